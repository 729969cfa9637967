"""Write predictions as JSONL (or a JSON array), one object per input in input order, and score them where references exist."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter

from sft_lightning.metrics import Tokenize, generation_metrics
from sft_lightning.records import Record


class JsonlPredictionWriter(BasePredictionWriter):
    def __init__(
        self, output_path: str, records: Callable[[], Sequence[Record]], metrics_tokenize: Tokenize = "auto"
    ) -> None:
        """Args:
        output_path: JSONL file (UTF-8, any script as itself); each line holds the input ``messages`` and the
            generated ``prediction``; a path ending in ``.json`` gets the same objects as one JSON array.
        records: the prediction inputs, in order (asked for when writing: they are read in the data's setup);
            each prediction carries its record's index.
        metrics_tokenize: tokenisation for BLEU and ROUGE-L (see :func:`~sft_lightning.metrics.choose_tokenize`).
        """
        super().__init__(write_interval="epoch")
        self.output_path = Path(output_path)
        self.records = records
        self.metrics_tokenize = metrics_tokenize

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        rows = [row for batch in predictions for row in batch]
        if dist.is_available() and dist.is_initialized():
            gathered = [None] * trainer.world_size
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if not trainer.is_global_zero:
            return
        by_index = {row["index"]: row["prediction"] for row in rows}  # a distributed sampler may repeat rows
        records = self.records()
        self.output_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.output_path.with_name(self.output_path.name + ".partial")
        written = ({"messages": record.messages, "prediction": by_index[index]} for index, record in enumerate(records))
        with partial.open("w", encoding="utf-8") as out:
            if self.output_path.suffix == ".json":  # the seed trainer's predictions.json: what json.load reads
                json.dump(list(written), out, ensure_ascii=False, indent=1)
                out.write("\n")
            else:
                out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in written)
        os.replace(partial, self.output_path)
        print(f"wrote {len(records)} predictions to {self.output_path}")
        scored = [(by_index[i], r.messages[-1]["content"]) for i, r in enumerate(records) if r.messages[-1]["role"] == "assistant"]
        if scored:
            self._write_metrics(*zip(*scored))

    def _write_metrics(self, predictions, references) -> None:
        """Inputs that end with an assistant turn carry a reference answer: score the predictions against them."""
        metrics = generation_metrics(list(predictions), list(references), self.metrics_tokenize)
        path = self.output_path.with_suffix(".metrics.json")
        path.write_text(json.dumps(metrics, indent=1) + "\n")
        print(
            f"{metrics['count']} predictions with a reference: exact match {metrics['exact_match']:.3f}, "
            f"BLEU {metrics['bleu']:.3f}, ROUGE-L {metrics['rouge_l']:.3f} ({metrics['tokenize']} tokenisation; "
            f"written to {path})"
        )
