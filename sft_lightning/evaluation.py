"""Generation on held-out prompts while training: what the loss cannot show (a model that never stops, answers in the
wrong language, a template that drifted), every N optimizer steps and at the end of training.

The prompts are validation conversations that end with an assistant turn: the messages before it are rendered as
``predict`` renders them (:func:`sft_lightning.loaders.render_prompt_ids`), and its text is the reference. A fixed
subset is taken once (evenly spread over the validation files), so every evaluation of a run answers the same
prompts. Each rank answers its share; under FSDP2 and ZeRO-3 every rank takes part in every forward (synced
generation), so the shares are equal in size.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import Callback
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from sft_lightning.checkpointing import run_folder
from sft_lightning.collate import collate_prompts
from sft_lightning.errors import ConfigError, DataError, TemplateError
from sft_lightning.generation import GenerationSettings, Reply
from sft_lightning.layout import RunLayout, connected
from sft_lightning.loaders import render_prompt_ids
from sft_lightning.metrics import Tokenize, generation_metrics
from sft_lightning.records import read_records
from sft_lightning.render import SystemMessage, render_text
from sft_lightning.sources import Source


class HeldOutPrompt(NamedTuple):
    """A prompt to answer while training, with the answer the data gives."""

    prompt_ids: list[int]  # rendered with the generation prompt, as predict renders
    question: str  # the last user (or tool) message, for the samples shown in the logs
    reference: str
    location: str  # file and record
    answer_tokens: int  # the reference as the template renders it after the prompt: reasoning, tool calls, end of turn


def spread(count: int, total: int) -> list[int]:
    """``count`` indices of ``total`` items, evenly spaced from the first (all of them when ``count >= total``)."""
    if count >= total:
        return list(range(total))
    return [i * total // count for i in range(count)]


def held_out_prompts(
    sources: list[Source], tokenizer, count: int, max_length: int, skip_invalid: bool = False,
    system_message: SystemMessage = "auto", split_special_tokens: bool = False,
) -> list[HeldOutPrompt]:
    """At most ``count`` conversations of ``sources`` that end with an assistant answer, spread evenly over their
    files in order, each as the prompt predict would give (:func:`~sft_lightning.loaders.render_prompt_ids`) and
    its answer; prompts longer than ``max_length`` tokens are left out. ``skip_invalid``: as ``data.on_invalid``."""
    answered = [
        record
        for source in sources
        for file in source.files
        for record in read_records(file, skipped=Counter() if skip_invalid else None, format=source.format)
        if len(record.messages) > 1 and record.messages[-1]["role"] == "assistant" and record.messages[-1]["content"].strip()
    ]
    prompts = []
    for record in (answered[i] for i in spread(count, len(answered))):
        try:
            ids = render_prompt_ids(record, tokenizer, system_message, split_special_tokens)
            whole = render_text(tokenizer, record.messages, False, record.tools, system_message)
        except (DataError, TemplateError):
            if skip_invalid:  # left out of validation too
                continue
            raise
        if len(ids) <= max_length:
            answer_tokens = max(len(tokenizer.encode(whole, add_special_tokens=False)) - len(ids), 1)
            question, answer = record.messages[-2]["content"], record.messages[-1]["content"]
            prompts.append(HeldOutPrompt(ids, question, answer, record.location, answer_tokens))
    return prompts


def answer_budget(answer_tokens: int, most: int) -> int:
    """New tokens allowed for an answer: twice its rendered reference answer plus 16, at most ``most``. An answer
    that runs past it would not match its reference, and a model that has not learnt to stop shows as well there as
    at ``most`` (``eval/ended_with_eot`` 0), for a fraction of the decoding steps."""
    return min(2 * answer_tokens + 16, most)


def rank_share(count: int, processes: int, rank: int) -> list[int]:
    """Indices of ``count`` items answered by ``rank``: every rank gets the same number (items repeat from the start
    to fill the last round), so synced generation runs the same forwards everywhere."""
    rounds = -(-count // processes)
    return [(rank + processes * i) % count for i in range(rounds)]


def answer_metrics(replies: Sequence[Reply], references: Sequence[str], tokenize: Tokenize) -> dict[str, float]:
    """The logged figures of one evaluation: exact match, BLEU and ROUGE-L against the references, the share of
    answers that ended with the end-of-turn token (not cut at their budget) and their mean length in tokens."""
    scores = generation_metrics([r.text for r in replies], list(references), tokenize)
    return {
        "eval/exact_match": scores["exact_match"],
        "eval/bleu": scores["bleu"],
        "eval/rouge_l": scores["rouge_l"],
        "eval/ended_with_eot": sum(r.stopped for r in replies) / len(replies),
        "eval/answer_tokens": sum(r.tokens for r in replies) / len(replies),
    }


class GenerationEval(Callback):
    def __init__(
        self,
        every_n_steps: Optional[int] = 500,
        num_prompts: int = 32,
        max_new_tokens: Optional[int] = None,
        batch_size: int = 16,
        samples: int = 4,
        tokenize: Tokenize = "auto",
    ) -> None:
        """Greedy answers to held-out validation prompts, scored while training (on whenever ``data.val_path`` has
        conversations that end with an assistant turn).

        Args:
            every_n_steps: answer every this many optimizer steps, and once more when training ends; null: only when
                training ends.
            num_prompts: how many validation conversations are answered each time (a fixed subset, spread evenly
                over the validation files); 0 turns the evaluation off.
            max_new_tokens: most tokens of an answer (default: ``model.max_new_tokens``); each answer stops sooner,
                at twice its reference answer (as the template renders it) plus 16 tokens.
            batch_size: prompts generated together on each device (with the KV cache).
            samples: prompt / answer / reference rows shown as text in the logger (TensorBoard, W&B, MLflow) and
                written whole, every answer, to ``generations/stepNNNNNN.jsonl`` in the run's folder (beside ``checkpoints/``).
            tokenize: sacreBLEU tokenisation of BLEU and ROUGE-L (``auto``: ``zh`` when a reference has CJK text).

        Logged: ``eval/exact_match``, ``eval/bleu``, ``eval/rouge_l``, ``eval/ended_with_eot`` (the share of answers
        that ended with the end-of-turn token within that many tokens) and ``eval/answer_tokens``.
        """
        if every_n_steps is not None and every_n_steps < 1:
            raise ConfigError(f"eval.every_n_steps must be 1 or more, or null (only at the end); got {every_n_steps}")
        if num_prompts < 0 or batch_size < 1 or samples < 0:
            raise ConfigError("eval.num_prompts and eval.samples must be 0 or more, eval.batch_size 1 or more")
        self.every_n_steps = every_n_steps
        self.num_prompts = num_prompts
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.samples = samples
        self.tokenize = tokenize
        self._source: Optional[Callable[[int], list[HeldOutPrompt]]] = None
        self._layout: Optional[RunLayout] = None
        self._prompts: list[HeldOutPrompt] = []
        self._done_at: Optional[int] = None  # the optimizer step last evaluated

    def connect(self, prompts: Optional[Callable[[int], list[HeldOutPrompt]]]) -> None:
        """``prompts(n)``: at most ``n`` held-out prompts (the data module's :meth:`held_out_prompts`), asked for once
        the data is set up; None: there is no validation data."""
        self._source = prompts

    def connect_layout(self, layout: RunLayout) -> None:
        self._layout = layout

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or self._source is None or self.num_prompts == 0:
            return
        self._prompts = self._source(self.num_prompts)
        if not self._prompts:
            rank_zero_info("eval: no validation conversation ends with an assistant answer after a prompt of at most "
                           "data.max_length tokens, so nothing is generated")
            return
        when = f"every {self.every_n_steps} optimizer steps and " if self.every_n_steps else ""
        rank_zero_info(f"eval: {len(self._prompts)} held-out prompts answered greedily {when}when training ends")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._done_at:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self._done_at:
            self.evaluate(trainer, pl_module)

    def evaluate(self, trainer, pl_module) -> Optional[dict[str, float]]:
        """Answer the prompts, log the figures and samples; returns the figures (None where there are no prompts)."""
        if not self._prompts:
            return None
        layout = connected(self._layout, True, "eval")
        step, started = trainer.global_step, time.perf_counter()
        self._done_at = step
        most = self.max_new_tokens or pl_module.generation_settings.max_new_tokens
        # Similar answer lengths together: each batch decodes only as long as its own references ask.
        share = sorted(rank_share(len(self._prompts), layout.processes, layout.rank),
                       key=lambda i: self._prompts[i].answer_tokens)
        answers: dict[int, Reply] = {}
        was_training = pl_module.training
        pl_module.eval()  # no dropout; and transformers uses the KV cache with checkpointed layers only in eval mode
        try:
            for start in range(0, len(share), self.batch_size):
                chosen = share[start : start + self.batch_size]
                batch = collate_prompts([self._prompts[i].prompt_ids for i in chosen], pl_module.tokenizer.pad_token_id)
                # Each answer gets its own budget, so that what it says does not depend on the prompts beside it (nor
                # on the number of ranks); the batch decodes as long as its longest budget.
                limits = [answer_budget(self._prompts[i].answer_tokens, most) for i in chosen]
                settings = GenerationSettings(max(limits))
                answers.update(zip(chosen, pl_module.reply(batch.to(pl_module.device), settings, limits)))
        finally:
            pl_module.train(was_training)
        if layout.distributed:
            gathered = [None] * layout.processes
            dist.all_gather_object(gathered, answers)
            answers = {i: reply for part in gathered for i, reply in part.items()}
        replies = [answers[i] for i in range(len(self._prompts))]
        metrics = answer_metrics(replies, [p.reference for p in self._prompts], self.tokenize)
        folder = run_folder(trainer)  # may be a broadcast from rank 0: every rank asks
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        # Beside the validation metrics, so a checkpoint or early stopping may monitor them.
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})
        if trainer.is_global_zero:
            rows = [{"location": p.location, "question": p.question, "answer": r.text, "reference": p.reference,
                     "ended_with_eot": r.stopped, "tokens": r.tokens} for p, r in zip(self._prompts, replies)]
            self._write(rows, step, folder, trainer.loggers)
        rank_zero_info(
            f"eval at step {step}: {len(replies)} answers, exact match {metrics['eval/exact_match']:.3f}, BLEU "
            f"{metrics['eval/bleu']:.3f}, ROUGE-L {metrics['eval/rouge_l']:.3f}, ended with end-of-turn "
            f"{metrics['eval/ended_with_eot']:.3f}, {metrics['eval/answer_tokens']:.1f} tokens each "
            f"({time.perf_counter() - started:.1f} s)"
        )
        return metrics

    def _write(self, rows: list[dict], step: int, folder: Optional[Path], loggers) -> None:
        if folder is not None:
            path = folder / "generations" / f"step{step:06d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        if self.samples:
            log_samples(loggers, rows[: self.samples], step)


SAMPLE_COLUMNS = ("question", "answer", "reference")


def log_samples(loggers, rows: list[dict], step: int) -> None:
    """Prompt / answer / reference rows as each logger shows text: a TensorBoard text table, a W&B table, an MLflow
    text artifact (CSV logs numbers only: the rows are in ``generations/`` beside it)."""
    table = [[str(row[c]) for c in SAMPLE_COLUMNS] for row in rows]
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("eval/samples", markdown_table(table), global_step=step)
        elif isinstance(logger, WandbLogger):
            logger.log_text("eval/samples", columns=list(SAMPLE_COLUMNS), data=table, step=step)
        elif isinstance(logger, MLFlowLogger):
            logger.experiment.log_text(logger.run_id, markdown_table(table), f"eval/samples_step{step:06d}.md")


def markdown_table(rows: list[list[str]]) -> str:
    """A Markdown table (TensorBoard renders its text as Markdown); ``|`` and line breaks in cells escaped."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(SAMPLE_COLUMNS) + " |", "|" + "---|" * len(SAMPLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
