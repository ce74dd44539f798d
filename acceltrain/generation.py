"""Text generation through transformers' ``generate`` (KV cache on): the one code path behind
``acceltrain generate`` and the compatibility layers' generators.

Example:
    >>> settings = GenerationSettings(max_new_tokens=32, temperature=0.8, top_k=40)
    >>> generate_texts(model, tokenizer, ["def add(a, b):"], settings)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .config import UserError

__all__ = ["GenerationSettings", "generate_texts", "prompt_loop"]


@dataclass(kw_only=True)
class GenerationSettings:
    """Decoding settings. ``temperature=0`` or ``num_beams > 1`` decode deterministically.

    ``max_new_tokens`` counts generated tokens; ``max_length`` (transformers' meaning) counts
    the prompt too. Give one of them.
    """

    max_new_tokens: int | None = 64
    max_length: int | None = None
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_beams: int = 1
    do_sample: bool | None = None  # None: sample unless temperature is 0 or beams are used
    seed: int | None = 0

    def check(self, flag: Callable[[str], str] = lambda name: name) -> None:
        """A UserError naming the first bad field (``flag`` turns a field into the name shown)."""
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:  # `not ok`: NaN fails every comparison, so it is refused too
                raise UserError(f"{flag(name)} must be {expected}, got {getattr(self, name)!r}")

        if self.max_length is None:
            need(self.max_new_tokens is not None and self.max_new_tokens >= 1, "max_new_tokens", ">= 1")
        else:
            need(self.max_length >= 1, "max_length", ">= 1")
        need(self.temperature >= 0 and math.isfinite(self.temperature), "temperature", ">= 0 (0: greedy)")
        need(self.top_k >= 0, "top_k", ">= 0 (0: no top-k filter)")
        need(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        need(self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty), "repetition_penalty",
             "> 0 (1: none)")
        need(self.num_beams >= 1, "num_beams", ">= 1")

    @property
    def sampling(self) -> bool:
        if self.do_sample is not None:
            return bool(self.do_sample) and self.num_beams == 1
        return self.temperature > 0 and self.num_beams == 1


@torch.no_grad()
def generate_texts(model: Any, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings, *,
                   use_cache: bool = True, new_text_only: bool = False) -> list[str]:
    """Decode a continuation of each prompt (one at a time: no padding changes the result).

    Returns the prompt and its continuation (``new_text_only``: the continuation alone).
    """
    settings.check()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sample = settings.sampling
    out_texts = []
    was_training = model.training
    model.eval()
    try:
        for prompt in prompts:
            if not prompt:
                raise UserError("prompt: expected non-empty text, got ''")
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
            if ids.shape[1] == 0:
                raise UserError(f"prompt {prompt!r}: the tokenizer turns it into no tokens")
            length = {"max_length": settings.max_length} if settings.max_length is not None else {
                "max_new_tokens": settings.max_new_tokens}
            if settings.max_length is not None and settings.max_length <= ids.shape[1]:
                raise UserError(f"max_length {settings.max_length} leaves no room after the prompt's "
                                f"{ids.shape[1]} tokens")
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=sample,
                temperature=settings.temperature if sample else None, top_k=settings.top_k if sample else None,
                top_p=settings.top_p if sample else None, repetition_penalty=settings.repetition_penalty,
                num_beams=settings.num_beams, use_cache=use_cache, pad_token_id=pad, **length)
            tokens = out[0, ids.shape[1]:] if new_text_only else out[0]
            out_texts.append(tokenizer.decode(tokens, skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out_texts


def prompt_loop(generate: Callable[[str], str], *, read: Callable[[str], str] = input,
                write: Callable[[str], Any] = print, banner: str | None = None) -> int:
    """Read a prompt, print its generation, until EOF (Ctrl-D), ``quit`` or ``exit``; returns how
    many prompts were answered. An empty line asks again."""
    if banner:
        write(banner)
    answered = 0
    while True:
        try:
            prompt = read("> ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return answered
        if prompt.strip() in ("quit", "exit"):
            return answered
        if not prompt.strip():
            continue
        write(generate(prompt))
        answered += 1
