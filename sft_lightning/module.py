"""SFTLitModule: a Hugging Face causal LM trained with the token-exact loss."""

from __future__ import annotations

import inspect
from typing import Literal, Optional

import torch
from lightning.pytorch import LightningModule

from sft_lightning.adapters import LoRA, Quantization, add_lora, as_lora, quantization_config
from sft_lightning.attention import SDPA_VARLEN, check_packing, model_inputs
from sft_lightning.checkpointing import drop_head_copy, newest_checkpoint, portable_arguments
from sft_lightning.collate import BatchCounts, PackedBatch, PackedSlice, PromptBatch, TrainingBatch
from sft_lightning.errors import ConfigError, check_range
from sft_lightning.generation import GenerationSettings, Reply, generate_replies
from sft_lightning.language_model import DType, build_causal_lm, prepare_for_training
from sft_lightning.layout import RunLayout, connected
from sft_lightning.lm_head import CHUNK_ABOVE_MB, CHUNK_TOKENS, ChunkedLMHead
from sft_lightning.moe import MoE, StepRouter, moe_of, router_balance
from sft_lightning.nonfinite import NonFiniteGuard, nonfinite_error
from sft_lightning.loss import EvaluationMetrics, TokenStats, gather_supervised, micro_batch_loss, token_stats
from sft_lightning.render import load_tokenizer, stop_token_ids
from sft_lightning.throughput import FlopParameters, matmul_parameters, training_flops
from sft_lightning.strategy_model import StrategyModel, decay_groups, strategy_model, warmup_schedule

class SFTLitModule(LightningModule):
    def __init__(
        self,
        model_name_or_path: str,
        torch_dtype: DType = "float32",
        trust_remote_code: bool = False,
        attn_implementation: Optional[str] = SDPA_VARLEN,
        gradient_checkpointing: bool = False,
        activation_offloading: bool = False,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine",
        adam_betas: tuple[float, float] = (0.9, 0.999),
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        packing_check: bool = True,
        lm_head_chunk_tokens: Optional[int] = CHUNK_TOKENS,
        lm_head_chunk_above_mb: float = CHUNK_ABOVE_MB,
        nonfinite_patience: int = 5,
        lora: Optional[LoRA] = None,
        quantization: Optional[Quantization] = None,
    ) -> None:
        """A causal LM from a local Hugging Face folder or a hub name, fine-tuned on supervised tokens only.

        Args:
            model_name_or_path: folder or hub name loaded with ``AutoModelForCausalLM.from_pretrained``; the
                tokenizer comes from the same place.
            torch_dtype: dtype the weights are loaded in; keep ``float32`` master weights with a
                ``*-mixed`` trainer precision.
            trust_remote_code: allow the model's own Python code from its folder or the hub.
            attn_implementation: ``sdpa_varlen`` (``sdpa`` that runs packed samples one by one instead of
                through a dense block mask), ``sdpa``, ``eager`` or ``flash_attention_2`` (variable-length kernel
                for packed rows); None: transformers' default.
            gradient_checkpointing: recompute activations in the backward pass to save memory.
            activation_offloading: with gradient_checkpointing, keep each decoder layer's input (what the
                recompute needs) in pinned host memory instead of the GPU, for samples too long otherwise: a copy
                each way per layer and micro-batch (transformers' ``activation_checkpointing_enable(offload=True)``).
            learning_rate: peak AdamW learning rate.
            weight_decay: AdamW weight decay, not applied to biases and norm weights.
            warmup_ratio: fraction of the optimizer steps spent warming up linearly from 0.
            lr_scheduler: decay after warmup.
            adam_betas: AdamW betas.
            max_new_tokens: predict: most tokens generated per answer.
            temperature: predict: 0 decodes greedily; above 0 samples at this temperature.
            top_p: predict: nucleus sampling mass.
            packing_check: in the first packed forward (training, validation or test), pack two spans of the batch
                and refuse to go on if the second one's logits change when the first one does (an attention
                backend that lets packed samples see each other).
            lm_head_chunk_tokens: the LM head and the loss run this many supervised positions at a time, forward and
                backward (recomputed), so a big vocabulary's logits never exist whole (a 151,936-token vocabulary:
                ~0.3 GB of float32 logits per 512 positions); null: the whole micro-batch at once. Models that
                transform their logits after the head (Gemma 2 soft-capping) always run whole, with a line saying so.
            lm_head_chunk_above_mb: chunks only for a micro-batch whose logits would take more than this many MiB
                whole (positions x vocabulary x (2 or 4 + 8) bytes: the logits, their float32 copy and gradient);
                smaller ones are scored whole, as the chunks' recompute costs more than they save there (~12% of a
                step at a small vocabulary). 0: always in chunks.
            nonfinite_patience: an optimizer step whose loss or gradient is NaN or infinite is skipped (weights and
                optimizer state untouched) and counted in ``train_nonfinite_steps``; this many in a row stop the
                run with an error that names the last checkpoint, which holds only finite weights.
            lora: train low-rank adapters (peft) instead of all weights; the export merges them into the base.
            quantization: QLoRA: load the frozen base in ``4bit`` (NF4) or ``8bit`` (bitsandbytes, CUDA only;
                needs ``lora``).
        """
        super().__init__()
        if activation_offloading and not gradient_checkpointing:
            raise ConfigError("model.activation_offloading moves checkpointed layers' inputs: set model.gradient_checkpointing true")
        self.save_hyperparameters()
        check_range("model.learning_rate", learning_rate, above=0)
        check_range("model.weight_decay", weight_decay, at_least=0)
        check_range("model.warmup_ratio", warmup_ratio, at_least=0, at_most=1)
        check_range("model.max_new_tokens", max_new_tokens, at_least=1)
        check_range("model.temperature", temperature, at_least=0)
        check_range("model.top_p", top_p, above=0, at_most=1)
        check_range("model.lm_head_chunk_tokens", lm_head_chunk_tokens, at_least=1)
        check_range("model.lm_head_chunk_above_mb", lm_head_chunk_above_mb, at_least=0)
        check_range("model.nonfinite_patience", nonfinite_patience, at_least=1)
        self.model = None
        self.tokenizer = None
        self.stop_ids: list[int] = []  # end-of-turn (and eos) ids that end generation
        self.val_metrics = EvaluationMetrics()
        self.test_metrics = EvaluationMetrics()
        self._matmul_parameters = FlopParameters(0, 0)  # for flops()
        self._packing_checked = False
        self._keeps_logits = False
        self._added_tokens = 0  # rows the tokenizer adds to the pretrained vocabulary
        self._strategy: StrategyModel = StrategyModel()  # what the model does under the run's strategy (build)
        self._nonfinite = NonFiniteGuard(nonfinite_patience)
        self._step_loss = torch.zeros(())
        self._checkpoint_follows = False  # set by connect(): the weights come from a checkpoint, not the folder
        self._linear_layers = 0  # linear-attention layers that run packed rows sample by sample
        self._moe: Optional[MoE] = None  # the router balance of a mixture-of-experts model
        self._step_router = StepRouter()
        self._layout: Optional[RunLayout] = None  # connected by ConnectRunLayout once the processes exist

    @property
    def _attached_trainer(self):
        """The trainer, or None where the module runs without one (export, chat, tests). Lightning 2.6.6's
        ``self.trainer`` raises then; its private ``_trainer`` is the way to ask (used here only)."""
        return self._trainer

    @property
    def generation_settings(self) -> GenerationSettings:
        h = self.hparams
        return GenerationSettings(h.max_new_tokens, h.temperature, h.top_p)

    def connect(self, tokenizer, checkpoint_follows: bool = False) -> None:
        """Use ``tokenizer`` (loaded once from ``model_name_or_path`` by the CLI, shared with the data) instead of
        loading one in :meth:`configure_model`; ``checkpoint_follows``: the run loads a checkpoint's weights (resume,
        ``validate/test/predict --ckpt_path``), so the pretrained ones are never read."""
        self.tokenizer = tokenizer
        self._checkpoint_follows = checkpoint_follows

    def connect_layout(self, layout: RunLayout) -> None:
        """Scale the loss and reduce across ranks for ``layout`` (:class:`~sft_lightning.layout.ConnectRunLayout`)."""
        self._layout = layout

    @property
    def layout(self) -> RunLayout:
        return connected(self._layout, self._attached_trainer is not None, "model")

    def configure_model(self) -> None:
        # A QLoRA base is quantized as it is read, and its checkpoint holds the quantized weights: read it always.
        self.build(pretrained=not self._checkpoint_follows or self.hparams.quantization is not None)

    def build(self, pretrained: bool, materialize: bool = True) -> None:
        """The tokenizer and the model, once. ``pretrained=False``: the architecture without reading its weights,
        for a checkpoint's (:mod:`sft_lightning.checkpoint_loading`, or Lightning's ``ckpt_path``): parameters in empty
        host memory ready to be loaded into, or with ``materialize`` False still on the meta device, for
        ``load_state_dict(assign=True)`` (no second copy of the weights)."""
        if self.model is not None:
            return
        h = self.hparams
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(h.model_name_or_path, h.trust_remote_code)
        self.stop_ids = stop_token_ids(self.tokenizer)
        lora = as_lora(h.lora)
        trainer = self._attached_trainer
        self._strategy = strategy_model(trainer and trainer.strategy, lora is not None or h.quantization is not None)
        model = self._strategy.build(self._causal_lm, pretrained, materialize)
        self._matmul_parameters = matmul_parameters(model)
        self._moe = moe_of(model.config)
        # Checked before any strategy wraps the model (a wrapper's forward takes *args, **kwargs).
        self._keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
        if lora is not None:
            added = range(len(self.tokenizer) - self._added_tokens, len(self.tokenizer))
            model = add_lora(model, lora, quantized=h.quantization is not None, trainable_tokens=list(added))
        # from_pretrained returns eval mode; Lightning switches modes only around evaluation loops.
        self.model = model.train()

    def _causal_lm(self, pretrained: bool):
        """The Hugging Face model with the tokenizer's vocabulary and activation checkpointing as configured."""
        h = self.hparams
        model = build_causal_lm(
            h.model_name_or_path, h.torch_dtype, h.trust_remote_code, h.attn_implementation, pretrained,
            quantization_config(h.quantization, as_lora(h.lora)) if pretrained else None,
        )
        self._added_tokens, self._linear_layers = prepare_for_training(
            model, len(self.tokenizer), pretrained, h.gradient_checkpointing, h.activation_offloading,
            h.lm_head_chunk_tokens, h.lm_head_chunk_above_mb,
        )
        return model

    def flops(self, counts: BatchCounts) -> float:
        """FLOPs of a micro-batch's forward and backward (:func:`~sft_lightning.throughput.training_flops`)."""
        return training_flops(self.model.config, self._matmul_parameters, counts)

    def score(self, batch: TrainingBatch) -> TokenStats:
        """NLL sum, supervised-token count and correct predictions of a training batch (the loss and metrics'
        one source, in training, validation and test)."""
        self._strategy.before_forward(self.model)
        if isinstance(batch, (PackedBatch, PackedSlice)) and self.hparams.packing_check and not self._packing_checked:
            # Once per run, in the first packed forward on every rank.
            self._packing_checked = True
            check_packing(self.model, batch.input_ids, lambda t: self.all_gather(t).max(), self._linear_layers > 0)
        inputs, positions = model_inputs(batch, self.model.config._attn_implementation, self._strategy.sequence_group)
        if self._keeps_logits:
            inputs["logits_to_keep"] = positions.keep
        balancing = self._moe is not None and self.training
        if balancing:
            inputs["output_router_logits"] = True
        head = self.model.get_output_embeddings()  # looked up, not kept: a module attribute would be saved twice
        # use_cache=False is not an optimisation: with a cache, transformers skips the packed-sample mask.
        if isinstance(head, ChunkedLMHead):
            with head.scoring(positions, every_position=not self._keeps_logits):
                output = self.model(**inputs, use_cache=False)
            nll_sum, correct = output.logits
            stats = TokenStats(nll_sum, len(positions.targets), correct.round().long())
        else:
            output = self.model(**inputs, use_cache=False)
            logits = output.logits if self._keeps_logits else output.logits[:, positions.keep]
            stats = token_stats(gather_supervised(logits, positions), positions.targets)
        if not balancing:
            return stats
        trainer = self._attached_trainer
        # Every rank holds different tokens (data- and sequence-parallel alike): the counts sum over all of them.
        reduce_sum = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if self.layout.distributed else (lambda t: t)
        return stats._replace(router=router_balance(output.router_logits, batch.real_tokens, self._moe, reduce_sum))

    def training_step(self, batch, batch_idx):
        stats = self.score(batch)
        step_tokens = batch.step_supervised_tokens
        self._step_loss = self._step_loss.to(stats.nll_sum.device) + stats.nll_sum.detach() / step_tokens
        accumulate, divisor = self.layout.accumulation, self.layout.loss_divisor
        loss = micro_batch_loss(stats.nll_sum, step_tokens, divisor)
        if stats.router is None:
            return loss
        # The balancing loss is a mean over the step's micro-batches (each over all ranks), weighted as the model says.
        self._step_router.add(stats.router, accumulate)
        return loss + self._moe.coefficient * stats.router.local_loss * divisor / accumulate

    def on_before_optimizer_step(self, optimizer) -> None:
        if not self._strategy.at_optimizer_step():
            return  # DeepSpeed: a micro-batch inside the accumulation
        # Called once per optimizer step after every micro-batch's backward: the step's exact token mean.
        self.log("train_loss", self._step_loss, prog_bar=True, sync_dist=True, reduce_fx="sum")
        # Host numbers are logged as tensors filled on the device: self.log would copy them there from pageable memory,
        # and such a copy waits for the GPU.
        self.log("lr", torch.full((), optimizer.param_groups[0]["lr"], device=self.device), rank_zero_only=True)
        trainer = self.trainer
        stop = self._nonfinite.before_step(
            self._step_loss, optimizer, check_gradients=getattr(trainer.precision_plugin, "scaler", None) is None,
            reduce=lambda flag: trainer.strategy.reduce(flag, reduce_op="sum") if self.layout.distributed else flag,
            deepspeed=self._strategy.deepspeed,
        )
        if stop is not None:
            raise nonfinite_error(stop, self.trainer.global_step + 1, newest_checkpoint(self.trainer.default_root_dir))
        self.log("train_nonfinite_steps", torch.full((), float(self._nonfinite.skipped), device=self.device),
                 rank_zero_only=True)
        self._step_loss = torch.zeros((), device=self._step_loss.device)
        if self._moe is not None:
            self.log_dict(self._step_router.metrics(), rank_zero_only=True)  # the same on every rank
            self._step_router = StepRouter()

    def teardown(self, stage: str) -> None:
        self._strategy.teardown()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite_steps"] = self._nonfinite.skipped
        checkpoint.setdefault("hyper_parameters", {}).update(portable_arguments(self.hparams))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._nonfinite.skipped = checkpoint.get("nonfinite_steps", 0)
        drop_head_copy(checkpoint.get("state_dict", {}))

    def connect_sources(self, val: list[str], test: list[str]) -> None:
        """Also log each evaluation loader's metrics under its source's name (``val_loss/<name>``; the data module's
        :meth:`~ChatMLDataModule.source_names`, in order)."""
        self.val_metrics, self.test_metrics = EvaluationMetrics(val), EvaluationMetrics(test)

    def validation_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self.val_metrics.update(self.score(batch), dataloader_idx)

    def test_step(self, batch, batch_idx, dataloader_idx: int = 0):
        self.test_metrics.update(self.score(batch), dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        totals, per_source = self.val_metrics.compute("val")
        self.log_dict(totals, prog_bar=True)
        self.log_dict(per_source)

    def on_test_epoch_end(self) -> None:
        totals, per_source = self.test_metrics.compute("test")
        self.log_dict({**totals, **per_source})

    def reply(self, batch: PromptBatch, settings: Optional[GenerationSettings] = None,
              limits: Optional[list[int]] = None) -> list[Reply]:
        """Answers to left-padded prompts (predict; evaluation while training), by default with
        :attr:`generation_settings`; ``limits``: see :func:`generate_replies`. A sharded model (FSDP2, ZeRO-3) needs
        every rank to call this as often."""
        self._strategy.before_forward(self.model)
        return generate_replies(
            self.model, self.tokenizer, batch.input_ids, batch.attention_mask, settings or self.generation_settings,
            self.stop_ids, synced=self._strategy.sharded and self.layout.distributed, limits=limits,
        )

    def predict_step(self, batch, batch_idx):
        return [{"index": int(i), "prediction": reply.text} for i, reply in zip(batch.index, self.reply(batch))]

    def configure_optimizers(self):
        h = self.hparams
        trained = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = self._strategy.optimizer(decay_groups(trained, h.weight_decay), h.learning_rate, tuple(h.adam_betas))
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        return {"optimizer": optimizer, "lr_scheduler": warmup_schedule(optimizer, h.lr_scheduler, h.warmup_ratio, total_steps)}
