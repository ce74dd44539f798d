"""SparsityHook: gradual magnitude pruning (Zhu & Gupta, 2017) through ``torch.nn.utils.prune``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn.utils import prune

from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

_PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


class SparsityHook(BaseHook):
    """Prune Linear and Conv weights by magnitude, ramping the sparsity up to ``target_sparsity``.

    At ``on_before_train`` every selected layer is re-parametrised by ``torch.nn.utils.prune``
    (``weight = weight_orig * weight_mask`` in a forward pre-hook). ``weight_orig`` is the very
    Parameter the optimizer was built on, so training goes on unchanged; the gradient of a
    masked entry is zero and its effective weight stays exactly zero whatever the optimizer
    does to ``weight_orig``. Masks only ever grow (pruned weights do not come back).

    Schedule: after step ``s = start_step + k * frequency`` (and at ``end_step``) the sparsity
    is raised to ``target * (1 - (1 - p) ** 3)`` with ``p = (s - start_step) / (end_step -
    start_step)`` clamped to [0, 1] (``"cubic"``; ``end_step`` defaults to ``max_steps``), or to
    ``target`` at once (``"constant"``). ``scope="layer"`` prunes that fraction of every layer
    (``l1_unstructured``); ``"global"`` prunes that fraction of all selected weights together,
    smallest magnitudes first, then applies each layer's share through ``l1_unstructured``.

    Selected: ``nn.Linear`` and ``nn.Conv*d`` modules of ``trainer.unwrapped_model`` whose weight
    has at least ``min_params_to_prune`` elements, is not tied to another module, and (with
    ``skip_lora``) whose name does not contain ``"lora_"``. Frozen weights are pruned too (so a
    LoRA model's base layers are).

    Reported every step (no device sync: figures are refreshed only when masks change):
    ``step_info["sparsity"]`` (fraction of selected weights pruned) and
    ``step_info["sparsity_layers"]`` (``{module name: fraction}``).

    Checkpoints: the masks are model buffers (``<module>.weight_mask``), so they are saved and
    restored with the weights (as tensors, in ``model.safetensors``) and the hook itself has no
    other state: its figures are re-measured from the masks on load. Because the re-parametrisation renames ``weight`` to
    ``weight_orig``, put this hook *before* ``CheckpointingHook`` and ``EmaHook`` in the hook
    list (it raises otherwise), and do not call ``trainer.load_state_dict`` before ``train()``.
    Single process and DDP only (not FSDP or DeepSpeed).

    Export: :meth:`make_permanent` (or ``permanent_at_end=True``, applied after a run that
    reached ``max_steps``) removes the re-parametrisation (``prune.remove``), leaving plain
    ``weight`` Parameters with the zeros baked in.

    Args:
        target_sparsity: Final fraction of pruned weights, in [0, 1).
        start_step: First step of the ramp.
        frequency: Steps between pruning events.
        skip_lora: Leave modules whose name contains ``"lora_"`` alone.
        min_params_to_prune: Smaller weights are left alone.
        end_step: Step at which the target is reached (default ``trainer.max_steps``).
        schedule: ``"cubic"`` or ``"constant"``.
        scope: ``"layer"`` or ``"global"``.
        permanent_at_end: Call :meth:`make_permanent` after a run that reached ``max_steps``.

    Example:
        >>> hooks = [SparsityHook(0.8, start_step=100, frequency=50, end_step=2000), CheckpointingHook()]
    """

    def __init__(self, target_sparsity: float, start_step: int = 0, frequency: int = 100, skip_lora: bool = True,
                 min_params_to_prune: int = 1000, end_step: int | None = None, schedule: str = "cubic",
                 scope: str = "layer", permanent_at_end: bool = False) -> None:
        if not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"SparsityHook target_sparsity must be in [0, 1), got {target_sparsity!r}")
        if frequency < 1 or start_step < 0:
            raise ValueError(f"SparsityHook needs frequency >= 1 and start_step >= 0, got {frequency}, {start_step}")
        if end_step is not None and end_step <= start_step:
            raise ValueError(f"SparsityHook end_step ({end_step}) must be > start_step ({start_step})")
        if schedule not in ("cubic", "constant"):
            raise ValueError(f"SparsityHook schedule must be 'cubic' or 'constant', got {schedule!r}")
        if scope not in ("layer", "global"):
            raise ValueError(f"SparsityHook scope must be 'layer' or 'global', got {scope!r}")
        self.target_sparsity = float(target_sparsity)
        self.start_step, self.frequency, self.end_step = start_step, frequency, end_step
        self.skip_lora, self.min_params_to_prune = skip_lora, min_params_to_prune
        self.schedule, self.scope, self.permanent_at_end = schedule, scope, permanent_at_end
        self.modules: dict[str, nn.Module] = {}
        self.sparsity = 0.0
        self.layer_sparsity: dict[str, float] = {}
        self.permanent = False

    # ------------------------------------------------------------------ selection
    def select(self, model: nn.Module) -> dict[str, nn.Module]:
        """The modules this hook prunes, by name."""
        owners: dict[int, int] = {}
        for module in model.modules():
            for p in module.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        chosen = {}
        for name, module in model.named_modules():
            weight = getattr(module, "weight_orig", getattr(module, "weight", None))
            if not isinstance(module, _PRUNABLE) or not isinstance(weight, nn.Parameter):
                continue
            if (self.skip_lora and "lora_" in name) or weight.numel() < self.min_params_to_prune:
                continue
            if owners[id(weight)] > 1:  # tied (e.g. an LM head sharing the embedding): masking one breaks the tie
                continue
            chosen[name] = module
        return chosen

    def target_at(self, step: int, end_step: int) -> float:
        """The scheduled sparsity after ``step``."""
        if step < self.start_step:
            return 0.0
        if self.schedule == "constant":
            return self.target_sparsity
        progress = min(1.0, (step - self.start_step) / (end_step - self.start_step))
        return self.target_sparsity * (1.0 - (1.0 - progress) ** 3)

    # ------------------------------------------------------------------ events
    def on_before_train(self, trainer: BaseTrainer) -> None:
        from .checkpointing import CheckpointingHook
        from .ema import EmaHook

        if trainer.engine_kind in ("fsdp", "fsdp2", "deepspeed"):
            raise ValueError("SparsityHook supports one process and DDP, not FSDP or DeepSpeed")
        for hook in trainer.hooks:
            if hook is self:
                break
            if isinstance(hook, EmaHook) or (isinstance(hook, CheckpointingHook) and hook.load is not None):
                raise ValueError(f"put SparsityHook before {type(hook).__name__} in the hook list: pruning renames "
                                 "weight to weight_orig, which the other hook must see from the start")
        self.modules = self.select(trainer.unwrapped_model)
        for module in self.modules.values():
            if not prune.is_pruned(module):
                prune.identity(module, "weight")  # all-ones mask: the same state layout from step 0
        self._measure()

    def on_load_state_dict(self, trainer: BaseTrainer, state_dict: dict[str, Any]) -> None:
        if self.modules:
            self._measure()  # the masks came back with the model's buffers

    def on_after_step(self, trainer: BaseTrainer) -> None:
        step = trainer.step
        end = self.end_step if self.end_step is not None else max(trainer.max_steps, self.start_step + 1)
        due = step >= self.start_step and ((step - self.start_step) % self.frequency == 0 or step == end)
        if due and self.modules and not self.permanent:
            self.prune_to(self.target_at(step, end))
        trainer.step_info["sparsity"] = self.sparsity
        trainer.step_info["sparsity_layers"] = self.layer_sparsity

    def on_after_train(self, trainer: BaseTrainer) -> None:
        if self.permanent_at_end and trainer.step >= trainer.max_steps:
            self.make_permanent()

    # ------------------------------------------------------------------ pruning
    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Raise the selected weights' sparsity to ``sparsity`` (masks never shrink)."""
        modules = list(self.modules.values())
        pruned = [int((m.weight_mask == 0).sum()) for m in modules]
        if self.scope == "layer":
            extra = [max(0, round(sparsity * m.weight_mask.numel()) - done) for m, done in zip(modules, pruned, strict=True)]
        else:
            extra = self._global_shares(modules, round(sparsity * sum(m.weight_mask.numel() for m in modules)) - sum(pruned))
        for module, amount in zip(modules, extra, strict=True):
            if amount > 0:
                # Scores from weight_orig: module.weight is only refreshed at the next forward.
                prune.l1_unstructured(module, "weight", amount=amount, importance_scores=module.weight_orig.detach())
        self._measure()

    @staticmethod
    def _global_shares(modules: list[nn.Module], amount: int) -> list[int]:
        """How many of the ``amount`` smallest unpruned weights (over all modules) each module holds."""
        if amount <= 0:
            return [0] * len(modules)
        scores = torch.cat([torch.where(m.weight_mask.bool(), m.weight_orig.detach().abs(), torch.inf).flatten()
                            for m in modules])
        chosen = torch.topk(scores, amount, largest=False).indices
        bounds = torch.tensor([m.weight_mask.numel() for m in modules], device=scores.device).cumsum(0)
        return torch.bincount(torch.bucketize(chosen, bounds, right=True), minlength=len(modules)).tolist()

    def _measure(self) -> None:
        zeros = {name: int((m.weight_mask == 0).sum()) for name, m in self.modules.items()}
        sizes = {name: m.weight_mask.numel() for name, m in self.modules.items()}
        self.layer_sparsity = {name: zeros[name] / sizes[name] for name in self.modules}
        self.sparsity = sum(zeros.values()) / max(1, sum(sizes.values()))

    def make_permanent(self) -> None:
        """Remove the re-parametrisation: plain ``weight`` Parameters (the same objects the
        optimizer holds) with the pruned entries set to zero. Pruning stops afterwards."""
        for module in self.modules.values():
            if prune.is_pruned(module):
                prune.remove(module, "weight")
        self.permanent = True
