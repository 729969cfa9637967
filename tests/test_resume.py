"""A run killed with SIGKILL between checkpoints and resumed with ``--ckpt_path last`` ends with the same weights
as a run that was never interrupted; a kill during a checkpoint write leaves the previous checkpoint intact."""

import signal

import pytest
import torch

from sft_lightning.checkpointing import AtomicCheckpointIO, save_beside
from sft_lightning.lightning_cli import SFTLightningCLI
from tests.conftest import ACCUMULATE, ROOT, final_weights
from tests.conftest import tiny_fit as fit

pytestmark = pytest.mark.slow


# With ACCUMULATE, 320 conversations in micro-batches of 16 make 10 optimizer steps an epoch.


@pytest.mark.parametrize(
    "kill_at, data",
    [
        (9, [ACCUMULATE]),  # mid-interval in epoch 0 (checkpoint at step 6, micro-batch 12)
        (17, [ACCUMULATE]),  # in epoch 1, after the epoch-end save at 10 and the step save at 12
        # Packed rows drawn from two sources (the shipped example: English 70%, Chinese 30%), 31 steps an epoch:
        # killed in epoch 1, after the epoch-end save at 31 and the step save at 36.
        (40, ["--data.packing=true", "--data.batch_size=4", "--config=configs/data/mixture-example.yaml"]),
    ],
    ids=["epoch0", "epoch1", "packed-mixture"],
)
def test_sigkill_then_resume_ends_with_the_same_weights(tmp_path, kill_at, data, uninterrupted_weights):
    # The first run is given --ckpt_path last too, as a requeueing scheduler would: with no checkpoint yet, it starts.
    killed = fit(tmp_path / "run", *data, "--ckpt_path=last", "--trainer.callbacks+=tests.helpers.KillAtStep",
                 f"--trainer.callbacks.step={kill_at}")
    assert killed.returncode == -signal.SIGKILL
    assert f"--ckpt_path last: no checkpoint under {tmp_path / 'run'} yet; starting a new run" in killed.stdout + killed.stderr
    if kill_at == 9:  # another seed would replay and skip samples: refused in one line, leaving no new log folder
        versions = sorted((tmp_path / "run" / "lightning_logs").iterdir())
        refused = fit(tmp_path / "run", *data, "--ckpt_path=last", "--data.seed=7")
        assert refused.returncode == 2 and "puts other samples in them" in refused.stderr.splitlines()[-1], refused.stderr[-2000:]
        assert sorted((tmp_path / "run" / "lightning_logs").iterdir()) == versions
    resumed = fit(tmp_path / "run", *data, "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "--ckpt_path last: resuming from" in resumed.stdout + resumed.stderr
    expected, actual = uninterrupted_weights(*data), final_weights(tmp_path / "run")
    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def dies_halfway(obj, file):
        file.write(b"half a checkpoint")
        raise KeyboardInterrupt  # stands in for the kill

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


class OneRank:
    """What save_beside asks of a strategy, for one process."""

    is_global_zero = True

    def broadcast(self, value):
        return value

    def barrier(self) -> None:
        pass


def test_a_sharded_checkpoint_killed_mid_write_leaves_the_previous_one(tmp_path):
    # The folders FSDP2 and DeepSpeed write: every rank a part, then renamed into place.
    path = tmp_path / "last.ckpt"

    def write(step: int, dies: bool = False):
        def into(folder):
            folder.mkdir()
            (folder / "rank0").write_text(str(step))
            if dies:
                raise KeyboardInterrupt  # stands in for the kill, after one rank's part
            (folder / "rank1").write_text(str(step))

        return into

    save_beside(OneRank(), path, write(1))
    with pytest.raises(KeyboardInterrupt):
        save_beside(OneRank(), path, write(2, dies=True))
    assert {p.name: p.read_text() for p in path.iterdir()} == {"rank0": "1", "rank1": "1"}
    save_beside(OneRank(), path, write(3))  # the next save clears what the kill left beside it
    assert {p.name: p.read_text() for p in path.iterdir()} == {"rank0": "3", "rank1": "3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_save_last_link_never_points_at_an_older_step(tmp_path, monkeypatch):
    # mode=max on a falling val_loss: top-k keeps only the first validation's checkpoint, and Lightning alone would
    # link every later last.ckpt to it, so that --ckpt_path last would resume 20 steps back.
    monkeypatch.chdir(ROOT)
    cli = SFTLightningCLI(args=[
        "fit", "--config", "configs/tiny.yaml", f"--trainer.default_root_dir={tmp_path}", f"--data.cache_dir={tmp_path / 'cache'}",
        "--trainer.max_epochs=2", "--checkpoint.save_last=link", "--checkpoint.mode=max", "--checkpoint.every_n_train_steps=6",
        "--trainer.enable_progress_bar=false",
    ])
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == cli.trainer.global_step == 40
    best = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)["global_step"]
    assert best == 24  # the first save after val_loss exists, kept by top-k: the older step (seen linked without the fix)
