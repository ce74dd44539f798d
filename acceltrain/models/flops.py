"""Training FLOPs per token, device peak FLOP/s, and model FLOPs utilisation (MFU).

MFU = achieved model FLOP/s / peak FLOP/s of the device, where "model FLOPs" count only the
matmuls the architecture needs (not recomputation from gradient checkpointing), as in the PaLM
paper (Chowdhery et al. 2022, appendix B).

Example:
    >>> fpt = flops_per_token(model, n_layers=12, d_model=768, seq_len=1024)
    >>> peak = device_peak_flops(torch.device("cuda"), torch.bfloat16)   # e.g. 312e12 on an A100
    >>> mfu(tokens_per_s=12_000, flops_per_token=fpt, peak=peak)          # per device
    0.33...
"""

from __future__ import annotations

import functools
import logging
import re
import time

import torch
from torch import nn

__all__ = [
    "GPU_PEAK_FLOPS",
    "device_peak_flops",
    "flops_per_token",
    "gpu_peak_flops",
    "measure_cpu_peak_flops",
    "mfu",
    "non_embedding_params",
]

logger = logging.getLogger("acceltrain")

# Dense (no 2:4 sparsity) 16-bit tensor-core peak per GPU: bf16 with fp32 accumulation, or fp16
# where the chip has no bf16 (V100, T4). Datasheets quote sparse figures first; these are half.
# Sources: NVIDIA datasheets for A100, H100 (SXM/PCIe/NVL), H200, A10, A40, RTX A6000, L4, L40,
# L40S, V100, T4; the Ampere GA102 and Ada whitepapers (RTX 3090, RTX 4090: fp32-accumulate
# rows). The A10G (AWS's variant of the A10) has no public NVIDIA datasheet; it trades tensor
# rate for CUDA-core rate (Baseten, "NVIDIA A10 vs A10G for ML model inference"), and 70e12 is
# the commonly quoted figure, not the A10's 125e12. Treat that one entry as approximate.
GPU_PEAK_FLOPS: dict[str, float] = {
    "H100 SXM": 989.4e12,
    "H100 PCIe": 756.0e12,
    "H100 NVL": 835.0e12,
    "H200": 989.4e12,
    "A100": 312.0e12,
    "A10G": 70.0e12,
    "A10": 125.0e12,
    "A40": 149.7e12,
    "RTX A6000": 154.8e12,
    "L40S": 362.05e12,
    "L40": 181.05e12,
    "L4": 121.0e12,
    "RTX 4090": 165.2e12,
    "RTX 3090": 71.0e12,
    "V100 SXM2": 125.0e12,
    "V100 PCIe": 112.0e12,
    "T4": 65.0e12,
}
"""Peak dense 16-bit FLOP/s by GPU (``torch.cuda.get_device_name`` is matched against these)."""

# Checked in order, first match wins: specific names before the families that contain them.
_GPU_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"h100.*nvl", "H100 NVL"),
    (r"h100.*(pcie|hbm2e)", "H100 PCIe"),
    (r"h100", "H100 SXM"),
    (r"h200", "H200"),
    (r"a100", "A100"),
    (r"a10g", "A10G"),
    (r"\ba10\b", "A10"),
    (r"a6000", "RTX A6000"),
    (r"\ba40\b", "A40"),
    (r"l40s", "L40S"),
    (r"\bl40\b", "L40"),
    (r"\bl4\b", "L4"),
    (r"rtx 4090", "RTX 4090"),
    (r"rtx 3090(?! ti)", "RTX 3090"),
    (r"v100.*sxm", "V100 SXM2"),
    (r"v100", "V100 PCIe"),
    (r"\bt4\b", "T4"),
)


def non_embedding_params(model: nn.Module, *, include_output_head: bool = True) -> int:
    """Parameters that take part in a matmul for every token.

    Embedding tables (token and learned position embeddings) are lookups, not matmuls, so they
    are left out: Kaplan et al. (2020)'s non-embedding ``N``. The output head does a
    ``d_model x vocab`` matmul per token even when its weight is tied to the token embedding,
    so by default it is counted (as nanoGPT and the PaLM MFU accounting do); pass
    ``include_output_head=False`` for Kaplan's strict ``N``.

    Example:
        >>> non_embedding_params(model, include_output_head=False)
    """
    unique = {id(p): p for p in model.parameters()}
    embedded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    n = sum(p.numel() for key, p in unique.items() if key not in embedded)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    if weight is not None:
        if include_output_head and id(weight) in embedded:  # tied: subtracted above, add it back
            n += weight.numel()
        elif not include_output_head and id(weight) not in embedded:
            n -= weight.numel()
    return n


def flops_per_token(n_params: int | nn.Module, n_layers: int, d_model: int, seq_len: int) -> int:
    """Training FLOPs (forward + backward) per token: ``6 * N + 12 * L * d * T``.

    ``6N``: each parameter in a matmul costs 2 FLOPs (multiply, add) per token in the forward
    pass and 4 in the backward (gradients of inputs and of weights) [Kaplan et al. 2020, sec.
    2.1; Hoffmann et al. 2022 (Chinchilla), app. F]. ``12 * L * d * T``: attention scores
    ``Q K^T`` and the weighted sum ``A V`` are ``2 * T * d`` FLOPs each per token per layer in
    the forward pass, times 3 for forward + backward [Chowdhery et al. 2022 (PaLM), app. B].
    The causal mask is not discounted (the PaLM convention), and grouped-query attention does
    not change the term (the scores still use all ``d`` query dimensions).

    Args:
        n_params: ``N``, the non-embedding parameter count, or a model to count it from with
            :func:`non_embedding_params`.
        n_layers: ``L``, Transformer blocks.
        d_model: ``d``, the width of attention (``n_heads * d_head``).
        seq_len: ``T``, the training context length.

    Example:
        >>> flops_per_token(1_000_000, n_layers=2, d_model=64, seq_len=128)
        6196608
    """
    n = non_embedding_params(n_params) if isinstance(n_params, nn.Module) else int(n_params)
    for name, value in (("n_params", n), ("n_layers", n_layers), ("d_model", d_model), ("seq_len", seq_len)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return 6 * n + 12 * n_layers * d_model * seq_len


def gpu_peak_flops(device_name: str) -> float | None:
    """The ``GPU_PEAK_FLOPS`` entry for a CUDA device name, or ``None`` if it is not listed.

    Example:
        >>> gpu_peak_flops("NVIDIA A100-SXM4-80GB")
        312000000000000.0
    """
    name = device_name.lower()
    for pattern, key in _GPU_PATTERNS:
        if re.search(pattern, name):
            return GPU_PEAK_FLOPS[key]
    return None


@functools.cache
def _cpu_peak(dtype: torch.dtype, threads: int, size: int, repeats: int) -> float:
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool start and the first-call kernel choice
    best = float("inf")
    deadline = time.perf_counter() + 1.0  # a slow dtype (bf16 without AMX) stops early
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return 2 * size**3 / best


def measure_cpu_peak_flops(
    dtype: torch.dtype = torch.float32, *, size: int = 1024, repeats: int = 5
) -> float:
    """Measure this CPU's matmul FLOP/s: the best of a few ``size x size`` matmuls.

    CPUs have no datasheet peak that PyTorch reaches, so the achievable matmul rate with the
    current ``torch.get_num_threads()`` stands in for it. Takes about 0.1 s at the defaults;
    the result is cached per (dtype, threads, size, repeats).

    Example:
        >>> measure_cpu_peak_flops(torch.float32) > 1e9
        True
    """
    if size < 1 or repeats < 1:
        raise ValueError(f"size and repeats must be >= 1, got size={size}, repeats={repeats}")
    return _cpu_peak(dtype, torch.get_num_threads(), size, repeats)


def device_peak_flops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak FLOP/s of one device: the GPU table for CUDA, a measured matmul rate on CPU.

    On CUDA the 16-bit tensor-core peak is returned whatever ``dtype`` is: MFU is quoted against
    it by convention, so an fp32 run shows how much it leaves on the table. On CPU ``dtype``
    picks the matmul that is measured. Unknown GPUs and other device types give ``None`` (and a
    log line): report no MFU rather than a wrong one.

    Example:
        >>> device_peak_flops("cpu", torch.float32) > 0
        True
    """
    device = torch.device(device)
    if device.type == "cpu":
        return measure_cpu_peak_flops(dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name)
        if peak is None:
            logger.info("no peak FLOP/s known for GPU %r: MFU is not reported", name)
        return peak
    logger.info("no peak FLOP/s known for device type %r: MFU is not reported", device.type)
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation, a fraction: ``tokens_per_s * flops_per_token / peak``.

    Use per-device figures (tokens per second on one device, that device's peak), or totals on
    both sides (global tokens per second, peak times the number of devices).

    Example:
        >>> mfu(tokens_per_s=1000, flops_per_token=6e9, peak=312e12)
        0.019230769230769232
    """
    if not peak > 0:
        raise ValueError(f"peak must be positive, got {peak}")
    if tokens_per_s < 0 or flops_per_token < 0:
        raise ValueError(
            f"tokens_per_s and flops_per_token must be >= 0, got {tokens_per_s}, {flops_per_token}"
        )
    return tokens_per_s * flops_per_token / peak
