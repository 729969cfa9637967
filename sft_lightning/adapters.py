"""LoRA and QLoRA through peft: adapters on a frozen (optionally 4/8-bit) base, merged back on export."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, Optional, Union

import torch

from sft_lightning.errors import ConfigError

Quantization = Literal["4bit", "8bit"]


@dataclass
class LoRA:
    """Low-rank adapters (peft ``LoraConfig``); the base weights stay frozen.

    Args:
        r: rank of each adapter.
        alpha: scaling numerator (the update is scaled by ``alpha / r``).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or ``all-linear`` (every linear layer but the LM head).
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: Union[str, list[str]] = "all-linear"


def as_lora(value: Union[LoRA, dict, None]) -> Optional[LoRA]:
    """Checkpoints keep the settings as a plain dict (loadable with ``weights_only=True``)."""
    return LoRA(**value) if isinstance(value, dict) else value


def add_lora(model, lora: LoRA, quantized: bool = False, trainable_tokens: Optional[list[int]] = None):
    """Wrap ``model`` with adapters; ``trainable_tokens``: embedding rows added for the chat template (the
    ChatML fallback's ``<|im_start|>``/``<|im_end|>``), which must learn too or the model never stops."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        # Casts norms to float32 and enables input gradients, as k-bit training needs.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=lora.target_modules, task_type="CAUSAL_LM",
                        trainable_token_indices=trainable_tokens or None)
    return get_peft_model(model, config)


def quantization_config(quantization: Optional[Quantization], lora: Optional[LoRA]):
    """transformers' BitsAndBytesConfig for QLoRA, or None; a clear error where it cannot work."""
    if quantization is None:
        return None
    if lora is None:
        raise ConfigError(f"model.quantization={quantization} trains adapters only: set model.lora as well")
    if not torch.cuda.is_available():
        raise ConfigError(f"model.quantization={quantization} needs a CUDA GPU (bitsandbytes); none is available here")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError(f"model.quantization={quantization} needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def has_adapters(model) -> bool:
    return hasattr(model, "merge_and_unload")


def lora_dict(lora: Optional[LoRA]) -> Optional[dict]:
    return None if lora is None else asdict(lora)
