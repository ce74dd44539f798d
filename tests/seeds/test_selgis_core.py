"""SELGIS's ``SelgisCore`` manual loop (seed 000, "Core") on acceltrain.

The seed lists the core's methods without a loop; the loop here is the one those methods
describe (and :mod:`acceltrain.compat.selgis_core` documents): zero_grad, forward under
``get_amp_context()``, ``check_loss``, ``backward_step``, ``optimizer_step``, and
``eval_epoch`` at the end of each epoch. It is checked against the one-call SELGIS ``Trainer``
on the same data and seed: the code path of a step is the same, so losses, learning rates,
evaluation metrics and weights are bitwise equal.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import acceltrain
from acceltrain import GuardError, NonFiniteError
from acceltrain.compat.selgis import (
    Callback,
    SelgisConfig,
    SelgisCore,
    SmartScheduler,
    Trainer,
    get_optimizer_grouped_params,
)

N, BATCH = 64, 16  # 4 batches an epoch


def _loader(seed: int = 0) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 8, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long()), batch_size=BATCH)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))


def _cfg(tmp_path, **kw) -> SelgisConfig:
    base = {"max_epochs": 3, "lr_finder_enabled": False, "device": "cpu", "output_dir": str(tmp_path / "out"),
            "batch_size": BATCH, "eval_batch_size": BATCH, "scheduler_type": "cosine", "warmup_ratio": 0.1,
            "state_storage": "memory"}
    return SelgisConfig(**{**base, **kw})


class Steps(Callback):
    """The one-call Trainer's loss and LR of every applied step, and its weights at the end of each."""

    def __init__(self):
        self.losses, self.lrs, self.weights = [], [], {}

    def on_step_end(self, trainer, step, loss):
        self.losses.append(float(loss))
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])
        self.weights[step] = [p.detach().clone() for p in trainer.model.parameters()]


def _core(cfg, steps: int):
    model = _mlp()
    optimizer = torch.optim.AdamW(get_optimizer_grouped_params(model, cfg.weight_decay), lr=1e-3)
    scheduler = SmartScheduler(optimizer, initial_lr=1e-3, config=cfg, num_training_steps=steps)
    return model, optimizer, SelgisCore(model, optimizer, scheduler, cfg, torch.device("cpu"))


def _guard(t):
    return next(h for h in t.hooks if isinstance(h, acceltrain.GuardHook))


def _events(guard):
    return [(e["kind"], e.get("from_step", e["step"]), e.get("to_step")) for e in guard.events]


def test_manual_loop_equals_the_trainer_bitwise(tmp_path):
    cfg = _cfg(tmp_path)
    ref = Steps()
    trainer = Trainer(_mlp(), cfg, _loader(), _loader(seed=1), callbacks=[ref])
    trainer.train()
    ref_evals = [m for _, m in next(h for h in trainer.hooks if isinstance(h, acceltrain.EvaluationHook)).history]

    # ---- the manual loop, as the core's methods describe it
    train_loader, eval_loader = _loader(), _loader(seed=1)
    model, optimizer, core = _core(cfg, steps=len(train_loader) * cfg.max_epochs)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    losses, lrs, evals, statuses = [], [], [], []
    for epoch in range(cfg.max_epochs):
        model.train()
        for x, y in train_loader:
            optimizer.zero_grad(set_to_none=True)
            with core.get_amp_context():
                loss = criterion(model(x), y)
            if not core.check_loss(loss):
                continue
            core.backward_step(loss)
            assert core.optimizer_step()
            losses.append(float(loss.detach()))
            lrs.append(optimizer.param_groups[0]["lr"])
        metrics = core.evaluate(eval_loader)  # no criterion: the Trainer's default loss, and accuracy
        evals.append(metrics)
        statuses.append(core.eval_epoch(metrics, epoch, primary_metric="loss", higher_is_better=False))
        if statuses[-1] == "STOP":
            break
    assert core.load_best_weights()

    assert len(losses) == 12 and losses == ref.losses and lrs == ref.lrs
    assert len(set(lrs)) == 12  # warmup, then the cosine: a new LR every update
    assert evals == ref_evals and set(evals[0]) == {"loss", "accuracy"}
    assert statuses[0] == "IMPROVED" and set(statuses) <= {"IMPROVED", "CONTINUE"}
    best = min(range(3), key=lambda i: evals[i]["loss"])
    assert core.best_metric == core.best_loss == evals[best]["loss"] == trainer.selgis.best_metric
    for a, b in zip(model.parameters(), trainer.unwrapped_model.parameters(), strict=True):  # both: the best epoch's
        assert torch.equal(a, b)
    assert core.trainable_params_count == core.total_params_count == sum(p.numel() for p in model.parameters())


def _micro_losses(core, model, optimizer, loader, k, epochs=2, step_every=None):
    """The manual loop with accumulation: optimizer_step every ``step_every`` (default k) micro-batches."""
    out = []
    seen = 0
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            assert core.check_loss(loss)
            core.backward_step(loss)
            out.append(loss.detach())
            seen += 1
            if seen % (step_every or k) == 0:
                assert core.optimizer_step()
    return out


def test_gradient_accumulation_equals_the_trainer(tmp_path):
    cfg = _cfg(tmp_path, max_epochs=2, gradient_accumulation_steps=2)
    ref = Steps()
    trainer = Trainer(_mlp(), cfg, _loader(), callbacks=[ref])
    trainer.train()
    model, optimizer, core = _core(cfg, steps=4)
    micro = _micro_losses(core, model, optimizer, _loader(), k=2)
    window = [float((micro[i] + micro[i + 1]) / 2) for i in range(0, 8, 2)]  # the trainer's step loss
    assert core.trainer.step == 4 and window == ref.losses
    for a, b in zip(model.parameters(), trainer.unwrapped_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_partial_window_is_not_under_scaled(tmp_path):
    # k = 2, but optimizer_step after every backward_step: each update weighs its one micro-batch
    # 1/1 (0.5 * 2, exact), so the run equals a k = 1 run bitwise.
    runs = []
    for k, every in ((2, 1), (1, 1)):
        model, optimizer, core = _core(_cfg(tmp_path, gradient_accumulation_steps=k), steps=8)
        _micro_losses(core, model, optimizer, _loader(), k=k, step_every=every)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


class _Inject:
    """The SELGIS Trainer's forward_fn that multiplies the loss of chosen steps (trainer.step + 1)."""

    def __init__(self, steps):
        self.steps, self.trainer = dict(steps), None

    def __call__(self, model, batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        factor = self.steps.pop(self.trainer.step + 1, None) if model.training else None
        return (loss if factor is None else loss * factor), logits


def _manual_injected(cfg, inject: dict[int, float], until: int):
    """The manual loop over as many epochs as it takes to reach ``until`` updates (as the Trainer does)."""
    model, optimizer, core = _core(cfg, steps=until)
    inject = dict(inject)
    while core.trainer.step < until:
        for x, y in _loader():
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            factor = inject.pop(core.trainer.step + 1, None)
            if factor is not None:
                loss = loss * factor
            if not core.check_loss(loss):
                assert all(p.grad is None for p in model.parameters())  # nothing of it reaches the weights
                continue
            core.backward_step(loss)
            core.optimizer_step()
            if core.trainer.step == until:
                break
    return model, core


@pytest.mark.parametrize("inject, kw, expected", [
    ({7: math.nan}, {"state_update_interval": 2}, [("rollback", 7, 6)]),
    ({7: math.nan}, {"state_update_interval": 100}, [("rollback", 7, 0)]),
    ({6: 50.0}, {"spike_threshold": 3.0, "min_history_len": 3}, [("skip", 6, None)]),
])
def test_check_loss_rolls_back_and_skips_as_the_trainer_does(tmp_path, inject, kw, expected):
    cfg = _cfg(tmp_path, **kw)
    fn = _Inject(inject)
    trainer = Trainer(_mlp(), cfg, _loader(), forward_fn=fn)
    fn.trainer = trainer
    trainer.train()
    model, core = _manual_injected(cfg, inject, until=12)
    assert _events(_guard(trainer)) == _events(_guard(core.trainer)) == expected
    if expected[0][0] == "rollback":
        assert optimizer_lr(core) == pytest.approx(optimizer_lr(trainer))  # halved, persistently
    for a, b in zip(model.parameters(), trainer.unwrapped_model.parameters(), strict=True):
        assert torch.equal(a, b)


def optimizer_lr(t):
    return t.trainer.unwrapped_optimizer.param_groups[0]["lr"] if isinstance(t, SelgisCore) else \
        t.unwrapped_optimizer.param_groups[0]["lr"]


def test_check_loss_ladder_snapshot_and_bound(tmp_path):
    cfg = _cfg(tmp_path, spike_threshold=3.0, min_history_len=3, state_update_interval=2)
    model, optimizer, core = _core(cfg, steps=100)
    x, y = next(iter(_loader()))

    def step(factor=1.0):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y) * factor
        ok = core.check_loss(loss)
        if ok:
            core.backward_step(loss)
            core.optimizer_step()
        return ok

    assert all(step() for _ in range(4))
    snapshot = [p.detach().clone() for p in model.parameters()]  # taken at step 4
    assert step() and core.trainer.step == 5
    after5 = [p.detach().clone() for p in model.parameters()]
    assert not step(50.0)  # first spike: skipped, nothing rolled back
    assert core.trainer.step == 5 and all(torch.equal(a, b) for a, b in zip(model.parameters(), after5, strict=True))
    assert not step(50.0)  # the second in a row: back to the snapshot, LR halved
    assert core.trainer.step == 4 and all(torch.equal(a, b) for a, b in zip(model.parameters(), snapshot, strict=True))
    assert _events(_guard(core.trainer)) == [("skip", 6, None), ("rollback", 6, 4)]
    lr = optimizer.param_groups[0]["lr"]
    assert not step(math.nan) and not step(math.inf)  # non-finite: a rollback each (2nd and 3rd)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lr / 4)
    with pytest.raises(GuardError, match=r"non-finite loss \(loss None\) after 3 rollback\(s\) \(max_rollbacks=3\)"):
        step(math.nan)


def test_check_loss_without_nan_recovery_refuses_a_nan(tmp_path):
    model, optimizer, core = _core(_cfg(tmp_path, nan_recovery=False), steps=10)
    x, y = next(iter(_loader()))
    before = [p.detach().clone() for p in model.parameters()]
    assert core.check_loss(F.cross_entropy(model(x), y) * 50.0)  # no guard: spikes pass
    with pytest.raises(NonFiniteError, match="^step 1: non-finite loss .* with nan_recovery=False"):
        core.check_loss(F.cross_entropy(model(x), y) * math.nan)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


def test_eval_epoch_improved_surge_stop_and_the_epoch_scheduler(tmp_path):
    cfg = _cfg(tmp_path, patience=2, warmup_ratio=0.0, max_epochs=10)  # epoch-based: step_epoch in eval_epoch
    model, optimizer, core = _core(cfg, steps=40)
    assert not core.scheduler.by_step
    x, y = next(iter(_loader()))
    curve = [core.scheduler.scheduler.lr_lambdas[0](e) for e in range(11)]  # the cosine over 10 epochs, x 1e-3
    expected = curve.__getitem__
    statuses, best = [], None
    for epoch, acc in enumerate([0.5, 0.6, 0.6, 0.6, 0.6, 0.6]):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        assert core.check_loss(loss)
        core.backward_step(loss)
        lr = optimizer.param_groups[0]["lr"]
        core.optimizer_step()
        assert optimizer.param_groups[0]["lr"] == lr  # updates leave an epoch schedule alone
        statuses.append(core.eval_epoch({"accuracy": acc, "loss": 1.0 - acc}, epoch))
        if statuses[-1] == "IMPROVED":
            best = [p.detach().clone() for p in model.parameters()]
        if statuses[-1] == "SURGE":  # the best weights are back, and the LR x3
            assert all(torch.equal(a, b) for a, b in zip(model.parameters(), best, strict=True))
            assert optimizer.param_groups[0]["lr"] == pytest.approx(3 * 1e-3 * expected(epoch + 1))
        elif statuses[-1] != "STOP":
            assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * expected(epoch + 1) * (3 if epoch > 3 else 1))
    assert statuses == ["IMPROVED", "IMPROVED", "CONTINUE", "SURGE", "CONTINUE", "STOP"]
    assert core.best_metric == 0.6 and core.best_loss == pytest.approx(0.4)
    with pytest.raises(KeyError, match="primary_metric 'accuracy' is not among the metrics \\['loss'\\]"):
        core.eval_epoch({"loss": 0.3}, 6)
    with pytest.raises(ValueError, match="judge one metric throughout"):
        core.eval_epoch({"loss": 0.3}, 6, primary_metric="loss", higher_is_better=False)


def test_constructor_and_the_trainer_view(tmp_path):
    with pytest.raises(TypeError, match="^SelgisCore: optimizer must be a torch.optim.Optimizer, got NoneType"):
        SelgisCore(_mlp(), None)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="drives another optimizer"):
        SelgisCore(model, opt, SmartScheduler(torch.optim.SGD(_mlp().parameters(), lr=0.1), 0.1, _cfg(tmp_path)))
    plain = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)  # a torch scheduler follows the updates
    core = SelgisCore(model, opt, plain, _cfg(tmp_path), "cpu")
    x, y = next(iter(_loader()))
    loss = F.cross_entropy(model(x), y)
    assert not core.optimizer_step()  # nothing back-propagated yet
    core.backward_step(loss)
    assert core.optimizer_step() and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    trainer = Trainer(_mlp(), _cfg(tmp_path), _loader())
    assert isinstance(trainer.selgis, SelgisCore)
    for name in ("check_loss", "backward_step", "optimizer_step", "eval_epoch"):
        with pytest.raises(RuntimeError, match=f"^trainer.selgis.{name}: the Trainer runs this inside train"):
            getattr(trainer.selgis, name)(*([loss] if name in ("check_loss", "backward_step") else
                                           [{}, 0] if name == "eval_epoch" else []))


@pytest.mark.slow
@pytest.mark.multiproc
def test_manual_loop_under_ddp_on_two_ranks(tmp_path):
    """2 gloo ranks, each with half of every batch: their weights agree bitwise and equal (to float
    rounding) one process on the whole batches; optimizer_step inside a no_sync window is refused."""
    import json

    from tests.conftest import ROOT, torchrun

    out = tmp_path / "weights"
    torchrun(ROOT / "tests/seeds/scripts/selgis_core_ddp.py", str(out))
    ranks = [json.loads((tmp_path / f"weights.{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["ddp"] == "DistributedDataParallel"
    assert ranks[0]["weights"] == ranks[1]["weights"] and ranks[0]["step"] == 4
    assert ranks[0]["errors"] == ["optimizer_step after 1 of 2 backward_step calls: under DDP the window's gradients "
                                  "are synchronised by its last backward (no_sync before it); call optimizer_step "
                                  "every gradient_accumulation_steps backward_steps"]
    # one process, whole batches of 16: the mean over two equal halves is the mean over the batch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    cfg = _cfg(tmp_path, gradient_accumulation_steps=2, warmup_ratio=0.0)
    optimizer = torch.optim.AdamW(get_optimizer_grouped_params(model, cfg.weight_decay), lr=1e-2)
    core = SelgisCore(model, optimizer, None, cfg, "cpu")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    y = (x[:, 0] > 0).long()
    for i in range(8):
        loss = F.cross_entropy(model(x[i * 16:(i + 1) * 16]), y[i * 16:(i + 1) * 16])
        assert core.check_loss(loss)
        core.backward_step(loss)
        if i % 2 == 1:
            assert core.optimizer_step()
    single = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(torch.tensor(ranks[0]["weights"]), single, atol=1e-6, rtol=0)
