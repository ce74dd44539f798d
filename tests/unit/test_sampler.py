"""ResumableSampler's global position: a resume on another number of ranks continues the same
global sample order, and on the same number it is exactly the per-rank resume."""

from __future__ import annotations

import pytest

from acceltrain.data.sampler import ResumableSampler


def _interleave(parts: list[list[int]]) -> list[int]:
    """What W ranks draw, in global order (rank r's j-th sample is global sample j*W + r)."""
    return [parts[r][j] for j in range(len(parts[0])) for r in range(len(parts))]


@pytest.mark.parametrize("n, drop_last", [(96, True), (97, True), (97, False), (10, False)])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_global_start_on_the_same_world_is_exactly_the_per_rank_start(n, drop_last, world):
    for rank in range(world):
        probe = ResumableSampler(n, num_replicas=world, rank=rank, seed=3, drop_last=drop_last)
        for k in range(probe.num_samples + 1):
            a = ResumableSampler(n, num_replicas=world, rank=rank, seed=3, drop_last=drop_last)
            a.set_start(k)
            b = ResumableSampler(n, num_replicas=world, rank=rank, seed=3, drop_last=drop_last)
            b.set_global_start(k * world)
            assert list(a) == list(b) and len(a) == len(b), (rank, k)


@pytest.mark.parametrize("saved_world, new_world", [(2, 1), (1, 2), (2, 3), (4, 2), (3, 4)])
@pytest.mark.parametrize("consumed_per_rank", [0, 4, 7])
def test_state_from_one_world_continues_the_global_order_on_another(saved_world, new_world, consumed_per_rank):
    n = 97
    full = ResumableSampler(n, seed=5).epoch_order(2).tolist()
    saved = []
    for rank in range(saved_world):
        s = ResumableSampler(n, num_replicas=saved_world, rank=rank, seed=5)
        s.set_epoch(2)
        it = iter(s)
        for _ in range(consumed_per_rank):
            next(it)
        saved.append(s.state_dict())
    g = consumed_per_rank * saved_world
    assert {st["global_offset"] for st in saved} == {g}
    parts = []
    for rank in range(new_world):
        s = ResumableSampler(n, num_replicas=new_world, rank=rank, seed=5)
        s.load_state_dict(saved[min(rank, saved_world - 1)])
        assert s.epoch == 2
        parts.append(list(s))
    # Every new rank gets the same count (no rank waits on a collective), and together they
    # draw the rest of the epoch's order from g on, truncated to a multiple of new_world.
    assert len({len(p) for p in parts}) == 1
    rest = (n - g) // new_world * new_world
    assert _interleave(parts) == full[g:g + rest]
    # The pass's end moves to the next epoch, from its start, on the new world.
    again = ResumableSampler(n, num_replicas=new_world, rank=0, seed=5)
    again.load_state_dict(saved[0])
    list(again)
    assert again.epoch == 3 and list(again) == ResumableSampler(n, num_replicas=new_world, seed=5).epoch_order(3).tolist()


def test_a_resized_pass_saves_a_global_position_that_resumes_again():
    s = ResumableSampler(50, num_replicas=2, rank=1, seed=1)
    s.set_global_start(7)  # odd: not a per-rank offset of 2 ranks
    it = iter(s)
    next(it), next(it)
    state = s.state_dict()
    assert state["global_offset"] == 11 and state["offset"] == -1
    t = ResumableSampler(50, num_replicas=2, rank=1, seed=1)
    t.load_state_dict(state)
    assert list(t) == list(it)


def test_a_changed_dataset_is_still_refused_across_worlds():
    state = ResumableSampler(40, num_replicas=2, rank=0).state_dict()
    with pytest.raises(ValueError, match="dataset_len=40, this run has dataset_len=41"):
        ResumableSampler(41, num_replicas=1, rank=0).load_state_dict(state)
