"""Hugging Face folders from a trainer: weights in safetensors, consolidated from shards."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .utils import dedupe_tensors

if TYPE_CHECKING:
    from .trainer import BaseTrainer

__all__ = ["save_pretrained"]


def save_pretrained(trainer: BaseTrainer, directory: str | Path, *, tokenizer: Any = None,
                    merge_lora: bool = False, model_card: str | None = None) -> Path:
    """Write the unwrapped model as a folder that ``from_pretrained`` loads; every rank must call it.

    - A ``transformers`` model: ``config.json`` (+ ``generation_config.json``) and
      ``model.safetensors``; a PEFT model: the adapter (``adapter_config.json`` +
      ``adapter_model.safetensors``), or with ``merge_lora=True`` the merged plain model.
    - Any other ``nn.Module``: ``model.safetensors`` only.
    - The weights come from ``accelerator.get_state_dict``, which gathers FSDP shards and
      DeepSpeed ZeRO-3 partitions on the main process.
    - ``tokenizer`` (default: ``trainer.tokenizer`` when it exists) is saved beside them, and
      ``model_card`` as ``README.md``.
    """
    directory = Path(directory)
    acc = trainer.accelerator
    state_dict = acc.get_state_dict(trainer.model)  # collective under FSDP / ZeRO-3
    if state_dict:  # Accelerate keeps torch.compile's wrapper, whose keys say `_orig_mod.`
        state_dict = {key.replace("_orig_mod.", ""): value for key, value in state_dict.items()}
    model = trainer.unwrapped_model
    tokenizer = tokenizer if tokenizer is not None else getattr(trainer, "tokenizer", None)
    if acc.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        if merge_lora and hasattr(model, "merge_and_unload"):
            import copy

            merged = copy.deepcopy(model)
            merged.load_state_dict(state_dict)
            merged = merged.merge_and_unload()
            merged.save_pretrained(directory, safe_serialization=True)
        elif hasattr(model, "save_pretrained"):
            model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
        else:
            from safetensors.torch import save_file

            unique = dedupe_tensors(state_dict)
            save_file(unique, str(directory / "model.safetensors"), metadata={"format": "pt"})
            (directory / "acceltrain.json").write_text(json.dumps({"class": type(model).__name__}) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        if model_card is not None:
            (directory / "README.md").write_text(model_card)
    acc.wait_for_everyone()
    return directory


def __getattr__(name: str) -> Any:
    # The hook moved to acceltrain.hooks.export; importing it here eagerly would be circular.
    if name == "ExportHook":
        from .hooks.export import ExportHook

        return ExportHook
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
