"""Training curves from run folders' ``metrics.jsonl``: ``acceltrain plot RUN_DIR [RUN_DIR ...] --out curves.png``.

One panel per figure (training loss, each evaluation metric, learning rate, gradient norm,
tokens/s, MFU) against the step, with every run overlaid, so the runs of a sweep compare at a
glance. Drawing needs matplotlib (``pip install 'acceltrain[plot]'``); reading does not.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import UserError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["read_metrics", "panels", "plot_runs", "save_curves", "final_metrics", "curves_section",
           "matplotlib_available", "add_plot_parser"]

#: The panels before the evaluation metrics, and after them: (key in metrics.jsonl, title).
_HEAD = (("loss", "training loss"),)
_TAIL = (("lr", "learning rate"), ("grad_norm", "gradient norm"), ("tokens_per_s", "tokens/s"), ("mfu", "MFU"))
#: Evaluation keys that count rather than measure: no panel.
_NOT_PLOTTED = ("eval/samples",)

Series = dict[str, tuple[list[int], list[float]]]


def read_metrics(run_dir: str | Path) -> Series:
    """``{key: (steps, values)}`` from ``run_dir/metrics.jsonl``, in file order.

    Raises:
        UserError: no such folder, no ``metrics.jsonl`` in it, or a line that is not a JSON
            record with a ``step`` (a last line torn by a kill is ignored).
    """
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run folder")
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (not a run folder, or nothing logged yet)")
    text = path.read_text()
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        lines = lines[:-1]  # written while the run was killed
    series: Series = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{number}: not a JSON record with a step") from None
        for key, value in record.items():
            if key == "step" or isinstance(value, bool):
                continue
            try:
                number_value = float(value)  # "nan" / "inf" are written as strings
            except (TypeError, ValueError):
                continue
            steps, values = series.setdefault(key, ([], []))
            steps.append(step)
            values.append(number_value)
    return series


def panels(runs: Sequence[Series]) -> list[tuple[str, str]]:
    """``(key, title)`` of each panel the runs have data for, in display order."""
    present = set().union(*(r.keys() for r in runs)) if runs else set()
    evals = sorted(k for k in present if k.startswith("eval/") and k not in _NOT_PLOTTED)
    order = [*_HEAD, *((k, k.replace("/", " ", 1).replace("eval ", "eval: ")) for k in evals), *_TAIL]
    return [(key, title) for key, title in order if key in present]


def _labels(run_dirs: Sequence[Path]) -> list[str]:
    # Folder names, unless two runs share one (then their paths).
    names = [p.name or str(p) for p in run_dirs]
    return names if len(set(names)) == len(names) else [str(p) for p in run_dirs]


def matplotlib_available() -> bool:
    """Whether matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_runs(run_dirs: Sequence[str | Path], *, labels: Sequence[str] | None = None) -> Figure:
    """A matplotlib ``Figure``: one panel per metric against the step, one line per run.

    Built with matplotlib's object API (no pyplot, no display needed). ``labels`` name the runs
    in the legends (default: their folder names).

    Raises:
        UserError: as :func:`read_metrics`; no run given, or none with any figure to plot;
            matplotlib not installed.

    Example:
        >>> fig = plot_runs(["runs/lr=1e-3", "runs/lr=3e-3"])
        >>> fig.savefig("curves.png")
    """
    if not run_dirs:
        raise UserError("plot: name at least one run folder")
    if not matplotlib_available():
        raise UserError("plotting needs matplotlib: pip install 'acceltrain[plot]'")
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    dirs = [Path(d) for d in run_dirs]
    runs = [read_metrics(d) for d in dirs]
    names = list(labels) if labels is not None else _labels(dirs)
    shown = panels(runs)
    if not shown:
        raise UserError(f"{', '.join(map(str, dirs))}: metrics.jsonl has no loss, evaluation, LR, gradient-norm, "
                        "throughput or MFU figures to plot")
    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (key, title) in zip(axes, shown, strict=False):
        for run, name in zip(runs, names, strict=True):
            if key in run:
                steps, values = run[key]
                ax.plot(steps, values, label=name, marker="." if len(steps) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(shown):]:
        fig.delaxes(ax)
    return fig


def save_curves(run_dirs: Sequence[str | Path], out: str | Path, **kwargs: Any) -> Path:
    """Draw :func:`plot_runs` and write it to ``out`` (PNG, or what its suffix says)."""
    out = Path(out)
    fig = plot_runs(run_dirs, **kwargs)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


#: The final figures a model card tabulates, in this order (evaluation metrics go in between).
_CARD_KEYS = ("loss", "grad_norm", "lr", "tokens_per_s", "mfu")


def final_metrics(run_dir: str | Path) -> list[tuple[str, int, float]]:
    """``(key, step, value)``: the last logged value of the training loss, each evaluation metric,
    gradient norm, LR, tokens/s and MFU."""
    series = read_metrics(run_dir)
    evals = sorted(k for k in series if k.startswith("eval/"))
    keys = [_CARD_KEYS[0], *evals, *_CARD_KEYS[1:]]
    return [(k, series[k][0][-1], series[k][1][-1]) for k in keys if k in series]


def curves_section(run_dir: str | Path, image: str | None) -> str:
    """A model-card section: the curves image (when ``image`` names it) and a table of the final metrics."""
    rows = final_metrics(run_dir)
    lines = ["", "## Training curves", ""]
    if image:
        lines += [f"![Training curves: loss, evaluation metrics, learning rate, gradient norm, tokens/s, MFU]({image})", ""]
    lines += ["Final metrics (the last value logged to `metrics.jsonl`):", "", "| metric | step | value |",
              "|---|---|---|"]
    lines += [f"| {key} | {step} | {value:.6g} |" for key, step, value in rows]
    return "\n".join(lines) + "\n"


def add_plot_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``acceltrain plot``."""
    p = sub.add_parser("plot", help="training curves of one or more run folders (from metrics.jsonl) as a PNG",
                       description="Training loss, evaluation metrics, learning rate, gradient norm, tokens/s "
                                   "and MFU against the step, one panel each, the runs overlaid; read from "
                                   "each RUN_DIR/metrics.jsonl.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders holding metrics.jsonl")
    p.add_argument("--out", default="curves.png", help="the image to write (default: curves.png)")
    p.set_defaults(handler=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    out = save_curves(args.run_dirs, args.out)
    print(f"Saved {out} ({len(args.run_dirs)} run(s))")
    return 0
