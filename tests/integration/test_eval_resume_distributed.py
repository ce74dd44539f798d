"""Two CPU ranks (gloo, torchrun): SIGTERM to one rank in the middle of an evaluation stops both
after the same evaluation batch; the resumed run finishes it and equals the uninterrupted run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.conftest import torchrun

SCRIPT = Path(__file__).parent / "scripts" / "eval_signal_check.py"
pytestmark = pytest.mark.multiproc


def test_sigterm_to_one_rank_during_evaluation_resumes_exactly_on_both(tmp_path: Path):
    torchrun(SCRIPT, "ref", str(tmp_path))
    torchrun(SCRIPT, "cut", str(tmp_path))  # the script catches the SystemExit and records its code
    torchrun(SCRIPT, "resume", str(tmp_path))
    for rank in (0, 1):
        ref, cut, again = (json.loads((tmp_path / f"{m}_rank{rank}.json").read_text())
                           for m in ("ref", "cut", "resume"))
        assert cut["code"] == 128 + signal.SIGTERM  # rank 1 got no signal: it exits with the agreed one
        # 12 of the 23 evaluation samples per rank, batch 5: 3 batches; both stop after batch 1.
        assert cut["seen"][-2:] == [[3, 0], [3, 1]] and cut["history"] == []
        assert again["seen"][0] == [3, 2]  # continued at the next batch, on both ranks
        assert again["history"] == ref["history"]  # bitwise (floats compared with ==)
        assert cut["losses"] + again["losses"] == ref["losses"]
        assert again["params"] == ref["params"]
