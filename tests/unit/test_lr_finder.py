"""LRFinder: a suggestion near the known good LR, exact restoration, divergence, the plot, find_lr."""

from __future__ import annotations

import copy
import random
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from acceltrain.lr_finder import LRFinder, find_lr, suggest_lr
from tests.helpers import ToyTrainer, params


def _regression(n: int = 256, d: int = 8) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Features of different scales; returns x, y and L, the largest Hessian eigenvalue of the MSE."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 3.0, d)
    y = x @ torch.randn(d, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    xa = torch.cat([x, torch.ones(n, 1)], 1)  # the bias is a weight on a constant feature
    # MSE = mean((xa w - y)^2): Hessian 2 xa^T xa / n; plain SGD is stable below 2 / L.
    big_l = 2 * torch.linalg.eigvalsh(xa.T @ xa / n).max().item()
    return x, y, big_l


@pytest.mark.parametrize("batch_size", [32, 256])
def test_sgd_linear_regression_suggestion_is_near_one_over_l(batch_size):
    x, y, big_l = _regression()
    model = nn.Linear(8, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    finder = LRFinder(model, torch.optim.SGD(model.parameters(), lr=0.01), criterion=nn.MSELoss())
    lr = finder.find(loader, start_lr=1e-5, end_lr=10.0, num_steps=100)
    assert 0.1 / big_l < lr < 2 / big_l  # within 10x of 1/L, and below the stability limit
    assert finder.suggestion == lr
    assert len(finder.history["lrs"]) == len(finder.history["losses"]) == len(finder.history["raw_losses"])


def test_adam_mlp_suggestion_is_in_the_range_that_trains():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 10, generator=g)
    y = (x[:, :3].sum(1) > 0).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64, shuffle=True)
    lr = LRFinder(model, torch.optim.Adam(model.parameters()), criterion=nn.CrossEntropyLoss()).find(
        loader, start_lr=1e-6, end_lr=10.0, num_steps=80)
    assert 1e-3 <= lr <= 1.0  # within 10x of the 1e-2..1e-1 that trains this MLP with Adam


def _snapshot(model: nn.Module, opt: torch.optim.Optimizer) -> dict:
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "grads": {k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()},
        "buffers": {k: v.clone() for k, v in model.named_buffers()},
        "opt": copy.deepcopy(opt.state_dict()),
        "training": [m.training for m in model.modules()],
    }


def _assert_same(a: dict, b: dict) -> None:
    for key in ("params", "buffers"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), name
    for name in a["grads"]:
        assert (a["grads"][name] is None) == (b["grads"][name] is None)
        assert a["grads"][name] is None or torch.equal(a["grads"][name], b["grads"][name])
    assert a["opt"]["param_groups"] == b["opt"]["param_groups"]  # lr, betas, initial_lr, ...
    assert a["opt"]["state"].keys() == b["opt"]["state"].keys()
    for idx, state in a["opt"]["state"].items():
        for k, v in state.items():
            assert torch.equal(v, b["opt"]["state"][idx][k]), (idx, k)
    assert a["training"] == b["training"]


@pytest.mark.parametrize("trainable_only", [True, False])
def test_model_optimizer_rng_and_loader_order_are_restored_exactly(trainable_only):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.2), nn.ReLU(), nn.Linear(16, 1))
    model[0].weight.requires_grad_(False)  # frozen: outside the sweep when trainable_only
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)  # adds initial_lr to the groups
    x, y, _ = _regression(64)
    for _ in range(3):  # a non-empty optimizer state and a pending gradient
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sched.step()
    nn.functional.mse_loss(model(x[:16]), y[:16]).backward()
    model.eval()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True,
                                         generator=torch.Generator().manual_seed(5))
    before = _snapshot(model, opt)
    rng = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    loader_state = loader.generator.get_state()

    LRFinder(model, opt, criterion=nn.MSELoss(), trainable_only=trainable_only).find(loader, num_steps=30)

    _assert_same(before, _snapshot(model, opt))
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert np.random.get_state()[1].tolist() == rng[1][1].tolist() and random.getstate() == rng[2]
    assert torch.equal(loader.generator.get_state(), loader_state)


def test_divergence_stops_the_sweep_early():
    x, y, _ = _regression()
    model = nn.Linear(8, 1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    finder = LRFinder(model, torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.MSELoss())
    finder.find(loader, start_lr=1e-4, end_lr=100.0, num_steps=100, diverge_th=5.0)
    losses = finder.history["losses"]
    assert 10 < len(losses) < 100 and finder.history["lrs"][-1] < 100.0
    assert losses[-1] > 5.0 * min(losses)  # stopped at the first point past the threshold
    assert all(loss <= 5.0 * min(losses[: i + 1]) for i, loss in enumerate(losses[:-1]))


def test_noisy_first_batches_only_warm_the_average_up():
    scripted = iter([0.1, 50.0] + [10.0 - 0.1 * i for i in range(48)])
    model = nn.Linear(2, 1)

    def forward(model, batch):  # a loss with a gradient, whose value follows the script
        return model.weight.sum() * 0 + next(scripted)

    finder = LRFinder(model, torch.optim.SGD(model.parameters(), lr=0.1))
    lr = finder.find([torch.zeros(1)], forward_fn=forward, num_steps=50)
    losses = finder.history["losses"]
    assert len(losses) == 50  # the spike at the 2nd batch is 250x the 1st, inside the warm-up: no stop
    assert losses[1] > 5 * losses[0]
    assert lr == pytest.approx(finder.history["lrs"][49] / 10)  # not the 1st point's 0.1, the true minimum


def test_plot_writes_a_png_with_the_suggestion(tmp_path):
    x, y, _ = _regression(64)
    model = nn.Linear(8, 1)
    finder = LRFinder(model, torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.MSELoss())
    finder.find(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16), num_steps=40)
    out = finder.plot(tmp_path / "sub" / "lr.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1024


def test_plot_without_matplotlib_says_how_to_install(monkeypatch):
    finder = LRFinder(nn.Linear(2, 1), torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1))
    finder.history = {"lrs": [1e-3, 1e-2], "losses": [1.0, 0.5], "raw_losses": [1.0, 0.5]}
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'acceltrain\[plot\]'"):
        finder.plot("never.png")


def test_suggest_lr_methods():
    lrs = [10 ** (-6 + 0.2 * i) for i in range(40)]
    losses = [10.0] * 21 + [5.0 - 0.1 * i for i in range(15)] + [4.0, 6.0, 9.0, 20.0]
    assert suggest_lr(lrs, losses) == pytest.approx(lrs[35] / 10)  # the lowest loss, 3.6
    assert suggest_lr(lrs, losses, "steepest") == pytest.approx(lrs[21])  # the drop from 10 to 5
    with pytest.raises(ValueError, match="method must be"):
        suggest_lr(lrs, losses, "valley")


def test_default_forward_needs_a_criterion_for_tuple_batches():
    model = nn.Linear(8, 1)
    finder = LRFinder(model, torch.optim.SGD(model.parameters(), lr=0.1))
    w_before = model.weight.detach().clone()
    x, y, _ = _regression(32)
    with pytest.raises(ValueError, match="^criterion"):
        finder.find(torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8))
    assert torch.equal(model.weight, w_before)  # restored on the error path too
    with pytest.raises(ValueError, match="start_lr and end_lr"):
        finder.find([], start_lr=1.0, end_lr=0.1)


# ----------------------------------------------------------------------------- find_lr(trainer)
class Shuffled(ToyTrainer):
    def build_data_loader(self):
        return torch.utils.data.DataLoader(super().build_data_loader().dataset, batch_size=8, shuffle=True)


@pytest.mark.parametrize("cls", [ToyTrainer, Shuffled])
def test_find_lr_on_a_trainer_leaves_training_bit_identical(cls):
    ref = cls(max_steps=5, device="cpu", optimizer="adamw", lr=1e-2, data_seed=3)
    ref.train()
    t = cls(max_steps=5, device="cpu", optimizer="adamw", lr=1e-2, data_seed=3)
    lr = find_lr(t, start_lr=1e-5, end_lr=10.0, num_steps=30)
    assert lr > 0 and t.step == 0
    assert t.optimizer.param_groups[0]["lr"] == 1e-2  # apply=False
    t.train()
    for a, b in zip(params(ref.model), params(t.model), strict=True):
        assert torch.equal(a, b)


def test_find_lr_apply_sets_the_base_lr_of_the_schedule(tmp_path):
    t = ToyTrainer(max_steps=4, device="cpu", scheduler=True, lr=0.1)
    lr = find_lr(t, num_steps=20, apply=True, plot=tmp_path / "lr.png")
    assert (tmp_path / "lr.png").stat().st_size > 1024
    assert t.lr_scheduler.scheduler.base_lrs == [pytest.approx(lr)]
    t.train()
    assert t.step_info["lr"][0] == pytest.approx(lr / 5)  # ToyTrainer's lambda: 1 / (1 + steps done)


def test_find_lr_refuses_fp16_scaling_and_one_shot_data():
    class Scaled(ToyTrainer):
        def build_grad_scaler(self):
            return torch.amp.GradScaler("cpu")

    with pytest.raises(ValueError, match="fp16 loss scaling"):
        find_lr(Scaled(max_steps=1, device="cpu"))

    class OneShot(ToyTrainer):
        def build_data_loader(self):
            return iter(list(super().build_data_loader()))

    with pytest.raises(ValueError, match="re-iterable"):
        find_lr(OneShot(max_steps=1, device="cpu"))
