"""One path rule for every hook that takes a path: a relative path is inside the workspace,
unless it already starts with the workspace (the seed's ``path=self.workspace / "checkpoints"``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from acceltrain import CheckpointingHook, ImageFileLoggerHook
from acceltrain.export import ExportHook
from acceltrain.utils import in_workspace
from tests.helpers import ToyTrainer, load_recipe, step_dir


@pytest.mark.parametrize(
    ("path", "workspace", "expected"),
    [
        ("checkpoints", "runs/exp1", "runs/exp1/checkpoints"),
        ("runs/exp1/checkpoints", "runs/exp1", "runs/exp1/checkpoints"),
        ("./runs/exp1/checkpoints", "runs/exp1/", "runs/exp1/checkpoints"),
        ("runs/exp10/checkpoints", "runs/exp1", "runs/exp1/runs/exp10/checkpoints"),  # parts, not text
        ("/abs/ckpt", "runs/exp1", "/abs/ckpt"),
        ("ckpt", None, "ckpt"),
        ("ckpt", "/abs/run", "/abs/run/ckpt"),
        ("/abs/run/ckpt", "/abs/run", "/abs/run/ckpt"),
    ],
)
def test_in_workspace(path, workspace, expected):
    assert in_workspace(path, workspace) == Path(expected)


class SeedIdiom(ToyTrainer):
    """The seed's own examples build hook paths from ``self.workspace``."""

    def build_hooks(self):
        return [CheckpointingHook(path=self.workspace / "checkpoints", interval=2),
                ImageFileLoggerHook(interval=2, path=self.workspace / "images"),
                ExportHook(path=self.workspace / "final")]

    def forward(self, input):
        loss, records = super().forward(input)
        self.log_images({"sample": torch.zeros(3, 4, 4)})
        return loss, records


def test_seed_idiom_with_a_relative_workspace(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    SeedIdiom(max_steps=2, device="cpu", workspace="runs/experiment_1").train()
    run = tmp_path / "runs" / "experiment_1"
    assert step_dir(run / "checkpoints", 2).is_dir()  # where the idiom points
    assert list((run / "images").glob("step_*/*.png"))
    assert (run / "final" / "model.safetensors").is_file()
    assert not (run / "runs").exists()


def _load_recipe(name: str):
    return load_recipe(name, "paths")


@pytest.fixture
def immutable_dir(tmp_path):
    """A folder even root cannot write into (ext4's immutable flag), removed again afterwards."""
    import shutil
    import subprocess

    folder = tmp_path / "locked"
    folder.mkdir()
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)]).returncode != 0:
        pytest.skip("chattr +i is not available on this file system")
    yield folder
    subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("recipe", ["pretrain", "causal_lm", "classify"])
@pytest.mark.parametrize("where, message", [
    ("{file}", "is a file, not a folder"),
    ("{file}/run", "{file} is a file, not a folder"),
    ("{locked}/run", "{locked} is not writable"),
])
def test_output_dir_that_cannot_be_a_folder_is_one_line_exit_2(tmp_path, capsys, immutable_dir, recipe, where,
                                                                  message):
    file = tmp_path / "notes.txt"
    file.write_text("the user's notes")
    names = {"file": file, "locked": immutable_dir}
    output_dir = where.format(**names)
    with pytest.raises(SystemExit) as e:
        _load_recipe(recipe).main(["--output_dir", output_dir, "--max_steps", "1"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output_dir {output_dir}: {message.format(**names)}"]
    assert file.read_text() == "the user's notes"
    assert list(immutable_dir.iterdir()) == []


def test_workspace_that_is_a_file_is_refused_before_anything_runs(tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("x")
    with pytest.raises(ValueError, match=f"^workspace {file}: is a file, not a folder$"):
        ToyTrainer(max_steps=1, device="cpu", workspace=file)


def test_a_cache_folder_that_cannot_be_one_is_named_by_where_it_came_from(tmp_path, capsys, monkeypatch):
    """--cache_dir or $ACCELTRAIN_CACHE naming a file (or under one): one line, exit 2, the file
    untouched; before, the first cache write ended in a NotADirectoryError traceback."""
    from acceltrain.config import UserError
    from acceltrain.recipe_kit import cache_root

    file = tmp_path / "notes.txt"
    file.write_text("the user's notes")
    with pytest.raises(UserError, match=f"^--cache_dir {file}/c: {file} is a file, not a folder$"):
        cache_root(file / "c")
    monkeypatch.setenv("ACCELTRAIN_CACHE", str(file))
    with pytest.raises(UserError, match=f"^\\$ACCELTRAIN_CACHE {file}: is a file, not a folder$"):
        cache_root()
    with pytest.raises(SystemExit) as e:  # the recipe checks it before reading any text
        _load_recipe("pretrain").main(["--output_dir", str(tmp_path / "run"), "--max_steps", "1"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: $ACCELTRAIN_CACHE {file}: is a file, not a folder"]
    assert file.read_text() == "the user's notes" and not (tmp_path / "run").exists()


def test_evaluate_output_path_under_a_file_is_refused_before_the_model_loads(tmp_path, capsys):
    from tests.helpers import cli_error

    file = tmp_path / "notes.txt"
    file.write_text("x")
    err = cli_error(capsys, "evaluate", "--model", str(tmp_path / "no_model"), "--dataset", "x.txt",
                    "--output_path", str(file / "result.json"))
    assert err == f"error: --output_path {file / 'result.json'}: {file} is a file, not a folder"
