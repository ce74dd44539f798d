"""The SELGIS API reference (seed 000) run on acceltrain: its code examples as written (only the
import line, tiny local models and data, and ``device="cpu"`` changed), and every
``SelgisConfig`` / ``TransformerConfig`` field shown to take effect or to be refused."""

from __future__ import annotations

import inspect
import json
import logging
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import acceltrain
from acceltrain import NonFiniteError
from acceltrain.cli import main
from acceltrain.compat import selgis as selgis_module
from acceltrain.compat.selgis import Callback, SelgisConfig, Trainer, TransformerConfig, TransformerTrainer
from acceltrain.config import ConfigError
from tests.helpers import BEST, LATEST, STEP_GLOB, ckpt_root, run_step_dir, step_dir, step_folder_name


def _data(n: int = 64, d: int = 8, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0] > 0).long())


def _loader(n: int = 64, batch_size: int = 16, shuffle: bool = False, d: int = 8) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_data(n, d), batch_size=batch_size, shuffle=shuffle)


def _mlp(d: int = 8, hidden: int = 16) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def _cfg(tmp_path, **kw) -> SelgisConfig:
    base = {"max_epochs": 2, "lr_finder_enabled": False, "device": "cpu", "output_dir": str(tmp_path / "out"),
            "batch_size": 16, "eval_batch_size": 16}
    return SelgisConfig(**{**base, **kw})


class Trace(Callback):
    """Every step's LR, loss and sparsity, through SELGIS's callback events."""

    def __init__(self):
        self.lrs, self.losses, self.events = [], [], []

    def on_train_begin(self, trainer):
        self.events.append("train_begin")

    def on_epoch_begin(self, trainer, epoch):
        self.events.append(f"epoch_begin {epoch}")

    def on_step_end(self, trainer, step, loss):
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])
        self.losses.append(float(loss))

    def on_evaluate(self, trainer, metrics):
        self.events.append(f"evaluate {sorted(metrics)}")

    def on_epoch_end(self, trainer, epoch, metrics):
        self.events.append(f"epoch_end {epoch}")

    def on_train_end(self, trainer):
        self.events.append("train_end")


# ---------------------------------------------------------------------- the documented examples
def test_public_api_block_imports_as_written():
    from acceltrain.compat.selgis import (  # the seed's block; only `selgis` -> `acceltrain.compat.selgis`
        Callback,
        CheckpointCallback,
        EarlyStoppingCallback,
        LoggingCallback,
        LRFinder,
        SelgisConfig,
        SelgisCore,
        SmartScheduler,
        SparsityCallback,
        Trainer,
        TransformerConfig,
        TransformerTrainer,
        WandBCallback,
        __version__,
        count_parameters,
        format_params,
        get_device,
        get_optimizer_grouped_params,
        get_transformer_scheduler,
        is_dict_like,
        move_to_device,
        seed_everything,
        to_dict,
        unpack_batch,
    )

    assert __version__ == acceltrain.__version__
    assert issubclass(TransformerTrainer, Trainer) and issubclass(TransformerConfig, SelgisConfig)
    assert issubclass(EarlyStoppingCallback, acceltrain.EarlyStoppingHook)
    assert issubclass(CheckpointCallback, acceltrain.CheckpointingHook)
    assert issubclass(SparsityCallback, acceltrain.SparsityHook) and issubclass(LoggingCallback, acceltrain.ProgressHook)
    assert LRFinder is acceltrain.LRFinder and seed_everything is acceltrain.seed_everything
    assert callable(WandBCallback) and callable(SmartScheduler) and callable(get_transformer_scheduler)
    assert issubclass(Callback, acceltrain.BaseHook)
    for fn in (count_parameters, format_params, get_device, get_optimizer_grouped_params, is_dict_like, move_to_device,
               to_dict, unpack_batch):
        assert callable(fn) and fn.__doc__  # each is exercised in test_utils
    assert callable(SelgisCore.check_loss)  # the manual loop: tests/seeds/test_selgis_core.py


def test_cli_version_and_device(capsys):
    for argv in (["version"], ["device"]):
        assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"acceltrain {acceltrain.__version__}"
    assert out[1].startswith("device: cpu") or out[1].startswith("device: cuda")
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"acceltrain {acceltrain.__version__}"


def test_cli_train_with_a_selgis_yaml(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "selgis.yaml").write_text("max_epochs: 2\nbatch_size: 64\neval_batch_size: 128\nlr_finder_steps: 5\n"
                                          "scheduler_type: cosine\nlogging_steps: 4\ndevice: cpu\noutput_dir: run\n")
    assert main(["train", "--config", "selgis.yaml"]) == 0
    out = capsys.readouterr().out
    assert "Step 16/16" in out  # 512 samples / batch_size 64 = 8 steps an epoch, 2 epochs
    final = next(line for line in out.splitlines() if line.startswith("final:"))
    assert "eval/accuracy" in final and "eval/loss" in final
    assert (tmp_path / "run/model.safetensors").is_file() and (tmp_path / "run/metrics.jsonl").is_file()
    assert (run_step_dir(tmp_path / "run", 16) / "manifest.json").is_file()


def test_cli_train_selgis_help_and_overrides(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "selgis.yaml").write_text("max_epochs: 3\nbatch_size: 128\nlr_finder_enabled: false\ndevice: cpu\n")
    assert main(["train", "--config", "selgis.yaml", "--help"]) == 0
    assert "--spike_threshold" in capsys.readouterr().out
    assert main(["train", "--config", "selgis.yaml", "--max_epochs", "1", "--output_dir", "o"]) == 0
    assert "Step 4/4" in capsys.readouterr().out and (tmp_path / "o/model.safetensors").is_file()
    with pytest.raises(SystemExit):
        main(["train", "--config", "selgis.yaml", "--max_epoch", "1"])
    assert capsys.readouterr().err == "error: --max_epoch: not a SelgisConfig field\n"


@pytest.mark.parametrize("text, message", [
    ("max_epochs: 2\nspike_treshold: 3\n", "selgis.yaml: unknown key 'spike_treshold' (did you mean 'spike_threshold'?)"),
    ("max_epochs: 2\nfp16: true\nbf16: true\n", "selgis.yaml: fp16 and bf16: at most one can be True"),
    ("max_epochs: 0\nnan_recovery: true\n", "selgis.yaml: max_epochs must be an int >= 1, got 0"),
])
def test_cli_train_bad_selgis_yaml_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys, text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "selgis.yaml").write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "selgis.yaml"])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["selgis.yaml"]  # nothing written


def test_positional_trainer_trains_evaluates_and_saves(tmp_path):
    """``Trainer(model, config, train_dl, eval_dl)``, ``train()``, ``evaluate()``, ``save_model`` / ``load_model``."""
    cfg = _cfg(tmp_path, max_epochs=3)
    trace = Trace()
    trainer = Trainer(_mlp(), cfg, _loader(shuffle=True), _loader(), None, None, [trace])
    metrics = trainer.train()
    assert set(metrics) == {"step", "loss", "eval/loss", "eval/accuracy"} and metrics["step"] == 12
    assert trace.events[:2] == ["train_begin", "epoch_begin 0"] and trace.events[-1] == "train_end"
    assert trace.events.count("evaluate ['accuracy', 'loss']") == 3 and "epoch_end 2" in trace.events
    ev = trainer.evaluate()
    assert set(ev) == {"loss", "accuracy"} and 0.0 <= ev["accuracy"] <= 1.0
    assert trainer.selgis.best_metric == pytest.approx(min(h[1]["loss"] for h in trainer.hooks[1].history))
    assert trainer.selgis.total_params_count == sum(p.numel() for p in _mlp().parameters())
    path = trainer.save_model(tmp_path / "model.safetensors")
    fresh = Trainer(_mlp(hidden=16), _cfg(tmp_path / "b"), _loader())
    fresh.load_model(path)
    for a, b in zip(fresh._model.parameters(), trainer.unwrapped_model.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="weights_only=False is refused"):
        fresh.load_model(path, weights_only=False)
    for attr in ("model", "config", "device", "optimizer", "selgis", "callbacks", "train_dataloader", "eval_dataloader"):
        assert hasattr(trainer, attr), attr


def test_evaluate_without_an_eval_loader_returns_an_empty_dict(tmp_path):
    assert Trainer(_mlp(), _cfg(tmp_path), _loader()).evaluate() == {}


# ---------------------------------------------------------------------- SelgisConfig fields
def test_max_epochs_and_gradient_accumulation_become_steps(tmp_path, caplog):
    with caplog.at_level(logging.INFO, "acceltrain"):
        t = Trainer(_mlp(), _cfg(tmp_path, max_epochs=3, gradient_accumulation_steps=2), _loader())
    assert t.max_steps == 6 and t.gradient_accumulation_steps == 2 and t.steps_per_epoch == 2
    assert "max_epochs 3 -> max_steps 6 (2 steps per epoch)" in caplog.text


def test_batch_sizes_must_match_the_given_loaders(tmp_path):
    with pytest.raises(ConfigError, match="^batch_size: 8 differs from the given loader's batch_size 16"):
        Trainer(_mlp(), _cfg(tmp_path, batch_size=8), _loader())
    with pytest.raises(ConfigError, match="^eval_batch_size: 8 differs from the given loader's batch_size 16"):
        Trainer(_mlp(), _cfg(tmp_path, eval_batch_size=8), _loader(), _loader())


def test_patience_and_min_delta_stop_early(tmp_path):
    t = Trainer(_mlp(), _cfg(tmp_path, max_epochs=6, patience=2, min_delta=10.0), _loader(), _loader())
    t.train()  # nothing improves by 10: best at epoch 1, two bad evaluations, stop after epoch 3
    assert t.step == 3 * 4 and t.should_stop


def _one_sgd_step(tmp_path, **kw):
    model = _mlp()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    t = Trainer(model, _cfg(tmp_path, max_epochs=1, scheduler_type="constant", nan_recovery=False, batch_size=64, **kw),
                _loader(batch_size=64), optimizer=opt)
    t.train()
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before, strict=True)]), t


def test_grad_clip_norm_and_value(tmp_path):
    free, t = _one_sgd_step(tmp_path / "a", grad_clip_norm=0)
    norm = float(t.step_info["grad_norm"])
    assert free.norm().item() == pytest.approx(norm, rel=1e-5) and norm > 0.01
    clipped, _ = _one_sgd_step(tmp_path / "b", grad_clip_norm=0.01)
    assert clipped.norm().item() == pytest.approx(0.01, rel=1e-4)
    valued, _ = _one_sgd_step(tmp_path / "c", grad_clip_norm=0, grad_clip_value=1e-4)
    assert valued.abs().max().item() == pytest.approx(1e-4, rel=1e-3)  # float32 differences


class _Inject:
    """A forward_fn that multiplies the loss of chosen optimizer steps (by trainer.step + 1)."""

    def __init__(self, steps: dict[int, float]):
        self.steps, self.trainer = steps, None

    def __call__(self, model, batch):
        x, y = batch
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        factor = self.steps.get(self.trainer.step + 1) if self.trainer is not None and model.training else None
        if factor is not None:
            self.steps.pop(self.trainer.step + 1)
            loss = loss * factor
        return loss, logits


def _guarded(tmp_path, inject, **kw):
    t = Trainer(_mlp(), _cfg(tmp_path, max_epochs=3, **kw), _loader(), forward_fn=inject)
    inject.trainer = t
    return t


def _guard(t):
    return next(h for h in t.hooks if isinstance(h, acceltrain.GuardHook))


def test_nan_recovery_rolls_back_and_state_update_interval_sets_the_snapshot(tmp_path):
    t = _guarded(tmp_path / "a", _Inject({7: math.nan}), state_update_interval=2)
    t.train()
    assert t.step == 12
    assert [(e["kind"], e["from_step"], e["to_step"]) for e in _guard(t).events] == [("rollback", 7, 6)]
    t = _guarded(tmp_path / "b", _Inject({7: math.nan}), state_update_interval=100)
    t.train()
    assert [(e["kind"], e["to_step"]) for e in _guard(t).events] == [("rollback", 0)]
    t = _guarded(tmp_path / "c", _Inject({7: math.nan}), nan_recovery=False)
    assert not any(isinstance(h, acceltrain.GuardHook) for h in t.build_hooks())
    with pytest.raises(NonFiniteError):
        t.train()


def test_spike_threshold_and_min_history_len(tmp_path):
    t = _guarded(tmp_path / "a", _Inject({6: 50.0}), spike_threshold=3.0, min_history_len=3)
    t.train()
    assert [e["kind"] for e in _guard(t).events] == ["skip"]
    t = _guarded(tmp_path / "b", _Inject({6: 50.0}), spike_threshold=100.0, min_history_len=3)
    t.train()
    assert _guard(t).events == []
    t = _guarded(tmp_path / "c", _Inject({6: 50.0}), spike_threshold=3.0, min_history_len=8)
    t.train()
    assert _guard(t).events == []  # only 5 losses known at step 6


def test_lr_finder_fields(tmp_path, monkeypatch):
    seen = {}
    real = selgis_module.find_lr

    def spy(trainer, **kwargs):
        seen.update(kwargs)
        return real(trainer, **kwargs)

    monkeypatch.setattr(selgis_module, "find_lr", spy)
    calls = []

    def counting(model, batch):
        calls.append(model.training)
        return F.cross_entropy(model(batch[0]), batch[1])

    t = Trainer(_mlp(), _cfg(tmp_path, lr_finder_enabled=True, lr_finder_start=1e-4, lr_finder_end=1e-2,
                             lr_finder_steps=7, lr_finder_trainable_only=True, scheduler_type="constant"),
                _loader(), forward_fn=counting)
    t.train()
    assert seen == {"apply": True, "start_lr": 1e-4, "end_lr": 1e-2, "num_steps": 7, "trainable_only": True}
    assert len(calls) == 7 + 8  # the sweep, then 2 epochs of 4 steps
    assert 1e-5 <= t.lr_finder_lr <= 1e-3  # the suggestion: a tenth of an LR inside the sweep
    assert t.optimizer.param_groups[0]["lr"] == pytest.approx(t.lr_finder_lr, rel=1e-12)
    off = Trainer(_mlp(), _cfg(tmp_path / "off", scheduler_type="constant"), _loader())
    off.train()
    assert off.lr_finder_lr is None and off.optimizer.param_groups[0]["lr"] == 1e-3


def _lrs(tmp_path, epochs=2, **kw) -> list[float]:
    trace = Trace()
    Trainer(_mlp(), _cfg(tmp_path, max_epochs=epochs, **kw), _loader(), callbacks=[trace]).train()
    return trace.lrs


def test_warmup_epochs_and_warmup_ratio(tmp_path, caplog):
    with caplog.at_level(logging.INFO, "acceltrain"):
        lrs = _lrs(tmp_path / "a", scheduler_type="constant", warmup_epochs=1)
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3], rel=1e-12)
    assert "warmup_epochs 1 -> warmup_steps 4" in caplog.text
    assert _lrs(tmp_path / "b", scheduler_type="constant", warmup_ratio=0.25) == pytest.approx(
        [5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3], rel=1e-12)
    with pytest.raises(ConfigError, match="warmup_epochs and warmup_ratio: give one of them, not both"):
        _cfg(tmp_path, warmup_epochs=1, warmup_ratio=0.1)
    with pytest.raises(ConfigError, match="^warmup_epochs: 2 epoch"):
        Trainer(_mlp(), _cfg(tmp_path, scheduler_type="linear", warmup_epochs=2), _loader())


def test_min_lr_is_the_floor_the_schedule_reaches(tmp_path):
    lrs = _lrs(tmp_path, scheduler_type="linear", min_lr=1e-4)
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-9) and lrs[0] < 1e-3


@pytest.mark.parametrize("name, expected", [("cosine", "cosine"), ("cosine_restart", "cosine_restarts"),
                                            ("linear", "linear"), ("constant", "constant"),
                                            ("polynomial", "polynomial")])
def test_scheduler_type(tmp_path, name, expected):
    t = Trainer(_mlp(), _cfg(tmp_path, scheduler_type=name, t_0=1), _loader())
    t.build()
    assert t.lr_scheduler.scheduler.lr_lambdas[0].name == expected
    with pytest.raises(ConfigError, match="scheduler_type must be one of"):
        _cfg(tmp_path, scheduler_type="step")


def test_t_0_is_epochs_and_t_mult_multiplies(tmp_path, caplog):
    with caplog.at_level(logging.INFO, "acceltrain"):
        lrs = _lrs(tmp_path / "a", epochs=4, t_0=1, t_mult=1, min_lr=0.0)
    assert "t_0 1 epoch(s) -> 4 steps (cosine_restarts)" in caplog.text
    assert [i + 1 for i, lr in enumerate(lrs) if lr == pytest.approx(1e-3, rel=1e-12)] == [4, 8, 12, 16]
    lrs = _lrs(tmp_path / "b", epochs=4, t_0=1, t_mult=2, min_lr=0.0)
    assert [i + 1 for i, lr in enumerate(lrs) if lr == pytest.approx(1e-3, rel=1e-12)] == [4, 12]


def test_label_smoothing_of_the_default_loss(tmp_path):
    x, y = _data().tensors
    for smoothing in (0.0, 0.1, 0.3):
        trace = Trace()
        expected = F.cross_entropy(_mlp()(x), y, label_smoothing=smoothing).item()
        Trainer(_mlp(), _cfg(tmp_path / str(smoothing), max_epochs=1, label_smoothing=smoothing, batch_size=64),
                _loader(batch_size=64), callbacks=[trace]).train()
        assert trace.losses[0] == pytest.approx(expected, abs=1e-6)


def test_weight_decay_goes_to_the_default_optimizer(tmp_path):
    t = Trainer(_mlp(), _cfg(tmp_path, weight_decay=0.05), _loader())
    t.build()
    assert [g["weight_decay"] for g in t.optimizer.param_groups] == [0.05, 0.0]
    assert [len(g["params"]) for g in t.optimizer.param_groups] == [2, 2]  # weights / biases


def test_sparsity_fields(tmp_path):
    seen = []

    class Sparsity(Callback):
        def on_step_end(self, trainer, step, loss):
            seen.append(trainer.step_info.get("sparsity", 0.0))

    t = Trainer(_mlp(hidden=128), _cfg(tmp_path, max_epochs=3, sparsity_enabled=True, sparsity_target=0.5,
                                       sparsity_start_epoch=1, sparsity_frequency=1),
                _loader(), callbacks=[Sparsity()])
    t.train()
    hook = next(h for h in t.hooks if isinstance(h, acceltrain.SparsityHook))
    assert (hook.start_step, hook.frequency) == (4, 4)
    assert seen[:4] == [0.0] * 4 and seen[7] == pytest.approx(0.5 * (1 - 0.5**3), abs=0.01)
    assert seen[-1] == pytest.approx(0.5, abs=0.01)
    assert selgis_module.SparsityCallback.get_layer_sparsity(t.unwrapped_model)["0"] == pytest.approx(0.5, abs=0.01)
    plain = Trainer(_mlp(), _cfg(tmp_path / "off"), _loader())
    assert not any(isinstance(h, acceltrain.SparsityHook) for h in plain.build_hooks())


def _reset_accelerate():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process otherwise


def test_fp16_bf16_and_device(tmp_path):
    assert Trainer(_mlp(), _cfg(tmp_path, bf16=True), _loader()).mixed_precision == "bf16"
    _reset_accelerate()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="mixed_precision='fp16' needs a GPU"):
            Trainer(_mlp(), _cfg(tmp_path, fp16=True), _loader())
    with pytest.raises(ConfigError, match="fp16 and bf16: at most one can be True"):
        _cfg(tmp_path, fp16=True, bf16=True)
    _reset_accelerate()
    assert Trainer(_mlp(), _cfg(tmp_path), _loader()).device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="^device: 'cuda', but no CUDA GPU is available here"):
            Trainer(_mlp(), _cfg(tmp_path, device="cuda"), _loader())
    with pytest.raises(ConfigError, match="device must be one of auto, cuda, cpu, mps, got 'tpu'"):
        _cfg(tmp_path, device="tpu")


def test_logging_eval_and_save_steps(tmp_path):
    t = Trainer(_mlp(), _cfg(tmp_path, logging_steps=2, eval_steps=3, save_steps=2, save_best_only=False,
                             save_total_limit=2), _loader(), _loader())
    t.train()
    out = tmp_path / "out"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6, 8]
    assert [step for step, _ in next(h for h in t.hooks if isinstance(h, acceltrain.EvaluationHook)).history] == [3, 6, 8]
    assert sorted(p.name for p in ckpt_root(out).glob(STEP_GLOB)) == [
        step_folder_name(6), step_folder_name(8)]


def test_save_best_only_keeps_the_best_and_the_newest(tmp_path):
    t = Trainer(_mlp(), _cfg(tmp_path, max_epochs=4, save_best_only=True), _loader(), _loader())
    t.train()
    root = tmp_path / "out/checkpoints"
    best = (root / BEST).resolve().name
    kept = sorted(p.name for p in root.glob(STEP_GLOB))
    assert step_folder_name(16) in kept and best in kept and len(kept) == len({best, step_folder_name(16)})


def test_state_storage_and_state_dir(tmp_path):
    Trainer(_mlp(), _cfg(tmp_path / "mem", state_storage="memory"), _loader()).train()
    assert not (tmp_path / "mem/out/checkpoints").exists()
    Trainer(_mlp(), _cfg(tmp_path / "dir", state_dir=str(tmp_path / "state")), _loader()).train()
    assert (step_dir(tmp_path / "state", 8) / "manifest.json").is_file()
    assert not (tmp_path / "dir/out/checkpoints").exists()
    with pytest.raises(ConfigError, match="state_storage must be 'disk' or 'memory', got 'gpu'"):
        _cfg(tmp_path, state_storage="gpu")


def test_output_dir_resume_and_seed(tmp_path):
    def weights(seed, folder):
        t = Trainer(_mlp(), _cfg(folder, seed=seed), _loader(shuffle=True))
        t.train()
        return torch.cat([p.detach().flatten() for p in t.unwrapped_model.parameters()]), t

    a, _ = weights(1, tmp_path / "a")
    b, _ = weights(1, tmp_path / "b")
    c, _ = weights(2, tmp_path / "c")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (ckpt_root(tmp_path / "a/out") / LATEST).exists()
    again, t = weights(1, tmp_path / "a")  # same output_dir: resumes from its finished checkpoint
    assert t.step == 8 and torch.equal(again, a)


# ---------------------------------------------------------------------- TransformerConfig fields
@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification

    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                     max_position_embeddings=32, num_labels=2)
    BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def _token_loader(n=16, batch_size=8, seq=6):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (n, seq), generator=g)
    rows = [{"input_ids": ids[i], "attention_mask": torch.ones(seq, dtype=torch.long), "labels": ids[i, 0] % 2}
            for i in range(n)]
    return torch.utils.data.DataLoader(rows, batch_size=batch_size)


def _tcfg(tmp_path, **kw):
    base = {"max_epochs": 1, "lr_finder_enabled": False, "device": "cpu", "output_dir": str(tmp_path / "out"),
            "batch_size": 8, "eval_batch_size": 8, "nan_recovery": False}
    return TransformerConfig(**{**base, **kw})


def test_transformer_trainer_loads_by_path_and_problem_type(tmp_path, bert_folder):
    t = TransformerTrainer(str(bert_folder), _tcfg(tmp_path, num_labels=3), _token_loader(), _token_loader())
    assert type(t._model).__name__ == "BertForSequenceClassification" and t._model.config.num_labels == 3
    metrics = t.train()
    assert set(metrics) == {"step", "loss", "eval/loss", "eval/accuracy"}
    t2 = TransformerTrainer(None, _tcfg(tmp_path / "b", model_name_or_path=str(bert_folder), problem_type="masked_lm"),
                            _token_loader())
    assert type(t2._model).__name__ == "BertForMaskedLM"
    with pytest.raises(ConfigError, match="model_name_or_path '.*nope': cannot load a AutoModelForCausalLM"):
        TransformerTrainer(str(tmp_path / "nope"), _tcfg(tmp_path, problem_type="causal_lm"), _token_loader())


@pytest.mark.parametrize("kind, cls", [("adamw", "AdamW"), ("adam", "Adam"), ("sgd", "SGD"), ("adafactor", "Adafactor")])
def test_optimizer_type_and_adam_fields(tmp_path, bert_folder, kind, cls):
    t = TransformerTrainer(str(bert_folder), _tcfg(tmp_path, optimizer_type=kind, learning_rate=3e-4, adam_beta1=0.8,
                                                   adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.02),
                           _token_loader())
    t.build()
    opt = t.optimizer.optimizer
    assert type(opt).__name__ == cls and opt.param_groups[0]["lr"] == pytest.approx(3e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.02, 0.0]
    no_decay = {id(p) for p in opt.param_groups[1]["params"]}
    assert all(id(p) in no_decay for n, p in t.unwrapped_model.named_parameters() if "LayerNorm" in n or "bias" in n)
    if kind in ("adamw", "adam"):
        assert opt.param_groups[0]["betas"] == (0.8, 0.95) and opt.param_groups[0]["eps"] == 1e-6


def test_peft_gradient_checkpointing_and_tokenize(tmp_path, bert_folder):
    from transformers import PreTrainedTokenizerFast

    from acceltrain.data.char_tokenizer import CharacterLevelTokenizer

    tok = CharacterLevelTokenizer(vocab_size=64).to_hf()
    assert isinstance(tok, PreTrainedTokenizerFast)
    t = TransformerTrainer(str(bert_folder), _tcfg(tmp_path, use_peft=True, gradient_checkpointing=True,
                                                   peft_config={"r": 2, "target_modules": ["query", "value"]},
                                                   max_length=5, padding="max_length", truncation=True),
                           _token_loader(), tokenizer=tok)
    assert type(t._model).__name__.startswith("Peft") and t._model.base_model.model.is_gradient_checkpointing
    trainable = sum(p.numel() for p in t._model.parameters() if p.requires_grad)
    assert 0 < trainable < sum(p.numel() for p in t._model.parameters()) // 4
    enc = t.tokenize(["ab", "abcdefgh"])
    assert enc["input_ids"].shape == (2, 5)
    t.train()
    folder = t.save_pretrained(tmp_path / "hf")
    assert (folder / "adapter_config.json").is_file() and (folder / "tokenizer.json").is_file()
    with pytest.raises(ConfigError, match="deepspeed_config: acceltrain takes DeepSpeed from the launch"):
        _tcfg(tmp_path, deepspeed_config="ds.json")
    with pytest.raises(ConfigError, match="peft_config: given but use_peft is False"):
        TransformerTrainer(str(bert_folder), _tcfg(tmp_path, peft_config={"r": 2}), _token_loader())


# ---------------------------------------------------------------------- scheduler and utils
def test_smart_scheduler_by_epoch_and_by_step():
    from acceltrain.compat.selgis import SmartScheduler, get_transformer_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    sched = SmartScheduler(opt, 0.1, SelgisConfig(max_epochs=10, scheduler_type="linear", warmup_epochs=2, min_lr=0.0))
    assert sched.get_lr() == 0.0
    assert sched.step_epoch(0) == pytest.approx(0.05) and sched.step_epoch(1) == pytest.approx(0.1)
    assert sched.step_epoch(5) == pytest.approx(0.1 * (1 - 4 / 8))
    assert sched.reduce_lr(0.5) == pytest.approx(0.025) and sched.surge_lr(3.0) == pytest.approx(0.075)
    opt2 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    by_step = SmartScheduler(opt2, 0.1, SelgisConfig(scheduler_type="cosine", warmup_ratio=0.1, min_lr=0.0),
                             num_training_steps=100)
    assert [by_step.step() for _ in range(10)][-1] == pytest.approx(0.1)
    # cosine_restart by step: t_0 stays epochs (4 epochs over 40 steps: t_0=1 restarts every 10 steps)
    from acceltrain.schedules import build_schedule

    opt3 = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    restarts = SmartScheduler(opt3, 0.1, SelgisConfig(scheduler_type="cosine_restart", warmup_ratio=0.1, max_epochs=4,
                                                      t_0=1, t_mult=1, min_lr=0.0), num_training_steps=40)
    want = build_schedule(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), "cosine_restarts", 40,
                          warmup_ratio=0.1, t_0=10, t_mult=1).lr_lambdas[0]
    assert [restarts.scheduler.lr_lambdas[0](i) for i in range(40)] == [want(i) for i in range(40)]
    hf = get_transformer_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0), "linear", 2, 10)
    hf.step()
    assert hf.get_last_lr() == [0.5]


def test_utils():
    from acceltrain.compat.selgis import (
        count_parameters,
        format_params,
        get_device,
        get_optimizer_grouped_params,
        is_dict_like,
        move_to_device,
        to_dict,
        unpack_batch,
    )

    model = _mlp()
    model[0].weight.requires_grad_(False)
    assert count_parameters(model) == 16 + 34 and count_parameters(model, trainable_only=False) == 128 + 50
    assert (format_params(1_200_000), format_params(3_400_000_000), format_params(999)) == ("1.2M", "3.4B", "999")
    assert get_device("cpu") == torch.device("cpu") and get_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': no CUDA GPU"):
            get_device("cuda")
    from transformers import BatchEncoding

    enc = BatchEncoding({"input_ids": torch.ones(2, 3), "labels": torch.zeros(2)})
    assert is_dict_like(enc) and type(to_dict(enc)) is dict and not is_dict_like((1, 2))
    inputs, labels = unpack_batch(enc)
    assert set(inputs) == {"input_ids"} and labels is enc["labels"]
    assert unpack_batch({"x": 1, "label": 2}) == ({"x": 1}, 2)
    assert unpack_batch((1, 2)) == (1, 2) and unpack_batch(torch.tensor(3.0))[1] is None
    moved = move_to_device({"a": [torch.ones(1)], "b": (torch.zeros(1),)}, "cpu")
    assert moved["a"][0].device.type == "cpu"
    groups = get_optimizer_grouped_params(model, 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] and [len(g["params"]) for g in groups] == [1, 2]


# Every config field and the test that fails if it is ignored (or checks its refusal): a field
# added to SelgisConfig/TransformerConfig without a test here fails the next test.
FIELD_TESTS = {
    "batch_size": "test_batch_sizes_must_match_the_given_loaders",
    "eval_batch_size": "test_batch_sizes_must_match_the_given_loaders",
    "max_epochs": "test_max_epochs_and_gradient_accumulation_become_steps",
    "gradient_accumulation_steps": "test_max_epochs_and_gradient_accumulation_become_steps",
    "patience": "test_patience_and_min_delta_stop_early",
    "min_delta": "test_patience_and_min_delta_stop_early",
    "grad_clip_norm": "test_grad_clip_norm_and_value",
    "grad_clip_value": "test_grad_clip_norm_and_value",
    "spike_threshold": "test_spike_threshold_and_min_history_len",
    "min_history_len": "test_spike_threshold_and_min_history_len",
    "nan_recovery": "test_nan_recovery_rolls_back_and_state_update_interval_sets_the_snapshot",
    "lr_finder_enabled": "test_lr_finder_fields",
    "lr_finder_trainable_only": "test_lr_finder_fields",
    "lr_finder_start": "test_lr_finder_fields",
    "lr_finder_end": "test_lr_finder_fields",
    "lr_finder_steps": "test_lr_finder_fields",
    "warmup_epochs": "test_warmup_epochs_and_warmup_ratio",
    "warmup_ratio": "test_warmup_epochs_and_warmup_ratio",
    "min_lr": "test_min_lr_is_the_floor_the_schedule_reaches",
    "scheduler_type": "test_scheduler_type",
    "t_0": "test_t_0_is_epochs_and_t_mult_multiplies",
    "t_mult": "test_t_0_is_epochs_and_t_mult_multiplies",
    "label_smoothing": "test_label_smoothing_of_the_default_loss",
    "weight_decay": "test_weight_decay_goes_to_the_default_optimizer",
    "sparsity_enabled": "test_sparsity_fields",
    "sparsity_target": "test_sparsity_fields",
    "sparsity_start_epoch": "test_sparsity_fields",
    "sparsity_frequency": "test_sparsity_fields",
    "fp16": "test_fp16_bf16_and_device",
    "bf16": "test_fp16_bf16_and_device",
    "logging_steps": "test_logging_eval_and_save_steps",
    "eval_steps": "test_logging_eval_and_save_steps",
    "save_steps": "test_logging_eval_and_save_steps",
    "output_dir": "test_output_dir_resume_and_seed",
    "save_total_limit": "test_logging_eval_and_save_steps",
    "save_best_only": "test_logging_eval_and_save_steps",
    "state_storage": "test_state_storage_and_state_dir",
    "state_dir": "test_state_storage_and_state_dir",
    "state_update_interval": "test_nan_recovery_rolls_back_and_state_update_interval_sets_the_snapshot",
    "device": "test_fp16_bf16_and_device",
    "seed": "test_output_dir_resume_and_seed",
    "model_name_or_path": "test_transformer_trainer_loads_by_path_and_problem_type",
    "num_labels": "test_transformer_trainer_loads_by_path_and_problem_type",
    "problem_type": "test_transformer_trainer_loads_by_path_and_problem_type",
    "max_length": "test_peft_gradient_checkpointing_and_tokenize",
    "padding": "test_peft_gradient_checkpointing_and_tokenize",
    "truncation": "test_peft_gradient_checkpointing_and_tokenize",
    "optimizer_type": "test_optimizer_type_and_adam_fields",
    "learning_rate": "test_optimizer_type_and_adam_fields",
    "adam_beta1": "test_optimizer_type_and_adam_fields",
    "adam_beta2": "test_optimizer_type_and_adam_fields",
    "adam_epsilon": "test_optimizer_type_and_adam_fields",
    "use_peft": "test_peft_gradient_checkpointing_and_tokenize",
    "peft_config": "test_peft_gradient_checkpointing_and_tokenize",
    "gradient_checkpointing": "test_peft_gradient_checkpointing_and_tokenize",
    "deepspeed_config": "test_peft_gradient_checkpointing_and_tokenize",
}


def test_every_config_field_has_a_test_that_checks_it():
    import dataclasses

    fields = [f.name for f in dataclasses.fields(TransformerConfig)]  # SelgisConfig's fields and its own
    assert sorted(fields) == sorted(FIELD_TESTS), sorted(set(fields) ^ set(FIELD_TESTS))
    for field, test in FIELD_TESTS.items():
        body = inspect.getsource(globals()[test])
        assert re.search(rf"\b{field}\b", body), (field, test)
