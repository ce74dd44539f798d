"""Pretraining data at scale, across processes: kill -9 mid-tokenization, peak memory, exact resume of a mixture."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.helpers import ckpt_root, link_step

INGEST = Path(__file__).parent / "scripts" / "ingest_run.py"


def ingest_run(*args: str, timeout: float = 300) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(INGEST), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl"
    from tests.integration.scripts.ingest_run import make_corpus

    make_corpus(path, 6)
    return path


def test_kill_9_mid_tokenization_then_rerun_keeps_only_verified_shards_and_matches_a_clean_run(corpus, tmp_path):
    from acceltrain.data import SourceSpec, TextSource, ingest
    from tests.integration.scripts.ingest_run import word_tokenizer

    source = TextSource(SourceSpec(str(corpus)))  # the clean run, in this process: same shards
    done = ingest(source.documents(), word_tokenizer(), tmp_path / "clean", key=source.key(), workers=1,
                  shard_bytes=500_000)
    clean = {"shards": len(done.shards), "tokens": done.num_tokens, "root": str(done.root)}
    assert clean["shards"] >= 6

    cache = tmp_path / "cache"
    cache.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(INGEST), str(corpus), str(cache), "--workers", "2",
                             "--shard-bytes", "500000", "--pause-after-shard", "3"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    while not (cache / "PAUSED").exists():
        assert proc.poll() is None and time.time() < deadline, "the run never reached shard 3"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job: the main process and its tokenizer workers
    proc.wait()
    leftovers = [p for p in cache.iterdir() if p.name != "PAUSED"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".") and ".tmp-" in leftovers[0].name
    assert not (leftovers[0] / "manifest.json").exists()
    assert (leftovers[0] / "shard-000003.json").exists()
    complete = 0  # the leading shards with a sidecar: the only ones a rerun may keep (after checksums)
    while (leftovers[0] / f"shard-{complete:06d}.json").exists():
        complete += 1

    again = ingest_run(str(corpus), str(cache), "--workers", "2", "--shard-bytes", "500000")
    assert not again["from_cache"] and again["tokens"] == clean["tokens"]
    assert again["reused"] == complete >= 1
    assert not leftovers[0].exists()  # the dead run's folder was taken over, nothing else is left
    assert sorted(p.name for p in cache.iterdir()) == sorted(["PAUSED", Path(again["root"]).name])
    for name in sorted(os.listdir(clean["root"])):
        assert (Path(again["root"]) / name).read_bytes() == (Path(clean["root"]) / name).read_bytes(), name


def test_peak_memory_stays_under_a_cap_a_quarter_of_the_corpus(tmp_path):
    """The cap: the ingesting process's RSS once imports and the tokenizer are loaded (its peak is
    reset there), plus a quarter of the corpus. Streaming stays under it; reading the corpus into a
    list (the old path) does not."""
    path = tmp_path / "big.jsonl"
    streamed = ingest_run(str(path), str(tmp_path / "cache"), "--make-mb", "120", "--workers", "1")
    size_kib = path.stat().st_size // 1024
    assert size_kib > 110_000
    cap = streamed["before_kib"] + size_kib // 4
    assert streamed["tokens"] > 1_000_000 and streamed["shards"] > 50
    assert streamed["peak_kib"] < cap, (streamed, cap)
    listed = ingest_run(str(path), str(tmp_path / "cache2"), "--in-memory")
    assert listed["peak_kib"] > cap, (listed, cap)  # the cap would catch a corpus held in memory


MIXTURE = Path(__file__).parent / "scripts" / "mixture_resume_run.py"


def mixture_corpora(folder: Path) -> tuple[Path, Path]:
    import random

    from tests.integration.scripts.ingest_run import WORDS

    paths = []
    for name, seed, n in (("code", 1, 300), ("prose", 2, 120)):
        rng = random.Random(seed)
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS[seed::2]) for _ in range(rng.randint(3, 40)))})
                                + "\n" for _ in range(n)))
        paths.append(path)
    return paths[0], paths[1]


@pytest.mark.multiproc
def test_sigterm_on_a_sharded_mixture_with_two_ranks_and_two_workers_resumes_bit_identically(tmp_path):
    from tests.conftest import torchrun
    from tests.integration.test_resume import N, assert_identical_end, steps

    code, prose = mixture_corpora(tmp_path)
    a, b = tmp_path / "a", tmp_path / "b"
    torchrun(MIXTURE, str(a), str(code), str(prose), "--max-steps", str(N))
    proc = torchrun(MIXTURE, str(b), str(code), str(prose), "--max-steps", str(N), "--kill-at", "5", "--kill-rank", "1",
                    check=False)
    assert proc.returncode != 0
    saved = 6  # the signal reached rank 1 after step 5; the ranks agree in step 6 and save it
    assert link_step(ckpt_root(b)) == saved
    torchrun(MIXTURE, str(b), str(code), str(prose), "--max-steps", str(N))
    ingests = {r: [json.loads(x)["from_cache"] for x in (a / f"ingest_rank{r}.jsonl").read_text().splitlines()]
               for r in (0, 1)}
    assert ingests == {0: [[False, False]], 1: [[True, True]]}  # tokenized once, by the main process
    assert [json.loads(x)["from_cache"] for x in (b / "ingest_rank0.jsonl").read_text().splitlines()] == [
        [False, False], [True, True]]  # the resumed run tokenizes nothing
    final = torch_load(a / "final_rank0.pt")
    assert all(n > 1 for n in final["num_shards"])  # both sources really are sharded
    for rank in (0, 1):
        assert_identical_end(a, b, saved, rank)
        sa, sb = steps(a, rank), steps(b, rank)
        assert all(sb[s]["sources"] == sa[s]["sources"] for s in range(saved + 1, N + 1))
    drawn = [src for rank in (0, 1) for s in steps(a, rank).values() for src in s["sources"]]
    assert set(drawn) == {0, 1}  # both sources feed the run
    s0, s1 = steps(a, 0), steps(a, 1)
    assert not set(s0[1]["indices"]) & set(s1[1]["indices"])  # the ranks draw disjoint windows


def torch_load(path: Path) -> dict:
    import torch

    return torch.load(path, weights_only=True)
