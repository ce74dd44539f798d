"""Tiny trainers used by several tests, and the checkpoint names tests look for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from acceltrain import BaseHook, BaseTrainer
from acceltrain.checkpoint_names import (  # noqa: F401  (re-exported for the tests)
    BEST,
    CHECKPOINTS_SUBDIR,
    LATEST,
    STEP_GLOB,
    STEP_PREFIX,
    TMP_GLOB,
    parse_step,
    step_folder_name,
    tmp_folder_name,
)


# ---------------------------------------------------------------------------- checkpoint names
# Tests spell checkpoint folders through these (acceltrain.checkpoint_names), never as literals,
# so renaming the layout is a change in one module.
def ckpt_root(workspace: str | Path) -> Path:
    """A run's checkpoint folder: ``workspace/checkpoints``."""
    return Path(workspace) / CHECKPOINTS_SUBDIR


def step_dir(root: str | Path, step: int) -> Path:
    """The folder of ``step``'s checkpoint under the checkpoint folder ``root``."""
    return Path(root) / step_folder_name(step)


def run_step_dir(workspace: str | Path, step: int) -> Path:
    """``step``'s checkpoint folder in a run's workspace (``workspace/checkpoints/checkpoint_step_N``)."""
    return step_dir(ckpt_root(workspace), step)


def saved_steps(root: str | Path) -> list[int]:
    """The steps of the step folders under ``root``, ascending (temporary folders and links excluded)."""
    return sorted(s for p in Path(root).glob(STEP_GLOB) if p.is_dir() and not p.is_symlink()
                  and (s := parse_step(p.name)) is not None)


def link_step(root: str | Path, link: str = LATEST) -> int | None:
    """The step the ``checkpoint_latest`` (or ``BEST``) link under ``root`` points at."""
    return parse_step((Path(root) / link).resolve().name)


def regression_data(n: int = 64, d: int = 8, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, 1, generator=g)
    y = x @ w + 0.01 * torch.randn(n, 1, generator=g)
    return torch.utils.data.TensorDataset(x, y)


class ToyTrainer(BaseTrainer):
    """Linear regression on fixed data: exact, fast, deterministic."""

    def __init__(self, *, batch_size: int = 8, n: int = 64, lr: float = 0.1, hooks: list | None = None,
                 optimizer: str = "sgd", scheduler: bool = False, model_seed: int = 0, **kwargs: Any):
        super().__init__(**kwargs)
        self.batch_size, self.n, self.lr = batch_size, n, lr
        self._extra_hooks = hooks or []
        self.optimizer_name, self.use_scheduler, self.model_seed = optimizer, scheduler, model_seed

    def build_data_loader(self):
        return torch.utils.data.DataLoader(regression_data(self.n), batch_size=self.batch_size, shuffle=False)

    def build_model(self):
        torch.manual_seed(self.model_seed)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1)).to(self.device)

    def build_optimizer(self):
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.model.parameters(), lr=self.lr)
        return torch.optim.SGD(self.model.parameters(), lr=self.lr)

    def build_lr_scheduler(self):
        if not self.use_scheduler:
            return None
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0 / (1 + s))

    def build_hooks(self):
        return list(self._extra_hooks)

    def forward(self, input):
        x, y = input
        pred = self.model(x)
        return nn.functional.mse_loss(pred, y), {"mae": (pred - y).abs().mean().item()}


class EvalTrainer(ToyTrainer):
    """ToyTrainer with a 23-sample evaluation set (not a multiple of any batch or world size)."""

    def __init__(self, *, eval_n: int = 23, eval_bs: int = 5, **kw: Any):
        super().__init__(**kw)
        self.eval_n, self.eval_bs = eval_n, eval_bs

    def build_eval_data_loader(self):
        return torch.utils.data.DataLoader(regression_data(self.eval_n, seed=3), batch_size=self.eval_bs)


class Recorder(BaseHook):
    """Records every event it sees, in order."""

    def __init__(self):
        self.events: list[str] = []

    def on_before_train(self, trainer):
        self.events.append("before_train")

    def on_after_train(self, trainer):
        self.events.append("after_train")

    def on_before_step(self, trainer):
        self.events.append(f"before_step:{trainer.step}")

    def on_before_optimizer_step(self, trainer):
        self.events.append(f"before_optimizer_step:{trainer.step}")

    def on_after_step(self, trainer):
        self.events.append(f"after_step:{trainer.step}")

    def on_log(self, trainer, records, dry_run=False):
        self.events.append(f"log:{trainer.step}")

    def on_state_dict(self, trainer, state_dict):
        self.events.append(f"state_dict:{trainer.step}")

    def on_load_state_dict(self, trainer, state_dict):
        self.events.append(f"load_state_dict:{trainer.step}")


def params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def cpu_fsdp2_accelerator(*, like_fsdp2_yaml: bool = False, **kwargs: Any):
    """An Accelerator running FSDP2 on gloo CPU ranks (test-only shim).

    Accelerate enables FSDP only for GPU-like multi-process types, so create the Accelerator
    for CPU and then switch the distributed type and plugin on *both* the process-wide
    PartialState and this AcceleratorState (``prepare`` re-reads the former and would undo a
    change to the latter alone). ``prepare`` then wraps the model with ``fully_shard``.
    ``like_fsdp2_yaml``: also what accelerate_configs/fsdp2.yaml sets: one FSDP unit per
    transformer block (the model's ``_no_split_modules``) and CPU-RAM-efficient loading.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    acc = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")],
                      step_scheduler_with_optimizer=False, **kwargs)
    yaml_settings = {"auto_wrap_policy": "transformer_based_wrap", "cpu_ram_efficient_loading": True}
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True,
                                            state_dict_type="SHARDED_STATE_DICT",
                                            **(yaml_settings if like_fsdp2_yaml else {}))
    for state in (PartialState(), acc.state):
        state.distributed_type = DistributedType.FSDP
        state.fsdp_plugin = plugin
    return acc


def skip_deepspeed_shm_build() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce (``deepspeed_shm_comm``, a C++
    build of ~30 s on 2 cores the first time its CPU backend starts). Only
    ``inference_all_reduce`` uses it, never training, which all-reduces through the gloo group."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def cli_run(capsys: Any, *argv: str, expect: int = 0) -> tuple[str, str]:
    """Run ``acceltrain`` in-process (no interpreter start-up); its exit status must be ``expect``.
    Returns what it wrote to stdout and stderr."""
    from accelerate.state import AcceleratorState, GradientState

    from acceltrain.cli import main

    AcceleratorState._reset_state(reset_partial_state=True)  # a command may build a trainer
    GradientState._reset_state()
    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    assert (code or 0) == expect, f"exit {code}, wanted {expect}\n{out[-2000:]}\n{err[-4000:]}"
    return out, err


def cli_error(capsys: Any, *argv: str) -> str:
    """Run ``acceltrain`` in-process; it must exit 2 with one ``error:`` line on stderr (returned)."""
    import pytest

    from acceltrain.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def require_slurm(nodes: tuple[str, ...] = ()) -> None:
    """Skip unless a SLURM cluster answers (with ``nodes`` each up, if named); under ``CI=true``
    fail instead: CI starts the cluster (.ci/slurm-up.sh), so a missing one is a defect there."""
    import os
    import re
    import shutil
    import subprocess

    import pytest

    problem = None
    if shutil.which("sbatch") is None:
        problem = "sbatch not found (apt-get install slurm-wlm munge, then run .ci/slurm-up.sh as root)"
    else:
        proc = subprocess.run(["sinfo", "--noheader", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=30)
        states = dict(line.split() for line in proc.stdout.splitlines() if len(line.split()) == 2)
        up = [n for n, state in states.items() if re.fullmatch(r"idle|mix|alloc", state)]
        if proc.returncode != 0 or not up or any(n not in up for n in nodes):
            wanted = f"nodes {', '.join(nodes)} are not all up" if nodes else "no SLURM node answers"
            problem = f"{wanted} (run .ci/slurm-up.sh as root): {proc.stderr.strip() or proc.stdout}"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true: {problem}")
        pytest.skip(problem)


def load_recipe(name: str, tag: str = "test"):
    """Import ``recipes/<name>.py`` as a module of its own (``<name>_recipe_<tag>``)."""
    import importlib.util
    import sys

    from tests.conftest import ROOT

    spec = importlib.util.spec_from_file_location(f"{name}_recipe_{tag}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module
