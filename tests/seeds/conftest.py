"""Fixtures shared by the seed-compatibility tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def restore_logging():
    """setup_logging reconfigures the root logger: put pytest's back afterwards."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level
