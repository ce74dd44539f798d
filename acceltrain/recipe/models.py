"""Loading and adapting the recipes' models: ``--model`` checks, LoRA, gradient checkpointing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch

from ..config import ConfigError, UserError
from .config import LoraFields

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["resolve_model", "apply_lora", "enable_gradient_checkpointing", "trainable_summary"]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


_TASK_HEADS = ("ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
               "ForMultipleChoice", "ForImageClassification")


_KINDS = {
    "causal_lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "a causal language model"),
    "classifier": ("AutoModelForSequenceClassification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
                   "a sequence classifier"),
}


def resolve_model(name: str, *, kind: Literal["causal_lm", "classifier"], trust_remote_code: bool = False,
                  missing_hint: str | None = None) -> tuple[str, PretrainedConfig]:
    """Check ``--model`` before anything heavy: a local folder or a Hub id whose config fits ``kind``.

    Returns ``(source, config)`` where ``source`` is an absolute folder path (so adapters and
    model cards name the base unambiguously) or the Hub id.

    Raises:
        UserError: a missing folder (with ``missing_hint``), a file, a folder without
            ``config.json`` (an adapter-only folder is named as such), an unloadable Hub id, a
            model type transformers has no ``kind`` class for, or, for ``"causal_lm"``, a folder
            holding a task head (e.g. ``BertForSequenceClassification``), whose LM head would
            start from random.
    """
    auto_class, mapping_name, what = _KINDS[kind]
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"--model {name}: is a file; expected a Hugging Face model folder or Hub id")
        if not (path / "config.json").is_file():
            if (path / "adapter_config.json").is_file():
                raise UserError(f"--model {name}: holds a LoRA adapter, not a model; pass its base model "
                                "(named in adapter_config.json) or a merged export")
            raise UserError(f"--model {name}: not a Hugging Face model folder (no config.json)")
        source = str(path.resolve())
    elif name.startswith((".", "/", "~")) or not _HUB_ID.match(name):
        raise UserError(f"--model {name}: no such folder" + (f"; {missing_hint}" if missing_hint else ""))
    else:
        source = name
    from transformers import AutoConfig
    from transformers.models.auto import modeling_auto

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = "its config.json does not load" if path.exists() else "not a local folder, and the Hub gave"
        raise UserError(f"--model {name}: {where}: {first}") from None
    remote = auto_class in (getattr(config, "auto_map", None) or {}) and trust_remote_code
    if config.model_type not in getattr(modeling_auto, mapping_name) and not remote:
        raise UserError(f"--model {name}: transformers has no {auto_class} for model type "
                        f"{config.model_type!r}; this recipe needs {what}")
    archs = list(getattr(config, "architectures", None) or [])
    if kind == "causal_lm" and archs and all(a.endswith(_TASK_HEADS) for a in archs):
        raise UserError(f"--model {name}: holds a {archs[0]}, not a language model (its LM head would "
                        "start from random); pass a causal LM or a base model")
    return source, config


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Recompute activations in backward, non-reentrant: the variant that works under DDP/FSDP and
    with frozen inputs (LoRA), so no ``enable_input_require_grads`` trick is needed."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5 renamed the method
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _linear_names(model: torch.nn.Module) -> list[str]:
    from transformers.pytorch_utils import Conv1D

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear | Conv1D)})


def apply_lora(model: torch.nn.Module, fields: LoraFields, *, task_type: str) -> torch.nn.Module:
    """Wrap ``model`` in a ``peft`` LoRA model; only the adapter (and, for ``SEQ_CLS``, the new
    classification head, which peft marks ``modules_to_save``) stays trainable.

    Every name in ``lora_target_modules`` must match a module (peft's rule: the full name or its
    last components), so a typo fails here instead of adapting fewer layers than asked.

    Raises:
        ConfigError: a name that matches nothing (the message lists the linear layers), or a
            target peft cannot adapt.
    """
    from peft import LoraConfig, get_peft_model

    targets: str | list[str] = fields.lora_target_modules.strip()
    if targets != "all-linear":
        names = [t.strip() for t in str(targets).split(",") if t.strip()]
        modules = [n for n, _ in model.named_modules()]
        unmatched = [t for t in names if not any(m == t or m.endswith("." + t) for m in modules)]
        if not names or unmatched:
            raise ConfigError(f"lora_target_modules: {', '.join(unmatched) or repr(targets)} matches no module of "
                              f"{type(model).__name__}; its linear layers: {', '.join(_linear_names(model))}")
        targets = names
    config = LoraConfig(r=fields.lora_r, lora_alpha=fields.lora_alpha, lora_dropout=fields.lora_dropout,
                        target_modules=targets, task_type=task_type)
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft's NoMatchingPeftModuleError and unsupported layer types
        raise ConfigError(f"lora_target_modules {fields.lora_target_modules!r}: {str(e).splitlines()[0]}") from None


def trainable_summary(model: torch.nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (each shared tensor counted once)."""
    seen: dict[int, torch.nn.Parameter] = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in seen.values())
    return sum(p.numel() for p in seen.values() if p.requires_grad), total
