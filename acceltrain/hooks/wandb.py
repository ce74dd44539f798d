"""WandbHook: a :class:`LoggingHook` that also reports to Weights & Biases (optional dependency)."""

from __future__ import annotations

from typing import Any

from .logging import LoggingHook


class WandbHook(LoggingHook):
    """``LoggingHook(report_to=["tensorboard", "wandb"], ...)``: use it instead of a ``LoggingHook``.

    It logs the same records to ``metrics.jsonl``, TensorBoard and a W&B run, reattaches to that
    run after a resume (its id is in the checkpoint) and forwards ``trainer.log_images`` to it.
    wandb is an optional extra: without it, creating the hook raises an ImportError that says
    how to install it.

    Args:
        project: The W&B project.
        name: The run's display name (default: the workspace folder's name).
        config: Hyperparameters stored with a new run.
        interval, sync, jsonl: As for :class:`LoggingHook`.

    Example:
        >>> WandbHook(project="my-project", name="exp-1", config={"lr": 1e-3})
    """

    def __init__(self, *, project: str = "acceltrain", name: str | None = None, config: dict[str, Any] | None = None,
                 interval: int = 100, sync: bool = True, jsonl: bool = True):
        try:
            import wandb  # noqa: F401
        except ImportError as e:
            raise ImportError("WandbHook needs wandb: pip install 'acceltrain[wandb]'") from e
        super().__init__(interval=interval, sync=sync, jsonl=jsonl, report_to=["tensorboard", "wandb"],
                         project=project, run_name=name, config=config)
