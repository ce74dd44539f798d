"""--report_to, tracker identities in checkpoints, replayed steps, --log_level (acceltrain.trackers,
LoggingHook, recipe_kit.configure_output)."""

from __future__ import annotations

import importlib.util
import json
import logging
import sys

import pytest

from acceltrain import BaseHook, CheckpointingHook, LoggingHook, WandbHook
from acceltrain.config import ConfigError, UserError
from acceltrain.recipe_kit import TrainingConfig, configure_output
from acceltrain.trackers import TRACKERS, parse_report_to
from tests.conftest import ROOT
from tests.helpers import ToyTrainer, run_step_dir


@pytest.fixture(autouse=True)
def _restore_logging():
    """configure_output changes process-wide loggers: leave them as the next test expects."""
    ours, deepspeed = logging.getLogger("acceltrain"), logging.getLogger("DeepSpeed")
    saved = ours.level, list(ours.handlers), list(deepspeed.filters)
    yield
    ours.setLevel(saved[0])
    ours.handlers[:] = saved[1]
    deepspeed.filters[:] = saved[2]


@pytest.mark.parametrize("value, expected", [
    ("tensorboard", ["tensorboard"]),
    (["tensorboard", "wandb"], ["tensorboard", "wandb"]),
    ("wandb,tensorboard,wandb", ["wandb", "tensorboard"]),
    (["WandB, tensorboard"], ["wandb", "tensorboard"]),
    ("none", []),
    (["none"], []),
    ([], []),
])
def test_report_to_names_lists_and_none(value, expected):
    pytest.importorskip("wandb")
    assert parse_report_to(value) == expected


def test_report_to_all_is_every_installed_tracker(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    got = parse_report_to("all")
    assert "mlflow" not in got and "tensorboard" in got
    assert got == [n for n in TRACKERS if n != "mlflow" and importlib.util.find_spec(TRACKERS[n][0]) is not None]


@pytest.mark.parametrize("value, message", [
    ("tensorbored", "report_to 'tensorbored' is not a tracker; choose from tensorboard, wandb, mlflow, aim, "
                    "comet_ml, clearml, dvclive, all or none"),
    ("none,wandb", "report_to none,wandb: 'none' and 'all' stand alone, not in a list"),
])
def test_report_to_bad_names_are_config_errors(value, message):
    with pytest.raises(ConfigError) as e:
        parse_report_to(value)
    assert str(e.value) == message


def test_a_tracker_that_is_not_installed_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` sees when it is missing
    with pytest.raises(UserError) as e:
        parse_report_to(["tensorboard", "mlflow"])
    assert str(e.value) == "report_to mlflow: mlflow is not installed; pip install 'acceltrain[mlflow]'"


def _recipe_main(name: str):
    spec = importlib.util.spec_from_file_location(f"_recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("recipe", ["pretrain", "causal_lm", "classify"])
def test_every_recipe_refuses_a_missing_tracker_with_exit_2_touching_nothing(recipe, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    main = _recipe_main(recipe)
    with pytest.raises(SystemExit) as e:  # --overwrite would delete the earlier run: it must not get that far
        main(["--output_dir", str(out), "--overwrite", "true", "--report_to", "mlflow", "--max_steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: report_to mlflow: mlflow is not installed; pip install 'acceltrain[mlflow]'\n"
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 2.0}\n' and (out / "final").is_dir()
    assert sorted(p.name for p in out.iterdir()) == ["final", "metrics.jsonl"]


def test_recipes_take_report_to_run_name_project_and_log_level_flags(tmp_path):
    from acceltrain.config import parse_config

    cfg = parse_config(TrainingConfig, ["--report_to", "tensorboard", "wandb", "--run_name", "r", "--tracker_project",
                                        "p", "--log_level", "ERROR"])
    assert (cfg.report_to, cfg.run_name, cfg.tracker_project, cfg.log_level) == (["tensorboard", "wandb"], "r", "p", "ERROR")
    yaml = tmp_path / "c.yaml"
    yaml.write_text("report_to: none\n")
    assert parse_config(TrainingConfig, ["--config", str(yaml)]).report_to == ["none"]
    assert parse_config(TrainingConfig, []).report_to == ["tensorboard"]


def test_log_level_follows_python_names():
    configure_output("ERROR")
    assert logging.getLogger("acceltrain").level == logging.ERROR
    configure_output("debug")
    assert logging.getLogger("acceltrain").level == logging.DEBUG
    with pytest.raises(ConfigError) as e:
        configure_output("loud")
    assert str(e.value) == "log_level 'loud': expected one of debug, info, warning, error, critical (Python's logging levels)"


def test_deepspeed_accelerator_detection_line_is_dropped_unless_debug():
    ds = logging.getLogger("DeepSpeed")

    def record(filename: str, level: int) -> logging.LogRecord:
        return logging.LogRecord("DeepSpeed", level, f"/x/deepspeed/accelerator/{filename}", 213,
                                 "Setting accelerator to CPU.", None, None)

    configure_output("warning")
    assert not ds.filter(record("real_accelerator.py", logging.WARNING))
    assert ds.filter(record("real_accelerator.py", logging.ERROR))
    assert ds.filter(record("engine.py", logging.WARNING))  # a DeepSpeed run's own warnings stay
    configure_output("warning")  # called again (a second run in one process): still one filter
    assert len(ds.filters) == len([f for f in ds.filters if type(f).__name__ != "_DeepSpeedDetectionFilter"]) + 1
    configure_output("debug")
    assert ds.filter(record("real_accelerator.py", logging.WARNING))


class _CrashAt(BaseHook):
    def __init__(self, step: int):
        self.step = step

    def on_after_step(self, trainer):
        if trainer.step == self.step:
            raise RuntimeError(f"crash at {self.step}")


def _tensorboard(ws) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ws / "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("loss")]


def test_tracker_identity_is_checkpointed_and_replayed_steps_are_logged_once(tmp_path):
    ws = tmp_path / "ws"
    hooks = [LoggingHook(interval=1), CheckpointingHook(interval=4, load=None, background=False), _CrashAt(6)]
    t = ToyTrainer(max_steps=10, workspace=ws, device="cpu", hooks=hooks)
    with pytest.raises(RuntimeError, match="crash at 6"):
        t.train()
    import torch

    saved = torch.load(run_step_dir(ws, 4) / "rank_state_0.pt", weights_only=True)
    assert saved["hooks"]["LoggingHook"]["trackers"] == {"tensorboard": {"log_dir": str(ws / "tensorboard")}}
    with open(ws / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # a line torn by a kill

    resumed = LoggingHook(interval=1)
    t2 = ToyTrainer(max_steps=10, workspace=ws, device="cpu", hooks=[resumed, CheckpointingHook(interval=4)])
    t2.train()
    assert resumed._resume_identities == {"tensorboard": {"log_dir": str(ws / "tensorboard")}}
    lines = [json.loads(line) for line in (ws / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, 11))  # 5 and 6 once, the torn line gone

    uninterrupted = ToyTrainer(max_steps=10, workspace=tmp_path / "u", device="cpu", hooks=[LoggingHook(interval=1)])
    uninterrupted.train()
    want = [json.loads(line)["loss"] for line in (tmp_path / "u" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines] == want  # the first writes of 5-6 equal the replay: exact resume
    scalars = _tensorboard(ws)
    assert [s for s, _ in scalars] == list(range(1, 11))
    assert [v for _, v in scalars] == pytest.approx(want, rel=1e-6)


def test_report_to_none_starts_no_tracker(tmp_path):
    t = ToyTrainer(max_steps=2, workspace=tmp_path, device="cpu", hooks=[LoggingHook(interval=1, report_to="none")])
    t.train()
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "metrics.jsonl").is_file()
    assert t.state_dict()["hooks"]["LoggingHook"]["trackers"] == {}


def test_wandb_hook_is_a_logging_hook_reporting_to_wandb():
    pytest.importorskip("wandb")
    hook = WandbHook(project="p", name="n", interval=5)
    assert isinstance(hook, LoggingHook)
    assert (hook.report_to, hook.project, hook.run_name, hook.interval) == (["tensorboard", "wandb"], "p", "n", 5)


def test_records_logged_before_the_first_step_reach_every_sink(tmp_path):
    class LogAtStart(BaseHook):
        def on_before_train(self, trainer):
            trainer.log({"eval/loss": 1.5}, dry_run=not trainer.is_main_process)

    t = ToyTrainer(max_steps=1, workspace=tmp_path, device="cpu", hooks=[LoggingHook(interval=1), LogAtStart()])
    t.train()
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first == {"step": 0, "eval/loss": 1.5}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("eval/loss")] == [(0, 1.5)]


def test_wandb_hook_without_wandb_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ImportError, match=r"^WandbHook needs wandb: pip install 'acceltrain\[wandb\]'$"):
        WandbHook(project="x")


def test_trackers_start_before_step_1_so_its_timing_leaves_them_out(tmp_path):
    seen = []

    class Probe(BaseHook):  # placed before the LoggingHook: sees the trackers as step 1 begins
        def on_before_step(self, trainer):
            if trainer.step in (0, 2):
                seen.append((trainer.step, [t.name for t in trainer.accelerator.trackers]))

    ToyTrainer(max_steps=2, workspace=tmp_path, device="cpu",
               hooks=[Probe(), LoggingHook(interval=1), CheckpointingHook(interval=2, load=None)]).train()
    ToyTrainer(max_steps=3, workspace=tmp_path, device="cpu",  # resumed: started once the checkpoint is in
               hooks=[Probe(), LoggingHook(interval=1), CheckpointingHook(interval=2, load="latest")]).train()
    assert seen == [(0, ["tensorboard"]), (2, ["tensorboard"])]


def test_a_resize_gives_rank_0_every_saved_ranks_partial_sums_scaled_to_the_new_world():
    """Interval sums are SUMmed across ranks when logged, one entry per rank and step: 2 saved ranks
    (one reporting a key of its own) resumed on 3 keep the interval's average, steps weighted alike."""
    import torch

    hook = LoggingHook(interval=4, tensorboard=False)
    states = [{"sums": {"loss": torch.tensor(1.0, dtype=torch.float64)}, "counts": {"loss": 1}, "trackers": {"x": {}}},
              {"sums": {"loss": torch.tensor(3.0, dtype=torch.float64), "only1": torch.tensor(5.0, dtype=torch.float64)},
               "counts": {"loss": 1, "only1": 1}, "trackers": {}}]
    zero, other = hook.resize_state(states, 0, 3), hook.resize_state(states, 2, 3)
    assert zero["counts"] == {"loss": 3, "only1": 1.5} and zero["trackers"] == {"x": {}}
    assert zero["sums"]["loss"].item() == 6.0 and zero["sums"]["only1"].item() == 7.5
    assert other["sums"] == {} and other["counts"] == {}
    hook.load_state_dict(zero)
    sums, counts = hook._figures.totals()
    assert counts == {"loss": 3, "only1": 1.5}  # 2.0 per figure: the saved run's average
    assert sums["loss"] / counts["loss"] == 2.0 and sums["only1"] / counts["only1"] == 5.0
