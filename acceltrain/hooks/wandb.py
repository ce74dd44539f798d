"""WandbHook: send logged records and images to Weights & Biases (optional dependency)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..utils import flatten_dict
from .base import BaseHook
from .images import to_pil

if TYPE_CHECKING:
    from ..trainer import BaseTrainer


class WandbHook(BaseHook):
    """Start a wandb run on the main process and forward ``trainer.log`` / ``log_images`` to it.

    Keyword arguments go to ``wandb.init``. wandb is an optional extra: without it, creating
    the hook raises an ImportError that says how to install it.

    Example:
        >>> WandbHook(project="my-project", name="exp-1", config={"lr": 1e-3})
    """

    def __init__(self, **init_kwargs: Any):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("WandbHook needs wandb: pip install 'acceltrain[wandb]'") from e
        self._wandb = wandb
        self.init_kwargs = init_kwargs
        self.run = None

    def on_before_train(self, trainer: BaseTrainer) -> None:
        if trainer.is_main_process and self.run is None:
            kwargs = dict(self.init_kwargs)
            if trainer.workspace is not None:
                kwargs.setdefault("dir", str(trainer.workspace))
            self.run = self._wandb.init(**kwargs)

    def on_log(self, trainer: BaseTrainer, records: dict[str, Any], dry_run: bool = False) -> None:
        if not dry_run and self.run is not None:
            self.run.log(flatten_dict(records), step=trainer.step)

    def on_log_images(self, trainer: BaseTrainer, records: dict[str, Any], dry_run: bool = False) -> None:
        if dry_run or self.run is None:
            return
        images = {
            k: [self._wandb.Image(to_pil(i)) for i in (v if isinstance(v, (list, tuple)) else [v])]
            for k, v in records.items()
        }
        self.run.log(images, step=trainer.step)

    def on_after_train(self, trainer: BaseTrainer) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
