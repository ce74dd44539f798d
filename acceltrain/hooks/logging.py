"""LoggingHook: aggregate step figures, reduce them across ranks, and send them to trackers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..utils import flatten_dict, to_float
from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer


def step_figures(info: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one step's ``step_info`` worth aggregating. Tensors stay tensors (nothing
    is read on the host: no sync on a step that does not log). Hooks call
    ``trainer.step_figures()``, which computes this once per step for all of them."""
    out: dict[str, Any] = {}
    for key in ("loss", "grad_norm", "step_time", "data_time"):
        if key in info:
            out[key] = info[key]
    for i, lr in enumerate(info.get("lr", ())):
        out[f"lr_{i}" if i else "lr"] = lr
    if info.get("non_finite_retries"):
        out["non_finite_retries"] = info["non_finite_retries"]
    for key, value in flatten_dict(info.get("records") or {}).items():
        out[f"records/{key}"] = value
    for key, value in info.items():  # figures other hooks put in (max_memory, tokens, ...)
        if key not in out and key not in _NOT_FIGURES and _numeric(value):
            out[key] = value
    return out


_NOT_FIGURES = {"loss", "grad_norm", "step_time", "data_time", "lr", "records", "skipped_batches",
                "non_finite_retries", "found_inf", "skipped_steps"}


def _cpu_tensor(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == "cpu"


def _numeric(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return value.numel() == 1
    return isinstance(value, (int, float))


class FigureSums:
    """Per-key sums and counts of step figures, cheap on the hot path.

    ``add`` only appends and never reads a tensor on the host, so the host never waits for the
    device: tensors are summed in batches (one stack and sum per key instead of one tensor add
    per step, which costs ~10x an append on the CPU). Accelerator tensors fold every ``fold``
    values; CPU tensors every ``host_fold``: small CPU tensors kept alive between steps can pin
    the heap under each step's activations (~1.5 MiB a step of peak RSS was once measured for a
    small GPT with 64 of them; none in a later probe with 128), so fewer are kept. ``totals()``
    gives float64 sums, as tensors where any value was a tensor."""

    def __init__(self, fold: int = 64, host_fold: int = 32):
        self.fold = fold
        self.host_fold = host_fold
        self._pending: dict[str, list[Any]] = {}
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, float] = {}  # whole numbers but after a resize

    def add(self, figures: dict[str, Any]) -> None:
        pending, counts = self._pending, self.counts
        for key, value in figures.items():
            values = pending.get(key)
            if values is None:
                pending[key] = [value]
            else:
                values.append(value)
                if len(values) >= (self.host_fold if _cpu_tensor(value) else self.fold):
                    self._fold(key)
            counts[key] = counts.get(key, 0) + 1

    def _fold(self, key: str) -> None:
        values = self._pending.pop(key)
        total: Any = self.sums.get(key, 0.0)
        tensors = [v for v in values if isinstance(v, torch.Tensor)]
        if tensors:
            if len({(t.dtype, t.device, t.shape) for t in tensors}) > 1:
                tensors = [t.reshape(()).to(torch.float64) for t in tensors]
            total = total + torch.stack(tensors).to(torch.float64).sum()
        if len(tensors) < len(values):
            total = total + math.fsum(float(v) for v in values if not isinstance(v, torch.Tensor))
        self.sums[key] = total

    def totals(self) -> tuple[dict[str, Any], dict[str, int]]:
        for key in list(self._pending):
            self._fold(key)
        return self.sums, self.counts

    def clear(self) -> None:
        self._pending.clear()
        self.sums = {}
        self.counts = {}

    def means(self, device: torch.device, sync: bool = False) -> dict[str, float]:
        """The mean of each figure since the last call, then reset; one host sync.

        ``sync``: over all ranks (a collective every rank must join). Ranks may have seen
        different keys (records a ``forward`` returns on some ranks only): the key sets are
        gathered first, and a key counts only where it was seen."""
        totals, counted = self.totals()
        keys = sorted(totals)
        world = torch.distributed.get_world_size() if sync and torch.distributed.is_initialized() else 1
        if world > 1:
            gathered: list[Any] = [None] * world
            torch.distributed.all_gather_object(gathered, keys)
            keys = sorted(set().union(*gathered))
        self.clear()
        if not keys:
            return {}
        both = torch.stack([
            torch.stack([torch.as_tensor(totals.get(k, 0.0), dtype=torch.float64, device=device) for k in keys]),
            torch.tensor([counted.get(k, 0) for k in keys], dtype=torch.float64, device=device),
        ])
        if world > 1:
            torch.distributed.all_reduce(both)  # SUM of sums and counts: gloo has no AVG
        sums, counts = both.tolist()
        return {k: total / n for k, total, n in zip(keys, sums, counts, strict=True) if n > 0}

    def state_dict(self) -> dict[str, Any]:
        totals, counted = self.totals()
        return {"sums": {k: torch.as_tensor(v, dtype=torch.float64).cpu() for k, v in totals.items()},
                "counts": dict(counted)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clear()
        self.sums = dict(state.get("sums", {}))
        # Whole numbers of figures, except after a resize to a number of ranks that does not
        # divide them (LoggingHook.resize_state scales them).
        self.counts = {k: int(v) if float(v).is_integer() else float(v) for k, v in state.get("counts", {}).items()}


class LoggingHook(BaseHook):
    """Every ``interval`` steps: average the step figures, reduce them across ranks, call
    ``trainer.log(records)``; send what is logged to experiment trackers and ``metrics.jsonl``.

    The sums and counts of the interval are kept as device tensors, so the hook reads nothing on the
    host on a step that does not log (:meth:`reads_step` tells the trainer which steps do).
    ``sync=True`` reduces them across ranks with one all-reduce of sums (gloo has no AVG). On its
    own ``on_log`` it forwards the records to Accelerate's trackers and appends a line to
    ``workspace/metrics.jsonl``. Skipped batches are logged as events as they happen.

    The trackers start on the main process before the first step, once a checkpoint (if any) is
    loaded: each tracker's run identity (W&B id, MLflow run id, TensorBoard folder) is part of
    this hook's checkpointed state, so a resumed run reattaches to the same tracker run. Steps
    that were logged after the last checkpoint, before a crash, are replayed after the resume
    but not logged again, by any sink: the first write of a step is kept (on the CPU the replay
    is bit-identical to it).

    Args:
        interval: Log every this many steps (and at the last step).
        sync: Reduce across ranks (every rank must run this hook).
        tensorboard: With ``report_to`` unset: report to TensorBoard (under ``workspace/tensorboard``).
        jsonl: Append records to ``workspace/metrics.jsonl``.
        report_to: Tracker names (see :func:`acceltrain.trackers.parse_report_to`), e.g.
            ``["tensorboard", "wandb"]``; ``"none"`` for none.
        project: The tracker project (W&B project, MLflow experiment).
        run_name: The run's display name; default: the workspace folder's name.
        config: Hyperparameters stored with a new tracker run.

    Example:
        >>> LoggingHook(interval=50, report_to=["tensorboard", "wandb"], project="my-project")
    """

    def __init__(self, interval: int = 100, sync: bool = True, tensorboard: bool = True, jsonl: bool = True, *,
                 report_to: str | list[str] | None = None, project: str = "acceltrain", run_name: str | None = None,
                 config: dict[str, Any] | None = None):
        if interval < 1:
            raise ValueError(f"LoggingHook interval must be >= 1, got {interval}")
        from ..trackers import parse_report_to

        self.interval = interval
        self.sync = sync
        self.jsonl = jsonl
        self.report_to = (["tensorboard"] if tensorboard else []) if report_to is None else parse_report_to(report_to)
        self.tensorboard = "tensorboard" in self.report_to
        self.project = project
        self.run_name = run_name
        self.config = config
        self._figures = FigureSums()
        self._jsonl_path = None
        self._trackers: list[Any] = []
        self._identities: dict[str, dict[str, Any]] = {}  # of the running trackers
        self._resume_identities: dict[str, dict[str, Any]] = {}  # from the checkpoint
        self._started = False
        self._replay_through = -1  # steps up to this one were logged before a restart (-1: none)

    def on_before_train(self, trainer: BaseTrainer) -> None:
        if trainer.workspace is not None and trainer.accelerator.is_main_process and self.jsonl:
            self._jsonl_path = trainer.workspace / "metrics.jsonl"
        from .checkpointing import CheckpointingHook

        # A checkpoint a CheckpointingHook loads (after this, in its own on_before_train) holds
        # the runs to reattach to: then start in on_load_state_dict, else now. Both come before
        # step 1, whose timing (tokens/s, MFU) a W&B start of seconds would distort.
        if not any(isinstance(h, CheckpointingHook) and h.load is not None for h in trainer.hooks):
            self.start_trackers(trainer)

    def on_before_step(self, trainer: BaseTrainer) -> None:
        if not self._started:  # a CheckpointingHook that was to load found no checkpoint
            self.start_trackers(trainer)

    def start_trackers(self, trainer: BaseTrainer) -> None:
        """Start (or reattach) this hook's trackers on the main process; once per ``train()``."""
        if self._started:
            return
        self._started = True
        acc = trainer.accelerator
        attached = {t.name for t in acc.trackers}
        names = [n for n in self.report_to if n not in attached]  # a tracker the user attached wins
        if not acc.is_main_process or not names:
            return
        from ..trackers import start_trackers

        run_name = self.run_name or (trainer.workspace.resolve().name if trainer.workspace is not None else None)
        self._trackers, self._identities = start_trackers(
            names, workspace=trainer.workspace, project=self.project, run_name=run_name,
            resume=self._resume_identities, config=self.config)
        acc.trackers.extend(self._trackers)

    def reads_step(self, trainer: BaseTrainer, step: int) -> bool:
        return step % self.interval == 0 or step >= trainer.max_steps

    def on_after_step(self, trainer: BaseTrainer) -> None:
        info = trainer.step_info
        self._figures.add(trainer.step_figures())
        if info.get("skipped_batches"):
            trainer.log({"events/skipped_batches": float(len(info["skipped_batches"]))})
            if trainer.is_main_process:
                trainer.logger.warning(
                    "step %d: %d retries, skipped batches %s",
                    trainer.step, info["non_finite_retries"], info["skipped_batches"],
                )
        if trainer.step % self.interval == 0 or trainer.step == trainer.max_steps or trainer.should_stop:
            records = self.flush(trainer)
            if records:
                trainer.log(records)

    def flush(self, trainer: BaseTrainer) -> dict[str, float]:
        """Averages since the last flush (reduced across ranks when ``sync``), then reset."""
        return self._figures.means(trainer.device, sync=self.sync and trainer.accelerator.num_processes > 1)

    def on_log(self, trainer: BaseTrainer, records: dict[str, Any], not_main_process: bool = False) -> None:
        if not_main_process or not records or trainer.step <= self._replay_through:
            return
        self.start_trackers(trainer)  # records before on_before_train (a no-op once started)
        flat = {k: to_float(v) for k, v in flatten_dict(records).items() if _numeric(v)}
        trainer.accelerator.log(flat, step=trainer.step)
        if self._jsonl_path is not None:
            line = {"step": trainer.step, **{k: (v if math.isfinite(v) else str(v)) for k, v in flat.items()}}
            with open(self._jsonl_path, "a") as f:
                f.write(json.dumps(line) + "\n")

    def on_log_images(self, trainer: BaseTrainer, records: dict[str, Any], not_main_process: bool = False) -> None:
        if not_main_process or trainer.step <= self._replay_through:
            return
        wandb = [t for t in self._trackers if t.name == "wandb"]
        if wandb:
            from .images import to_pil

            images = {k: [to_pil(i) for i in (v if isinstance(v, (list, tuple)) else [v])] for k, v in records.items()}
            wandb[0].log_images(images, step=trainer.step)

    def on_load_state_dict(self, trainer: BaseTrainer, state_dict: dict[str, Any]) -> None:
        if trainer.workspace is not None and self.jsonl and trainer.accelerator.is_main_process:
            logged = _last_logged_step(trainer.workspace / "metrics.jsonl")
            if logged > trainer.step:
                self._replay_through = logged
                trainer.logger.info("steps %d-%d were logged before the restart: their replay is not logged again",
                                    trainer.step + 1, logged)
        self.start_trackers(trainer)

    def on_teardown(self, trainer: BaseTrainer) -> None:
        # train() has finished the trackers; a later train() reattaches to the same runs.
        acc = trainer.accelerator
        acc.trackers = [t for t in acc.trackers if all(t is not mine for mine in self._trackers)]
        self._resume_identities = self._identities or self._resume_identities
        self._trackers, self._identities, self._started = [], {}, False

    def state_dict(self) -> dict[str, Any]:
        # The interval's partial sums, so a resumed run logs the same averages, and the tracker
        # runs' identities (main process), so it logs to the same runs.
        return {**self._figures.state_dict(), "trackers": self._identities or self._resume_identities}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._figures.load_state_dict(state)
        self._resume_identities = {k: dict(v) for k, v in (state.get("trackers") or {}).items()}

    def resize_state(self, states: list[dict[str, Any] | None], rank: int, world: int) -> dict[str, Any] | None:
        # The interval's partial sums are reduced by SUM across ranks when they are logged, and
        # each step adds one entry per rank: rank 0 takes every saved rank's sums and counts,
        # scaled by new/saved ranks, the others none. The first average after the resize is then
        # the one the saved run would have logged, every step weighted alike (copying rank 0's
        # would count its steps twice on two ranks; keeping each rank's own would drop some).
        first = next((st for st in states if st is not None), {})
        scale = world / len(states)
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, float] = {}
        if rank == 0:
            for st in states:
                for k, v in (st or {}).get("sums", {}).items():
                    sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, dtype=torch.float64) * scale
                for k, n in (st or {}).get("counts", {}).items():
                    counts[k] = counts.get(k, 0.0) + float(n) * scale
        return {"sums": sums, "counts": {k: int(n) if n.is_integer() else n for k, n in counts.items()},
                "trackers": first.get("trackers")}


def _last_logged_step(path: Path) -> int:
    """The highest step in a ``metrics.jsonl`` (0 if none); a line torn by a kill is cut off,
    so the next append starts on a line of its own."""
    if not path.is_file():
        return 0
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        path.write_text(text)
    return max((int(json.loads(line)["step"]) for line in text.splitlines() if line.strip()), default=0)
