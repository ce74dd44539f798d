"""Transformer Builder's model test tiers: quick checks of a language model before training it.

Tier 1 (critical, seconds on a small model): shape robustness, gradient flow, output
stability, parameter initialisation, memory footprint, inference speed. Tier 2 (analysis):
attention patterns, gradient x input attribution, sensitivity to a one-token change. Each
check returns ``{"passed": bool, ...figures}``; a tier returns ``{check: result}`` and prints a
line per check. Tier 3 (training: fine-tuning loop, hyperparameter search, GLUE) is in
:mod:`.tb_tier3`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from .tb_tier3 import TIER3

__all__ = ["run_all_tier1_tests", "run_all_tier2_tests", "run_all_tier3_tests", "run_all_tests"]


def _settings(model: torch.nn.Module, config: Any) -> tuple[int, int]:
    get = (lambda k: config.get(k)) if isinstance(config, dict) else (lambda k: getattr(config, k, None))
    mc = getattr(model, "config", None)
    vocab = (get("vocab_size") if config is not None else None) or getattr(mc, "vocab_size", None)
    seq = (get("max_seq_len") if config is not None else None) or getattr(mc, "max_position_embeddings", None) or 64
    if vocab is None:
        raise ValueError("config: needs vocab_size (or a model with config.vocab_size)")
    return int(vocab), int(min(seq, 64))


def _logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs: Any) -> Any:
    out = model(input_ids=ids, **kwargs) if hasattr(model, "config") else model(ids)
    return out


def _tensor(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out


def _ids(vocab: int, batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------- tier 1
def check_shapes(model: torch.nn.Module, vocab: int, seq: int) -> dict[str, Any]:
    shapes = [(1, 2), (2, max(2, seq // 2)), (3, seq)]
    got = {}
    with torch.no_grad():
        for b, t in shapes:
            got[f"{b}x{t}"] = tuple(_tensor(_logits(model, _ids(vocab, b, t))).shape)
    ok = all(shape[:2] == (b, t) for (b, t), shape in zip(shapes, got.values(), strict=True))
    return {"passed": ok, "output_shapes": got}


def check_gradient_flow(model: torch.nn.Module, vocab: int, seq: int) -> dict[str, Any]:
    model.zero_grad(set_to_none=True)
    ids = _ids(vocab, 2, seq)
    out = _logits(model, ids, labels=ids) if hasattr(model, "config") else _logits(model, ids)
    loss = out.loss if getattr(out, "loss", None) is not None else _tensor(out).float().pow(2).mean()
    loss.backward()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in params if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for _, p in params)
    model.zero_grad(set_to_none=True)
    return {"passed": finite and not missing, "loss": float(loss), "no_gradient": missing[:10],
            "parameters_with_gradient": len(params) - len(missing)}


def check_output_stability(model: torch.nn.Module, vocab: int, seq: int) -> dict[str, Any]:
    ids = _ids(vocab, 2, seq, seed=1)
    with torch.no_grad():
        a, b = _tensor(_logits(model, ids)), _tensor(_logits(model, ids))
    finite = bool(torch.isfinite(a).all())
    return {"passed": finite and torch.equal(a, b), "finite": finite, "deterministic_in_eval": torch.equal(a, b),
            "max_abs_logit": float(a.abs().max())}


def check_initialization(model: torch.nn.Module, vocab: int, seq: int) -> dict[str, Any]:
    bad, stds = [], {}
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            bad.append(f"{name}: not finite")
        elif p.dim() >= 2:
            std = float(p.float().std())
            stds[name] = std
            if not 1e-4 < std < 1.0:  # collapsed, or large enough to saturate activations
                bad.append(f"{name}: std {std:.3g}")
    return {"passed": not bad, "problems": bad[:10], "weight_std_range": [min(stds.values(), default=0.0),
                                                                          max(stds.values(), default=0.0)]}


def check_memory(model: torch.nn.Module, vocab: int, seq: int) -> dict[str, Any]:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    training = 4 * params  # weights, gradients, AdamW's two moments
    return {"passed": True, "parameter_mib": params / 2**20, "buffer_mib": buffers / 2**20,
            "adamw_training_state_mib": training / 2**20}


def check_speed(model: torch.nn.Module, vocab: int, seq: int, repeats: int = 5) -> dict[str, Any]:
    ids = _ids(vocab, 1, seq)
    with torch.no_grad():
        _logits(model, ids)
        start = time.perf_counter()
        for _ in range(repeats):
            _logits(model, ids)
    ms = (time.perf_counter() - start) / repeats * 1000
    return {"passed": math.isfinite(ms), "ms_per_forward": ms, "tokens_per_second": seq / (ms / 1000)}


# ---------------------------------------------------------------------- tier 2
def check_attention(model: torch.nn.Module, vocab: int, seq: int) -> dict[str, Any]:
    if not hasattr(model, "config"):
        return {"passed": False, "reason": "needs a transformers model (output_attentions=True)"}
    ids = _ids(vocab, 1, seq, seed=2)
    original = getattr(model.config, "_attn_implementation", None)
    switch = original not in (None, "eager") and hasattr(model, "set_attn_implementation")
    if switch:  # SDPA / flash kernels return no weights: look with the eager implementation
        model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True)
    finally:
        if switch:
            model.set_attn_implementation(original)
    attentions = getattr(out, "attentions", None)
    if not attentions or any(a is None for a in attentions):
        return {"passed": False, "reason": "the model returned no attention weights (try attn_implementation='eager')"}
    entropies, sums_ok = [], True
    for a in attentions:  # (B, heads, T, T)
        sums_ok &= bool(torch.allclose(a.sum(-1), torch.ones_like(a.sum(-1)), atol=1e-4))
        entropies.append(float(-(a.clamp_min(1e-12).log() * a).sum(-1).mean()))
    return {"passed": sums_ok, "layers": len(attentions), "mean_entropy_per_layer": entropies}


def check_attribution(model: torch.nn.Module, vocab: int, seq: int) -> dict[str, Any]:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None:
        return {"passed": False, "reason": "needs get_input_embeddings()"}
    ids = _ids(vocab, 1, seq, seed=3)
    x = emb(ids).detach().requires_grad_(True)  # (1, T, C)
    logits = _tensor(model(inputs_embeds=x))
    logits[0, -1].max().backward()
    scores = (x.grad * x).sum(-1).abs()[0]  # gradient x input per position
    model.zero_grad(set_to_none=True)
    return {"passed": bool(torch.isfinite(scores).all()), "attribution_per_position": scores.tolist()}


def check_perturbation(model: torch.nn.Module, vocab: int, seq: int) -> dict[str, Any]:
    ids = _ids(vocab, 1, seq, seed=4)
    changed = ids.clone()
    changed[0, 0] = (changed[0, 0] + 1) % vocab
    with torch.no_grad():
        a, b = _tensor(_logits(model, ids)), _tensor(_logits(model, changed))
    delta = float((a - b).norm() / a.norm().clamp_min(1e-12))
    return {"passed": math.isfinite(delta) and delta > 0, "relative_output_change": delta}


_TIER1: dict[str, Callable[..., dict[str, Any]]] = {
    "shape_robustness": check_shapes, "gradient_flow": check_gradient_flow, "output_stability": check_output_stability,
    "parameter_initialization": check_initialization, "memory_footprint": check_memory, "inference_speed": check_speed}
_TIER2: dict[str, Callable[..., dict[str, Any]]] = {
    "attention_patterns": check_attention, "feature_attribution": check_attribution,
    "input_perturbation": check_perturbation}


def _run(checks: dict[str, Callable[..., dict[str, Any]]], model: torch.nn.Module, config: Any,
         with_config: bool = False) -> dict[str, Any]:
    vocab, seq = _settings(model, config)
    was_training = model.training
    results = {}
    try:
        for name, check in checks.items():
            model.train(name == "gradient_flow")
            results[name] = check(model, vocab, seq, config) if with_config else check(model, vocab, seq)
            r = results[name]
            print(f"{'SKIP' if r.get('skipped') else 'PASS' if r['passed'] else 'FAIL'} {name}"
                  + (f" ({r['reason']})" if r.get("skipped") else ""))
    finally:
        model.train(was_training)
    return results


def run_all_tier1_tests(model: torch.nn.Module, config: Any = None) -> dict[str, Any]:
    """Tier 1: ``config`` gives ``vocab_size`` (and ``max_seq_len``) unless the model's config does."""
    return _run(_TIER1, model, config)


def run_all_tier2_tests(model: torch.nn.Module, config: Any = None) -> dict[str, Any]:
    """Tier 2: attention patterns, attribution, perturbation."""
    return _run(_TIER2, model, config)


def run_all_tier3_tests(model: torch.nn.Module, config: Any = None) -> dict[str, Any]:
    """Tier 3 (training, on copies of the model): fine-tuning loop, hyperparameter search, GLUE
    linear probe; see :mod:`.tb_tier3` for the ``config`` keys each reads."""
    return _run(TIER3, model, config, with_config=True)


def run_all_tests(model: torch.nn.Module, config: Any = None) -> dict[str, Any]:
    """Tiers 1, 2 and 3: ``{"tier1": ..., "tier2": ..., "tier3": ...}``."""
    return {"tier1": run_all_tier1_tests(model, config), "tier2": run_all_tier2_tests(model, config),
            "tier3": run_all_tier3_tests(model, config)}
