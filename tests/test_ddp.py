"""Two CPU processes (DDP, gloo) with batch 4 each apply the same gradients as one process with batch 8, and the
``sft-lightning`` command itself runs DDP on 2 processes to the end (export included)."""

import pytest

from tests.conftest import cli_fit
from tests.helpers import assert_same_gradients, train_gradients

pytestmark = pytest.mark.slow


def test_two_ranks_batch_4_equal_one_rank_batch_8(tmp_path):
    reference = train_gradients(tmp_path, batch_size=8)
    assert_same_gradients(train_gradients(tmp_path, batch_size=4, devices=2, strategy="ddp_spawn"), reference)


def test_two_ranks_share_packed_rows_with_the_same_gradients(tmp_path):
    reference = train_gradients(tmp_path, batch_size=8, packing=True)
    assert_same_gradients(train_gradients(tmp_path, batch_size=4, devices=2, strategy="ddp_spawn", packing=True), reference)


def test_ddp_through_the_command_exits_0_and_exports(tmp_path):
    result = cli_fit("tiny.yaml", tmp_path, "--trainer.devices=2", "--trainer.strategy=ddp", "--trainer.max_epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "lightning_logs" / "version_0" / "hf_model" / "model.safetensors").is_file()
