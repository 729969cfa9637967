"""ChatMLDataModule: conversations in, supervised micro-batches out."""

from __future__ import annotations

import os
import time
from functools import partial
from typing import Any, Optional

import numpy as np
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, DistributedSampler

from sft_lightning.collate import PackedBatch
from sft_lightning.errors import ConfigError, DataError, check_range
from sft_lightning.formats import Format
from sft_lightning.layout import RunLayout, connected
from sft_lightning.evaluation import HeldOutPrompt, held_out_prompts
from sft_lightning.loaders import MicroBatchDataset, PromptDataset, ResumableLoader, collate_prompt_batch
from sft_lightning.mixture import Mixture, SampleSet, WeightBy
from sft_lightning.packing import pack_best_fit_decreasing, slice_packed
from sft_lightning.records import OnInvalid, Record
from sft_lightning.render import SystemMessage, TrainOn, load_tokenizer
from sft_lightning.sampling import Batching, StepPlan, StepPlanSampler, padding_fraction
from sft_lightning.sources import Sources, resolve_sources
from sft_lightning.preparing import Share
from sft_lightning.tokenized import tokenize_split


class ChatMLDataModule(LightningDataModule):
    def __init__(
        self,
        train_path: Optional[Sources] = None,
        val_path: Optional[Sources] = None,
        test_path: Optional[Sources] = None,
        predict_path: Optional[str] = None,
        tokenizer_path: Optional[str] = None,
        trust_remote_code: bool = False,
        max_length: int = 2048,
        batch_size: int = 8,
        eval_batch_size: Optional[int] = None,
        packing: bool = False,
        group_by_length: bool = False,
        max_tokens_per_batch: Optional[int] = None,
        num_workers: int = 0,
        train_on: TrainOn = "assistant",
        shuffle: bool = True,
        seed: int = 42,
        cache_dir: Optional[str] = "~/.cache/sft-lightning",
        preprocessing_workers: Optional[int] = None,
        on_invalid: OnInvalid = "error",
        format: Format = "auto",
        system_message: SystemMessage = "auto",
        split_special_tokens: bool = False,
        weight_by: WeightBy = "conversations",
    ) -> None:
        """Chat conversations (rows of ``{"messages": [...]}`` in JSON, JSONL, Parquet or a ``datasets`` folder)
        rendered with the model's template.

        Args:
            train_path: training conversations: a JSON/JSONL/Parquet file, a glob of them, a folder written by
                ``datasets``' ``save_to_disk``, or a list of such sources, each a path or ``{path, weight,
                conversations, format}``: ``weight`` is the source's share of each epoch among the weighted
                sources (a share above the source's size repeats samples, one below it subsamples; drawn once
                from ``seed``), ``conversations`` a fixed number per epoch, ``format`` the source's own row shape.
            val_path: validation conversations (``val_loss``, ``val_ppl``, ``val_acc``); sources as for training.
            test_path: test conversations (``test_loss``, ...); sources as for training.
            predict_path: conversations to answer (one file or ``datasets`` folder); each ends with a user turn,
                or with an assistant turn that is taken as the reference and not shown to the model.
            tokenizer_path: tokenizer folder or hub name; linked from ``model.model_name_or_path`` by the CLI.
            trust_remote_code: allow the tokenizer's own Python code; linked from the model.
            max_length: conversations longer than this many tokens keep their first ``max_length`` tokens; with
                ``packing``, the length of a packed row.
            batch_size: conversations per micro-batch on each device; with ``packing``, packed rows.
            eval_batch_size: micro-batch for validation, test and predict (default ``batch_size``).
            packing: pack conversations into rows of ``max_length`` tokens (best-fit decreasing). Positions
                restart at 0 for each conversation and attention never crosses one (block-diagonal mask, or
                FlashAttention's variable-length kernel), so the loss equals the unpacked loss. Applies to
                training, validation and test.
            group_by_length: without packing, batch conversations of similar length (sorted within windows
                of 50 batches, batches shuffled) to cut padding.
            max_tokens_per_batch: without packing, fill each micro-batch up to this many tokens (count x
                longest) instead of ``batch_size`` conversations; batches are cut once from the
                length-sorted data and shuffled each epoch.
            num_workers: DataLoader worker processes.
            train_on: ``assistant``: every assistant turn (content and the end-of-turn token); ``last``: the
                final assistant turn only; ``all``: every token of the conversation.
            shuffle: shuffle the training conversations (or rows) each epoch.
            seed: seed of the shuffle (the order depends on seed and epoch only) and of a mixture's draw.
            cache_dir: where tokenised files are kept, each keyed by its content, format, tokenizer, template,
                ``max_length`` and ``train_on`` (not by mixture weights), so a second run skips tokenisation (null:
                no cache).
            preprocessing_workers: processes that tokenise in parallel, on each rank (default: the CPUs of the
                node divided among its ranks, for JSONL files of 4 MB or more and other files of 5,000
                conversations or more). With a cache, every rank prepares its share of each file.
            on_invalid: ``error``: the first invalid conversation (bad JSON line, role, content, order, or one
                the chat template cannot render) stops the run with its file and line; ``skip``: invalid ones are
                left out and counted by reason in the setup summary.
            format: row shape of the files: ``auto`` recognises ChatML ``messages``, ShareGPT ``conversations``
                and Alpaca ``instruction``/``input``/``output`` row by row; or insist on one of them.
            system_message: under a chat template without a system role (Gemma 2), ``auto`` merges a leading
                system message into the first user turn (``system + "\\n\\n" + user``, as such models are prompted;
                counted in the setup summary), ``error`` refuses such conversations. Predict renders the same way,
                and so does chat.
            weight_by: what the weights of a list of sources share: ``conversations`` (samples) or ``tokens``
                (supervised tokens: a source of long answers gets fewer samples for the same weight); the setup
                summary shows both shares, planned and drawn.
            split_special_tokens: message text that spells a special token (``<|im_end|>``, ``<s>``) is an error,
                as the tokenizer would read the token itself; true reads it as plain text (in training and
                predict), while the template's own special tokens stay special.
        """
        super().__init__()
        self.save_hyperparameters()
        for name, value, least in (("max_length", max_length, 1), ("batch_size", batch_size, 1),
                                   ("eval_batch_size", eval_batch_size, 1), ("max_tokens_per_batch", max_tokens_per_batch, 1),
                                   ("num_workers", num_workers, 0), ("preprocessing_workers", preprocessing_workers, 0)):
            check_range(f"data.{name}", value, at_least=least)
        if packing and (group_by_length or max_tokens_per_batch):
            raise DataError("data.packing already fills rows; group_by_length and max_tokens_per_batch are for unpacked batches")
        self.tokenizer = None
        self._layout: Optional[RunLayout] = None
        self.splits: dict[str, Mixture | SampleSet] = {}  # and each evaluation source's samples, as val/<name>
        self._reported: set[str] = set()  # splits whose summary is printed
        self._prepared: dict[str, float] = {}  # seconds each split took to tokenise or read on this process
        self._preparation_share: Optional[Share] = None
        self._packed_rows: dict[str, list[list[int]]] = {}
        self._train_loader: Optional[ResumableLoader] = None
        self._source_tokens: Optional[tuple[int, np.ndarray]] = None  # (epoch, cumulative tokens per source)
        self._position: Optional[dict[str, Any]] = None  # the training position of a checkpoint being resumed
        self.predict_dataset: Optional[PromptDataset] = None

    def connect(self, tokenizer) -> None:
        """Render with ``tokenizer`` (the model's, loaded once by the CLI) instead of loading ``tokenizer_path``."""
        self.tokenizer = tokenizer

    def connect_layout(self, layout: RunLayout) -> None:
        """Plan the micro-batches for ``layout`` (:class:`~sft_lightning.layout.ConnectRunLayout` calls this)."""
        if layout.sequence_parallel_size > 1 and not self.hparams.packing:
            raise ConfigError(f"sequence_parallel_size {layout.sequence_parallel_size} splits packed rows along their "
                              "length: set data.packing true")
        self._layout = layout

    @property
    def layout(self) -> RunLayout:
        return connected(self._layout, self.trainer is not None, "data module")

    def _load_tokenizer(self) -> None:
        if self.tokenizer is not None:
            return
        if self.hparams.tokenizer_path is None:
            raise DataError("data.tokenizer_path is not set (the CLI links it from model.model_name_or_path)")
        self.tokenizer = load_tokenizer(self.hparams.tokenizer_path, self.hparams.trust_remote_code)

    def _split_names(self, stage: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """(required, optional) tokenised splits of a stage."""
        required = {"fit": ("train",), "validate": ("val",), "test": ("test",), "predict": ()}[stage]
        return required, ("val",) if stage == "fit" else ()

    def _tokenize(self, name: str) -> Mixture:
        """Each file of each source tokenised on its own (and cached so), then the mixture drawn from them."""
        h = self.hparams
        layout = self._run_layout()
        share, workers = self._share(layout), h.preprocessing_workers
        if workers is None and layout.processes_per_node > 1:
            # The ranks on a node share its CPUs; with a cache each prepares its share of every file.
            workers = max((os.cpu_count() or 1) // layout.processes_per_node, 1)
        sources = resolve_sources(h[f"{name}_path"], f"{name}_path", h.format)
        parts = [
            [tokenize_split(str(file), self.tokenizer, h.max_length, h.train_on, h.cache_dir, workers,
                            on_invalid=h.on_invalid, format=source.format, system_message=h.system_message,
                            split_special_tokens=h.split_special_tokens, share=share) for file in source.files]
            for source in sources
        ]
        return Mixture(sources, parts, h.seed, f"{name}_path", h.weight_by)

    def _run_layout(self) -> RunLayout:
        """The connected layout; before it is (Lightning calls the data module's setup before the callbacks' and
        prepare_data before both), the trainer's, read by the layout itself; one process without a trainer."""
        if self._layout is not None:
            return self._layout
        return RunLayout.of(self.trainer) if self.trainer is not None else RunLayout()

    def _share(self, layout: RunLayout) -> Optional[Share]:
        """This process's part in preparing the data with the others of a multi-process run (with a cache): every
        rank renders its share of each file into it, all read all; made once, by every process (a collective)."""
        if self.hparams.cache_dir is None or not layout.distributed:
            return None
        if self._preparation_share is None:
            self._preparation_share = Share.of_run(layout)
        return self._preparation_share

    def tokenized(self, name: str) -> Mixture:
        """The ``train``, ``val`` or ``test`` split, tokenised (into the cache, or read from it) once and kept, with
        how long that took (:meth:`preparation`)."""
        if name not in self.splits:
            self._load_tokenizer()
            started = time.perf_counter()
            self.splits[name] = self._tokenize(name)
            self._prepared[name] = time.perf_counter() - started
        return self.splits[name]

    def preparation(self, name: str) -> str:
        """How long tokenising (or reading from the cache) a split took on this process, and at what rate."""
        split, seconds = self.splits[name], self._prepared.get(name, 0.0)
        cached = all(source.from_cache for source in split.sources)
        read = sum(source.read for source in split.sources)
        ranks = {rank for source in split.sources for part in source.parts if not part.from_cache for rank in part.shares}
        shared = f" (by {len(ranks)} processes, each its share)" if len(ranks) > 1 else ""
        return (f"{name} prepared in {seconds:.1f} s: {read / max(seconds, 1e-9):,.0f} conversations/s"
                f"{' (read from the cache)' if cached else shared}")

    @property
    def cache_folder(self) -> str:
        return os.path.expanduser(self.hparams.cache_dir)

    def prepare_data(self) -> None:
        # One process alone: tokenised before the loggers make their folders, so that bad data leaves nothing behind.
        # Several: every rank prepares its share of each file in setup() (see _share).
        if self.trainer is None or self._run_layout().distributed:
            return
        for name in sum(self._split_names(self.trainer.state.fn.value), ()):
            if self.hparams[f"{name}_path"] is not None:
                # Kept, so that setup() neither reads it back nor calls a fresh split "cached".
                self.tokenized(name)

    def setup(self, stage: str) -> None:
        self._load_tokenizer()
        required, optional = self._split_names(stage)
        for name in required + optional:
            if self.hparams[f"{name}_path"] is None:
                if name in required:
                    raise DataError(f"data.{name}_path is required for {stage}")
                continue
            self.tokenized(name)
            if name not in self._reported:
                self._reported.add(name)
                rank_zero_info(self.splits[name].summary(name))
                rank_zero_info(self.preparation(name))
                rank_zero_info(f"{name} batching: {self.batching(name)}")
        if stage == "predict":
            if self.hparams.predict_path is None:
                raise DataError("data.predict_path is required for predict")
            h = self.hparams
            self.predict_dataset = PromptDataset(
                h.predict_path, self.tokenizer, h.format, h.system_message, h.split_special_tokens
            )

    def predict_records(self) -> list[Record]:
        """The prediction inputs as read (after :meth:`setup` for predict), in file order."""
        if self.predict_dataset is None:
            raise RuntimeError("predict_records() before setup('predict')")
        return self.predict_dataset.records

    def held_out_prompts(self, count: int) -> list[HeldOutPrompt]:
        """At most ``count`` validation conversations that end with an answer, as predict renders their prompts
        (:func:`~sft_lightning.evaluation.held_out_prompts`), for evaluation while training."""
        h = self.hparams
        self._load_tokenizer()
        sources = resolve_sources(h.val_path, "val_path", h.format)
        return held_out_prompts(sources, self.tokenizer, count, h.max_length, h.on_invalid == "skip", h.system_message,
                                h.split_special_tokens)

    def _rows(self, name: str) -> list[list[int]]:
        """Packed rows of a split, built once (deterministic, so every rank and a resumed run agree)."""
        if name not in self._packed_rows:
            self._packed_rows[name] = pack_best_fit_decreasing(self.splits[name].lengths, self.hparams.max_length)
        return self._packed_rows[name]

    def _plan(self, name: str, training: bool, single_process: bool = False, plain: bool = False) -> StepPlan:
        """The micro-batch plan of a split; ``plain``: without packing or grouping, to compare against."""
        h, split = self.hparams, self.splits[name]
        packed = h.packing and not plain
        lengths, supervised = split.lengths, split.supervised_tokens
        if packed:
            rows = self._rows(name)
            lengths = tuple(sum(lengths[i] for i in row) for row in rows)
            supervised = tuple(sum(supervised[i] for i in row) for row in rows)
        layout = RunLayout() if single_process else self.layout
        return StepPlan(
            supervised,
            batch_size=h.batch_size if training else self._eval_batch_size,
            accumulate_grad_batches=layout.accumulation if training else 1,
            num_replicas=layout.data_parallel_size,
            rank=layout.data_parallel_rank,
            shuffle=training and h.shuffle,
            seed=h.seed,
            lengths=lengths,
            group_by_length=h.group_by_length and not plain,
            max_tokens=None if plain else h.max_tokens_per_batch,
        )

    def batching(self, name: str) -> Batching:
        """How a tokenised split is batched, and how much of each micro-batch is padding (as configured, and as a
        plain padded batching would be)."""
        h, training = self.hparams, name == "train"
        configured = padding_fraction(self._plan(name, training, single_process=True))
        if not (h.packing or h.group_by_length or h.max_tokens_per_batch):
            return Batching("", configured, None)
        plain = padding_fraction(self._plan(name, training, single_process=True, plain=True))
        how = (
            f"packed {len(self.splits[name])} conversations into {len(self._rows(name))} rows of <= {h.max_length} tokens"
            if h.packing else "grouped by length"
        )
        return Batching(how, configured, plain)

    def trained_tokens_by_source(self) -> dict[str, int]:
        """Supervised tokens trained so far from each training source, all ranks together, by source name (for the
        training logs); empty for a single source. Read off the plan at the loader's position: no communication."""
        mixture, loader = self.splits.get("train"), self._train_loader
        if loader is None or mixture is None or len(mixture.sources) == 1:
            return {}
        if self._source_tokens is None or self._source_tokens[0] != loader.epoch:
            rows = self._rows("train") if self.hparams.packing else None
            batches = loader.sampler.plan.global_micro_batches(loader.epoch)
            self._source_tokens = (loader.epoch, mixture.cumulative_source_tokens(batches, rows))
        cumulative = self._source_tokens[1]
        trained = cumulative[-1] * loader.epoch + cumulative[min(loader.trained, len(cumulative) - 1)]
        return {source.source.name: int(tokens) for source, tokens in zip(mixture.sources, trained)}

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position and RNG states (:class:`~sft_lightning.loaders.ResumableLoader`).

        Kept here rather than only in the loader's own state: Lightning 2.6.6 restores loader states with the
        loops, after ``configure_optimizers`` (through ``trainer.estimated_stepping_batches``) has already built
        the loader and drawn its iterator; a data module's state is restored before that.
        """
        if self._train_loader is None:
            return {}
        return {**self._train_loader.state_dict(), "mixture": self.splits["train"].fingerprint()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._position = state_dict or None

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        # Called once for every micro-batch as training takes it (and for evaluation batches, not counted).
        if self.trainer.training and self._train_loader is not None:
            self._train_loader.count_trained()
        layout = self.layout
        if isinstance(batch, PackedBatch) and layout.sequence_parallel_size > 1:
            # Every rank of a sequence group has the whole micro-batch here, on the host; it keeps its own slice.
            return slice_packed(batch, layout.sequence_parallel_rank, layout.sequence_parallel_size)
        return batch

    def _loader(self, name: str, training: bool) -> ResumableLoader | DataLoader:
        rows = self._rows(name) if self.hparams.packing else None
        loader = (ResumableLoader if training else DataLoader)(
            MicroBatchDataset(self.splits[name], self.tokenizer.pad_token_id, rows),
            sampler=StepPlanSampler(self._plan(name, training)),
            batch_size=None,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
            pin_memory=self._pin_memory,
        )
        if not training:
            return loader
        self._train_loader = loader
        if self._position is not None:  # from a checkpoint: continue where it stopped
            self.splits["train"].check_position(self._position.get("mixture"))
            self._train_loader.load_state_dict(self._position)
        return self._train_loader

    @property
    def _pin_memory(self) -> bool:
        """Page-locked batches where they go to a GPU: their copy there is then asynchronous (no wait per batch)."""
        return self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"

    @property
    def _eval_batch_size(self) -> int:
        return self.hparams.eval_batch_size or self.hparams.batch_size

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", training=True)

    def source_names(self, name: str) -> list[str]:
        """The sources of the ``val`` or ``test`` split by name when there are several: each gets a loader of its own
        (in this order) and metrics of its own (``val_loss/<name>``); an empty list for one source or none."""
        value = self.hparams[f"{name}_path"]
        if value is None or isinstance(value, (str, os.PathLike)):
            return []
        sources = resolve_sources(value, f"{name}_path", self.hparams.format)
        return [source.name for source in sources] if len(sources) > 1 else []

    def _evaluation_loaders(self, name: str) -> Any:
        """One loader for the split, or one per source where there are several (each source's drawn samples packed
        and batched on their own: the metrics of each equal validating that source alone)."""
        mixture = self.splits[name]
        if len(mixture.sources) == 1:
            return self._loader(name, training=False)
        loaders = []
        for source in mixture.sources:
            part = f"{name}/{source.source.name}"
            if part not in self.splits:
                self.splits[part] = SampleSet(source.parts, source.drawn)
            loaders.append(self._loader(part, training=False))
        return loaders

    def val_dataloader(self) -> Any:
        return self._evaluation_loaders("val") if "val" in self.splits else []

    def test_dataloader(self) -> Any:
        return self._evaluation_loaders("test")

    def predict_dataloader(self) -> DataLoader:
        layout = self.layout
        # Every rank runs the same number of batches: a sharded model (FSDP2, ZeRO-3) gathers its weights in each
        # forward, with every rank taking part. DistributedSampler fills the last batches by repeating prompts; the
        # writer keeps one answer per prompt. (Lightning's own predict sampler leaves the counts unequal.)
        sampler = None
        if layout.distributed:
            sampler = DistributedSampler(self.predict_dataset, layout.processes, layout.rank, shuffle=False)
        return DataLoader(
            self.predict_dataset,
            sampler=sampler,
            batch_size=self._eval_batch_size,
            collate_fn=partial(collate_prompt_batch, pad_token_id=self.tokenizer.pad_token_id),
            num_workers=self.hparams.num_workers,
            pin_memory=self._pin_memory,
        )
