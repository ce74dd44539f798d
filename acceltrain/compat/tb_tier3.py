"""Transformer Builder's test tier 3 (training): fine-tuning loop, hyperparameter search, GLUE.

Each check trains a *copy* of the model (the caller's weights are never changed) with
acceltrain's one-call :class:`acceltrain.Trainer`, so it exercises the loop the model will be
trained with. On a small model the tier takes seconds; the seed's "~120 minutes" is a real GLUE
run on a real model.

- ``fine_tuning_loop``: ``steps`` updates on a few fixed batches of random tokens; passes when
  the mean loss over them fell (a model that cannot fit four batches will not train).
- ``hyperparameter_search``: the same run for every learning rate of the grid
  (:class:`acceltrain.sweep.ParameterGrid`); reports each final loss and the best LR.
- ``glue_benchmark``: a linear probe on the frozen model's mean-pooled last hidden states
  (a classifier trained on the train split, accuracy on the validation split, beside the
  majority-class baseline); passes when the probe is at least as good as the baseline. The data
  is ``config["glue_data"]`` (a ``DatasetDict`` with the task's text columns, tokenized with
  ``config["tokenizer"]``, or ``{"train": (input_ids, labels), "validation": (...)}`` tensors),
  else the task (``config["glue_task"]``, default ``"sst2"``) from the Hub with
  ``config["tokenizer"]``; offline or without a tokenizer the check says it was skipped and why.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["check_fine_tuning", "check_hyperparameter_search", "check_glue", "TIER3", "GLUE_COLUMNS"]

#: GLUE task -> its text column(s) (the second is None for single-sentence tasks).
GLUE_COLUMNS = {"cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
                "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"),
                "mnli": ("premise", "hypothesis"), "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"),
                "wnli": ("sentence1", "sentence2")}


def _get(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
    return default if value is None else value


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _token_batches(vocab: int, seq: int, n: int = 4, batch: int = 4, seed: int = 10) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids})
    return out


@torch.no_grad()
def _mean_loss(adapter: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    was = adapter.training
    adapter.eval()
    device = _device(adapter)
    losses = [float(adapter(**{k: v.to(device) for k, v in b.items()})["loss"]) for b in batches]
    adapter.train(was)
    return sum(losses) / len(losses)


def _fine_tune(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], lr: float,
               steps: int) -> tuple[float, float]:
    """(mean loss before, after) ``steps`` updates of a copy of ``model`` on ``batches``."""
    from ..one_call import Trainer
    from .tb_parts import UniversalModelAdapter

    adapter = UniversalModelAdapter(copy.deepcopy(model))
    before = _mean_loss(adapter, batches)
    trainer = Trainer(adapter, train_dataloader=batches, device=_device(model),
                      config={"max_steps": steps, "learning_rate": lr, "scheduler": "constant", "log_interval": steps})
    trainer.train()
    return before, _mean_loss(trainer.unwrapped_model, batches)


def check_fine_tuning(model: torch.nn.Module, vocab: int, seq: int, config: Any = None) -> dict[str, Any]:
    steps, lr = int(_get(config, "tier3_steps", 30)), float(_get(config, "learning_rate", 1e-3))
    before, after = _fine_tune(model, _token_batches(vocab, seq), lr, steps)
    return {"passed": math.isfinite(after) and after < before, "loss_before": before, "loss_after": after,
            "steps": steps, "learning_rate": lr}


def check_hyperparameter_search(model: torch.nn.Module, vocab: int, seq: int, config: Any = None) -> dict[str, Any]:
    from ..sweep import ParameterGrid

    steps = int(_get(config, "tier3_steps", 30))
    grid = ParameterGrid().add_parameter("learning_rate", list(_get(config, "learning_rates", [1e-4, 1e-3, 1e-2])))
    batches = _token_batches(vocab, seq)
    losses, before = {}, None
    for params in grid:
        before, losses[params["learning_rate"]] = _fine_tune(model, batches, params["learning_rate"], steps)
    finite = {lr: loss for lr, loss in losses.items() if math.isfinite(loss)}
    best = min(finite, key=finite.get) if finite else None
    return {"passed": best is not None and finite[best] < before, "loss_before": before, "final_loss_per_lr": losses,
            "best_learning_rate": best, "steps": steps}


# ---------------------------------------------------------------------- GLUE (linear probe)
def _tokenized(split: Any, task: str, tokenizer: Any, seq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    first, second = GLUE_COLUMNS[task]
    texts = list(split[first])
    pairs = list(split[second]) if second else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=seq, padding="max_length", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.as_tensor(list(split["label"]))


def _glue_splits(config: Any, task: str, seq: int) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    data, tokenizer = _get(config, "glue_data"), _get(config, "tokenizer")
    if isinstance(data, dict) and all(isinstance(v, (tuple, list)) for v in data.values()):
        out = {}
        for name, (ids, labels) in data.items():
            ids = torch.as_tensor(ids)
            out[name] = (ids, torch.ones_like(ids), torch.as_tensor(labels))
        return out
    if tokenizer is None:
        raise ValueError("needs config['tokenizer'] to tokenize the GLUE sentences (or tokenized config['glue_data'])")
    if data is None:
        import datasets

        data = datasets.load_dataset("nyu-mll/glue", task)
    val = "validation_matched" if task == "mnli" else "validation"
    return {"train": _tokenized(data["train"], task, tokenizer, seq), "validation": _tokenized(data[val], task, tokenizer, seq)}


@torch.no_grad()
def _features(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """(N, C): the last hidden state averaged over the real tokens (logits for non-transformers models)."""
    was = model.training
    model.eval()
    device, out = _device(model), []
    for i in range(0, ids.shape[0], batch):
        x, m = ids[i:i + batch].to(device), mask[i:i + batch].to(device)
        if hasattr(model, "config"):
            h = model(input_ids=x, attention_mask=m, output_hidden_states=True).hidden_states[-1]  # (B, T, C)
        else:
            h = model(x)
            h = h.logits if hasattr(h, "logits") else h
        w = m.unsqueeze(-1).to(h.dtype)
        out.append(((h * w).sum(1) / w.sum(1).clamp_min(1)).float().cpu())
    model.train(was)
    return torch.cat(out)


def check_glue(model: torch.nn.Module, vocab: int, seq: int, config: Any = None) -> dict[str, Any]:
    from ..one_call import Trainer

    task = str(_get(config, "glue_task", "sst2"))
    if task not in GLUE_COLUMNS:
        raise ValueError(f"glue_task must be one of {sorted(GLUE_COLUMNS)}, got {task!r}")
    if task == "stsb":
        raise ValueError("glue_task 'stsb' is a regression task: the probe here classifies")
    try:
        splits = _glue_splits(config, task, seq)
    except (OSError, ImportError, ValueError) as e:  # offline, no datasets, no tokenizer: say so, don't guess
        return {"passed": False, "skipped": True, "task": task, "reason": str(e).splitlines()[0]}
    train_x = _features(model, *splits["train"][:2])
    val_x = _features(model, *splits["validation"][:2])
    train_y, val_y = splits["train"][2].long(), splits["validation"][2].long()
    classes = int(max(train_y.max(), val_y.max())) + 1
    mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)  # standardised features
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset((train_x - mean) / std, train_y),
                                         batch_size=32, shuffle=True)
    with torch.random.fork_rng(devices=[]):  # a seeded probe; the caller's RNG is left as it was
        torch.manual_seed(0)
        probe = torch.nn.Linear(train_x.shape[1], classes)
    epochs = int(_get(config, "glue_epochs", 20))
    Trainer(probe, train_dataloader=loader, criterion=F.cross_entropy, device="cpu", data_seed=0,
            config={"epochs": epochs, "learning_rate": 1e-2, "scheduler": "constant", "log_interval": 10**9}).train()
    with torch.no_grad():
        accuracy = float((probe((val_x - mean) / std).argmax(-1) == val_y).float().mean())
    baseline = float(torch.bincount(val_y, minlength=classes).max()) / len(val_y)
    return {"passed": accuracy >= baseline, "task": task, "accuracy": accuracy, "majority_baseline": baseline,
            "train_examples": len(train_y), "validation_examples": len(val_y), "probe_epochs": epochs}


TIER3 = {"fine_tuning_loop": check_fine_tuning, "hyperparameter_search": check_hyperparameter_search,
         "glue_benchmark": check_glue}
