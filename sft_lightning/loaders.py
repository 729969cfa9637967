"""What the data loaders read: micro-batches of a tokenised split, prediction prompts, and the training loader
that knows where training is in its data (with the RNG states), so that a resumed run continues exactly."""

from __future__ import annotations

import random
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sft_lightning.collate import PromptBatch, TrainingBatch, collate_prompts, collate_training
from sft_lightning.errors import DataError, TemplateError
from sft_lightning.formats import Format
from sft_lightning.packing import collate_packed
from sft_lightning.records import Record, read_records
from sft_lightning.render import IGNORE_INDEX, SystemMessage, render_prompt
from sft_lightning.sampling import MicroBatch, StepPlanSampler
from sft_lightning.tokenized import TokenizedSplit


class MicroBatchDataset(Dataset):
    """Indexed by :class:`MicroBatch`: returns the padded (or packed) micro-batch, ready for the loss."""

    def __init__(self, split: TokenizedSplit, pad_token_id: int, rows: Optional[list[list[int]]] = None) -> None:
        self.split = split
        self.pad_token_id = pad_token_id
        self.rows = rows  # packed: each unit is a row of sample indices

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else len(self.split)

    def __getitem__(self, micro: MicroBatch) -> TrainingBatch:
        def sample(index: int) -> tuple[np.ndarray, np.ndarray]:
            ids, labels = self.split.sample(index)
            # A ghost (a rank with nothing left) runs like the others and trains nothing: its labels are masked
            # before collation, so the positions scored and the counts say so too.
            return ids, np.full_like(labels, IGNORE_INDEX) if micro.ghost else labels

        if self.rows is None:
            chosen = [sample(i) for i in micro.indices]
            return collate_training([ids for ids, _ in chosen], [labels for _, labels in chosen], self.pad_token_id,
                                    micro.step_supervised_tokens, ghost=micro.ghost)
        rows = [[sample(i) for i in self.rows[r]] for r in micro.indices]
        return collate_packed(rows, self.pad_token_id, micro.step_supervised_tokens, ghost=micro.ghost)


class PromptDataset(Dataset):
    """Prediction inputs: each conversation up to its last user turn, rendered with the generation prompt."""

    def __init__(
        self, path: str, tokenizer, format: Format = "auto", system_message: SystemMessage = "auto",
        split_special_tokens: bool = False,
    ) -> None:
        self.records = read_records(path, require_assistant=False, format=format)
        self.prompts = [render_prompt_ids(r, tokenizer, system_message, split_special_tokens) for r in self.records]

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> tuple[int, list[int]]:
        return index, self.prompts[index]


def prompt_messages(messages: list[dict]) -> list[dict]:
    """The messages shown to the model: a final assistant turn is the reference answer, not input."""
    return messages[:-1] if messages[-1]["role"] == "assistant" else messages


def render_prompt_ids(
    record: Record, tokenizer, system_message: SystemMessage = "auto", split_special_tokens: bool = False
) -> list[int]:
    """The ids generation starts from for ``record`` (its messages without a final assistant turn, then the
    generation prompt), as predict and the evaluation while training give them; one-line :class:`DataError`."""
    shown = prompt_messages(record.messages)
    if shown[-1]["role"] not in ("user", "tool"):
        raise DataError(f"{record.location}: a prediction input must end with a user turn or tool results")
    try:
        return render_prompt(shown, tokenizer, record.tools, system_message, split_special_tokens)
    except TemplateError as err:
        raise DataError(f"{record.location}: {err}") from None


def collate_prompt_batch(items: list[tuple[int, list[int]]], pad_token_id: int) -> PromptBatch:
    return collate_prompts([prompt for _, prompt in items], pad_token_id, [index for index, _ in items])


class ResumableLoader(DataLoader):
    """The training loader, with the state a resumed run needs: the epoch, the micro-batches of it trained, and
    the RNG states (dropout continues as it would have).

    The state goes into every checkpoint through the data module's ``state_dict`` (see
    :meth:`ChatMLDataModule.state_dict` for why there), and having it makes the loader stateful to Lightning, which
    then knows a mid-epoch resume is exact. Trained micro-batches are counted by :meth:`count_trained` as training
    takes each one, not as the loader yields them: Lightning fetches one batch ahead. Built like any DataLoader
    (so Lightning can rebuild it), over a :class:`StepPlanSampler`.

    The data's epoch is counted here, from what training took, not taken from Lightning's ``set_epoch``: an iterator
    continues the epoch where training stopped, and begins the next one once every micro-batch of it was trained.
    Lightning 2.6.6, resumed from a checkpoint written at the end of an epoch (validation there saves one), numbers
    every later epoch one higher than the run that wrote it: following it would skip an epoch's order of the data.
    """

    sampler: StepPlanSampler
    epoch = 0  # the data's epoch
    trained = 0  # micro-batches of it handed to training

    def __iter__(self):
        if self.trained >= len(self.sampler):
            self.epoch, self.trained = self.epoch + 1, 0
        self.sampler.start_at(self.epoch, self.trained)
        return super().__iter__()

    def count_trained(self) -> None:
        self.trained += 1

    def state_dict(self) -> dict[str, Any]:
        epoch, done = self.epoch, self.trained
        return {"epoch": epoch, "micro_batches_done": done, "rng": rng_states(),
                "trained": self.sampler.plan.trained_digest(epoch, done)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        epoch, done = state_dict["epoch"], state_dict["micro_batches_done"]
        saved = state_dict.get("trained")
        if saved is not None and saved != self.sampler.plan.trained_digest(epoch, done):
            raise DataError(
                f"data: the checkpoint trained {done} micro-batches of epoch {epoch}, and this run's plan puts other "
                "samples in them (another data.seed, batch_size, packing or number of devices, or edited data): "
                "resuming there would replay or skip samples; resume with the checkpoint's settings, or start a new "
                "run from the exported hf_model/"
            )
        self.epoch, self.trained = epoch, done
        set_rng_states(state_dict["rng"])


def rng_states() -> dict[str, Any]:
    """Every RNG a training step may draw from, in types that ``torch.load(weights_only=True)`` accepts."""
    kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [kind, keys.tolist(), position, has_gauss, gauss],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), position, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
