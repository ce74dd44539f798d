"""acceltrain.checkpoint_names: the one place that spells checkpoint folders."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from acceltrain import checkpoint_names as names
from tests.conftest import ROOT


def test_the_layout_users_see():
    # The one place the spelling is pinned: scripts and docs outside acceltrain rely on it.
    assert (names.CHECKPOINTS_SUBDIR, names.LATEST, names.BEST) == ("checkpoints", "checkpoint_latest", "checkpoint_best")
    assert names.step_folder_name(200) == "checkpoint_step_200"
    assert names.tmp_folder_name(7) == ".tmp_checkpoint_step_7"


def test_step_names_round_trip_and_nothing_else_parses():
    for step in (0, 5, 10, 123456):
        assert names.parse_step(names.step_folder_name(step)) == step
        assert names.checkpoint_step(Path("/x") / names.step_folder_name(step)) == step
    for other in (names.LATEST, names.BEST, names.tmp_folder_name(3), names.STEP_PREFIX, names.step_folder_name(3) + "x",
                  names.CHECKPOINTS_SUBDIR):
        assert names.parse_step(other) is None, other


def test_globs_match_the_names(tmp_path):
    for name in (names.step_folder_name(2), names.tmp_folder_name(3), names.LATEST, names.BEST):
        (tmp_path / name).mkdir()
    assert [p.name for p in tmp_path.glob(names.STEP_GLOB)] == [names.step_folder_name(2)]
    assert [p.name for p in tmp_path.glob(names.TMP_GLOB)] == [names.tmp_folder_name(3)]


_SPELLINGS = ("checkpoint_step_", "checkpoint_latest", "checkpoint_best", ".tmp_checkpoint")


def _literals(path: Path) -> list[tuple[int, str]]:
    """String constants of a module that are not docstrings (f-string pieces included)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]


@pytest.mark.parametrize("folder", ["acceltrain", "recipes", "benchmarks"])
def test_no_module_but_checkpoint_names_spells_them(folder):
    found = [f"{path.relative_to(ROOT)}:{line}: {text!r}"
             for path in sorted((ROOT / folder).rglob("*.py"))
             if path.name != "checkpoint_names.py"
             for line, text in _literals(path) if any(s in text for s in _SPELLINGS)]
    assert not found, found
