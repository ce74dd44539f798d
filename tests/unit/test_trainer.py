"""BaseTrainer on one process: the seed's Quick Tour, hook order, accumulation, non-finite steps."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from acceltrain import BaseTrainer, LoggingHook, NonFiniteError, ProgressHook
from tests.helpers import Recorder, ToyTrainer, params, step_dir


# ----------------------------------------------------------------------------- the seed's Quick Tour
class QuickTourTrainer(BaseTrainer):
    """The mini.trainer Quick Tour, unchanged but for the import and a learnable toy dataset."""

    def build_data_loader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(256, 784, generator=g)
        y = (x[:, :10]).argmax(1)  # learnable: the label is the largest of the first 10 inputs
        dataset = torch.utils.data.TensorDataset(x, y)
        return torch.utils.data.DataLoader(dataset, batch_size=32)

    def build_model(self):
        model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
        return model.to(self.device)

    def build_optimizer(self):
        return torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def forward(self, input):
        x, y = input
        x, y = x.to(self.device), y.to(self.device)
        logits = self.model(x)
        loss = nn.functional.cross_entropy(logits, y)
        records = {"accuracy": (logits.argmax(1) == y).float().mean().item()}
        return loss, records

    def build_hooks(self):
        return [ProgressHook(interval=10, with_records=True), LoggingHook(interval=10)]


def test_quick_tour_trains_on_cpu(tmp_path, capsys):
    trainer = QuickTourTrainer(
        max_steps=60,
        grad_clip=1.0,
        max_non_finite_grad_retries=3,
        mixed_precision="bf16",
        gradient_accumulation_steps=2,
        workspace=tmp_path / "experiment_1",
        device="cpu",
    )
    losses = []

    class Keep(Recorder):
        def on_after_step(self, trainer):
            losses.append(trainer.step_info["loss"].item())

    trainer.build_hooks = lambda: [ProgressHook(interval=10, with_records=True), LoggingHook(interval=10), Keep()]
    trainer.train()
    assert trainer.step == 60
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    out = capsys.readouterr().out
    assert "Step 60/60:" in out and "records/accuracy" in out and "grad_norm" in out
    lines = (tmp_path / "experiment_1" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6
    assert list((tmp_path / "experiment_1" / "tensorboard").iterdir())


# ----------------------------------------------------------------------------- hook order
def test_hook_order_and_counts_three_steps_accumulation_two():
    rec = Recorder()
    trainer = ToyTrainer(max_steps=3, gradient_accumulation_steps=2, device="cpu", hooks=[rec, LoggingHook(interval=2)])
    trainer.train()
    assert rec.events == [
        "before_train",
        "before_step:0", "before_optimizer_step:0", "after_step:1",
        "before_step:1", "before_optimizer_step:1", "after_step:2", "log:2",
        "before_step:2", "before_optimizer_step:2", "after_step:3", "log:3",
        "after_train",
    ]
    state = trainer.state_dict()
    assert rec.events[-1] == "state_dict:3"
    trainer.load_state_dict(state)
    assert rec.events[-1] == "load_state_dict:3"


def test_forward_called_once_per_micro_batch():
    calls = []

    class Counting(ToyTrainer):
        def forward(self, input):
            calls.append(self.step)
            return super().forward(input)

    Counting(max_steps=3, gradient_accumulation_steps=2, device="cpu").train()
    assert calls == [0, 0, 1, 1, 2, 2]


# ----------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("k", [2, 4])
def test_accumulation_equals_one_larger_batch(k):
    a = ToyTrainer(max_steps=6, gradient_accumulation_steps=k, batch_size=4, n=96, device="cpu")
    a.train()
    b = ToyTrainer(max_steps=6, gradient_accumulation_steps=1, batch_size=4 * k, n=96, device="cpu")
    b.train()
    for pa, pb in zip(params(a.model), params(b.model), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0)
    assert not torch.equal(params(a.model)[0], params(ToyTrainer(max_steps=0, device="cpu")._built_model())[0])


def _built(self):
    self.build()
    return self.model


ToyTrainer._built_model = _built


def test_micro_batch_without_loss_is_not_under_scaled():
    """forward() returning None for one micro-batch: the others are averaged over 3, not 4."""

    class DropThird(ToyTrainer):
        def forward(self, input):
            self.seen = getattr(self, "seen", 0) + 1
            if self.seen % 4 == 3:
                return None, {}
            return super().forward(input)

    a = DropThird(max_steps=1, gradient_accumulation_steps=4, batch_size=4, device="cpu", grad_clip=0.05)
    a.train()

    class OnlyKept(ToyTrainer):
        def build_data_loader(self):
            ds = torch.utils.data.Subset(super().build_data_loader().dataset, [*range(8), *range(12, 16)])
            return torch.utils.data.DataLoader(ds, batch_size=4)

    b = OnlyKept(max_steps=1, gradient_accumulation_steps=3, batch_size=4, device="cpu", grad_clip=0.05)
    b.train()
    for pa, pb in zip(params(a.model), params(b.model), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0)
    torch.testing.assert_close(a.step_info["grad_norm"], b.step_info["grad_norm"])


def test_one_shot_iterable_ending_mid_window_steps_once_then_stops():
    class OneShot(ToyTrainer):
        def build_data_loader(self):
            return iter(list(super().build_data_loader())[:3])  # 3 batches, windows of 2

    t = OneShot(max_steps=10, gradient_accumulation_steps=2, device="cpu")
    t.train()
    assert t.step == 2 and t.stop_reason == "data exhausted"


# ----------------------------------------------------------------------------- non-finite steps
class NaNAt(ToyTrainer):
    """Puts NaN into the loss of the given micro-batch positions (counted from 0)."""

    def __init__(self, nan_at, **kwargs):
        super().__init__(**kwargs)
        self.nan_at, self.seen = set(nan_at), 0

    def forward(self, input):
        loss, rec = super().forward(input)
        if self.seen in self.nan_at:
            loss = loss * float("nan")
        self.seen += 1
        return loss, rec


def test_nan_step_is_retried_with_fresh_batches_and_nothing_advances():
    rec = Recorder()
    t = NaNAt(nan_at={3}, max_steps=3, gradient_accumulation_steps=2, max_non_finite_grad_retries=2,
              device="cpu", scheduler=True, hooks=[rec])
    infos = []
    t.build_hooks = lambda: [rec, _Keep(infos)]
    t.train()
    assert t.step == 3
    assert [i["non_finite_retries"] for i in infos] == [0, 1, 0]
    assert [i["skipped_batches"] for i in infos] == [[], [2, 3], []]
    # The scheduler advanced once per real step: lr = 0.1 / (1 + steps done before).
    assert [i["lr"][0] for i in infos] == pytest.approx([0.1 / 2, 0.1 / 3, 0.1 / 4])
    # One on_before_optimizer_step per real step, none for the skipped attempt.
    assert rec.events.count("before_optimizer_step:1") == 1
    assert all(torch.isfinite(p).all() for p in t.model.parameters())


def test_nan_with_no_retries_raises_naming_the_step():
    t = NaNAt(nan_at={4}, max_steps=5, gradient_accumulation_steps=2, device="cpu")
    with pytest.raises(NonFiniteError, match=r"step 3: non-finite gradients after 1 attempt\(s\)"):
        t.train()
    assert t.step == 2


def test_nan_every_step_exhausts_retries():
    t = NaNAt(nan_at=set(range(1000)), max_steps=5, max_non_finite_grad_retries=3, device="cpu")
    with pytest.raises(NonFiniteError, match=r"step 1: non-finite gradients after 4 attempt\(s\).*skipped batches \[0, 1, 2, 3\]"):
        t.train()


def test_forward_returning_none_throughout_is_an_error_not_a_hang():
    class Nothing(ToyTrainer):
        def forward(self, input):
            return None, {}

    with pytest.raises(NonFiniteError, match=r"step 1: forward\(\) returned None for all 2 micro-batches"):
        Nothing(max_steps=2, gradient_accumulation_steps=2, max_non_finite_grad_retries=5, device="cpu").train()


def test_fp16_style_scaler_overflow_backs_off_without_spending_retries():
    """The GPU fp16 path (GradScaler) exercised on CPU: an overflowing scale is lowered and the step redone."""
    infos = []

    class Scaled(ToyTrainer):
        def build_grad_scaler(self):
            return torch.amp.GradScaler("cpu", init_scale=2.0**127, backoff_factor=2.0**-100)

        def build_hooks(self):
            return [_Keep(infos)]

    t = Scaled(max_steps=2, device="cpu")
    t.train()
    assert t.step == 2
    assert infos[0]["skipped_batches"] == [0] and infos[0]["non_finite_retries"] == 0
    assert t.grad_scaler.get_scale() == pytest.approx(2.0**27)
    ref = ToyTrainer(max_steps=2, device="cpu")

    class Shifted(ToyTrainer):
        def build_data_loader(self):
            ds = torch.utils.data.Subset(super().build_data_loader().dataset, range(8, 64))
            return torch.utils.data.DataLoader(ds, batch_size=8)

    ref = Shifted(max_steps=2, device="cpu")
    ref.train()
    for pa, pb in zip(params(t.model), params(ref.model), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


class _Keep(Recorder):
    def __init__(self, infos):
        super().__init__()
        self.infos = infos

    def on_after_step(self, trainer):
        self.infos.append(dict(trainer.step_info))


# ----------------------------------------------------------------------------- precision and config
def test_bf16_autocast_runs_on_cpu():
    dtypes = []

    class Bf16(ToyTrainer):
        def build_model(self):
            model = super().build_model()
            model[0].register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
            return model

    t = Bf16(max_steps=2, mixed_precision="bf16", device="cpu")
    t.train()
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # the matmuls ran in bf16
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # the weights stay fp32


def test_fp16_on_cpu_is_refused_clearly():
    with pytest.raises(ValueError, match=r"mixed_precision='fp16' needs a GPU.*use mixed_precision='bf16'"):
        ToyTrainer(max_steps=1, mixed_precision="fp16", device="cpu")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_steps": -1}, "max_steps must be an int >= 0"),
        ({"max_steps": 1, "grad_clip": 0}, "grad_clip must be a number > 0"),
        ({"max_steps": 1, "gradient_accumulation_steps": 0}, "gradient_accumulation_steps must be an int >= 1"),
        ({"max_steps": 1, "mixed_precision": "fp8"}, "mixed_precision must be 'fp16', 'bf16' or None"),
        ({"max_steps": 1, "max_non_finite_grad_retries": -2}, "max_non_finite_grad_retries must be"),
        ({"max_steps": 1, "device": "cuda"}, "CUDA is not available"),
    ],
)
def test_bad_constructor_arguments_name_the_field(kwargs, match):
    if kwargs.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=match):
        ToyTrainer(**kwargs)


def test_grad_norm_is_in_step_info_every_step_and_clipping_applies():
    norms = []

    class Keep(Recorder):
        def on_after_step(self, trainer):
            norms.append(trainer.step_info["grad_norm"].item())

    t = ToyTrainer(max_steps=3, grad_clip=1e-3, device="cpu", hooks=[Keep()])
    before = params(t._built_model())
    t.train()
    assert len(norms) == 3 and all(n > 1e-3 for n in norms)
    # SGD lr 0.1 with a clipped norm of 1e-3: each parameter moved by at most 3 * 0.1 * 1e-3 in total.
    moved = torch.cat([(a - b).flatten() for a, b in zip(params(t.model), before, strict=True)])
    assert moved.norm().item() <= 3 * 0.1 * 1e-3 + 1e-7


# ----------------------------------------------------------------------------- state
def test_state_dict_round_trip_continues_identically():
    full = ToyTrainer(max_steps=6, optimizer="adamw", scheduler=True, device="cpu")
    full.train()

    first = ToyTrainer(max_steps=3, optimizer="adamw", scheduler=True, device="cpu")
    first.train()
    state = first.state_dict()
    second = ToyTrainer(max_steps=6, optimizer="adamw", scheduler=True, device="cpu", model_seed=123)
    second.load_state_dict(state)  # before train(): applied after building, as in the seed
    second.train()  # the data position came with the state: the next batch is batch 4
    assert second.step == 6
    for pa, pb in zip(params(full.model), params(second.model), strict=True):
        assert torch.equal(pa, pb)
    assert math.isclose(second.lr_scheduler.get_last_lr()[0], full.lr_scheduler.get_last_lr()[0])


# ----------------------------------------------------------------------------- token-normalised loss
class TokenTrainer(ToyTrainer):
    """Per-token regression with padding (label mask 0): micro-batches hold different token counts."""

    def build_data_loader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 6, 8, generator=g)
        y = torch.randn(32, 6, 1, generator=g)
        lengths = torch.randint(1, 7, (32,), generator=g)
        mask = (torch.arange(6)[None, :] < lengths[:, None]).float().unsqueeze(-1)  # (B, T, 1)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y, mask), batch_size=self.batch_size)

    def count_loss_items(self, batch):
        return batch[2].sum()

    def forward(self, input):
        x, y, mask = input
        return (((self.model(x) - y) ** 2) * mask).sum(), {}


@pytest.mark.parametrize("n_batches", [3, 4])  # ends mid-window / exactly at a window boundary
def test_token_normalised_one_shot_iterable_running_dry_stops_cleanly(n_batches):
    class OneShotTokens(TokenTrainer):
        def build_data_loader(self):
            return iter(list(super().build_data_loader())[:n_batches])

    t = OneShotTokens(max_steps=10, gradient_accumulation_steps=2, batch_size=2, device="cpu")
    t.train()
    assert t.step == 2 and t.stop_reason == "data exhausted"


@pytest.mark.parametrize("k", [2, 4])
def test_token_normalised_accumulation_equals_the_unaccumulated_token_mean(k):
    a = TokenTrainer(max_steps=4, gradient_accumulation_steps=k, batch_size=2, device="cpu")
    a.train()
    b = TokenTrainer(max_steps=4, gradient_accumulation_steps=1, batch_size=2 * k, device="cpu")
    b.train()
    for pa, pb in zip(params(a.model), params(b.model), strict=True):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=0)
    # The reported loss is the window's token mean too.
    torch.testing.assert_close(a.step_info["loss"], b.step_info["loss"], atol=1e-6, rtol=1e-6)


def test_mean_of_micro_batch_means_differs_for_padded_batches():
    """The bug class of transformers#34191: averaging micro-batch means is not the token mean."""

    class MeanOfMeans(TokenTrainer):
        count_loss_items = BaseTrainer.count_loss_items

        def forward(self, input):
            x, y, mask = input
            return (((self.model(x) - y) ** 2) * mask).sum() / mask.sum(), {}

    a = MeanOfMeans(max_steps=4, gradient_accumulation_steps=4, batch_size=2, device="cpu")
    a.train()
    b = TokenTrainer(max_steps=4, gradient_accumulation_steps=1, batch_size=8, device="cpu")
    b.train()
    assert not torch.allclose(params(a.model)[0], params(b.model)[0], atol=1e-6)


# ----------------------------------------------------------------------------- the seed's Integration Example
class IntegrationTrainer(BaseTrainer):
    """The seed's Integration Example minus mini.config/mini.builder (plain dicts instead)."""

    def __init__(self, data_cfg, model_cfg, optimizer_cfg, **kwargs):
        super().__init__(**kwargs)
        self.data_cfg = data_cfg
        self.model_cfg = model_cfg
        self.optimizer_cfg = optimizer_cfg

    def build_data_loader(self):
        x = torch.randn(256, 16, generator=torch.Generator().manual_seed(0))
        dataset = torch.utils.data.TensorDataset(x, x[:, :4].argmax(1))
        return torch.utils.data.DataLoader(dataset, batch_size=self.data_cfg["batch_size"], shuffle=True)

    def build_model(self):
        model = nn.Sequential(nn.Linear(16, self.model_cfg["hidden_size"]), nn.ReLU(),
                              nn.Linear(self.model_cfg["hidden_size"], 4))
        return model.to(self.device)

    def build_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.optimizer_cfg["lr"])

    def forward(self, input):
        x, y = input
        x, y = x.to(self.device), y.to(self.device)
        logits = self.model(x)
        loss = torch.nn.functional.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean().item()
        return loss, {"accuracy": acc}

    def build_hooks(self):
        from acceltrain import CheckpointingHook

        return [
            ProgressHook(interval=10, with_records=True),
            CheckpointingHook(interval=1000, path=self.workspace / "checkpoints"),
        ]


def test_the_seeds_integration_example_runs(tmp_path):
    config = {
        "trainer": {"max_steps": 30, "grad_clip": 1.0, "mixed_precision": "bf16", "gradient_accumulation_steps": 4,
                    "workspace": str(tmp_path / "experiment_1"), "device": "cpu"},
        "data": {"batch_size": 32, "num_workers": 0},
        "model": {"hidden_size": 128},
        "optimizer": {"lr": 3e-3},
    }
    trainer = IntegrationTrainer(config["data"], config["model"], config["optimizer"], **config["trainer"])
    trainer.train()
    assert trainer.step == 30 and trainer.step_info["records"]["accuracy"] > 0.5
    assert (step_dir(tmp_path / "experiment_1" / "checkpoints", 30) / "manifest.json").is_file()
