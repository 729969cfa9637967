"""Sequence parallelism's parts: the slices of a packed micro-batch (exact tensors), and the all-to-all attention on 2 gloo
processes, whose summed loss and gradients equal one process's (each supervised token counted once)."""

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import AutoConfig, AutoModelForCausalLM

from sft_lightning.attention import model_inputs
from sft_lightning.collate import PackedSlice
from sft_lightning.errors import ConfigError
from sft_lightning.loss import gather_supervised, token_stats
from sft_lightning.packing import collate_packed, slice_packed
from sft_lightning.render import IGNORE_INDEX
from sft_lightning.sequence_parallel import check_sequence_parallel, exchange
from tests.conftest import ROOT, TINY_QWEN

X = IGNORE_INDEX


def sample(ids, trained_from):
    """A sample whose labels train its tokens from ``trained_from`` on."""
    return ids, [X] * trained_from + ids[trained_from:]


def test_slices_split_the_rows_end_to_end_and_score_each_supervised_token_once():
    # 2 rows of 5: [10 11 12 | 13 14] and [20 21 22 23 + pad]; flat length 10, 3 ranks -> padded to 12, slices of 4.
    batch = collate_packed([[sample([10, 11, 12], 1), sample([13, 14], 1)], [sample([20, 21, 22, 23], 2)]],
                           pad_token_id=99, step_supervised_tokens=7)
    slices = [slice_packed(batch, rank, 3) for rank in range(3)]
    assert all(isinstance(s, PackedSlice) for s in slices)
    assert [s.input_ids.tolist() for s in slices] == [[[10, 11, 12, 13]], [[14, 20, 21, 22]], [[23, 99, 0, 0]]]
    assert [s.position_ids.tolist() for s in slices] == [[[0, 1, 2, 0]], [[1, 0, 1, 2]], [[3, 0, 0, 1]]]
    # The whole micro-batch's boundaries, the end padding one more pseudo-sample.
    assert all(s.cu_seq_lens.tolist() == [0, 3, 5, 9, 10, 12] and s.max_seq_len == 4 for s in slices)
    assert [s.real_tokens.tolist() for s in slices] == [[[True] * 4], [[True] * 4], [[True, False, False, False]]]
    # Supervised labels: 11 12 (sample 1), 14 (sample 2), 22 23 (sample 3). Slice 0's last position (13) predicts
    # 14, the first token of slice 1; slice 1's last (22) predicts 23, the first of slice 2.
    assert [(s.supervision.keep.tolist(), s.supervision.targets.tolist()) for s in slices] == [
        ([0, 1, 3], [11, 12, 14]), ([2, 3], [22, 23]), ([], [])]
    assert [s.supervision.index.tolist() for s in slices] == [[0, 1, 2], [0, 1], []]
    counts = [s.counts for s in slices]
    assert [c.samples for c in counts] == [2, 1, 0] and [c.tokens for c in counts] == [4, 4, 1]
    assert [c.slots for c in counts] == [4, 4, 4] and sum(c.supervised for c in counts) == batch.counts.supervised
    assert sum(c.squared_lengths for c in counts) == batch.counts.squared_lengths == 9 + 4 + 16
    assert all(s.step_supervised_tokens == 7 for s in slices)


@pytest.mark.parametrize("size", [1, 2, 3, 4, 7])
def test_every_supervised_token_is_scored_once_whatever_the_group_size(size):
    batch = collate_packed([[sample(list(range(1, 12)), 3), sample([40, 41, 42], 1)], [sample(list(range(50, 61)), 5)]],
                           pad_token_id=0)
    whole = batch.supervision_flat
    pairs = []  # (position in the flat micro-batch, target) scored by each slice
    for rank in range(size):
        part = slice_packed(batch, rank, size)
        pairs += [(rank * part.input_ids.shape[1] + k, t) for k, t in zip(part.supervision.keep.tolist(),
                                                                         part.supervision.targets.tolist())]
    assert pairs == list(zip(whole.keep.tolist(), whole.targets.tolist()))
    ids = torch.cat([slice_packed(batch, rank, size).input_ids for rank in range(size)], dim=1)
    assert torch.equal(ids[0, : batch.input_ids.numel()], batch.input_ids.reshape(-1))


def test_models_that_sequence_parallelism_cannot_split_are_refused_in_one_line():
    config = AutoConfig.from_pretrained(TINY_QWEN)  # 4 heads, 2 key/value heads
    check_sequence_parallel(config, 2, "sdpa_varlen")
    with pytest.raises(ConfigError, match=r"must divide the model's 4 attention heads and 2 key/value heads .*\[1, 2\]"):
        check_sequence_parallel(config, 4, "sdpa_varlen")
    with pytest.raises(ConfigError, match="set model.attn_implementation sdpa_varlen, not sdpa$"):
        check_sequence_parallel(config, 2, "sdpa")
    hybrid = AutoConfig.from_pretrained(ROOT / "models" / "tiny-qwen3.5")
    with pytest.raises(ConfigError, match="linear-attention layers"):
        check_sequence_parallel(hybrid, 2, "sdpa_varlen")


def packed_batch():
    """Two rows of several chats from the tiny model's vocabulary; sample lengths that do not divide evenly."""
    generator = torch.Generator().manual_seed(0)

    def chat(length, prompt):
        return sample(torch.randint(5, 500, (length,), generator=generator).tolist(), prompt)

    return collate_packed([[chat(37, 9), chat(21, 4), chat(30, 30 - 8)], [chat(50, 12), chat(29, 3)]], pad_token_id=0)


def sequence_parallel_rank(rank: int, size: int, store: str, out: str) -> None:
    """One rank: its slice's NLL sum, count and gradients through the sequence-parallel attention, and an exchange
    with uneven rank contents, written to ``out``."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=size)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(TINY_QWEN, attn_implementation="sdpa_varlen").train()
    part = slice_packed(packed_batch(), rank, size)
    inputs, positions = model_inputs(part, "sdpa_varlen", dist.group.WORLD)
    logits = model(**inputs, use_cache=False).logits
    stats = token_stats(gather_supervised(logits[:, positions.keep], positions), positions.targets)
    stats.nll_sum.backward()
    gradients = {name: p.grad for name, p in model.named_parameters()}
    for gradient in gradients.values():
        dist.all_reduce(gradient)  # what FSDP2's reduce-scatter sums (before its average, which the divisor undoes)
    # Rank r holds r * 10 + (0..size*2): exchanging dim 1 for dim 0 gives rank r every rank's r-th pair.
    mine = (rank * 10 + torch.arange(size * 2)).reshape(1, -1)
    swapped = exchange(mine, dist.group.WORLD, scatter_dim=1, gather_dim=0)
    if rank == 0:
        torch.save({"nll": stats.nll_sum.detach(), "tokens": stats.supervised_tokens, "gradients": gradients}, out)
    nll = stats.nll_sum.detach().reshape(1)
    dist.all_reduce(nll)
    with open(f"{out}.{rank}", "w") as file:
        json.dump({"swapped": swapped.tolist(), "tokens": stats.supervised_tokens, "nll": nll.item()}, file)
    dist.destroy_process_group()


def test_sequence_parallel_loss_and_gradients_equal_one_process(tmp_path):
    size = 2
    out = tmp_path / "rank0.pt"
    mp.start_processes(sequence_parallel_rank, args=(size, str(tmp_path / "store"), str(out)), nprocs=size,
                       start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank0.pt.{rank}").read_text()) for rank in range(size)]
    assert [r["swapped"] for r in ranks] == [[[10 * source + 2 * rank, 10 * source + 2 * rank + 1] for source in range(size)]
                                             for rank in range(size)]
    # One process on the whole micro-batch.
    model = AutoModelForCausalLM.from_pretrained(TINY_QWEN, attn_implementation="sdpa_varlen").train()
    batch = packed_batch()
    inputs, positions = model_inputs(batch, "sdpa_varlen")
    stats = token_stats(gather_supervised(model(**inputs, use_cache=False).logits[:, positions.keep], positions),
                        positions.targets)
    stats.nll_sum.backward()
    assert sum(r["tokens"] for r in ranks) == stats.supervised_tokens == batch.counts.supervised
    assert ranks[0]["nll"] == pytest.approx(stats.nll_sum.item(), rel=1e-5)
    saved = torch.load(out)
    for name, p in model.named_parameters():
        torch.testing.assert_close(saved["gradients"][name], p.grad, rtol=1e-4, atol=1e-5, msg=name)
