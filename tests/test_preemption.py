"""SIGTERM / SIGUSR1: a checkpoint at the next optimizer-step boundary, exit 0, and an exact resume from it."""

import signal

import lightning as L
import pytest
import torch

from tests.conftest import ACCUMULATE, final_weights
from tests.conftest import tiny_fit as fit

pytestmark = pytest.mark.slow


class SignalAtBatch(L.Callback):
    """Test helper: deliver ``signal_name`` to this process as micro-batch ``batch_idx`` of epoch 0 starts."""

    def __init__(self, batch_idx: int, signal_name: str = "SIGTERM") -> None:
        self.batch_idx, self.signal_name = batch_idx, signal_name

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.current_epoch == 0 and batch_idx == self.batch_idx:
            signal.raise_signal(getattr(signal, self.signal_name))


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGUSR1"])
def test_signal_saves_at_the_step_boundary_exits_0_and_resumes_exactly(tmp_path, signal_name, uninterrupted_weights):
    accumulate = [ACCUMULATE]  # the uninterrupted run is the resume tests' own
    # Micro-batch 8 is the first half of optimizer step 5: the save must wait for the step to finish.
    preempted = fit(tmp_path / "run", *accumulate, "--trainer.callbacks+=tests.test_preemption.SignalAtBatch",
                    "--trainer.callbacks.batch_idx=8", f"--trainer.callbacks.signal_name={signal_name}")
    assert preempted.returncode == 0, preempted.stderr[-2000:]
    line = preempted.stderr.strip().splitlines()[-1]
    assert line.startswith(f"sft-lightning: preempted: {signal_name} received: saved step 5 to ")
    assert line.endswith("resume with the same command and --ckpt_path last")
    saved = torch.load(line.split(" to ")[1].split(";")[0], map_location="cpu", weights_only=True)
    # The training loader's position: 10 micro-batches of epoch 0 trained.
    position = saved["ChatMLDataModule"]
    assert saved["global_step"] == 5 and (position["epoch"], position["micro_batches_done"]) == (0, 10)
    assert not list((tmp_path / "run").rglob("hf_model"))  # an unfinished run is not exported
    if signal_name != "SIGTERM":
        return  # the same handler and checkpoint: the exact resume is shown once, for SIGTERM

    resumed = fit(tmp_path / "run", *accumulate, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, actual = uninterrupted_weights(*accumulate), final_weights(tmp_path / "run")
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)
