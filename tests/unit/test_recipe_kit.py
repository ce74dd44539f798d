"""recipe_kit.guard_output_dir: one folder, one run (checkpoints are covered end to end in
tests/integration/test_pretrain.py; here the folders that hold only logs or an export)."""

from __future__ import annotations

import pytest

from acceltrain.config import UserError
from acceltrain.recipe_kit import guard_output_dir
from tests.helpers import load_recipe


def test_a_fresh_or_missing_folder_passes(tmp_path):
    assert guard_output_dir(tmp_path / "new", resume=False, overwrite=False, is_main=True) is False
    (tmp_path / "config.yaml").write_text("lr: 1\n")  # every run rewrites its config: not a run's output
    assert guard_output_dir(tmp_path, resume=False, overwrite=False, is_main=True) is False


def test_a_trackers_files_alone_are_an_earlier_run(tmp_path):
    (tmp_path / "wandb" / "offline-run-1").mkdir(parents=True)
    with pytest.raises(UserError, match=r"holds an earlier run's wandb; pass --resume true"):
        guard_output_dir(tmp_path, resume=False, overwrite=False, is_main=True)
    assert (tmp_path / "wandb" / "offline-run-1").is_dir()


def test_logs_and_export_without_checkpoints_are_refused_and_left_alone(tmp_path):
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    with pytest.raises(UserError, match=r"holds an earlier run's final, metrics.jsonl; pass --resume true"):
        guard_output_dir(tmp_path, resume=False, overwrite=False, is_main=True)
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == b"weights"
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
    # --resume with nothing to resume from starts again (there is no checkpoint to load).
    assert guard_output_dir(tmp_path, resume=True, overwrite=False, is_main=True) is False
    assert (tmp_path / "metrics.jsonl").exists()


def test_overwrite_removes_only_the_run_outputs(tmp_path):
    for name in ("final", "tensorboard", "merged", "wandb", "dvclive", ".aim"):  # the trackers' files too
        (tmp_path / name).mkdir()
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "notes.txt").write_text("mine")
    assert guard_output_dir(tmp_path, resume=False, overwrite=True, is_main=False) is False
    assert (tmp_path / "final").exists()  # only the main process deletes
    guard_output_dir(tmp_path, resume=False, overwrite=True, is_main=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_resume_and_overwrite_together_is_an_error(tmp_path):
    with pytest.raises(UserError, match="contradict"):
        guard_output_dir(tmp_path, resume=True, overwrite=True, is_main=True)


def _recipe(name: str):
    return load_recipe(name, "unit")


def test_pretrain_config_is_a_training_config_with_its_own_defaults():
    from acceltrain.recipe_kit import TrainingConfig

    cfg = _recipe("pretrain").PretrainConfig()
    assert isinstance(cfg, TrainingConfig)
    assert (cfg.output_dir, cfg.max_steps, cfg.lr, cfg.warmup_steps, cfg.weight_decay, cfg.eval_interval,
            cfg.save_interval, cfg.batch_size, cfg.min_lr_ratio, cfg.grad_clip, cfg.keep_checkpoints) == (
        "runs/pretrain", 300, 3e-3, 30, 0.1, 100, 100, 16, 0.1, 1.0, 2)
    assert cfg.trainer_kwargs()["workspace"] == "runs/pretrain"  # output_dir is the trainer's workspace


@pytest.mark.parametrize("field, value, message", [
    ("seq_len", 0, "seq_len must be >= 1, got 0"), ("keep_checkpoints", 0, "keep_checkpoints must be >= 1, got 0"),
    ("num_workers", -1, "num_workers must be >= 0, got -1"), ("warmup_steps", -2, "warmup_steps must be >= 0, got -2"),
    ("sample_tokens", -1, "sample_tokens must be >= 0, got -1"),
    ("lr", 0.0, "lr must be > 0 and min_lr_ratio in [0, 1], got 0.0 and 0.1"),
    ("grad_clip", 0.0, "grad_clip must be > 0 and weight_decay >= 0, got 0.0 and 0.1"),
    ("collective_timeout", 0.0, "collective_timeout must be a number of seconds > 0, got 0.0"),
    ("collective_timeout", float("inf"), "collective_timeout must be a number of seconds > 0, got inf"),
])
def test_pretrain_config_checks_inherited_and_own_fields(field, value, message):
    from acceltrain.config import ConfigError

    cfg = _recipe("pretrain").PretrainConfig(**{field: value})
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert str(e.value) == message


def test_every_recipe_main_is_run_recipe(monkeypatch):
    import acceltrain.recipe.trainer as recipe_trainer

    calls = []
    for name in ("pretrain", "causal_lm", "classify"):
        module = _recipe(name)
        monkeypatch.setattr(module, "run_recipe", lambda *a, **kw: calls.append((a, kw)) or "done")
        assert module.main(["--x"]) == "done"
        (config_class, trainer_class, argv), kw = calls[-1]
        assert (config_class, trainer_class) == module.RECIPE and argv == ["--x"]
        assert kw["prog"] == f"recipes/{name}.py"
    assert recipe_trainer.run_recipe.__module__ == "acceltrain.recipe.trainer"


@pytest.mark.parametrize("name", ["pretrain", "causal_lm", "classify"])
def test_every_recipe_takes_collective_timeout_to_the_trainer(name):
    from acceltrain.config import parse_config

    module = _recipe(name)
    config_class = module.RECIPE[0]
    assert parse_config(config_class, []).trainer_kwargs()["collective_timeout"] == 60.0  # BaseTrainer's default
    cfg = parse_config(config_class, ["--collective_timeout", "300"])
    assert cfg.trainer_kwargs()["collective_timeout"] == 300.0


def _failing_recipe(tmp_path, fail_in: str):
    """run_recipe's own control flow around a trainer whose train() or finish() raises."""
    from dataclasses import dataclass

    from acceltrain.config import UserError

    events = []

    @dataclass
    class Config:
        output_dir: str = str(tmp_path / "run")

        def validate(self):
            pass

    class Trainer:
        is_main_process = True

        def __init__(self, cfg):
            from pathlib import Path

            self.workspace = Path(cfg.output_dir)

        def train(self):
            events.append("train")
            if fail_in == "train":
                raise UserError("the data went away")

        def finish(self):
            events.append("finish")
            raise UserError("--output_dir: no space left to export")

        def close(self):
            events.append("close")

    return Config, Trainer, events


@pytest.mark.parametrize("fail_in, expected", [("train", ["train", "close"]),
                                              ("finish", ["train", "finish", "close"])])
def test_run_recipe_closes_the_trainer_when_training_or_export_fails(tmp_path, capsys, fail_in, expected):
    from acceltrain.recipe.trainer import run_recipe

    config, trainer, events = _failing_recipe(tmp_path, fail_in)
    with pytest.raises(SystemExit) as e:
        run_recipe(config, trainer, [], prog="recipes/x.py")
    assert e.value.code == 2 and events == expected  # trackers and the process group are closed too
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
    assert (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / ".config.yaml.tmp").exists()
