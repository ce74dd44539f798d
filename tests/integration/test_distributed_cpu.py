"""Two CPU ranks (gloo, torchrun): no_sync accumulation, all-reduce counts, collective NaN skips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import torchrun
from tests.helpers import ToyTrainer, run_step_dir

SCRIPT = Path(__file__).parent / "scripts" / "ddp_check.py"
pytestmark = pytest.mark.multiproc


def _results(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Path:
    """Every check of ddp_check.py's CASES, one after another in one 2-rank launch (OUT/NAME/)."""
    out = tmp_path_factory.mktemp("ddp_cases")
    torchrun(SCRIPT, "cases", str(out), timeout=600)
    return out


@pytest.mark.parametrize("accum", [1, 3])
def test_two_ranks_match_one_process_on_the_global_batch(cases, accum):
    r0, r1 = _results(cases / f"equiv_{accum}")
    assert r0["world"] == 2 and r0["step"] == 4
    assert r0["params"] == r1["params"]  # replicas identical
    # One process, batch 2x4 (the two ranks' shards of each micro-step), same accumulation.
    ref = ToyTrainer(max_steps=4, gradient_accumulation_steps=accum, batch_size=8, n=128, device="cpu")
    ref.train()
    for got, want in zip(r0["params"], ref.model.parameters(), strict=True):
        torch.testing.assert_close(torch.tensor(got), want.detach().flatten(), atol=1e-6, rtol=0)
    # no_sync: exactly one gradient all-reduce (one bucket for this model) per optimizer step.
    assert r0["allreduces"] == r1["allreduces"] == 4


def test_without_no_sync_every_micro_batch_all_reduces(cases):
    r0, _ = _results(cases / "equiv_3_sync")
    assert r0["allreduces"] == 4 * 3


@pytest.mark.parametrize("mode", ["nan", "nan_ignored"])
def test_nan_on_one_rank_skips_the_step_on_both(cases, mode):
    # nan_ignored: the NaN is in a gradient DDP does not all-reduce, so the ranks learn of it
    # only from the trainer's own agreement (not from the synchronised gradients).
    r0, r1 = _results(cases / mode)
    assert r0["params"] == r1["params"]
    for r in (r0, r1):
        assert r["step"] == 4
        assert [i["retries"] for i in r["infos"]] == [0, 1, 0, 0]
        assert [i["skipped"] for i in r["infos"]] == [[], [2, 3], [], []]
        # LambdaLR 1/(1+s): the scheduler did not advance for the skipped attempt.
        assert [i["lr"] for i in r["infos"]] == pytest.approx([0.1 / 2, 0.1 / 3, 0.1 / 4, 0.1 / 5])


def test_nan_on_one_rank_every_step_fails_on_both_without_hanging(cases):
    r0, r1 = _results(cases / "nan_exhaust")  # and the launch went on to the next case: nothing hung
    for r in (r0, r1):
        assert r["step"] == 0
        assert r["error"].startswith("step 1: non-finite gradients after 3 attempt(s)")


def test_evaluation_on_two_ranks_equals_one_process(cases):
    """23 evaluation samples, batch 5, 2 ranks: padding is masked, nothing counted twice."""
    from tests.helpers import EvalTrainer

    r0, r1 = _results(cases / "eval")
    assert r0["metrics"] == r1["metrics"]
    ref = EvalTrainer(max_steps=4, batch_size=8, n=128, device="cpu")
    ref.train()
    want = ref.evaluate()
    assert r0["metrics"]["loss"] == pytest.approx(want["loss"], rel=1e-6)
    assert r0["metrics"]["mae"] == pytest.approx(want["mae"], rel=1e-6)


def test_token_normalisation_spans_ranks_and_the_window(cases):
    """2 ranks x accumulation 2 x batch 2 of padded sequences == one process, batch 8, token mean."""
    from tests.unit.test_trainer import TokenTrainer

    r0, r1 = _results(cases / "items")
    assert r0["params"] == r1["params"]
    ref = TokenTrainer(max_steps=4, gradient_accumulation_steps=1, batch_size=8, device="cpu")
    ref.train()
    for got, want in zip(r0["params"], ref.model.parameters(), strict=True):
        torch.testing.assert_close(torch.tensor(got), want.detach().flatten(), atol=1e-6, rtol=0)


def test_guard_spike_on_one_rank_rolls_back_both(cases):
    r0, r1 = _results(cases / "guard")
    assert r0["params"] == r1["params"] and r0["step"] == r1["step"] == 10
    for r in (r0, r1):
        assert [(e["kind"], e["from_step"], e["to_step"]) for e in r["guard_events"]] == [("rollback", 7, 4)]


def test_none_on_the_syncing_micro_batch_is_an_error_not_drift(cases):
    for r in _results(cases / "none_last"):
        assert r["step"] == 0 and "returned None on the last micro-batch" in r["error"]


@pytest.fixture(scope="module")
def records_run(cases) -> Path:
    return cases / "records"


def test_logging_reduces_records_that_only_some_ranks_return(records_run):
    """Rank-dependent record keys: no hang, no misaligned reduce; a key counts where it was seen."""
    lines = [json.loads(line) for line in (records_run / "ws" / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]
    for line in lines:
        assert line["records/rank_plus_one"] == 1.5
        assert line["records/only_rank1"] == 2.0


def test_a_signal_on_one_rank_stops_every_rank_without_an_export(records_run):
    """ExportHook before CheckpointingHook, SIGTERM on rank 1 only (after step 2): both ranks stop and
    save after step 3, whose collective carries the stop; they agree it was a signal (rank 0
    received none) and export nothing (the resumed run will). Before, rank 0 exported and hung."""
    for r in _results(records_run):
        assert r["signalled"] == {"step": 3, "exit": 128 + 15, "stopped_by_signal": True, "exported": False}, r["rank"]
    assert run_step_dir(records_run / "signalled", 3).is_dir()
