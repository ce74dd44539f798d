"""Model building blocks: architecture presets (Llama / GPT-2 configs) and FLOPs accounting.

Example:
    >>> from acceltrain.models import preset, build_model, flops_per_token
    >>> cfg = preset("tiny", vocab_size=4096)
    >>> model = build_model(cfg)
    >>> fpt = flops_per_token(model, cfg.n_layers, cfg.d_model, cfg.max_seq_len)
"""

from .compile import compile_blocks, transformer_blocks
from .flops import (
    GPU_PEAK_FLOPS,
    device_peak_flops,
    flops_per_token,
    gpu_peak_flops,
    measure_cpu_peak_flops,
    mfu,
    non_embedding_params,
)
from .presets import ACTIVATIONS, ARCHS, PRESETS, ModelConfig, build_config, build_model, preset

__all__ = [
    "ACTIVATIONS",
    "ARCHS",
    "GPU_PEAK_FLOPS",
    "PRESETS",
    "ModelConfig",
    "build_config",
    "build_model",
    "compile_blocks",
    "device_peak_flops",
    "flops_per_token",
    "gpu_peak_flops",
    "measure_cpu_peak_flops",
    "mfu",
    "non_embedding_params",
    "preset",
    "transformer_blocks",
]
