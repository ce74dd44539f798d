"""acceltrain plot: panels and legends from metrics.jsonl, bad input, the model card's curves section."""

from __future__ import annotations

import json
import sys

import pytest

from acceltrain.cli import main as cli
from acceltrain.config import UserError
from acceltrain.plot import curves_section, final_metrics, plot_runs, read_metrics

pytest.importorskip("matplotlib")


def write_run(folder, records, torn: str = ""):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + torn)
    return folder


@pytest.fixture
def two_runs(tmp_path):
    a = write_run(tmp_path / "lr=1e-3", [
        {"step": 1, "loss": 4.0, "lr": 1e-4, "grad_norm": 2.0, "tokens_per_s": 100.0, "mfu": 0.1, "step_time": 0.5},
        {"step": 2, "loss": 3.0, "lr": 2e-4, "grad_norm": 1.5, "tokens_per_s": 110.0, "mfu": 0.11, "step_time": 0.4},
        {"step": 2, "eval/loss": 3.2, "eval/perplexity": 24.5, "eval/samples": 40},
        {"step": 3, "loss": "nan", "lr": 3e-4, "grad_norm": 1.0, "tokens_per_s": 120.0, "mfu": 0.12},
    ])
    b = write_run(tmp_path / "lr=3e-3", [
        {"step": 1, "loss": 5.0, "lr": 3e-4, "grad_norm": 3.0},
        {"step": 2, "loss": 2.5, "lr": 6e-4, "grad_norm": 2.5},
        {"step": 2, "eval/accuracy": 0.75},
    ], torn='{"step": 3, "lo')
    return a, b


def test_figure_has_one_panel_per_metric_and_each_run_in_its_legends(two_runs):
    a, b = two_runs
    fig = plot_runs([a, b])
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["training loss", "eval: accuracy", "eval: loss", "eval: perplexity", "learning rate",
                      "gradient norm", "tokens/s", "MFU"]  # no step_time, no eval/samples
    legends = {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes}
    assert legends["training loss"] == ["lr=1e-3", "lr=3e-3"]
    assert legends["gradient norm"] == ["lr=1e-3", "lr=3e-3"]
    assert legends["eval: accuracy"] == ["lr=3e-3"] and legends["MFU"] == ["lr=1e-3"]
    loss = fig.axes[0].get_lines()
    assert list(loss[0].get_xdata()) == [1, 2, 3] and list(loss[0].get_ydata())[:2] == [4.0, 3.0]
    assert list(loss[1].get_xdata()) == [1, 2]  # the torn last line is left out
    assert all(ax.get_xlabel() == "step" for ax in fig.axes)


def test_cli_writes_a_png(two_runs, tmp_path, capsys):
    out = tmp_path / "plots" / "curves.png"
    assert cli(["plot", str(two_runs[0]), str(two_runs[1]), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out == f"Saved {out} (2 run(s))\n"


def test_runs_with_the_same_folder_name_are_told_apart_by_path(tmp_path):
    a = write_run(tmp_path / "x" / "run", [{"step": 1, "loss": 1.0}])
    b = write_run(tmp_path / "y" / "run", [{"step": 1, "loss": 2.0}])
    fig = plot_runs([a, b])
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == [str(a), str(b)]


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "nope", "{p}/nope: no such run folder"),
    (lambda p: p, "{p}: no metrics.jsonl (not a run folder, or nothing logged yet)"),
])
def test_bad_run_folders_exit_2_with_one_line(tmp_path, capsys, make, message):
    with pytest.raises(SystemExit) as e:
        cli(["plot", str(make(tmp_path)), "--out", str(tmp_path / "c.png")])
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {message.format(p=tmp_path)}\n"
    assert not (tmp_path / "c.png").exists()


def test_a_line_that_is_not_a_record_names_file_and_line(tmp_path):
    run = write_run(tmp_path / "r", [{"step": 1, "loss": 1.0}], torn="not json\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON record with a step$"):
        read_metrics(run)


def test_without_matplotlib_the_error_says_what_to_install(two_runs, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as e:
        cli(["plot", str(two_runs[0]), "--out", str(tmp_path / "c.png")])
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: plotting needs matplotlib: pip install 'acceltrain[plot]'\n"


def test_model_card_section_embeds_the_curves_and_tabulates_final_metrics(two_runs):
    a, _ = two_runs
    assert [(k, s) for k, s, _ in final_metrics(a)] == [
        ("loss", 3), ("eval/loss", 2), ("eval/perplexity", 2), ("eval/samples", 2), ("grad_norm", 3), ("lr", 3),
        ("tokens_per_s", 3), ("mfu", 3)]
    section = curves_section(a, "curves.png")
    assert "## Training curves" in section and "](curves.png)" in section
    assert "| eval/loss | 2 | 3.2 |" in section and "| mfu | 3 | 0.12 |" in section and "| loss | 3 | nan |" in section
    assert "curves.png" not in curves_section(a, None)
