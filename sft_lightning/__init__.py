"""sft-lightning: supervised fine-tuning of Hugging Face causal LMs on chat conversations."""

__version__ = "0.1.0"
