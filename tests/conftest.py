"""Hermetic fixtures: word-level tokenizers built in-process (ids are readable), and the shipped tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parents[1]
TINY_QWEN = str(ROOT / "models" / "tiny-qwen2")
TINY_LLAMA = str(ROOT / "models" / "tiny-llama3")

CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
WORDS = ["\n", "system", "user", "assistant", "be", "brief", "hi", "hello", "how", "are", "you", "fine", "thanks", "bye"]


def word_tokenizer(
    specials: list[str], template: str | None = None, words: tuple[str, ...] = (), **roles: str
) -> PreTrainedTokenizerFast:
    """One token per word, per newline and per special token, so expected ids can be written by name; ``words``
    adds ordinary (non-special) words to the vocabulary."""
    vocab = {token: i for i, token in enumerate(specials + WORDS + list(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex("\n"), "isolated"), pre_tokenizers.Split(Regex(" "), "removed")]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, additional_special_tokens=specials, chat_template=template, **roles
    )


@pytest.fixture
def chatml_tokenizer():
    return word_tokenizer(["<pad>", "<|im_start|>", "<|im_end|>"], CHATML_TEMPLATE, pad_token="<pad>", eos_token="<|im_end|>")


@pytest.fixture
def llama3_tokenizer():
    specials = ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    return word_tokenizer(specials, LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")


def names(tokenizer, ids) -> list:
    """Token names for ids; None for ignored labels."""
    return [None if i == -100 else tokenizer.convert_ids_to_tokens(i) for i in ids]


def fit_command(config: str, root, *extra: str) -> list[str]:
    """``fit --config configs/<config>`` writing under ``root`` (its cache included)."""
    return ["fit", "--config", f"configs/{config}", f"--trainer.default_root_dir={root}", f"--data.cache_dir={root / 'cache'}",
            "--trainer.enable_progress_bar=false", *extra]


def cli_fit(config: str, root, *extra: str) -> subprocess.CompletedProcess:
    """``sft-lightning fit --config configs/<config>`` in a subprocess (every rank it launches runs the command's own
    code), writing under ``root``; returns the completed process."""
    args = [sys.executable, "-m", "sft_lightning.cli", *fit_command(config, root, *extra)]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    # Kept whole beside the run (a failing test shows the tail): every rank writes here, so the first rank's error
    # can sit far above the last one's.
    Path(root).mkdir(parents=True, exist_ok=True)
    (Path(root) / "stderr.log").write_text(done.stderr)
    return done


def fit_here(config: str, root, *extra: str) -> None:
    """The same run as :func:`cli_fit`, in this process: for the runs a test compares against, which then skip the
    interpreter start and imports (~10 s each)."""
    from sft_lightning.cli import cli_main

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with mock.patch.dict(os.environ):  # what the run sets (PL_GLOBAL_SEED, ...) does not reach later runs
            cli_main(fit_command(config, root, *extra))
    finally:
        os.chdir(cwd)


TINY_RUN = ("--trainer.max_epochs=2", "--checkpoint.every_n_train_steps=6")  # 2 epochs, last.ckpt every 6 steps
# Accumulation 2 in the resume and preemption runs (which then compare against the same uninterrupted run): the
# data position counts micro-batches while optimizer steps accumulate them.
ACCUMULATE = "--trainer.accumulate_grad_batches=2"


def tiny_fit(root, *extra) -> subprocess.CompletedProcess:
    """The tiny config for 2 epochs, ``last.ckpt`` every 6 steps."""
    return cli_fit("tiny.yaml", root, *TINY_RUN, *extra)


def final_weights(root) -> dict[str, torch.Tensor]:
    checkpoints = sorted(root.rglob("last.ckpt"), key=lambda path: path.stat().st_mtime_ns)
    return torch.load(checkpoints[-1], map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture(scope="session")
def uninterrupted_weights(tmp_path_factory):
    """Final weights of an uninterrupted :func:`tiny_fit` with the given arguments, run once per session: the
    resume and preemption tests compare against the same runs."""
    runs: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def weights(*extra: str) -> dict[str, torch.Tensor]:
        if extra not in runs:
            root = tmp_path_factory.mktemp("uninterrupted")
            fit_here("tiny.yaml", root, *TINY_RUN, *extra)
            runs[extra] = final_weights(root)
        return runs[extra]

    return weights
