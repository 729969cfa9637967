"""ChatMLDataModule: conversations in, supervised micro-batches out."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Optional

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from sft_lightning.collate import collate_prompts, collate_training
from sft_lightning.errors import DataError, TemplateError
from sft_lightning.records import read_records
from sft_lightning.render import (
    IGNORE_INDEX,
    RenderedSample,
    TrainOn,
    load_tokenizer,
    render_conversation,
    render_prompt,
)
from sft_lightning.sampling import MicroBatch, StepPlan, StepPlanSampler


@dataclass
class TokenizedSplit:
    """A split rendered and masked, with what happened on the way (for the setup summary)."""

    path: str
    samples: list[RenderedSample] = field(default_factory=list)
    read: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)

    def summary(self, name: str) -> str:
        supervised = sum(s.supervised_tokens for s in self.samples)
        mean = sum(len(s.input_ids) for s in self.samples) / max(len(self.samples), 1)
        why = ", ".join(f"{count} {reason}" for reason, count in self.dropped.items()) or "none"
        return (
            f"{name} ({self.path}): {self.read} conversations read, {sum(self.dropped.values())} dropped ({why}), "
            f"{self.truncated} truncated, {len(self.samples)} kept, {supervised} supervised tokens, "
            f"mean length {mean:.1f} tokens"
        )


def tokenize_split(path: str, tokenizer, max_length: int, train_on: TrainOn) -> TokenizedSplit:
    split = TokenizedSplit(path)
    for record in read_records(path):
        split.read += 1
        try:
            sample = render_conversation(record.messages, tokenizer, train_on, max_length)
        except TemplateError as err:
            raise DataError(f"{record.location}: {err}") from None
        split.truncated += sample.truncated
        if sample.supervised_tokens == 0:
            split.dropped["with no supervised token left after truncation"] += 1
            continue
        split.samples.append(sample)
    if not split.samples:
        raise DataError(f"{path}: no conversation has a supervised token within max_length={max_length}")
    return split


class MicroBatchDataset(Dataset):
    """Indexed by :class:`MicroBatch`: returns the padded micro-batch, ready for the loss."""

    def __init__(self, samples: list[RenderedSample], pad_token_id: int) -> None:
        self.samples = samples
        self.pad_token_id = pad_token_id

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, micro: MicroBatch) -> dict[str, torch.Tensor]:
        chosen = [self.samples[i] for i in micro.indices]
        labels = [[IGNORE_INDEX] * len(s.labels) if micro.ghost else s.labels for s in chosen]
        batch = collate_training([s.input_ids for s in chosen], labels, self.pad_token_id)
        batch["step_supervised_tokens"] = torch.tensor(micro.step_supervised_tokens)
        return batch


class PromptDataset(Dataset):
    """Prediction inputs: each conversation up to its last user turn, rendered with the generation prompt."""

    def __init__(self, path: str, tokenizer) -> None:
        self.records = read_records(path, require_assistant=False)
        self.prompts = []
        for record in self.records:
            shown = prompt_messages(record.messages)
            if shown[-1]["role"] != "user":
                raise DataError(f"{record.location}: a prediction input must end with a user turn")
            try:
                self.prompts.append(render_prompt(shown, tokenizer))
            except TemplateError as err:
                raise DataError(f"{record.location}: {err}") from None

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> tuple[int, list[int]]:
        return index, self.prompts[index]


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The messages shown to the model: a final assistant turn is the reference answer, not input."""
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


def _collate_prompt_batch(items: list[tuple[int, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    batch = collate_prompts([prompt for _, prompt in items], pad_token_id)
    batch["index"] = torch.tensor([index for index, _ in items])
    return batch


class ChatMLDataModule(LightningDataModule):
    def __init__(
        self,
        train_path: Optional[str] = None,
        val_path: Optional[str] = None,
        test_path: Optional[str] = None,
        predict_path: Optional[str] = None,
        tokenizer_path: Optional[str] = None,
        trust_remote_code: bool = False,
        max_length: int = 2048,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        num_workers: int = 0,
        train_on: TrainOn = "assistant",
        shuffle: bool = True,
        seed: int = 42,
    ) -> None:
        """Chat conversations (JSON array or JSONL of ``{"messages": [...]}``) rendered with the model's template.

        Args:
            train_path: training conversations.
            val_path: validation conversations (``val_loss``, ``val_ppl``, ``val_acc``).
            test_path: test conversations (``test_loss``, ...).
            predict_path: conversations to answer; each ends with a user turn, or with an assistant turn that
                is taken as the reference and not shown to the model.
            tokenizer_path: tokenizer folder or hub name; linked from ``model.model_name_or_path`` by the CLI.
            trust_remote_code: allow the tokenizer's own Python code; linked from the model.
            max_length: conversations longer than this many tokens keep their first ``max_length`` tokens.
            batch_size: conversations per micro-batch on each device.
            eval_batch_size: micro-batch for validation, test and predict (default ``batch_size``).
            num_workers: DataLoader worker processes.
            train_on: ``assistant``: every assistant turn (content and the end-of-turn token); ``last``: the
                final assistant turn only; ``all``: every token of the conversation.
            shuffle: shuffle the training conversations each epoch.
            seed: seed of the shuffle (the order depends on seed and epoch only).
        """
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer = None
        self.splits: dict[str, TokenizedSplit] = {}
        self.predict_dataset: Optional[PromptDataset] = None

    def setup(self, stage: str) -> None:
        if self.hparams.tokenizer_path is None:
            raise DataError("data.tokenizer_path is not set (the CLI links it from model.model_name_or_path)")
        self.tokenizer = load_tokenizer(self.hparams.tokenizer_path, self.hparams.trust_remote_code)
        required = {"fit": ("train",), "validate": ("val",), "test": ("test",), "predict": ()}[stage]
        optional = ("val",) if stage == "fit" else ()
        for name in required + optional:
            path = self.hparams[f"{name}_path"]
            if path is None:
                if name in required:
                    raise DataError(f"data.{name}_path is required for {stage}")
                continue
            if name not in self.splits:
                split = tokenize_split(path, self.tokenizer, self.hparams.max_length, self.hparams.train_on)
                rank_zero_info(split.summary(name))
                self.splits[name] = split
        if stage == "predict":
            if self.hparams.predict_path is None:
                raise DataError("data.predict_path is required for predict")
            self.predict_dataset = PromptDataset(self.hparams.predict_path, self.tokenizer)

    def _loader(self, name: str, training: bool) -> DataLoader:
        split = self.splits[name]
        trainer = self.trainer
        plan = StepPlan(
            tuple(s.supervised_tokens for s in split.samples),
            batch_size=self.hparams.batch_size if training else self._eval_batch_size,
            accumulate_grad_batches=trainer.accumulate_grad_batches if training and trainer else 1,
            num_replicas=trainer.world_size if trainer else 1,
            rank=trainer.global_rank if trainer else 0,
            shuffle=training and self.hparams.shuffle,
            seed=self.hparams.seed,
        )
        return DataLoader(
            MicroBatchDataset(split.samples, self.tokenizer.pad_token_id),
            sampler=StepPlanSampler(plan),
            batch_size=None,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    @property
    def _eval_batch_size(self) -> int:
        return self.hparams.eval_batch_size or self.hparams.batch_size

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", training=True)

    def val_dataloader(self) -> Any:
        return self._loader("val", training=False) if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", training=False)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.predict_dataset,
            batch_size=self._eval_batch_size,
            collate_fn=partial(_collate_prompt_batch, pad_token_id=self.tokenizer.pad_token_id),
            num_workers=self.hparams.num_workers,
        )
