"""CUDA tests: every test here carries the ``gpu`` marker and skips, with the reason, where no
CUDA device is visible (they are still collected, so an import error fails on any machine).

Run them with ``python -m pytest -m gpu`` (or ``benchmarks/gpu_check.py``, which does)."""

from __future__ import annotations

import pytest
import torch

_NO_CUDA = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/gpu/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.gpu)
            if not torch.cuda.is_available():
                item.add_marker(_NO_CUDA)
