"""The Model Training Framework's ``GenericTrainer``: a :class:`~acceltrain.BaseTrainer` whose
``training_step(batch, batch_idx)`` / ``validation_step(batch, batch_idx)`` are the seed's
contract, with callbacks, checkpoints and phase-aware resume from acceltrain's hooks.

What runs where::

    fit(model, optimizer, train_loader, val_loader, scheduler)
        max_steps = epochs x steps per epoch; BaseTrainer.train() with these hooks, in order:
        EvaluationHook(prefix="val")   validation at each epoch end: validation_step per batch,
                                       sample-weighted means; a signal mid-validation stops it
                                       after the batch, and the resumed run continues there
        callbacks                      TrainingCallback events
        CheckpointingHook              checkpoint_dir; resumes from the latest; SIGTERM/INT/USR1
                                       save and exit 128+signal

Import these names from :mod:`acceltrain.compat.mtf`.
"""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint import MANIFEST, find_latest_checkpoint, load_checkpoint, verify_checkpoint
from ..checkpoint_names import CHECKPOINTS_SUBDIR, step_folder_name
from ..hooks.base import BaseHook
from ..hooks.checkpointing import CheckpointingHook
from ..hooks.evaluation import EvaluationHook
from ..trainer import BaseTrainer
from ..utils import to_float

if TYPE_CHECKING:
    from .mtf_config import ExperimentConfig

__all__ = ["CheckpointTimeoutError", "GenericTrainer", "GenericTrainerConfig", "PreemptionTimeoutError", "RNGState",
           "ResumeState", "TrainMicroState", "TrainerError", "TrainerPhase", "TrainingCallback", "ValMicroState"]


class TrainerError(RuntimeError):
    """Training cannot go on (the message says why)."""


class PreemptionTimeoutError(TrainerError):
    """A preemption checkpoint did not finish within the grace period."""


class CheckpointTimeoutError(TrainerError):
    """A checkpoint save did not finish in time."""


class TrainerPhase(str, Enum):
    """Where the trainer is; a checkpoint's ``ResumeState.phase`` says where the resumed run goes on."""

    INIT = "init"
    TRAIN_START_EPOCH = "train_start_epoch"
    TRAIN_BATCH_FORWARD = "train_batch_forward"
    TRAIN_BATCH_BACKWARD = "train_batch_backward"
    TRAIN_BATCH_OPTIM_STEP = "train_batch_optim_step"
    VAL_START_EPOCH = "val_start_epoch"
    VAL_BATCH_FORWARD = "val_batch_forward"
    EPOCH_END = "epoch_end"
    TRAINING_COMPLETE = "training_complete"


@dataclass
class TrainMicroState:
    """The training position inside the epoch: batches of it already consumed."""

    batch_idx: int = 0


@dataclass
class ValMicroState:
    """The validation position: batches done, and the running sample-weighted sums."""

    batch_idx: int = 0
    samples: int = 0
    sums: dict[str, float] = field(default_factory=dict)


@dataclass
class RNGState:
    """The generator states saved with the checkpoint (rank 0's)."""

    python: Any = None
    numpy: Any = None
    torch: Any = None
    cuda: Any = None


@dataclass
class ResumeState:
    """What a checkpoint resumes into: the phase, epoch, step and micro-positions."""

    phase: TrainerPhase
    epoch: int
    global_step: int
    version: str = "v2.0"
    train: TrainMicroState | None = None
    val: ValMicroState | None = None
    rng: RNGState | None = None
    timestamp: float = 0.0


@dataclass(kw_only=True)
class GenericTrainerConfig:
    """How ``GenericTrainer.fit`` trains.

    Args:
        max_epochs: Passes over the training loader.
        gradient_accumulation_steps: Batches per optimizer step.
        max_grad_norm: Clip the global gradient norm (None: measure only).
        checkpoint_dir: Checkpoint folder; ``fit`` resumes from its latest valid checkpoint.
        save_every_n_epochs: Save at every n-th epoch end (the last step is always saved).
        save_every_n_steps: Save every n optimizer steps instead (wins when set).
        keep_last: Newest checkpoints kept (None: all).
        validate_every_n_epochs: Validation at every n-th epoch end (and after the last).
        resume: Resume from ``checkpoint_dir`` when it holds a checkpoint.
        mixed_precision: ``"bf16"``, ``"fp16"`` (GPU) or None.
        device: ``"cpu"``, ``"cuda"`` or None (Accelerate decides).
        exit_signals: Signals that save and stop (exit status 128 + signal).
    """

    max_epochs: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = None
    checkpoint_dir: str | Path = CHECKPOINTS_SUBDIR
    save_every_n_epochs: int = 1
    save_every_n_steps: int | None = None
    keep_last: int | None = 2
    validate_every_n_epochs: int = 1
    resume: bool = True
    mixed_precision: str | None = None
    device: str | None = None
    exit_signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    @classmethod
    def from_experiment(cls, experiment: ExperimentConfig, **overrides: Any) -> GenericTrainerConfig:
        """The trainer settings an ExperimentConfig names (training and checkpoint sections)."""
        t, c = experiment.training, experiment.checkpoint
        values = {"max_epochs": t.epochs, "gradient_accumulation_steps": t.gradient_accumulation_steps,
                  "max_grad_norm": t.max_grad_norm, "checkpoint_dir": c.checkpoint_dir,
                  "save_every_n_epochs": c.save_every_n_epochs, "keep_last": c.save_top_k}
        return cls(**{**values, **overrides})


class TrainingCallback:
    """Override the events you need; each is a no-op here."""

    def on_training_start(self, trainer: GenericTrainer) -> None:
        """Called at the start of training."""

    def on_training_end(self, trainer: GenericTrainer, logs: dict[str, Any]) -> None:
        """Called at the end of training."""

    def on_epoch_start(self, trainer: GenericTrainer, epoch: int) -> None:
        """Called at the start of each epoch."""

    def on_epoch_end(self, trainer: GenericTrainer, epoch: int, logs: dict[str, Any]) -> None:
        """Called at the end of each epoch (after its validation)."""

    def on_batch_start(self, trainer: GenericTrainer, batch_idx: int) -> None:
        """Called at the start of each batch."""

    def on_batch_end(self, trainer: GenericTrainer, batch_idx: int, logs: dict[str, Any]) -> None:
        """Called at the end of each batch (its ``training_step`` values, as floats)."""


class _Callbacks(BaseHook):
    """TrainingCallback events from the loop; keeps the epoch's loss sum for ``on_epoch_end``."""

    def __init__(self, trainer: GenericTrainer):
        self.trainer = trainer
        self.loss_sum, self.loss_steps = 0.0, 0
        self.epoch_end_due: int | None = None  # an epoch whose validation a signal interrupted

    def _each(self, name: str, *args: Any) -> None:
        for callback in self.trainer.callbacks:
            getattr(callback, name)(self.trainer, *args)

    def on_before_train(self, trainer: BaseTrainer) -> None:
        self._each("on_training_start")

    def on_load_state_dict(self, trainer: BaseTrainer, state: dict[str, Any]) -> None:
        ev = self.trainer.evaluation
        if self.epoch_end_due is not None and (ev is None or ev.pending is None):
            self._epoch_end(self.epoch_end_due)  # its validation, interrupted, was finished on resume

    def on_before_step(self, trainer: BaseTrainer) -> None:
        if trainer.step % self.trainer.steps_per_epoch == 0:
            self._each("on_epoch_start", trainer.step // self.trainer.steps_per_epoch)

    def on_after_step(self, trainer: BaseTrainer) -> None:
        self.loss_sum += to_float(trainer.step_info["loss"])
        self.loss_steps += 1
        spe = self.trainer.steps_per_epoch
        if trainer.step % spe == 0 or trainer.step == trainer.max_steps:
            epoch = (trainer.step - 1) // spe
            ev = self.trainer.evaluation
            if ev is not None and ev.pending is not None:
                self.epoch_end_due = epoch
            else:
                self._epoch_end(epoch)

    def _epoch_end(self, epoch: int) -> None:
        logs = {"epoch": epoch, "train_loss": self.loss_sum / max(1, self.loss_steps)}
        ev = self.trainer.evaluation
        if ev is not None and ev.history and ev.history[-1][0] == self.trainer.step:
            logs.update({f"val_{k}": v for k, v in ev.history[-1][1].items()})
        self.loss_sum, self.loss_steps, self.epoch_end_due = 0.0, 0, None
        self.trainer.last_logs = logs
        self._each("on_epoch_end", epoch, logs)

    def on_after_train(self, trainer: BaseTrainer) -> None:
        self._each("on_training_end", {"global_step": trainer.step, **self.trainer.last_logs})

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum, "loss_steps": self.loss_steps, "epoch_end_due": self.epoch_end_due}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum, self.loss_steps = float(state["loss_sum"]), int(state["loss_steps"])
        self.epoch_end_due = state.get("epoch_end_due")


class GenericTrainer(BaseTrainer):
    """Override ``training_step`` (and ``validation_step``), then ``fit``.

    Example:
        >>> class MyTrainer(GenericTrainer):
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return {"loss": F.cross_entropy(self.model(x), y)}
        >>> MyTrainer(GenericTrainerConfig(max_epochs=3)).fit(model, optimizer, train_loader, val_loader)
    """

    def __init__(self, config: GenericTrainerConfig | None = None):
        self.config = config or GenericTrainerConfig()
        c = self.config
        super().__init__(max_steps=0, grad_clip=c.max_grad_norm, gradient_accumulation_steps=c.gradient_accumulation_steps,
                         mixed_precision=c.mixed_precision, device=c.device)
        self.callbacks: list[TrainingCallback] = []
        self.phase = TrainerPhase.INIT
        self.steps_per_epoch = 1
        self.last_logs: dict[str, Any] = {}
        self.evaluation: EvaluationHook | None = None
        self.checkpointing = CheckpointingHook(path=Path(c.checkpoint_dir), load="latest" if c.resume else None,
                                               keep_previous=c.keep_last, exit_signals=c.exit_signals,
                                               background=False)
        self._given: tuple[Any, ...] | None = None

    # ------------------------------------------------------------------ the seed's contract
    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """One training batch; return a dict with at least ``'loss'``. Override it."""
        raise NotImplementedError("override training_step(batch, batch_idx) in your GenericTrainer subclass")

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Any]:
        """One validation batch's metrics, each a mean over the batch (default: training_step's)."""
        return self.training_step(batch, batch_idx)

    def add_callback(self, callback: TrainingCallback) -> None:
        if not isinstance(callback, TrainingCallback):
            raise TypeError(f"add_callback: expected a TrainingCallback, got {type(callback).__name__}")
        self.callbacks.append(callback)

    def fit(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_loader: Any,
            val_loader: Any | None = None, scheduler: Any | None = None) -> None:
        """Train for ``config.max_epochs`` epochs, validating at epoch ends; resumes from
        ``checkpoint_dir``; a signal saves and exits with 128 + signal."""
        c = self.config
        if not hasattr(train_loader, "__len__") or len(train_loader) == 0:
            raise TrainerError("fit: train_loader must be a non-empty DataLoader (it needs a length)")
        self._given = (model, optimizer, train_loader, val_loader, scheduler)
        self.steps_per_epoch = math.ceil(len(train_loader) / self.gradient_accumulation_steps)
        self.max_steps = c.max_epochs * self.steps_per_epoch
        self.checkpointing.interval = c.save_every_n_steps or c.save_every_n_epochs * self.steps_per_epoch
        if val_loader is not None:
            self.evaluation = EvaluationHook(interval=c.validate_every_n_epochs * self.steps_per_epoch, prefix="val")
        self.train()
        self.phase = TrainerPhase.TRAINING_COMPLETE if self.step == self.max_steps else self.phase

    # ------------------------------------------------------------------ BaseTrainer's build contract
    def _given_part(self, i: int) -> Any:
        if self._given is None:
            raise TrainerError("call fit(model, optimizer, train_loader, ...) to train a GenericTrainer")
        return self._given[i]

    def build_model(self) -> torch.nn.Module:
        return self._given_part(0).to(self.device)

    def build_optimizer(self) -> torch.optim.Optimizer:
        return self._given_part(1)

    def build_data_loader(self) -> Any:
        return self._given_part(2)

    def build_eval_data_loader(self) -> Any:
        return self._given_part(3)

    def build_lr_scheduler(self) -> Any:
        return self._given_part(4)

    def build_hooks(self) -> list[BaseHook]:
        # Validation, then the callbacks (on_epoch_end sees the validation metrics), then the
        # checkpoint: it holds the validation's result or position and the callbacks' sums.
        hooks: list[BaseHook] = [self.evaluation] if self.evaluation is not None else []
        return [*hooks, _Callbacks(self), self.checkpointing]

    def forward(self, input: Any) -> tuple[torch.Tensor | None, dict[str, Any]]:
        self.phase = TrainerPhase.TRAIN_BATCH_FORWARD
        batch_idx = self.data.batches_in_epoch - 1
        for callback in self.callbacks:
            callback.on_batch_start(self, batch_idx)
        out = self.training_step(input, batch_idx)
        if not isinstance(out, dict) or "loss" not in out:
            got = sorted(out) if isinstance(out, dict) else type(out).__name__
            raise TrainerError(f"training_step must return a dict with a 'loss' key, got {got}")
        if self.callbacks:  # floats for the callbacks: one device read per batch, only with callbacks
            logs = {k: to_float(v) for k, v in out.items() if isinstance(v, int | float | torch.Tensor)}
            for callback in self.callbacks:
                callback.on_batch_end(self, batch_idx, logs)
        self.phase = TrainerPhase.TRAIN_BATCH_BACKWARD
        records = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in out.items() if k != "loss"}
        return out["loss"], records

    def evaluation_step(self, batch: Any) -> dict[str, Any]:
        self.phase = TrainerPhase.VAL_BATCH_FORWARD
        return self.validation_step(batch, self.eval_batch_idx)

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, emergency: bool = False) -> Path:
        """Save now (complete on return); returns the checkpoint folder. ``emergency`` saves the
        same full state (every acceltrain checkpoint resumes exactly)."""
        self._require_built("save_checkpoint()")
        self.checkpointing.save(self)
        self.checkpointing.wait()
        return self.checkpointing.root(self) / step_folder_name(self.step)

    def load_checkpoint(self, checkpoint_path: str | Path | None = None) -> ResumeState:
        """Load ``checkpoint_path`` (default: the latest valid one in ``checkpoint_dir``) and say
        where it resumes. Before ``fit`` the checkpoint is kept and loaded by ``fit``."""
        root = self.checkpointing.root(self)
        folder = Path(checkpoint_path) if checkpoint_path is not None else find_latest_checkpoint(root)
        if folder is None:
            raise TrainerError(f"load_checkpoint: no valid checkpoint in {root}")
        verify_checkpoint(folder)  # a CheckpointError naming the folder and the broken file
        if self._built:
            load_checkpoint(self, folder, verify=False)
        else:
            self.checkpointing.load = folder
        return self.resume_state(folder)

    def resume_state(self, folder: str | Path) -> ResumeState:
        """The ResumeState of a checkpoint folder (read without loading it)."""
        import json

        folder = Path(folder)
        step = int(json.loads((folder / MANIFEST).read_text())["step"])
        rank = torch.load(folder / "rank_state_0.pt", weights_only=True)
        hooks, data = rank.get("hooks") or {}, rank.get("data") or {}
        spe = self.steps_per_epoch if self._given is not None else None
        rng = RNGState(**{k: rank["rng"].get(k) for k in ("python", "numpy", "torch", "cuda")})
        stamp = (folder / MANIFEST).stat().st_mtime
        pending = (hooks.get("EvaluationHook") or {}).get("pending")
        if pending is not None:  # validation of the epoch that ended at this step
            epoch = (step - 1) // spe if spe else int(data.get("epoch", 0))
            val = ValMicroState(int(pending["batches"]), int(pending["count"]),
                                {k: float(v) for k, v in pending["sums"].items()})
            return ResumeState(TrainerPhase.VAL_BATCH_FORWARD, epoch, step, val=val, rng=rng, timestamp=stamp)
        # Before fit() the epoch length is unknown: the data position's epoch stands in (at an
        # epoch boundary it is the epoch just finished).
        epoch = step // spe if spe else int(data.get("epoch", 0))
        if self.max_steps and step >= self.max_steps:
            phase = TrainerPhase.TRAINING_COMPLETE
        elif spe and step % spe == 0:
            phase = TrainerPhase.TRAIN_START_EPOCH
        else:
            phase = TrainerPhase.TRAIN_BATCH_FORWARD
        batch_size = getattr(self._given[2], "batch_size", None) if self._given is not None else None
        batches = (int(data.get("samples_in_epoch", 0)) // batch_size if batch_size and phase is not
                   TrainerPhase.TRAIN_START_EPOCH else 0 if phase is TrainerPhase.TRAIN_START_EPOCH
                   else int(data.get("batches_in_epoch", 0)))
        return ResumeState(phase, epoch, step, train=TrainMicroState(batches), rng=rng, timestamp=stamp)
