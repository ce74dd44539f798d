"""Ingest a corpus in its own process, for the kill -9 and peak-memory tests of acceltrain/data/shards.py.

Usage: ingest_run.py CORPUS CACHE [--workers W] [--shard-bytes B] [--pause-after-shard I]
       [--in-memory] [--make-mb MB]

Prints one JSON line: tokens, shards, whether the cache was hit, this process's RSS (KiB) once
imports and the tokenizer are loaded (the peak is reset to it there), its peak from then on,
and the peak of its largest child.
``--pause-after-shard I`` writes CACHE/PAUSED once shard I is complete and then sleeps, so a
test can kill -9 the process group in the middle of tokenizing. ``--in-memory`` only reads every
document into a list (what the recipe did before streaming), to show that the test's cap bites.
``--make-mb MB`` first writes a JSON-lines corpus of about MB megabytes to CORPUS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

# Long words: one token per ~40 bytes keeps tokenizing a few hundred MB quick on a loaded machine.
WORDS = [f"{w}{i:02d}" * 4 for i, w in enumerate(["trainer", "shard", "window", "sampler", "gradient"] * 4)]


def word_tokenizer():
    """A fast word-level tokenizer built from a config (no download); EOS is id 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", unk_token="<unk>")


def make_corpus(path: Path, mb: float) -> None:
    import random

    rng = random.Random(0)
    block = "".join(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 400)))}) + "\n"
                    for _ in range(400))
    with open(path, "w") as f:
        for i in range(max(1, int(mb * 1e6 / len(block)))):
            f.write(block.replace('"text": "', f'"text": "{WORDS[i % len(WORDS)]} ', 1))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_kib() -> int:
    """This process's peak RSS in KiB: VmHWM, not ru_maxrss, which also keeps the RSS the process
    had before exec (a fork of a large parent, such as a pytest session, starts that large)."""
    return _status_kib("VmHWM")


def children_peak_kib() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux


def reset_peak() -> int:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0) and return that, in KiB.

    Without it the peak would still hold transients of the imports, which vary from run to run."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kib("VmRSS")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("corpus", type=Path)
    ap.add_argument("cache", type=Path)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--shard-bytes", type=int, default=1 << 20)
    ap.add_argument("--pause-after-shard", type=int)
    ap.add_argument("--in-memory", action="store_true")
    ap.add_argument("--make-mb", type=float)
    args = ap.parse_args()
    if args.make_mb:
        make_corpus(args.corpus, args.make_mb)

    import acceltrain.data.shards as shards
    from acceltrain.data.sources import SourceSpec, TextSource

    if args.pause_after_shard is not None:
        original = shards._write_json_atomic

        def pausing(path: Path, data: dict) -> None:
            original(path, data)
            if path.name == f"shard-{args.pause_after_shard:06d}.json":
                (args.cache / "PAUSED").write_text(str(path.parent))
                time.sleep(600)

        shards._write_json_atomic = pausing  # forked workers inherit the patch

    tok = word_tokenizer()
    source = TextSource(SourceSpec(str(args.corpus)))
    key = source.key()
    tok("warm up", add_special_tokens=False)
    before = reset_peak()
    if args.in_memory:  # the list alone is the point: no need to tokenize it
        docs = list(source.documents())
        print(json.dumps({"documents": len(docs), "before_kib": before, "peak_kib": peak_kib()}))
        return
    docs = source.documents()
    corpus = shards.ingest(docs, tok, args.cache, key=key, workers=args.workers, shard_bytes=args.shard_bytes)
    print(json.dumps({"tokens": corpus.num_tokens, "shards": len(corpus.shards), "from_cache": corpus.from_cache,
                      "reused": corpus.reused_shards,
                      "root": str(corpus.root), "before_kib": before, "peak_kib": peak_kib(),
                      "child_peak_kib": children_peak_kib()}))


if __name__ == "__main__":
    main()
