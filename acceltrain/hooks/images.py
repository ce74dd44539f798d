"""ImageFileLoggerHook: write the images given to ``trainer.log_images`` as PNG files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..utils import in_workspace
from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer


def to_pil(image: Any) -> Any:
    """A PIL image from a PIL image, a HWC/CHW array or tensor (float in [0, 1] or uint8)."""
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("ImageFileLoggerHook needs Pillow: pip install pillow") from e
    if isinstance(image, Image.Image):
        return image
    array = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    return Image.fromarray(array)


class ImageFileLoggerHook(BaseHook):
    """Save ``trainer.log_images({name: image or [images]})`` under ``path/step_{N}/``.

    Only every ``interval``-th step is written, and at most ``max_images`` per name. A relative
    ``path`` is taken inside the trainer's workspace.

    Example:
        >>> ImageFileLoggerHook(interval=100, path="images", max_images=8)
    """

    def __init__(self, interval: int = 1, path: str | Path = "images", max_images: int = 8):
        self.interval = interval
        self.path = Path(path)
        self.max_images = max_images

    def on_log_images(self, trainer: BaseTrainer, records: dict[str, Any], not_main_process: bool = False) -> None:
        if not_main_process or trainer.step % self.interval:
            return
        root = in_workspace(self.path, trainer.workspace)
        folder = root / f"step_{trainer.step}"
        folder.mkdir(parents=True, exist_ok=True)
        for name, images in records.items():
            if not isinstance(images, (list, tuple)):
                images = [images]
            for i, image in enumerate(images[: self.max_images]):
                safe = str(name).replace("/", "_")
                to_pil(image).save(folder / f"{safe}_{i}.png")
