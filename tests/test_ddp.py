"""Two CPU processes (DDP, gloo) with batch 4 each apply the same gradients as one process with batch 8."""

import pytest

from tests.test_loss import assert_same_gradients, train_gradients

pytestmark = pytest.mark.slow


def test_two_ranks_batch_4_equal_one_rank_batch_8(tmp_path):
    reference = train_gradients(tmp_path, batch_size=8)
    assert_same_gradients(train_gradients(tmp_path, batch_size=4, devices=2, strategy="ddp_spawn"), reference)


def test_two_ranks_share_packed_rows_with_the_same_gradients(tmp_path):
    reference = train_gradients(tmp_path, batch_size=8, packing=True)
    assert_same_gradients(train_gradients(tmp_path, batch_size=4, devices=2, strategy="ddp_spawn", packing=True), reference)
