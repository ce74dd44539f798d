"""Schedules: every LR equals its closed form, restarts, floors, exact resume, persistent scaling."""

from __future__ import annotations

import io
import math

import pytest
import torch

from acceltrain.schedules import build_schedule, reduce_lr, scale_lr, surge_lr
from tests.helpers import ToyTrainer

BASE = 2.0


def _optimizer(lr: float = BASE) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def _lrs(sched: torch.optim.lr_scheduler.LRScheduler, n: int) -> list[float]:
    """The LR each of the next ``n`` updates uses (the trainer steps the scheduler after each)."""
    out = []
    for _ in range(n):
        out.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    return out


# Closed forms, written from the definitions (not from the implementation).
def _progress(k: int, w: int, t: int) -> float:
    return min(1.0, (k - w) / (t - w))


def _cos(m: float, p: float) -> float:
    return m + (1 - m) * 0.5 * (1 + math.cos(math.pi * p))


def _restart_position(k: int, t0: int, tm: int) -> tuple[int, int]:
    start, length = 0, t0
    while k >= start + length:
        start, length = start + length, length * tm
    return k - start, length


CASES = {
    "constant": ({}, lambda k, w, t, m: 1.0),
    "linear": ({}, lambda k, w, t, m: m + (1 - m) * (1 - _progress(k, w, t))),
    "polynomial": ({"power": 2.0}, lambda k, w, t, m: m + (1 - m) * (1 - _progress(k, w, t)) ** 2),
    "cosine": ({}, lambda k, w, t, m: _cos(m, _progress(k, w, t))),
    "cosine_restarts": ({"t_0": 6, "t_mult": 2},
                        lambda k, w, t, m: _cos(m, _restart_position(k - w, 6, 2)[0] / _restart_position(k - w, 6, 2)[1])),
    "wsd": ({"decay_ratio": 0.25},
            lambda k, w, t, m: 1.0 if k < t - 10 else (_cos(m, (k - (t - 10)) / 10) if k < t else m)),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("warmup, floor", [(0, 0.0), (5, 0.1)])
def test_every_lr_equals_the_closed_form(name, warmup, floor):
    kwargs, closed = CASES[name]
    total = 40
    sched = build_schedule(_optimizer(), name, total, warmup_steps=warmup, min_lr_ratio=floor, **kwargs)
    got = _lrs(sched, total + 15)  # past the end too: decays hold at the floor
    expected = [BASE * (k / warmup if k < warmup else closed(k, warmup, total, floor)) for k in range(total + 15)]
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
    if name not in ("constant", "cosine_restarts"):
        assert got[total:] == pytest.approx([BASE * floor] * 15, rel=1e-12, abs=1e-15)
    assert min(got[warmup:]) >= BASE * floor - 1e-12


def test_restarts_start_at_t0_then_t0_plus_t0_tmult():
    sched = build_schedule(_optimizer(), "cosine_restarts", 200, warmup_steps=3, min_lr_ratio=0.2, t_0=4, t_mult=3)
    got = _lrs(sched, 60)
    peaks = [k for k in range(4, 60) if got[k] == pytest.approx(BASE) and got[k - 1] < BASE]
    assert peaks == [3 + 4, 3 + 4 + 12, 3 + 4 + 12 + 36]  # warmup ends at 3; cycles of 4, 12, 36
    assert got[3 + 3] == pytest.approx(BASE * _cos(0.2, 3 / 4))  # last step of the first cycle


def test_warmup_ratio_rounds_up_like_transformers():
    sched = build_schedule(_optimizer(), "linear", 30, warmup_ratio=0.1)  # ceil(3.0) = 3
    got = _lrs(sched, 4)
    assert got == pytest.approx([0.0, BASE / 3, 2 * BASE / 3, BASE])
    sched = build_schedule(_optimizer(), "linear", 25, warmup_ratio=0.1)  # ceil(2.5) = 3
    assert _lrs(sched, 4)[3] == pytest.approx(BASE)


def _save_load(state: dict) -> dict:
    """Through a file with the checkpoint's safe loader: nothing in the state needs pickle."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name, kwargs", [("cosine", {}), ("cosine_restarts", {"t_0": 7, "t_mult": 2}),
                                          ("wsd", {"decay_ratio": 0.3, "decay_type": "1-sqrt"})])
def test_state_dict_round_trip_mid_schedule_continues_identically(name, kwargs):
    a = build_schedule(_optimizer(), name, 60, warmup_steps=4, min_lr_ratio=0.05, **kwargs)
    _lrs(a, 23)
    state = _save_load(a.state_dict())
    b = build_schedule(_optimizer(), name, 60, warmup_steps=4, min_lr_ratio=0.05, **kwargs)
    b.load_state_dict(state)
    b.optimizer.param_groups[0]["lr"] = a.optimizer.param_groups[0]["lr"]  # the optimizer's own state_dict does this
    assert _lrs(b, 50) == _lrs(a, 50)


def test_reduce_lr_persists_through_state_dict():
    a = build_schedule(_optimizer(), "cosine", 50, warmup_steps=5, min_lr_ratio=0.1)
    _lrs(a, 12)
    before = a.optimizer.param_groups[0]["lr"]
    assert reduce_lr(a, 0.5) == pytest.approx(before / 2)
    assert a.get_last_lr() == [pytest.approx(before / 2)]
    sched_state, opt_state = _save_load(a.state_dict()), _save_load(a.optimizer.state_dict())
    b = build_schedule(_optimizer(), "cosine", 50, warmup_steps=5, min_lr_ratio=0.1)
    b.optimizer.load_state_dict(opt_state)
    b.load_state_dict(sched_state)
    got = _lrs(b, 30)
    assert got == _lrs(a, 30)
    assert got == pytest.approx([0.5 * BASE * _cos(0.1, (k - 5) / 45) for k in range(12, 42)], rel=1e-12)
    assert surge_lr(b, 4.0) == pytest.approx(2 * BASE * _cos(0.1, 37 / 45))


def test_scale_lr_shared_lambda_is_scaled_once_for_many_groups():
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, (1.0, 0.1, 0.01), strict=True)])
    sched = build_schedule(opt, "constant", 10)
    scale_lr(sched, 0.25)
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.25, 0.025, 0.0025])


def test_scale_lr_without_our_schedule():
    opt = _optimizer(1.0)
    assert reduce_lr(opt, 0.1) == pytest.approx(0.1)  # no scheduler: the group LR itself
    foreign = torch.optim.lr_scheduler.LambdaLR(_optimizer(1.0), lambda s: 1.0 / (1 + s))
    _lrs(foreign, 3)
    surge_lr(foreign, 2.0)  # a plain-function lambda: base_lrs are scaled (and saved in state_dict)
    assert foreign.state_dict()["base_lrs"] == [2.0]
    assert _lrs(foreign, 2) == pytest.approx([2.0 / 4, 2.0 / 5])


def test_trainer_resume_keeps_a_reduced_schedule(tmp_path):
    class Scheduled(ToyTrainer):
        def build_lr_scheduler(self):
            return build_schedule(self.optimizer, "cosine", self.max_steps, warmup_steps=2, min_lr_ratio=0.1)

    a = Scheduled(max_steps=12, device="cpu")
    a.build()
    for _ in range(5):
        a.run_step()
    reduce_lr(a, 0.5)
    state = _save_load(a.state_dict())
    b = Scheduled(max_steps=12, device="cpu")
    b.load_state_dict(state)
    b.build()
    lrs_a, lrs_b = [], []
    for t, out in ((a, lrs_a), (b, lrs_b)):
        while t.step < t.max_steps:
            t.run_step()
            out.append(t.step_info["lr"][0])
    assert lrs_a == lrs_b
    assert lrs_a[-1] == pytest.approx(0.5 * 0.1 * _cos(0.1, 10 / 10))  # base 0.1, halved, at the floor


@pytest.mark.parametrize(
    "args, kwargs, field",
    [
        (("cosinus", 10), {}, "name"),
        (("cosine", 0), {}, "total_steps"),
        (("cosine", 10), {"warmup_steps": 2, "warmup_ratio": 0.1}, "warmup_steps and warmup_ratio"),
        (("cosine", 10), {"warmup_steps": 10}, "warmup_steps"),
        (("cosine", 10), {"warmup_ratio": 1.5}, "warmup_ratio"),
        (("cosine", 10), {"min_lr_ratio": -0.1}, "min_lr_ratio"),
        (("cosine", 10), {"power": 2}, "power: not an argument of schedule 'cosine'"),
        (("cosine_restarts", 10), {}, "t_0"),
        (("cosine_restarts", 10), {"t_0": 3, "t_mult": 0}, "t_mult"),
        (("polynomial", 10), {"power": -1}, "power"),
        (("wsd", 10), {"decay_ratio": 0.0}, "decay_ratio"),
        (("wsd", 10), {"decay_type": "exp"}, "decay_type"),
    ],
)
def test_bad_arguments_name_the_field(args, kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        build_schedule(_optimizer(), *args, **kwargs)


def test_bad_scaling_factors():
    with pytest.raises(ValueError, match="reduce_lr factor must be in"):
        reduce_lr(_optimizer(), 2.0)
    with pytest.raises(ValueError, match="surge_lr factor must be > 1"):
        surge_lr(_optimizer(), 0.5)
    with pytest.raises(ValueError, match="factor must be a finite number"):
        scale_lr(_optimizer(), float("nan"))
    with pytest.raises(TypeError, match="expected an optimizer"):
        scale_lr(object(), 0.5)
