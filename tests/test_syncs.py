"""At most one device-to-host sync per training micro-batch (the non-finite guard's, at the optimizer step), counted
on the CPU in the GPU's code path: the strict varlen stand-in in place of the kernel, bf16-mixed."""

import json

import pytest
import torch

from tests.conftest import fit_here
from tests.host_syncs import HostSyncs


def test_the_counter_counts_what_waits_for_a_gpu():
    values = torch.arange(6.0)
    step = torch.tensor(3.0)  # like AdamW's step count: host memory on a GPU run too
    with HostSyncs(host_resident=[step]) as syncs:
        values.sum().item()
        values[values > 2].sum()
        values.nonzero()
        values.tolist()
        step.item()
        values.index_select(0, torch.tensor([1, 2]))  # an index computed beforehand: nothing to wait for
    assert syncs.ops == {"_local_scalar_dense": 1, "index": 1, "nonzero": 1, "tolist": 1}


@pytest.mark.slow
@pytest.mark.parametrize("packing, lm_head_chunk_tokens, accumulate", [("true", "512", 2), ("false", "null", 1)],
                         ids=["packed-chunked-accumulate2", "padded-whole-head"])
def test_one_host_sync_per_micro_batch(tmp_path, packing, lm_head_chunk_tokens, accumulate):
    fit_here("tiny.yaml", tmp_path, f"--data.packing={packing}", f"--model.lm_head_chunk_tokens={lm_head_chunk_tokens}", "--model.lm_head_chunk_above_mb=0",
             f"--trainer.accumulate_grad_batches={accumulate}", "--data.batch_size=2", "--trainer.precision=bf16-mixed",
             "--trainer.max_steps=3",
             "--trainer.log_every_n_steps=1000", "--data.val_path=null",
             "--trainer.callbacks+=tests.strict_kernels.StrictVarlen", f"--trainer.callbacks.path={tmp_path / 'kernel'}",
             "--trainer.callbacks+=tests.host_syncs.SyncCounter", f"--trainer.callbacks.path={tmp_path / 'syncs'}")
    batches = json.loads((tmp_path / "syncs.0").read_text())
    assert len(batches) == 3 * accumulate
    # The first optimizer step also runs the packing check and creates AdamW's state; every later micro-batch syncs
    # only in the non-finite guard, once per optimizer step (in its last micro-batch).
    steady = batches[accumulate:]
    assert steady == [{"_local_scalar_dense": 1} if (i + 1) % accumulate == 0 else {} for i in range(len(steady))]
    kernel_calls = json.loads((tmp_path / "kernel.0").read_text())
    # 2 layers, in each micro-batch and in the packing check's two forwards
    assert kernel_calls == ({"torch.bfloat16": 2 * (3 * accumulate + 2)} if packing == "true" else {})
