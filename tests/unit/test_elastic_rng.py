"""acceltrain.elastic.seed_new_rank: a rank that a resized run adds is seeded from (seed, step,
rank), so its dropout stream is reproducible across reruns and differs between ranks and steps."""

from __future__ import annotations

import random

import numpy as np
import torch

from acceltrain.elastic import seed_new_rank
from acceltrain.rng import rng_state, set_rng_state


def _draws() -> tuple[float, float, list[float]]:
    return random.random(), float(np.random.rand()), torch.rand(4).tolist()


def test_a_new_rank_is_seeded_from_seed_step_and_rank_alone():
    saved = rng_state()
    try:
        random.seed(1), np.random.seed(2), torch.manual_seed(3)
        seed_new_rank(1234, 40, 1)
        first = _draws()
        random.seed(9), np.random.seed(9), torch.manual_seed(9)  # whatever the process did before
        seed_new_rank(1234, 40, 1)
        assert _draws() == first
        others = set()
        for args in ((1234, 40, 2), (1234, 41, 1), (1235, 40, 1)):
            seed_new_rank(*args)
            others.add(_draws()[2][0])
        assert len(others | {first[2][0]}) == 4  # another rank, step or seed: another stream
        seed_new_rank(2**64 + 5, 0, 0)  # seeds beyond 63 bits are folded in, not refused
    finally:
        set_rng_state(saved)
