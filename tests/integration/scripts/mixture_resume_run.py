"""Train a tiny LM on a weighted mixture of two sharded corpora, interruptible by SIGTERM, for exact resume.

Usage: mixture_resume_run.py WORKSPACE CODE.jsonl PROSE.jsonl --max-steps N [--kill-at K [--kill-rank R]]

The corpora are tokenized into small shards (main process first, the other rank finds the
cache), mixed 0.7/0.3 by :func:`acceltrain.data.mixture.build_mixture` and served through a
shuffled ``DataLoader`` with 2 workers, which the trainer rebuilds around its resumable sampler.
Each rank appends one JSON line per step to WORKSPACE/steps_rank{r}.jsonl (loss, lr, the
mixture indices and their sources) and writes its model and optimizer state to
WORKSPACE/final_rank{r}.pt at the end (the format tests/integration/test_resume.py compares).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from acceltrain import BaseHook, BaseTrainer, CheckpointingHook  # noqa: E402
from acceltrain.config import exit_on_user_error  # noqa: E402
from acceltrain.data.mixture import build_mixture  # noqa: E402
from acceltrain.data.shards import ingest  # noqa: E402
from acceltrain.data.sources import SourceSpec, TextSource  # noqa: E402
from tests.integration.scripts.ingest_run import word_tokenizer  # noqa: E402
from tests.integration.scripts.resume_run import KillAfterStep  # noqa: E402

SEQ = 8


class Indexed(torch.utils.data.Dataset):
    """The mixture's items with their index and source, so the log can show the order."""

    def __init__(self, mixture):
        self.mixture = mixture

    def __len__(self) -> int:
        return len(self.mixture)

    def __getitem__(self, i: int) -> dict:
        return {**self.mixture[i], "index": i, "source": self.mixture.source_of(i)}


class StepLog(BaseHook):
    def __init__(self, path: Path):
        self.path = path
        self.indices: list[int] = []
        self.sources: list[int] = []

    def on_before_step(self, trainer):
        self.indices, self.sources = [], []

    def on_after_step(self, trainer):
        line = {"step": trainer.step, "loss": trainer.step_info["loss"].item(), "indices": self.indices,
                "sources": self.sources, "lr": trainer.step_info["lr"][0]}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


class MixtureTrainer(BaseTrainer):
    def __init__(self, args: argparse.Namespace, **kwargs):
        super().__init__(**kwargs)
        self.args = args
        self.tok = word_tokenizer()
        cache = args.workspace / "cache"
        with self.accelerator.main_process_first():  # tokenized once; the other rank opens the cache
            corpora = []
            for path in (args.code, args.prose):
                source = TextSource(SourceSpec(str(path)), hash_cache=cache / "filehash")
                corpora.append(ingest(source.documents(), self.tok, cache / "shards", key=source.key(), workers=2,
                                      shard_bytes=20_000))
        self.mixture, _ = build_mixture(corpora, seq_len=SEQ, weights=[0.7, 0.3], names=["code", "prose"], seed=5)
        self.num_shards = [len(c.shards) for c in corpora]
        rank = self.accelerator.process_index
        with open(args.workspace / f"ingest_rank{rank}.jsonl", "a") as f:  # which rank tokenized
            f.write(json.dumps({"from_cache": [c.from_cache for c in corpora]}) + "\n")

    def build_data_loader(self):
        return torch.utils.data.DataLoader(Indexed(self.mixture), batch_size=4, shuffle=True, num_workers=2)

    def build_model(self):
        torch.manual_seed(0)
        v = len(self.tok)
        return nn.Sequential(nn.Embedding(v, 16), nn.Dropout(0.2), nn.Linear(16, v))

    def build_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-2, weight_decay=0.1)

    def build_lr_scheduler(self):
        total = self.max_steps
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1 - 0.5 * min(s, total) / total)

    def build_hooks(self):
        rank = self.accelerator.process_index
        hooks = [StepLog(self.workspace / f"steps_rank{rank}.jsonl"), CheckpointingHook(interval=3, keep_previous=None)]
        if self.args.kill_at is not None:
            hooks.append(KillAfterStep(self.args.kill_at, self.args.kill_rank))
        return hooks

    def forward(self, input):
        self.hooks[0].indices.extend(input["index"].tolist())
        self.hooks[0].sources.extend(input["source"].tolist())
        x = input["input_ids"]  # (B, T)
        logits = self.model(x[:, :-1])  # (B, T-1, V)
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)), {}


@exit_on_user_error
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workspace", type=Path)
    ap.add_argument("code", type=Path)
    ap.add_argument("prose", type=Path)
    ap.add_argument("--max-steps", type=int, required=True)
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--kill-rank", type=int, default=0)
    args = ap.parse_args()
    trainer = MixtureTrainer(args, max_steps=args.max_steps, gradient_accumulation_steps=2, grad_clip=1.0,
                             workspace=args.workspace, device="cpu")
    trainer.train()
    rank = trainer.accelerator.process_index
    state = trainer.state_dict()
    torch.save({"model": state["model"], "optimizer": state["optimizer"], "step": trainer.step,
                "num_shards": trainer.num_shards}, args.workspace / f"final_rank{rank}.pt")


if __name__ == "__main__":
    main()
