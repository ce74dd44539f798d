"""Tokenize + pack throughput against calling the fast tokenizer directly on the same text.

    python benchmarks/data.py [--repeats 3] [--max_bytes 3000000] [--out benchmarks/results/data.json]
    python benchmarks/data.py --scale [--gb 1.0] [--out benchmarks/results/data_scale.json]

Both sides tokenize the same documents (this Python's standard library, the pretraining
recipe's default corpus) with the same tokenizer on one thread (tokens/s per core):
``direct`` is ``tokenizer(texts, add_special_tokens=False)`` in batches of 1,000 (ids only:
no attention masks or token type ids, as the packer asks for) and nothing else; ``pack_texts`` is acceltrain's packer writing the flat token memmap with EOS after every
document, with an empty cache each time (a cache hit is also shown). The data-wait share of
training steps is measured by benchmarks/throughput.py.

``--scale``: the streaming ingest of ``acceltrain.data.shards`` on a generated JSON-lines corpus
(this Python's stdlib source, cycled with a distinct header per copy) of ``--gb`` GB and of a
quarter of that. Each row runs in a fresh interpreter and reports tokens/s of the whole ingest
(read + tokenize + write shards) and peak RSS (the main process, and the largest worker, whose
figure includes pages it shares with the main process since it is forked from it). Rows: the
bare fast tokenizer's batch call on one core over the first 64 MB of the same text (its rate is
per token and does not depend on the corpus size), ingest with 1 worker and with every core at
the small size, and with every core at the full size. ``other_cpus`` is how many CPUs other
processes kept busy meanwhile: above ~0.15 the machine was shared and the row is suspect.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # the fast tokenizer's thread pool: one core
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from acceltrain.data import load_texts, pack_texts, texts_fingerprint, train_bpe_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max_bytes", type=int, default=3_000_000)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--scale", action="store_true", help="the streaming ingest on a generated corpus of --gb GB")
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--_row", nargs=4, metavar=("KIND", "CORPUS", "TOKENIZER", "WORKERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._row:
        from data_scale import row

        row(*args._row)
        return
    if args.scale:
        from data_scale import scale

        scale(args.gb, args.out or Path(__file__).parent / "results" / "data_scale.json")
        return
    args.out = args.out or Path(__file__).parent / "results" / "data.json"
    texts = load_texts("python-stdlib", max_bytes=args.max_bytes)
    fingerprint = texts_fingerprint(texts)
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_bpe_tokenizer(texts, 4096, Path(tmp) / "tok", fingerprint=fingerprint)
        direct_s, pack_s, hit_s, tokens = [], [], [], 0
        for r in range(args.repeats):
            t0 = time.perf_counter()
            n = 0
            for i in range(0, len(texts), 1000):
                ids = tok(texts[i:i + 1000], add_special_tokens=False, return_attention_mask=False,
                          return_token_type_ids=False, verbose=False)["input_ids"]
                n += sum(len(x) for x in ids)
            direct_s.append(time.perf_counter() - t0)
            cache = Path(tmp) / f"cache{r}"
            t0 = time.perf_counter()
            corpus = pack_texts(texts, tok, cache, fingerprint=fingerprint)
            pack_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            again = pack_texts(texts, tok, cache, fingerprint=fingerprint)
            hit_s.append(time.perf_counter() - t0)
            assert again.from_cache and corpus.num_tokens == n + len(texts)  # one EOS per document
            tokens = n
    direct, pack, hit = (statistics.median(v) for v in (direct_s, pack_s, hit_s))
    print(f"{len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} MB, {tokens:,} tokens, one core, median of {args.repeats}")
    print(f"{'':22} {'seconds':>8} {'tokens/s':>12} {'cost vs direct':>15}")
    print(f"{'tokenizer, direct':22} {direct:8.2f} {tokens / direct:12,.0f} {'':>15}")
    print(f"{'pack_texts (no cache)':22} {pack:8.2f} {tokens / pack:12,.0f} {100 * (pack / direct - 1):+14.1f}%")
    print(f"{'pack_texts (cache hit)':22} {hit:8.3f} {'':>12} {'':>15}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"tokens": tokens, "direct_s": direct, "pack_s": pack, "cache_hit_s": hit,
                                    "pack_overhead": pack / direct - 1}, indent=1) + "\n")


if __name__ == "__main__":
    main()
