"""SFTLitModule: a Hugging Face causal LM trained with the token-exact loss."""

from __future__ import annotations

import inspect
import math
from functools import partial
from pathlib import Path
from typing import Literal, Optional

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.utilities import rank_zero_info
from transformers import get_scheduler

from sft_lightning.adapters import LoRA, Quantization, add_lora, as_lora, lora_dict, quantization_config
from sft_lightning.attention import SDPA_VARLEN, cross_sample_influence, model_inputs
from sft_lightning.checkpointing import newest_checkpoint
from sft_lightning.collate import BatchCounts, PackedBatch, TrainingBatch
from sft_lightning.errors import ConfigError, NonFiniteError, PackingError
from sft_lightning.generation import GenerationSettings, generate_replies
from sft_lightning.language_model import DType, build_causal_lm
from sft_lightning.linear_attention import keep_linear_attention_apart
from sft_lightning.lm_head import ChunkedLMHead, install_chunked_head
from sft_lightning.moe import MoE, StepRouter, moe_of, router_balance
from sft_lightning.nonfinite import NonFiniteGuard
from sft_lightning.loss import TokenMetrics, TokenStats, gather_supervised, micro_batch_loss, token_stats
from sft_lightning.render import load_tokenizer, stop_token_ids
from sft_lightning.sharding import FSDP2Strategy
from sft_lightning.throughput import FlopParameters, matmul_parameters, training_flops
from sft_lightning.zero import (
    adamw, at_optimizer_step, deepspeed_config, end_zero3_loading, float32_rotary_buffers, is_zero3, logical_ndim,
    loss_divisor, zero3_loading,
)

# The packing check packs two spans of this many tokens from the first batch.
PACKING_CHECK_TOKENS = 128
# Same shapes round the same way, so a correct attention moves the second span's logits by exactly 0; a leak moves
# them by a sizeable fraction of their scale.
PACKING_CHECK_TOLERANCE = 1e-3

# Our names to transformers' scheduler names; "constant" still warms up.
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def init_buffers(model) -> None:
    """Compute the buffers that no state dict holds (the rotary ``inv_freq``, Gemma's ``embed_scale``) of a model whose
    tensors were created empty (``to_empty`` after the meta device). Call it before the weights are loaded: it may
    reset the parameters of a module that owns such a buffer (Gemma's scaled embedding).

    transformers 5.24 computes these buffers in ``PreTrainedModel._init_weights`` (private), which is applied here
    only to the modules that own such a buffer, the same way ``from_pretrained`` applies it to them."""
    owners = {name.rpartition(".")[0] for name, _ in model.named_non_persistent_buffers()}
    for owner in sorted(owners):
        model._init_weights(model.get_submodule(owner))


def drop_head_copy(state_dict: dict) -> dict:
    """``state_dict`` without the second copy of the LM head that checkpoints written before 2026-12 hold (the module
    kept the head as an attribute of its own, ``_scoring_head``)."""
    for name in [name for name in state_dict if name.startswith("_scoring_head.")]:
        del state_dict[name]
    return state_dict


class SFTLitModule(LightningModule):
    def __init__(
        self,
        model_name_or_path: str,
        torch_dtype: DType = "float32",
        trust_remote_code: bool = False,
        attn_implementation: Optional[str] = SDPA_VARLEN,
        gradient_checkpointing: bool = False,
        learning_rate: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine",
        adam_betas: tuple[float, float] = (0.9, 0.999),
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        packing_check: bool = True,
        lm_head_chunk_tokens: Optional[int] = 512,
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
            nonfinite_patience: an optimizer step whose loss or gradient is NaN or infinite is skipped (weights and
                optimizer state untouched) and counted in ``train_nonfinite_steps``; this many in a row stop the
                run with an error that names the last checkpoint, which holds only finite weights.
            lora: train low-rank adapters (peft) instead of all weights; the export merges them into the base.
            quantization: QLoRA: load the frozen base in ``4bit`` (NF4) or ``8bit`` (bitsandbytes, CUDA only;
                needs ``lora``).
        """
        super().__init__()
        self.save_hyperparameters()
        self.model = None
        self.tokenizer = None
        self.stop_ids: list[int] = []  # end-of-turn (and eos) ids that end generation
        self.val_metrics = TokenMetrics()
        self.test_metrics = TokenMetrics()
        self._matmul_parameters = FlopParameters(0, 0)  # for flops()
        self._packing_checked = False
        self._keeps_logits = False
        self._added_tokens = 0  # rows the tokenizer adds to the pretrained vocabulary
        self._deepspeed: Optional[dict] = None  # the DeepSpeed config, when trained under DeepSpeed
        self._hf_deepspeed = None
        self._first_forward_done = False
        self._nonfinite = NonFiniteGuard(nonfinite_patience)
        self._step_loss = torch.zeros(())
        self._checkpoint_follows = False  # set by connect(): the weights come from a checkpoint, not the folder
        self._linear_layers = 0  # linear-attention layers that run packed rows sample by sample
        self._moe: Optional[MoE] = None  # the router balance of a mixture-of-experts model
        self._step_router = StepRouter()

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
        self._deepspeed = deepspeed_config(self._attached_trainer.strategy if self._attached_trainer is not None else None)
        if is_zero3(self._deepspeed):
            self._hf_deepspeed = zero3_loading(self._deepspeed)  # alive while and after from_pretrained runs
        if self.device_mesh is not None:  # set by a ModelParallelStrategy before this hook
            model = self._sharded_model(pretrained)
        elif pretrained or self._hf_deepspeed is not None:  # ZeRO-3 partitions as it builds: never on meta
            model = self._causal_lm(pretrained)
        else:
            with torch.device("meta"):
                model = self._causal_lm(pretrained=False)
            if materialize:
                model.to_empty(device="cpu")
                model.tie_weights()  # to_empty gives each tied module a tensor of its own
                init_buffers(model)
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
        self._added_tokens = max(len(self.tokenizer) - model.get_input_embeddings().num_embeddings, 0)
        if self._added_tokens:
            # The ChatML fallback added <|im_start|>/<|im_end|> to a template-less tokenizer. New rows start at the
            # mean embedding; a model without weights yet (meta) gets them from a pretrained one.
            model.resize_token_embeddings(len(self.tokenizer), mean_resizing=pretrained)
        if h.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._linear_layers = keep_linear_attention_apart(model)
        if h.lm_head_chunk_tokens:
            why_not = install_chunked_head(model, h.lm_head_chunk_tokens)
            if why_not and pretrained:
                rank_zero_info(f"model.lm_head_chunk_tokens: the LM head and the loss run unchunked: {why_not}")
        return model

    def _sharded_model(self, pretrained: bool):
        strategy = self.trainer.strategy
        if not isinstance(strategy, FSDP2Strategy):
            raise ConfigError(f"{type(strategy).__name__}: for sharded training use sft_lightning.sharding.FSDP2Strategy")
        if self.hparams.lora is not None or self.hparams.quantization is not None:
            raise ConfigError("FSDP2Strategy trains every weight; LoRA and QLoRA fit one GPU: use trainer.strategy ddp")
        return strategy.load_pretrained(
            partial(self._causal_lm, pretrained=False), partial(self._causal_lm, pretrained=True) if pretrained else None,
            init_buffers,
        )

    def _check_packing(self, input_ids: torch.Tensor) -> None:
        """Once per run, in the first packed forward on every rank: refuse an attention that lets packed samples
        mix. Runs wherever the model runs (sharded, mixed precision), with the same decision on every rank."""
        self._packing_checked = True
        tokens = input_ids.reshape(-1)[: 2 * PACKING_CHECK_TOKENS]
        half = len(tokens) // 2
        attn = self.model.config._attn_implementation
        was_training = self.model.training
        self.model.eval()  # no dropout, so any difference is the attention's
        with torch.no_grad():
            influence = cross_sample_influence(self.model, tokens[:half], tokens[half : 2 * half], attn)
        self.model.train(was_training)
        influence = self.all_gather(influence).max().item()
        if influence > PACKING_CHECK_TOLERANCE:
            # Linear-attention layers learn the sample boundaries only from the variable-length inputs.
            fits = "sdpa_varlen or flash_attention_2" if self._linear_layers else "sdpa_varlen, sdpa or flash_attention_2"
            raise PackingError(
                f"packed samples attend to each other with attn_implementation={attn} (a sample's logits move by "
                f"{influence:.3g} of their scale when the sample before it changes): use {fits}, or set "
                "data.packing false"
            )

    def _before_first_forward(self) -> None:
        self._first_forward_done = True
        if self._deepspeed is not None:  # built under zero.Init, whose context has ended by now
            float32_rotary_buffers(self.model)

    def flops(self, counts: BatchCounts) -> float:
        """FLOPs of a forward and backward of a micro-batch of these counts (for MFU; see
        :func:`sft_lightning.throughput.training_flops`)."""
        return training_flops(self.model.config, self._matmul_parameters, counts)

    def score(self, batch: TrainingBatch) -> TokenStats:
        """NLL sum, supervised-token count and correct predictions of a training batch (the loss and metrics'
        one source, in training, validation and test)."""
        if not self._first_forward_done:
            self._before_first_forward()
        if isinstance(batch, PackedBatch) and self.hparams.packing_check and not self._packing_checked:
            self._check_packing(batch.input_ids)
        inputs, positions = model_inputs(batch, self.model.config._attn_implementation)
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
        several = trainer is not None and trainer.world_size > 1
        reduce_sum = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if several else (lambda t: t)
        return stats._replace(router=router_balance(output.router_logits, batch.real_tokens, self._moe, reduce_sum))

    def training_step(self, batch, batch_idx):
        stats = self.score(batch)
        step_tokens = batch.step_supervised_tokens
        self._step_loss = self._step_loss.to(stats.nll_sum.device) + stats.nll_sum.detach() / step_tokens
        accumulate = self.trainer.accumulate_grad_batches
        divisor = loss_divisor(self._deepspeed, accumulate, self.trainer.world_size)
        loss = micro_batch_loss(stats.nll_sum, step_tokens, divisor)
        if stats.router is None:
            return loss
        # The balancing loss is a mean over the step's micro-batches (each over all ranks), weighted as the model says.
        self._step_router.add(stats.router, accumulate)
        return loss + self._moe.coefficient * stats.router.local_loss * divisor / accumulate

    def on_before_optimizer_step(self, optimizer) -> None:
        if not at_optimizer_step(self.trainer.strategy):
            return  # DeepSpeed: a micro-batch inside the accumulation
        # Called once per optimizer step after every micro-batch's backward: the step's exact token mean.
        self.log("train_loss", self._step_loss, prog_bar=True, sync_dist=True, reduce_fx="sum")
        # Host numbers are logged as tensors filled on the device: self.log would copy them there from pageable memory,
        # and such a copy waits for the GPU.
        self.log("lr", torch.full((), optimizer.param_groups[0]["lr"], device=self.device), rank_zero_only=True)
        trainer = self.trainer
        stop = self._nonfinite.before_step(
            self._step_loss, optimizer, check_gradients=getattr(trainer.precision_plugin, "scaler", None) is None,
            reduce=lambda flag: trainer.strategy.reduce(flag, reduce_op="sum") if trainer.world_size > 1 else flag,
            deepspeed=self._deepspeed,
        )
        if stop is not None:
            self._raise_nonfinite(stop)
        self.log("train_nonfinite_steps", torch.full((), float(self._nonfinite.skipped), device=self.device),
                 rank_zero_only=True)
        self._step_loss = torch.zeros((), device=self._step_loss.device)
        if self._moe is not None:
            self.log_dict(self._step_router.metrics(), rank_zero_only=True)  # the same on every rank
            self._step_router = StepRouter()

    def _raise_nonfinite(self, what: str) -> None:
        last = newest_checkpoint(self.trainer.default_root_dir)
        raise NonFiniteError(
            f"{what} (to step {self.trainer.global_step + 1}) had a NaN or infinite loss or gradient; the last good "
            f"checkpoint is {last or 'none (none was saved)'}; lower model.learning_rate or look for a broken batch"
        )

    def teardown(self, stage: str) -> None:
        if self._hf_deepspeed is not None:
            self._hf_deepspeed = None
            end_zero3_loading()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["nonfinite_steps"] = self._nonfinite.skipped
        # The arguments as a checkpoint needs them: loadable with weights_only (LoRA as a plain dict), and a local
        # model folder as an absolute path (checkpoints are exported and resumed from other working directories).
        h = self.hparams
        portable = {"lora": lora_dict(as_lora(h.lora))}
        if Path(h.model_name_or_path).expanduser().is_dir():
            portable["model_name_or_path"] = str(Path(h.model_name_or_path).expanduser().resolve())
        checkpoint.setdefault("hyper_parameters", {}).update(portable)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._nonfinite.skipped = checkpoint.get("nonfinite_steps", 0)
        drop_head_copy(checkpoint.get("state_dict", {}))

    def validation_step(self, batch, batch_idx):
        self.val_metrics.update(self.score(batch))

    def test_step(self, batch, batch_idx):
        self.test_metrics.update(self.score(batch))

    def _log_metrics(self, prefix: str, metrics: TokenMetrics) -> None:
        values = metrics.compute()
        self.log_dict({f"{prefix}_{name}": value for name, value in values.items()}, prog_bar=prefix == "val")
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def predict_step(self, batch, batch_idx):
        if not self._first_forward_done:
            self._before_first_forward()
        sharded = self.device_mesh is not None or is_zero3(self._deepspeed)
        replies = generate_replies(
            self.model, self.tokenizer, batch.input_ids, batch.attention_mask, self.generation_settings, self.stop_ids,
            synced=sharded and self.trainer.world_size > 1,
        )
        return [{"index": int(i), "prediction": reply.text} for i, reply in zip(batch.index, replies)]

    def configure_optimizers(self):
        h = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        # Biases and norm weights are the 1-D parameters; decaying them only hurts.
        groups = [
            {"params": [p for p in params if logical_ndim(p) >= 2], "weight_decay": h.weight_decay},
            {"params": [p for p in params if logical_ndim(p) < 2], "weight_decay": 0.0},
        ]
        optimizer = adamw(groups, h.learning_rate, tuple(h.adam_betas), self._deepspeed)
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = get_scheduler(
            SCHEDULERS[h.lr_scheduler], optimizer,
            num_warmup_steps=math.ceil(h.warmup_ratio * total_steps), num_training_steps=total_steps,
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
