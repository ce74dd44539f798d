"""The ``--scale`` rows of benchmarks/data.py: streaming ingest at 0.25x and 1x of a generated corpus."""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from _common import OtherLoad, emit_result, format_table, machine_info, peak_rss_mib, run_worker, write_json

_ROOT = Path(__file__).resolve().parents[1]
_BARE_BYTES = 64_000_000


def make_corpus(path: Path, target_bytes: int) -> int:
    """Write stdlib source documents as JSON lines, cycling with a per-copy header, up to the target."""
    from acceltrain.data import python_stdlib_corpus

    docs = python_stdlib_corpus(None)
    written = 0
    with open(path, "w") as f:
        copy = 0
        while written < target_bytes:
            for doc in docs:
                line = json.dumps({"text": f"# copy {copy}\n{doc}"}) + "\n"
                f.write(line)
                written += len(line)
                if written >= target_bytes:
                    break
            copy += 1
    return written


def row(kind: str, corpus: str, tokenizer: str, workers: str) -> None:
    """One measured row, in this fresh interpreter."""
    from transformers import PreTrainedTokenizerFast

    from acceltrain.data.shards import ingest
    from acceltrain.data.sources import SourceSpec, TextSource

    tok = PreTrainedTokenizerFast.from_pretrained(tokenizer)
    source = TextSource(SourceSpec(corpus))
    before = peak_rss_mib()
    if kind == "bare":  # the text is read first: this row times the tokenizer's batch call alone
        from acceltrain.data.sources import take_bytes

        docs = list(take_bytes(source.documents(), _BARE_BYTES))
        text_bytes = sum(len(d.encode("utf-8")) for d in docs)
        backend, tokens = tok.backend_tokenizer, 0
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(0, len(docs), 256):
            tokens += sum(len(e.ids) for e in backend.encode_batch_fast(docs[i:i + 256], add_special_tokens=False))
    else:
        t0, c0 = time.perf_counter(), time.process_time()
        with tempfile.TemporaryDirectory(dir=Path(corpus).parent) as cache:
            corpus_ = ingest(source.documents(), tok, cache, key=source.key() + workers, workers=int(workers))
            tokens = corpus_.num_tokens - corpus_.num_documents  # EOS are not the tokenizer's work
        text_bytes = os.path.getsize(corpus)
    wall = time.perf_counter() - t0
    emit_result({"kind": kind, "workers": int(workers), "tokens": tokens, "seconds": wall, "text_mb": text_bytes / 1e6,
                 "tokens_per_s": tokens / wall, "cpu_s": time.process_time() - c0,
                 # Forked tokenizer workers' CPU time: on a shared machine, tokens per CPU-second is
                 # the figure the load does not distort (wall-clock rates are then only a floor).
                 "children_cpu_s": (lambda u: u.ru_utime + u.ru_stime)(resource.getrusage(resource.RUSAGE_CHILDREN)),
                 "rss_before_mib": before, "peak_rss_mib": peak_rss_mib(),
                 "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024})


def scale(gb: float, out: Path) -> None:
    from acceltrain.data import python_stdlib_corpus, train_bpe_tokenizer
    from acceltrain.data.shards import default_workers

    cores = default_workers()
    env = {**os.environ, "RAYON_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(_ROOT)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok_dir = tmp / "tok"
        train_bpe_tokenizer(python_stdlib_corpus(3_000_000), 4096, tok_dir)
        small, big = tmp / "small.jsonl", tmp / "big.jsonl"
        make_corpus(small, int(gb * 0.25e9))
        make_corpus(big, int(gb * 1e9))
        plan = [("bare", small, 1), ("ingest", small, 1), ("ingest", small, cores), ("ingest", big, cores)]
        for kind, corpus, workers in plan:
            cmd = [sys.executable, str(_ROOT / "benchmarks" / "data.py"), "--_row", kind, str(corpus), str(tok_dir),
                   str(workers)]
            with OtherLoad() as load:
                result = run_worker(cmd, env, timeout=6 * 3600, cwd=_ROOT)
            result["other_cpus"] = load.cpus
            result["corpus_gb"] = os.path.getsize(corpus) / 1e9
            rows.append(result)
            print(json.dumps(result), file=sys.stderr)
    bare = rows[0]["tokens_per_s"]
    table = [[r["kind"], f"{r['corpus_gb']:.2f}", str(r["workers"]), f"{r['tokens_per_s']:,.0f}",
              f"{r['tokens_per_s'] / bare:.2f}", f"{r['peak_rss_mib']:.0f}", f"{r['worker_peak_rss_mib']:.0f}",
              f"{r['other_cpus']:.2f}" if r["other_cpus"] is not None else "-"] for r in rows]
    print(format_table(["row", "corpus GB", "workers", "tokens/s", "x bare 1-core", "peak RSS MiB",
                        "worker peak MiB", "other_cpus"], table))
    summary = {"cores": cores, "all_workers_vs_cores_x_bare": rows[3]["tokens_per_s"] / (cores * bare),
               "peak_rss_1x_over_0.25x": rows[3]["peak_rss_mib"] / rows[2]["peak_rss_mib"]}
    print(json.dumps(summary))
    write_json(out, {"machine": machine_info(), "rows": rows, "summary": summary})
