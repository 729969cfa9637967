"""Helpers shared by several test modules (test modules import from here and conftest, never from each other)."""

import os
import signal
import subprocess
import sys

import lightning as L
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from sft_lightning.attention import packed_model_inputs
from sft_lightning.datamodule import ChatMLDataModule
from sft_lightning.module import SFTLitModule
from sft_lightning.packing import collate_packed
from sft_lightning.layout import ConnectRunLayout
from tests.conftest import ROOT, TINY_QWEN

TRAIN = str(ROOT / "data" / "chatml_data.json")

# ShareGPT rows: a multi-turn one, a top-level system, a system turn (test_data, test_mixture).
SHAREGPT = [
    {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"},
                       {"from": "human", "value": "Bye"}, {"from": "gpt", "value": "Goodbye."}]},
    {"system": "Be brief.", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hey"},
                       {"from": "gpt", "value": "Hey there."}]},
]


class GradientRecorder(L.Callback):
    """Rank 0 saves the gradient each optimizer step is about to apply (already all-reduced under DDP) to a
    file, so that runs in spawned processes report back too."""

    def __init__(self, path):
        self.path = path
        self.steps = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.steps.append({n: p.grad.detach().clone() for n, p in module.model.named_parameters()})

    def on_train_end(self, trainer, module):
        if trainer.is_global_zero:
            torch.save(self.steps, self.path)


# The tiny models' logits are far below model.lm_head_chunk_above_mb: runs that must prove the chunked LM head (on
# sharded ranks, under GPU dtypes) ask for chunks all the same, as at a real vocabulary.
IN_CHUNKS = "--model.lm_head_chunk_above_mb=0"

def train_gradients(
    tmp_path, batch_size: int, accumulate: int = 1, devices: int = 1, strategy: str = "auto", steps: int = 2,
    model: str = TINY_QWEN, lm_head_chunk_tokens: int | None = 512, lm_head_chunk_above_mb: float = 0.0, **data_args,
) -> list[dict[str, torch.Tensor]]:
    """The gradients of each step; the tiny models' logits are small, so the LM head runs in chunks here only because
    ``lm_head_chunk_above_mb`` is 0 (the default of these runs, which compare ranks and strategies)."""
    L.seed_everything(0)
    module = SFTLitModule(model, learning_rate=1e-3, warmup_ratio=0.0, lr_scheduler="constant",
                          lm_head_chunk_tokens=lm_head_chunk_tokens, lm_head_chunk_above_mb=lm_head_chunk_above_mb)
    data = ChatMLDataModule(train_path=TRAIN, tokenizer_path=model, batch_size=batch_size, max_length=64, seed=1,
                            cache_dir=None, **data_args)
    path = tmp_path / f"gradients-{batch_size}x{accumulate}x{devices}-{lm_head_chunk_tokens}-{lm_head_chunk_above_mb}-{sorted(data_args.items())}.pt"
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=steps, accumulate_grad_batches=accumulate,
        logger=False, callbacks=[ConnectRunLayout(module, data), GradientRecorder(path)], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    return torch.load(path, weights_only=True)


def assert_same_gradients(steps, reference):
    assert len(steps) == len(reference)
    for step, expected in zip(steps, reference):
        for name, grad in expected.items():
            # float32 summation order differs between the runs (and Adam amplifies it in later steps: a chunked head
            # under transformers 5.25 reached 1.3e-4 of the scale at step 2, 2.6e-7 at step 1): the tolerance is
            # relative to the tensor scale, far below the ~10% a wrong normalisation gives
            scale = grad.abs().max().item()
            torch.testing.assert_close(step[name], grad, rtol=1e-4, atol=5e-4 * scale, msg=name)


def chat_through_pipe(model_dir, lines, *options):
    """``sft-lightning chat`` fed ``lines`` on stdin: (replies on stdout, stderr lines saying a reply was cut)."""
    result = subprocess.run(
        [sys.executable, "-m", "sft_lightning.cli", "chat", f"--model_path={model_dir}", "--max_new_tokens=48", *options],
        input="\n".join([*lines, "/exit"]) + "\n", capture_output=True, text=True, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.splitlines(), [line for line in result.stderr.splitlines() if "reply cut" in line], result.stderr


class KillAtStep(L.Callback):
    """Test helper: SIGKILL this process right after optimizer step ``step`` (no chance to clean up)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def packed_logit_mismatch(model, samples: list[tuple[list[int], list[int]]], attn_implementation: str) -> float:
    """Largest difference between the logits of ``samples`` packed into one row and of each sample run alone.

    Zero up to rounding when the attention keeps samples apart (the run-time check is
    :func:`sft_lightning.attention.cross_sample_influence`, which needs no second forward per sample).
    """
    device = next(model.parameters()).device
    batch = collate_packed([samples], pad_token_id=0).to(device)
    inputs, _ = packed_model_inputs(batch, attn_implementation)
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits.reshape(-1, model.config.vocab_size)
        worst, start = 0.0, 0
        for ids, _ in samples:
            alone = model(input_ids=torch.as_tensor([list(ids)], device=device), use_cache=False).logits[0]
            worst = max(worst, (packed[start : start + len(ids)] - alone).abs().max().item())
            start += len(ids)
    return worst


def logged_steps(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the run's TensorBoard event files, by tag, as (step, value)."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def logged_scalars(log_dir) -> dict[str, list[float]]:
    """Every scalar in the run's TensorBoard event files, by tag."""
    return {tag: [value for _, value in values] for tag, values in logged_steps(log_dir).items()}
