"""The recipes' optimizer and schedule: AdamW with decay groups, warmup + cosine."""

from __future__ import annotations

import torch

__all__ = ["adamw_with_decay_groups", "warmup_cosine"]


def adamw_with_decay_groups(model: torch.nn.Module, *, lr: float, weight_decay: float,
                            betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW that decays matrices (2-D and up: linear and embedding weights) but not biases or
    norm gains, the GPT-2/nanoGPT convention; fused kernels where the device has them."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    device = next(model.parameters()).device
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=device.type in _fused_devices())


def _fused_devices() -> list[str]:
    # Fused AdamW runs on CUDA and (torch >= 2.4) on the CPU too, where it is ~4x faster than
    # the per-tensor loop (2.2 vs 9.1 ms for the tiny preset's ~3M parameters on 2 cores).
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices

        return list(_get_fused_kernels_supported_devices())
    except ImportError:
        return ["cuda"]


def warmup_cosine(optimizer: torch.optim.Optimizer, *, warmup_steps: int, max_steps: int,
                  min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to ``min_lr_ratio`` of the peak (transformers' schedule)."""
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps, min_lr_rate=min_lr_ratio)
