from collections import Counter

import pytest

from torch.utils.data import Dataset

from sft_lightning.loaders import ResumableLoader
from sft_lightning.sampling import StepPlan, StepPlanSampler

TOKENS = (3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5)  # 11 samples: steps end with partial batches


def test_single_process_plan_covers_each_sample_once_with_step_totals():
    plan = StepPlan(TOKENS, batch_size=2, accumulate_grad_batches=2, shuffle=False).epoch()
    assert [m.indices for m in plan] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10,)]
    assert [m.step_supervised_tokens for m in plan] == [9, 9, 22, 22, 13, 13]
    assert not any(m.ghost for m in plan)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_share_every_sample_exactly_once_and_run_equal_steps(world):
    plans = [StepPlan(TOKENS, 2, 2, world, rank, shuffle=True, seed=7).epoch(1) for rank in range(world)]
    assert len({len(p) for p in plans}) == 1
    seen = Counter(i for p in plans for m in p if not m.ghost for i in m.indices)
    assert seen == Counter(range(len(TOKENS)))
    for step in zip(*plans):  # every rank agrees on the step total
        assert len({m.step_supervised_tokens for m in step}) == 1


def test_global_batches_match_single_process_order():
    single = StepPlan(TOKENS, batch_size=4, shuffle=True, seed=3).epoch()
    ranks = [StepPlan(TOKENS, 2, 1, 2, rank, shuffle=True, seed=3).epoch() for rank in range(2)]
    for whole, first, second in zip(single, *ranks):
        assert whole.indices == first.indices + second.indices
        assert whole.step_supervised_tokens == first.step_supervised_tokens


def test_ghost_when_a_rank_has_nothing_left():
    plans = [StepPlan((1, 1, 1), 2, 1, 4, rank, shuffle=False).epoch() for rank in range(4)]
    assert [p[-1].ghost for p in plans] == [False, False, False, True]


def test_sampler_len_and_epoch_reshuffle():
    sampler = StepPlanSampler(StepPlan(TOKENS, batch_size=4, shuffle=True, seed=0))
    assert len(sampler) == len(list(sampler)) == 3
    first = [m.indices for m in sampler]
    sampler.set_epoch(1)
    assert [m.indices for m in sampler] != first




class Indices(Dataset):
    def __getitem__(self, micro):
        return list(micro.indices)


def trained_loader(plan: StepPlan) -> ResumableLoader:
    return ResumableLoader(Indices(), sampler=StepPlanSampler(plan), batch_size=None)


def take(loader: ResumableLoader, count=None) -> list:
    taken = []
    for indices in loader:
        if len(taken) == count:
            break
        loader.count_trained()  # as training takes each micro-batch
        taken.append(indices)
    return taken


@pytest.mark.parametrize("done", [1, 3])
def test_a_resumed_loader_continues_where_training_stopped_whatever_lightning_numbers_the_epoch(done):
    plan = StepPlan(TOKENS, batch_size=4, shuffle=True, seed=0)
    epochs = [[list(m.indices) for m in plan.epoch(e)] for e in range(3)]
    # Uninterrupted, as Lightning drives it: set_epoch, then a new iterator, each epoch.
    loader = trained_loader(plan)
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        assert take(loader) == epochs[epoch]
    # Killed after `done` micro-batches of epoch 0 (3: all of it, where validation at the epoch's end saves a checkpoint).
    first = trained_loader(plan)
    take(first, done)
    state = first.state_dict()
    resumed = trained_loader(plan)
    resumed.load_state_dict(state)
    if done == 3:
        # Lightning 2.6.6 draws an iterator, calls set_epoch(1) for the epoch it finishes without a batch, and then
        # numbers the next epoch 2: the data is still epoch 1, whole (before: epoch 1 was skipped).
        iter(resumed)
        resumed.sampler.set_epoch(1)
        resumed.sampler.set_epoch(2)
        assert take(resumed) == epochs[1]
    else:
        resumed.sampler.set_epoch(0)
        assert take(resumed) == epochs[0][done:]
    resumed.sampler.set_epoch(7)
    assert take(resumed) == epochs[2 if done == 3 else 1]


LENGTHS = tuple((i * 53) % 97 + 3 for i in range(200))


def padded_slots(plan, epoch=0):
    return sum(len(m.indices) * max(plan.lengths[i] for i in m.indices) for m in plan.epoch(epoch))


def test_group_by_length_cuts_padding_and_keeps_every_sample_once():
    plain = StepPlan(LENGTHS, batch_size=8, seed=1, lengths=LENGTHS)
    grouped = StepPlan(LENGTHS, batch_size=8, seed=1, lengths=LENGTHS, group_by_length=True)
    assert padded_slots(grouped) < 0.75 * padded_slots(plain)
    for epoch in (0, 1):
        micro = grouped.epoch(epoch)
        assert sorted(i for m in micro for i in m.indices) == list(range(200)) and len(micro) == len(grouped)
        assert max(LENGTHS[i] for i in micro[0].indices) == max(LENGTHS)  # the largest batch runs first
    assert [m.indices for m in grouped.epoch(0)] != [m.indices for m in grouped.epoch(1)]


@pytest.mark.parametrize("world", [1, 2])
def test_token_budget_batches(world):
    plans = [StepPlan(LENGTHS, 1, 2, world, rank, seed=4, lengths=LENGTHS, max_tokens=300) for rank in range(world)]
    epochs = [[plan.epoch(e) for e in (0, 1)] for plan in plans]
    for plan, per_epoch in zip(plans, epochs):
        assert {len(micro) for micro in per_epoch} == {len(plan)}  # same step count every epoch
        for micro in per_epoch[0]:
            assert len(micro.indices) * max(LENGTHS[i] for i in micro.indices) <= 300
    seen = Counter(i for per_epoch in epochs for m in per_epoch[0] if not m.ghost for i in m.indices)
    assert seen == Counter(range(200))
    for step in zip(*(per_epoch[1] for per_epoch in epochs)):
        assert len({m.step_supervised_tokens for m in step}) == 1
