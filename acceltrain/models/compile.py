"""Regional compilation: ``torch.compile`` each repeated transformer block, not the whole model.

Compiling one block class once and reusing the compiled code for every instance cuts compile
time by about the number of layers (the blocks are identical up to their weights) and gives the
same kernels where the time goes. Each block is compiled in place (``nn.Module.compile``), so
parameter names, ``state_dict`` keys and checkpoints stay those of the eager model (no
``_orig_mod.`` prefix). Accelerate's ``compile_regions`` does the same job but swaps the blocks
for ``OptimizedModule`` wrappers, which renames every key under them.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

__all__ = ["compile_blocks", "transformer_blocks"]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a Hugging Face model: instances of the classes it names in
    ``_no_split_modules`` (``LlamaDecoderLayer``, ``GPT2Block``, ...), outermost first."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def compile_blocks(model: nn.Module, **compile_kwargs: Any) -> int:
    """Compile every transformer block of ``model`` in place; return how many were compiled.

    A model without named blocks (not a Hugging Face transformer) is compiled whole, also in
    place, and 0 is returned. ``compile_kwargs`` go to ``torch.compile`` (``mode``, ``backend``...).

    Example:
        >>> n = compile_blocks(model)          # the model's forward now runs compiled blocks
    """
    blocks = transformer_blocks(model)
    if not blocks:
        model.compile(**compile_kwargs)
        return 0
    for block in blocks:
        block.compile(**compile_kwargs)
    return len(blocks)
