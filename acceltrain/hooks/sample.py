"""SampleHook: print a short greedy continuation of a prompt as training goes (language models)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .base import BaseHook

if TYPE_CHECKING:
    from ..trainer import BaseTrainer

__all__ = ["SampleHook", "generate_sample"]


@torch.no_grad()
def generate_sample(model: torch.nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """The greedy continuation of ``prompt`` (new text only). Greedy keeps ranks in lockstep, so
    every rank can call it when forwards are collective (FSDP)."""
    was_training = model.training
    model.eval()
    try:
        enc = tokenizer(prompt, return_tensors="pt").to(next(model.parameters()).device)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


class SampleHook(BaseHook):
    """Print a short greedy continuation of ``prompt`` every ``interval`` steps and after the last.

    Every rank generates (FSDP forwards are collective); only the main process prints.

    Example:
        >>> SampleHook(tokenizer, "def add(a, b):", max_new_tokens=32, interval=100)
    """

    def __init__(self, tokenizer: Any, prompt: str, *, max_new_tokens: int = 32, interval: int = 100):
        self.tokenizer, self.prompt, self.max_new_tokens, self.interval = tokenizer, prompt, max_new_tokens, interval

    def on_after_step(self, trainer: BaseTrainer) -> None:
        if trainer.step % self.interval and trainer.step != trainer.max_steps:
            return
        text = generate_sample(trainer.unwrapped_model, self.tokenizer, self.prompt, self.max_new_tokens)
        if trainer.is_main_process:
            print(f"Sample {trainer.step}/{trainer.max_steps}: {self.prompt!r} -> {text!r}", flush=True)
