"""Coming from the Model Training Framework (seed 001): its documented API through
``acceltrain.compat.mtf``, run as the document writes it (imports changed, tiny local data).

Covers: ParameterGrid / ParameterGridSearch (counts and permutations against a closed form,
each naming strategy's names), ConfigurationManager (the document's complete YAML example,
save, compose), GenericTrainer (fit, callbacks, checkpoints, phase-aware resume after SIGTERM
in validation), GitManager.branch_context (a throwaway repository), SLURMLauncher (rendered
scripts run by bash; a real job array on the CI cluster) and the utilities.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from acceltrain.compat.mtf import (
    CheckpointTimeoutError,
    ConfigurationError,
    ConfigurationManager,
    Error,
    ExecutionMode,
    ExperimentConfig,
    GenericTrainer,
    GenericTrainerConfig,
    GitManager,
    GitOperationError,
    JobStatus,
    JobSubmissionError,
    ModelTrainingFramework,
    NamingStrategy,
    ParameterGrid,
    ParameterGridSearch,
    PreemptionTimeoutError,
    Result,
    ResumeState,
    SLURMError,
    SLURMLauncher,
    Success,
    TrainerError,
    TrainerPhase,
    TrainingCallback,
    ValidationError,
    ensure_directory_exists,
    get_logger,
    get_project_root,
    setup_logging,
    validate_project_structure,
)
from tests.helpers import LATEST, require_slurm, step_dir, step_folder_name

SEED = Path("/work/shared/seeds/001_5e7f6eb599918087.txt")

# The document's "Complete Configuration Example", as written.
COMPLETE_YAML = """\
experiment_name: "example_experiment"
description: "Complete configuration example"

model:
  name: "transformer"
  hidden_size: 512
  num_layers: 6
  num_heads: 8
  dropout: 0.1

training:
  epochs: 100
  batch_size: 32
  learning_rate: 0.001
  gradient_accumulation_steps: 1
  max_grad_norm: 1.0

data:
  dataset_name: "custom_dataset"
  train_split: "train"
  val_split: "validation"
  test_split: "test"
  preprocessing: {}

optimizer:
  name: "adamw"
  weight_decay: 0.01
  betas: [0.9, 0.999]
  eps: 1e-8

scheduler:
  name: "cosine"
  warmup_steps: 1000
  min_lr: 1e-6

slurm:
  job_name: "training_job"
  time_limit: "24:00:00"
  nodes: 1
  ntasks_per_node: 1
  cpus_per_task: 4
  mem: "32G"
  gres: "gpu:1"
  partition: "gpu"
  additional_args: []

logging:
  log_level: "INFO"
  use_wandb: true
  wandb_project: "my_project"
  wandb_entity: "my_team"
  log_every_n_steps: 10

checkpoint:
  save_every_n_epochs: 5
  save_top_k: 3
  monitor: "val_loss"
  mode: "min"
  checkpoint_dir: "./checkpoints"

preemption:
  timeout_minutes: 5
  grace_period_seconds: 60
  max_preemptions: 3

performance:
  num_workers: 4
  pin_memory: true
  prefetch_factor: 2
  persistent_workers: true

# Custom parameters
seed: 42
deterministic: true
benchmark: false
tags: ["experiment", "baseline"]
version: "1.0"
"""

BASE = {"experiment_name": "base", "model": {"name": "mlp", "hidden_size": 16},
        "training": {"epochs": 1, "batch_size": 8, "learning_rate": 0.1}, "data": {"dataset_name": "toy"},
        "optimizer": {"name": "sgd"}}


def test_the_complete_configuration_example_is_in_the_document_as_tested():
    text = SEED.read_text()
    assert COMPLETE_YAML.split("# Custom parameters")[0].strip() in text


# ---------------------------------------------------------------------- grids
def nested_grid() -> tuple[ParameterGrid, dict[str, list]]:
    values = {"training.learning_rate": [1e-2, 1e-3, 1e-4], "model.hidden_size": [16, 32],
              "model.dropout": [0.0, 0.1]}
    grid = ParameterGrid("search", "3x2x2, nested keys")
    grid.add_parameter("training.learning_rate", values["training.learning_rate"])
    grid.add_nested_parameter("model.hidden_size", values["model.hidden_size"])
    grid.add_nested_parameter("model.dropout", values["model.dropout"])
    return grid, values


def test_a_3x2x2_nested_grid_counts_and_permutes_as_the_closed_form():
    grid, values = nested_grid()
    assert (grid.name, grid.description) == ("search", "3x2x2, nested keys")
    assert grid.get_parameter_count() == 3 * 2 * 2
    expected = [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]
    assert list(grid.generate_permutations()) == expected  # the last key varies fastest

    search = ParameterGridSearch(BASE)
    search.add_grid(grid)
    experiments = list(search.generate_experiments())
    assert len(experiments) == 12 and all(isinstance(e, ExperimentConfig) for e in experiments)
    for exp, point in zip(experiments, expected, strict=True):
        assert exp.training.learning_rate == point["training.learning_rate"]
        assert (exp.model.hidden_size, exp.model.dropout) == (point["model.hidden_size"], point["model.dropout"])
        assert exp.model.name == "mlp" and exp.training.batch_size == 8  # the base under the grid
    assert BASE["model"] == {"name": "mlp", "hidden_size": 16}  # not mutated


def test_each_naming_strategy_gives_the_documented_names():
    grid, values = nested_grid()
    points = list(grid.generate_permutations())
    names = {}
    for strategy in (NamingStrategy.DESCRIPTIVE, NamingStrategy.HASH_BASED, NamingStrategy.SEQUENTIAL):
        search = ParameterGridSearch(BASE)
        search.add_grid(grid)
        search.set_naming_strategy(strategy)
        names[strategy] = [e.experiment_name for e in search.generate_experiments()]
    # Parameter names (the last part of a dotted key) and values:
    assert names[NamingStrategy.DESCRIPTIVE][:3] == ["base_learning_rate=0.01_hidden_size=16_dropout=0.0",
                                                    "base_learning_rate=0.01_hidden_size=16_dropout=0.1",
                                                    "base_learning_rate=0.01_hidden_size=32_dropout=0.0"]
    # A hash of the parameters:
    assert names[NamingStrategy.HASH_BASED] == [
        "base_" + hashlib.sha256(json.dumps(p, sort_keys=True).encode()).hexdigest()[:10] for p in points]
    # Sequential numbering:
    assert names[NamingStrategy.SEQUENTIAL] == [f"base_run_{i:03d}" for i in range(12)]
    assert all(len(set(n)) == 12 for n in names.values())
    with pytest.raises(ConfigurationError, match=r"^naming 'by_date': expected one of descriptive, hash, sequential$"):
        ParameterGridSearch(BASE).set_naming_strategy("by_date")


def test_create_grid_adds_it_and_grids_union_without_duplicates():
    search = ParameterGridSearch(BASE)
    search.create_grid("lr", "learning rates").add_parameter("training.learning_rate", [0.1, 0.2])
    search.create_grid("lr again").add_parameter("training.learning_rate", [0.2, 0.3])
    assert [e.training.learning_rate for e in search.generate_experiments()] == [0.1, 0.2, 0.3]
    assert search.get_total_experiments() == 3


def test_bad_grids_and_configs_say_which_field():
    with pytest.raises(ConfigurationError, match=r"^grid model.x: expected a non-empty list of values, got 3$"):
        ParameterGrid("g").add_parameter("model.x", 3)
    search = ParameterGridSearch({**BASE, "training": {**BASE["training"], "epochs": 0}})
    search.create_grid("g").add_parameter("model.hidden_size", [1])
    with pytest.raises(ValidationError, match=r"training.epochs: expected an integer >= 1, got 0$"):
        list(search.generate_experiments())
    with pytest.raises(ValidationError, match=r"^config: optimizer: required field is missing$"):
        ExperimentConfig.from_dict({k: v for k, v in BASE.items() if k != "optimizer"})
    with pytest.raises(ValidationError, match=r"^config: training.lr: unknown field; known fields: epochs, "):
        ExperimentConfig.from_dict({**BASE, "training": {"lr": 1}})


# ---------------------------------------------------------------------- configuration manager
def test_configuration_manager_loads_saves_and_composes(tmp_path: Path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "complete.yaml").write_text(COMPLETE_YAML)
    cm = ConfigurationManager(tmp_path)
    data = cm.load_config("complete.yaml")  # found in project_root/configs; validated
    exp = ExperimentConfig.from_dict(data)
    assert exp.optimizer.eps == 1e-8 and exp.scheduler.min_lr == 1e-6  # YAML 1.2 numbers
    assert exp.optimizer.betas == [0.9, 0.999] and exp.slurm.time_limit == "24:00:00"
    assert exp.tags == ["experiment", "baseline"] and exp.seed == 42 and exp.model.hidden_size == 512

    cm.save_config(exp, tmp_path / "out" / "exp.json", format="json")
    cm.save_config(data, tmp_path / "out" / "exp.yaml")
    assert ExperimentConfig.from_dict(json.loads((tmp_path / "out" / "exp.json").read_text())) == exp
    assert cm.load_config(tmp_path / "out" / "exp.yaml") == data

    (configs / "small.yaml").write_text("model: {hidden_size: 64}\ntags: [small]\noptimizer: {betas: [0.8, 0.9]}\n")
    composed = cm.compose_configs("complete.yaml", ["small.yaml", {"training": {"epochs": 2}}],
                                  {"training.learning_rate": 3e-4, "model.num_layers": 2})
    assert composed["model"] == {"name": "transformer", "hidden_size": 64, "num_layers": 2, "num_heads": 8,
                                 "dropout": 0.1}  # deep merge
    assert composed["tags"] == ["small"] and composed["optimizer"]["betas"] == [0.8, 0.9]  # lists replaced
    assert composed["optimizer"]["weight_decay"] == 0.01
    assert composed["training"] == {"epochs": 2, "batch_size": 32, "learning_rate": 3e-4,
                                    "gradient_accumulation_steps": 1, "max_grad_norm": 1.0}
    assert cm.load_config("complete.yaml") == data  # composing mutated neither file nor cache

    with pytest.raises(ConfigurationError, match=r"^nope.yaml: config file not found \(looked in "):
        cm.load_config("nope.yaml")
    with pytest.raises(ConfigurationError, match=r"^save_config format: expected 'yaml' or 'json', got 'toml'$"):
        cm.save_config(data, tmp_path / "x.toml", format="toml")
    (configs / "broken.json").write_text("{")
    with pytest.raises(ConfigurationError, match=r"broken.json: not valid JSON \(line 1\)$"):
        cm.load_config("broken.json")


# ---------------------------------------------------------------------- GenericTrainer
def toy_loaders(n_train: int = 48, n_val: int = 21) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_train + n_val, 4, generator=g)
    y = x @ torch.randn(4, 1, generator=g)
    train = DataLoader(TensorDataset(x[:n_train], y[:n_train]), batch_size=8, shuffle=True,
                       generator=torch.Generator().manual_seed(1))
    return train, DataLoader(TensorDataset(x[n_train:], y[n_train:]), batch_size=4)


class RegressionTrainer(GenericTrainer):
    """The document's contract: training_step / validation_step return dicts."""

    def __init__(self, config: GenericTrainerConfig, signal_at: tuple[int, int] | None = None):
        super().__init__(config)
        self.signal_at, self.val_batches = signal_at, []

    def training_step(self, batch, batch_idx):
        x, y = batch
        return {"loss": nn.functional.mse_loss(self.model(x), y)}

    def validation_step(self, batch, batch_idx):
        self.val_batches.append((self.step, batch_idx))
        if (self.step, batch_idx) == self.signal_at:
            os.kill(os.getpid(), signal.SIGTERM)  # preempted in the middle of validation
        x, y = batch
        pred = self.model(x)
        return {"loss": nn.functional.mse_loss(pred, y), "mae": (pred - y).abs().mean()}


class Events(TrainingCallback):
    def __init__(self):
        self.events, self.batch_losses = [], []

    def on_training_start(self, trainer):
        self.events.append("training_start")

    def on_training_end(self, trainer, logs):
        self.events.append(f"training_end:{logs['global_step']}")

    def on_epoch_start(self, trainer, epoch):
        self.events.append(f"epoch_start:{epoch}")

    def on_epoch_end(self, trainer, epoch, logs):
        self.events.append(f"epoch_end:{epoch}:{sorted(logs)}")
        self.epoch_logs = logs

    def on_batch_start(self, trainer, batch_idx):
        self.events.append(f"batch_start:{batch_idx}")

    def on_batch_end(self, trainer, batch_idx, logs):
        self.events.append(f"batch_end:{batch_idx}")
        self.batch_losses.append(logs["loss"])


def fit(tmp_path: Path, *, signal_at=None, epochs: int = 2) -> tuple[RegressionTrainer, Events, int | None]:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    trainer = RegressionTrainer(GenericTrainerConfig(max_epochs=epochs, checkpoint_dir=tmp_path / "ckpt",
                                                     device="cpu"), signal_at=signal_at)
    events = Events()
    trainer.add_callback(events)
    train, val = toy_loaders()
    code = None
    try:
        trainer.fit(model, optimizer, train, val)
    except SystemExit as e:
        code = e.code
    return trainer, events, code


def test_fit_calls_the_callbacks_in_order_and_validates_each_epoch(tmp_path: Path):
    trainer, events, code = fit(tmp_path)
    assert code is None and trainer.phase is TrainerPhase.TRAINING_COMPLETE and trainer.step == 12
    batches = [e for i in range(6) for e in (f"batch_start:{i}", f"batch_end:{i}")]
    logs = "['epoch', 'train_loss', 'val_loss', 'val_mae']"
    assert events.events == ["training_start", "epoch_start:0", *batches, f"epoch_end:0:{logs}",
                             "epoch_start:1", *batches, f"epoch_end:1:{logs}", "training_end:12"]
    # Validation: sample-weighted means over all 21 samples (5 full batches and one of 1).
    _, val = toy_loaders()
    x, y = val.dataset.tensors
    with torch.no_grad():
        pred = trainer.unwrapped_model(x)
    assert events.epoch_logs["val_loss"] == pytest.approx(nn.functional.mse_loss(pred, y).item(), rel=1e-6)
    assert events.epoch_logs["train_loss"] == pytest.approx(sum(events.batch_losses[6:]) / 6, rel=1e-6)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted([
        LATEST, step_folder_name(12), step_folder_name(6)])


def test_sigterm_during_validation_resumes_into_validation_at_that_batch_exactly(tmp_path: Path):
    ref, ref_events, _ = fit(tmp_path / "ref")
    cut, cut_events, code = fit(tmp_path / "run", signal_at=(6, 2))
    assert code == 128 + signal.SIGTERM
    assert cut.val_batches == [(6, 0), (6, 1), (6, 2)]  # stopped after the batch the signal came in
    assert "epoch_end:0" not in " ".join(cut_events.events)  # the epoch ends once its validation does

    probe = RegressionTrainer(GenericTrainerConfig(checkpoint_dir=tmp_path / "run" / "ckpt"))
    state = probe.load_checkpoint()
    assert isinstance(state, ResumeState)
    assert (state.phase, state.global_step, state.val.batch_idx, state.val.samples) == (
        TrainerPhase.VAL_BATCH_FORWARD, 6, 3, 12)

    again, again_events, code = fit(tmp_path / "run")
    assert code is None
    assert again.val_batches[:3] == [(6, 3), (6, 4), (6, 5)]  # continued, not restarted
    ref_val = [e for e in ref_events.events if e.startswith("epoch_end")]
    assert [e for e in again_events.events if e.startswith("epoch_end")] == ref_val
    assert again.evaluation.history == ref.evaluation.history  # float ==: bitwise
    assert cut_events.batch_losses + again_events.batch_losses == ref_events.batch_losses
    assert torch.equal(again.unwrapped_model.weight, ref.unwrapped_model.weight)


def test_save_and_load_checkpoint_mid_epoch(tmp_path: Path):
    trainer, _, _ = fit(tmp_path, epochs=1)
    path = trainer.save_checkpoint()
    assert path == step_dir(tmp_path / "ckpt", 6) and (path / "manifest.json").is_file()
    state = trainer.load_checkpoint(path)
    assert (state.phase, state.epoch, state.global_step) == (TrainerPhase.TRAINING_COMPLETE, 1, 6)
    assert state.rng is not None and state.rng.torch is not None

    class Stop(TrainingCallback):  # stop after 3 of the 6 batches (the loop's own stop request)
        def on_batch_end(self, trainer, batch_idx, logs):
            if trainer.step == 2:
                trainer.request_stop("test")

    t = RegressionTrainer(GenericTrainerConfig(max_epochs=1, checkpoint_dir=tmp_path / "mid", device="cpu"))
    t.add_callback(Stop())
    train, val = toy_loaders()
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    t.fit(model, torch.optim.AdamW(model.parameters(), lr=0.05), train, val)
    state = t.load_checkpoint()
    assert (state.phase, state.epoch, state.global_step, state.train.batch_idx) == (
        TrainerPhase.TRAIN_BATCH_FORWARD, 0, 3, 3)


def test_training_step_without_a_loss_is_a_trainer_error(tmp_path: Path):
    class NoLoss(GenericTrainer):
        def training_step(self, batch, batch_idx):
            return {"mae": torch.tensor(1.0)}

    train, _ = toy_loaders()
    model = nn.Linear(4, 1)
    t = NoLoss(GenericTrainerConfig(checkpoint_dir=tmp_path / "c", device="cpu"))
    with pytest.raises(TrainerError, match=r"^training_step must return a dict with a 'loss' key, got \['mae'\]$"):
        t.fit(model, torch.optim.SGD(model.parameters(), lr=0.1), train)
    assert issubclass(PreemptionTimeoutError, TrainerError) and issubclass(CheckpointTimeoutError, TrainerError)


# ---------------------------------------------------------------------- git
def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


TRAIN_PY = """\
import argparse, json, pathlib, yaml
p = argparse.ArgumentParser(); p.add_argument("--config"); args = p.parse_args()
cfg = yaml.safe_load(open(args.config))
pathlib.Path(args.config).with_name("result.json").write_text(json.dumps(
    {{"code": "{code}", "lr": cfg["training"]["learning_rate"]}}))
"""


def make_repo(root: Path) -> Path:
    repo = root / "project"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    (repo / "train.py").write_text(TRAIN_PY.format(code="main"))
    (repo / "notes.txt").write_text("one\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "main")
    git(repo, "checkout", "-qb", "exp")
    (repo / "train.py").write_text(TRAIN_PY.format(code="exp"))
    git(repo, "commit", "-qam", "exp")
    git(repo, "checkout", "-q", "main")
    # The user's tree is busy: a stash, an uncommitted edit, a staged file, an untracked file.
    (repo / "notes.txt").write_text("stashed\n")
    git(repo, "stash", "-q")
    (repo / "notes.txt").write_text("uncommitted edit\n")
    (repo / "staged.txt").write_text("staged\n")
    git(repo, "add", "staged.txt")
    (repo / "untracked.txt").write_text("untracked\n")
    return repo


def snapshot(repo: Path) -> dict:
    files = {str(p.relative_to(repo)): p.read_bytes() for p in sorted(repo.rglob("*"))
             if p.is_file() and ".git" not in p.relative_to(repo).parts}
    return {"status": git(repo, "status", "--porcelain=v2", "--branch"), "head": git(repo, "rev-parse", "HEAD"),
            "stash": git(repo, "stash", "list"), "files": files, "index": (repo / ".git" / "index").read_bytes(),
            "worktrees": git(repo, "worktree", "list", "--porcelain"), "cwd": os.getcwd()}


def test_branch_context_runs_the_other_branch_and_leaves_the_tree_byte_identical(tmp_path: Path):
    repo = make_repo(tmp_path)
    before = snapshot(repo)
    manager = GitManager(str(repo))
    base = {**BASE, "training": {**BASE["training"], "learning_rate": 0.5}}
    grid = ParameterGrid("lr").add_parameter("training.learning_rate", [0.1, 0.2])
    with manager.branch_context("exp") as ws:
        assert Path.cwd() == ws.path and ws.commit == git(repo, "rev-parse", "exp").strip()
        framework = ModelTrainingFramework(".", training_script="train.py")  # the branch's train.py
        result = framework.run_grid_search([grid], base_config=base, execution_mode=ExecutionMode.LOCAL,
                                           output_dir=tmp_path / "experiments")
    assert result.failed == [] and result.successful == ["base_learning_rate=0.1", "base_learning_rate=0.2"]
    for name, lr in zip(result.successful, [0.1, 0.2], strict=True):
        assert json.loads((tmp_path / "experiments" / name / "result.json").read_text()) == {"code": "exp", "lr": lr}
        record = json.loads((tmp_path / "experiments" / name / "sweep_run.json").read_text())
        assert record["git"]["commit"] == ws.commit  # what ran is recorded
    assert manager.history == [ws] and not ws.root.exists()
    assert snapshot(repo) == before

    with pytest.raises(GitOperationError, match=r"'nope' is neither a branch nor a commit of "):
        with manager.branch_context("nope", create_if_not_exists=False):
            pass
    with manager.branch_context("new-branch") as ws2:  # created at HEAD (a ref only)
        assert ws2.commit == before["head"].strip()
        (Path.cwd() / "added.txt").write_text("x\n")
        commit = manager.commit_changes("add a file", files=["added.txt"])  # in the worktree, detached
    assert commit != before["head"].strip() and git(repo, "cat-file", "-t", commit).strip() == "commit"
    after = snapshot(repo)
    assert {k: v for k, v in after.items()} == before
    assert manager.create_branch("exp") is False and manager.create_branch("other", "exp") is True
    with pytest.raises(GitOperationError, match=r"not inside a git repository$"):
        GitManager(str(tmp_path / "experiments"))


# ---------------------------------------------------------------------- SLURM
def experiments(n: int = 2, **slurm) -> list[ExperimentConfig]:
    search = ParameterGridSearch({**BASE, "slurm": {"job_name": "grid", **slurm}})
    search.create_grid("lr").add_parameter("training.learning_rate", [0.1, 0.2, 0.3][:n])
    return list(search.generate_experiments())


EVIL = "x; touch pwned $(touch pwned2) `touch pwned3`"


def test_a_custom_template_renders_quoted_values_and_runs_each_array_task(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text(TRAIN_PY.format(code="template"))
    template = tmp_path / "job.sbatch.tmpl"
    template.write_text("#!/bin/bash\n#SBATCH --job-name={{job_name}}\n#SBATCH --time={{ time_limit }}\n"
                        "#SBATCH --partition={{partition}}\necho running {{experiment_name}}\n"
                        "{{python}} {{script_path}} --config {{config_path}}\n")
    exps = experiments(2, time_limit="1:00:00", partition=EVIL)
    exps[1].experiment_name = "base_" + EVIL  # hostile names reach bash as data
    launcher = SLURMLauncher(str(template), str(tmp_path / "out"), training_script="train.py")
    script = launcher.render(exps, max_concurrent_jobs=1)
    assert "#SBATCH --array=0-1%1" in script and "#SBATCH --job-name=grid" in script
    assert not (tmp_path / "out").exists()  # rendering writes nothing
    launcher.submit_experiment_batch(exps, ExecutionMode.DRY_RUN)
    assert not (tmp_path / "out").exists()
    # The run folders as submission writes them, then each array task as SLURM would start it.
    from acceltrain.sweep import CONFIG_FILE

    for exp in exps:
        folder = tmp_path / "out" / exp.experiment_name
        folder.mkdir(parents=True)
        (folder / CONFIG_FILE).write_text(yaml.safe_dump(exp.to_dict()))
    (tmp_path / "job.sh").write_text(script)
    for task in ("0", "1"):
        proc = subprocess.run(["bash", "job.sh"], env={**os.environ, "SLURM_ARRAY_TASK_ID": task}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        name = exps[int(task)].experiment_name
        assert proc.stdout == f"running {name}\n"
        result = json.loads((tmp_path / "out" / name / "result.json").read_text())
        assert result == {"code": "template", "lr": exps[int(task)].training.learning_rate}
    assert not list(tmp_path.rglob("pwned*"))

    bad = tmp_path / "bad.tmpl"
    bad.write_text("#!/bin/bash\n#SBATCH --output={{output_dir}}/log\n")
    with pytest.raises(JobSubmissionError, match=r"bad.tmpl:2: \{\{output_dir\}\} differs per array task"):
        SLURMLauncher(bad, tmp_path / "o2", training_script="train.py").submit_experiment_batch(exps)
    bad.write_text("#!/bin/bash\n{{gpu_count}}\n")
    with pytest.raises(JobSubmissionError, match=r"bad.tmpl:2: unknown placeholder \{\{gpu_count\}\}; known: "):
        SLURMLauncher(bad, tmp_path / "o2", training_script="train.py").submit_experiment(exps[0])
    assert not (tmp_path / "o2").exists()
    with pytest.raises(SLURMError, match=r"^slurm_template_path missing.tmpl: no such file$"):
        SLURMLauncher("missing.tmpl", "out")


def test_the_default_script_maps_the_slurm_section(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("")
    exp = experiments(1, time_limit="24:00:00", nodes=2, cpus_per_task=4, mem="32G", gres="gpu:8",
                      partition="gpu", ntasks_per_node=8, additional_args=["--exclusive"])[0]
    script = SLURMLauncher(None, "out", training_script="train.py").render([exp])
    for line in ("--job-name=grid", "--nodes=2", "--gpus-per-node=8", "--cpus-per-task=4", "--mem=32G",
                 "--time=24:00:00", "--partition=gpu", "--exclusive"):
        assert f"#SBATCH {line}\n" in script
    assert "export ACCELTRAIN_RUN_DIR=out/base_learning_rate=0.1" in script
    # The experiment's script gets its config only: `--resume true` is the recipes' flag.
    assert script.rstrip().endswith('train.py --config "$ACCELTRAIN_RUN_DIR"/sweep_config.yaml')
    bad = experiments(1, ntasks_per_node=4)[0]
    with pytest.raises(JobSubmissionError, match=r"slurm.ntasks_per_node 4: acceltrain runs one task per node"):
        SLURMLauncher(None, "out", training_script="train.py").render([bad])


def test_job_status_aggregates_array_task_states():
    from acceltrain.compat.mtf_slurm import _states, aggregate_status

    squeue = "JOBID STATE REASON TIME NODES NODELIST\n7_[2-3] PENDING JobArrayTaskLimit 0:00 1 \n7_1 RUNNING None 0:03 1 n1"
    assert _states(squeue) == ["PENDING", "RUNNING"] and aggregate_status(_states(squeue)) is JobStatus.RUNNING
    done = "JobId=8 ArrayJobId=7 ArrayTaskId=0 JobState=COMPLETED\nJobId=9 ArrayJobId=7 JobState=FAILED Reason=x"
    assert aggregate_status(_states(done)) is JobStatus.FAILED
    assert aggregate_status(["COMPLETED", "COMPLETED"]) is JobStatus.COMPLETED
    assert aggregate_status(["CANCELLED", "COMPLETED"]) is JobStatus.CANCELLED


@pytest.fixture
def cluster() -> None:
    require_slurm()


@pytest.mark.slow
def test_submit_experiment_batch_runs_a_real_job_array(cluster, tmp_path: Path):
    import time

    (tmp_path / "train.py").write_text(TRAIN_PY.format(code="slurm"))
    launcher = SLURMLauncher(None, tmp_path / "out", training_script=str(tmp_path / "train.py"))
    exps = experiments(3, time_limit="5:00")
    result = launcher.submit_experiment_batch(exps, max_concurrent_jobs=2)
    job = result.array_job_id
    assert result.job_ids == [f"{job}_{i}" for i in range(3)] and result.success_rate == 1.0
    seen = []
    deadline = time.time() + 240
    while True:
        status = launcher.get_job_status(job)
        seen.append(status)
        if status not in (JobStatus.PENDING, JobStatus.RUNNING):
            break
        assert time.time() < deadline, f"job array {job} still {status} after 240 s"
        time.sleep(1)
    assert status is JobStatus.COMPLETED, seen
    assert seen[0] in (JobStatus.PENDING, JobStatus.RUNNING)
    for exp in exps:
        out = json.loads((tmp_path / "out" / exp.experiment_name / "result.json").read_text())
        assert out == {"code": "slurm", "lr": exp.training.learning_rate}
    assert launcher.get_job_status(job) is JobStatus.COMPLETED

    # One experiment through a custom template, cancelled while it waits or runs.
    template = tmp_path / "job.tmpl"
    template.write_text("#!/bin/bash\n#SBATCH --job-name={{job_name}}\n#SBATCH --time={{time_limit}}\n"
                        "#SBATCH --output={{output_dir}}/slurm.out\nsleep 120\n"
                        "{{python}} {{script_path}} --config {{config_path}}\n")
    single = SLURMLauncher(template, tmp_path / "single", training_script=str(tmp_path / "train.py"))
    job = single.submit_experiment(exps[0])
    assert re.fullmatch(r"\d+", job) and single.get_job_status(job) in (JobStatus.PENDING, JobStatus.RUNNING)
    assert single.cancel_job(job) is True
    deadline = time.time() + 120
    while (status := single.get_job_status(job)) in (JobStatus.PENDING, JobStatus.RUNNING):
        assert time.time() < deadline, f"job {job} still {status} after scancel"
        time.sleep(1)
    assert status is JobStatus.CANCELLED
    assert not (tmp_path / "single" / exps[0].experiment_name / "result.json").exists()


# ---------------------------------------------------------------------- the framework and utils
def test_run_grid_search_dry_run_lists_and_writes_nothing(tmp_path: Path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "base.yaml").write_text(yaml.safe_dump(BASE))
    (tmp_path / "train.py").write_text("")
    framework = ModelTrainingFramework(tmp_path)
    grid = ParameterGrid("lr").add_parameter("training.learning_rate", [0.1, 0.2])
    result = framework.run_grid_search([grid], base_config_path="base.yaml", execution_mode=ExecutionMode.DRY_RUN)
    assert result.total_experiments == 2 and result.experiment_names == ["base_learning_rate=0.1",
                                                                         "base_learning_rate=0.2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs", "train.py"]
    assert framework.get_config_manager().config_dir == tmp_path / "configs"
    assert framework.get_slurm_launcher().output_dir == tmp_path / "experiments"


def test_utilities_as_documented(tmp_path: Path, monkeypatch, restore_logging):
    setup_logging(level="INFO", log_file=str(tmp_path / "training.log"))
    logger = get_logger(__name__)
    logger.info("hello")
    assert "hello" in (tmp_path / "training.log").read_text()
    with pytest.raises(ConfigurationError, match=r"^setup_logging level 'LOUD': expected DEBUG"):
        setup_logging(level="LOUD")

    (tmp_path / "proj" / "configs").mkdir(parents=True)
    (tmp_path / "proj" / "pyproject.toml").write_text("")
    monkeypatch.chdir(tmp_path / "proj" / "configs")
    root = get_project_root()
    assert root == tmp_path / "proj" and validate_project_structure(root) is True
    ensure_directory_exists(Path("./experiments"))
    assert (tmp_path / "proj" / "configs" / "experiments").is_dir()

    def some_operation(success: bool) -> Result[str, str]:
        if success:
            return Success("operation completed")
        else:
            return Error("operation failed")

    result = some_operation(True)
    assert isinstance(result, Success) and result.value == "operation completed"
    assert some_operation(False).error == "operation failed"
