"""Language-model metrics: perplexity, distinct-n diversity, repetition, BLEU.

Texts are split into words on whitespace (what distinct-n is defined over); BLEU is sacrebleu's
corpus BLEU (the ``metrics`` extra: ``pip install acceltrain[metrics]``), reported in [0, 1].

Example:
    >>> diversity_metrics(["a b a", "b c"])
    {'distinct_1': 0.6, 'distinct_2': 1.0}
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .config import UserError

__all__ = ["bleu_score", "distinct_n", "diversity_metrics", "generation_quality", "perplexity",
           "perplexity_of", "repetition_metrics"]


def perplexity(mean_loss: float) -> float:
    """``exp(mean next-token loss)``; infinity where that overflows a float."""
    return math.exp(mean_loss) if mean_loss < 700 else math.inf


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Iterable[str], n: int) -> float:
    """Distinct n-grams over all n-grams of ``texts`` (Li et al. 2016); 0 when there are none."""
    grams = [g for text in texts for g in _ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def diversity_metrics(texts: Sequence[str]) -> dict[str, float]:
    """``distinct_1`` and ``distinct_2`` of ``texts``."""
    return {"distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2)}


def repetition_metrics(texts: Sequence[str]) -> dict[str, float]:
    """How much each text repeats itself, averaged over texts: ``repetition_rate`` (words that
    repeat an earlier word of the same text), ``repeated_bigram_rate`` (the same for bigrams)
    and ``max_run`` (the longest run of one word, the mean over texts)."""
    if not texts:
        return {"repetition_rate": 0.0, "repeated_bigram_rate": 0.0, "max_run": 0.0}
    rates, bigram_rates, runs = [], [], []
    for text in texts:
        words = text.split()
        rates.append(1 - len(set(words)) / len(words) if words else 0.0)
        bigrams = _ngrams(words, 2)
        bigram_rates.append(1 - len(set(bigrams)) / len(bigrams) if bigrams else 0.0)
        longest = run = 0
        for i, word in enumerate(words):
            run = run + 1 if i and word == words[i - 1] else 1
            longest = max(longest, run)
        runs.append(float(longest))
    n = len(texts)
    return {"repetition_rate": sum(rates) / n, "repeated_bigram_rate": sum(bigram_rates) / n, "max_run": sum(runs) / n}


def bleu_score(predictions: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
    """Corpus BLEU in [0, 1] (sacrebleu; each prediction has one reference, or a list of them)."""
    try:
        import sacrebleu
    except ImportError:
        raise UserError("BLEU needs sacrebleu: pip install 'acceltrain[metrics]'") from None
    if len(predictions) != len(references):
        raise UserError(f"bleu: {len(predictions)} predictions but {len(references)} references")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    width = max((len(r) for r in refs), default=0)
    streams = [[r[i] if i < len(r) else "" for r in refs] for i in range(width)]
    return sacrebleu.corpus_bleu(list(predictions), streams).score / 100


def generation_quality(generated: Sequence[str], references: Sequence[str] | None = None) -> dict[str, float]:
    """Diversity, repetition, mean length in words and, with references, BLEU."""
    out: dict[str, float] = {**diversity_metrics(generated), **repetition_metrics(generated),
                             "mean_words": sum(len(t.split()) for t in generated) / max(1, len(generated))}
    if references is not None:
        out["bleu"] = bleu_score(generated, references)
    return out


@torch.no_grad()
def perplexity_of(model: torch.nn.Module, dataloader: Iterable[Any], device: torch.device | str | None = None,
                  max_batches: int | None = None) -> dict[str, float]:
    """Token-weighted mean next-token loss of a causal LM over ``dataloader`` and its perplexity.

    Batches are dicts with ``input_ids`` (and optionally ``attention_mask`` and ``labels``, -100
    marking tokens that are not predicted) or ``input_ids`` tensors. Each batch's mean loss is
    weighted by its predicted tokens, so the result is the mean over tokens.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens, batches = 0.0, 0, 0
    try:
        for batch in dataloader:
            if max_batches is not None and batches >= max_batches:
                break
            if isinstance(batch, torch.Tensor):
                batch = {"input_ids": batch}
            ids = batch["input_ids"].to(device)
            labels = batch.get("labels", ids).to(device)
            mask = batch.get("attention_mask")
            if mask is not None:
                mask = mask.to(device)
                labels = labels.masked_fill(mask == 0, -100)
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            n = int((labels[:, 1:] != -100).sum())
            total += float(out.loss) * n
            tokens += n
            batches += 1
    finally:
        model.train(was_training)
    if tokens == 0:
        raise UserError("perplexity: the data holds no predicted tokens")
    loss = total / tokens
    return {"loss": loss, "perplexity": perplexity(loss), "tokens": tokens, "batches": batches}


def generation_samples(model: Any, tokenizer: Any, windows: Sequence[dict[str, torch.Tensor]], n: int,
                       new_tokens: int) -> dict[str, Any]:
    """Greedy continuations of ``n`` evenly spaced token windows, scored against the text that
    follows in the data: the first half of a window is the prompt, its next ``new_tokens``
    tokens the reference. Diversity, repetition, mean length and BLEU (None without sacrebleu)."""
    from .generation import GenerationSettings, generate_texts

    n = min(n, len(windows))
    prompts, references = [], []
    for i in range(n):
        ids = windows[i * len(windows) // n]["input_ids"]
        half = max(1, len(ids) // 2)
        prompts.append(tokenizer.decode(ids[:half], skip_special_tokens=True) or tokenizer.decode(ids[:half]))
        references.append(tokenizer.decode(ids[half:half + new_tokens], skip_special_tokens=True))
    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0, seed=None)
    generated = generate_texts(model, tokenizer, prompts, settings, new_text_only=True)
    out: dict[str, Any] = {"samples": n, "new_tokens": new_tokens, **generation_quality(generated)}
    try:
        out["bleu"] = bleu_score(generated, references)
    except UserError:
        out["bleu"] = None  # sacrebleu is not installed (the `metrics` extra)
    return out
