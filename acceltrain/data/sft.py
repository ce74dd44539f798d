"""Prompt/response pairs for supervised fine-tuning of a causal LM: tokenisation with the prompt
masked out of the loss, right-padding collation, and the summed token loss the trainer normalises.

The pieces chain in one direction::

    examples, dropped = tokenize_pairs(prompts, responses, tokenizer, max_length=512)
    loader = DataLoader(examples, batch_size=8, collate_fn=PadCollator(tokenizer.pad_token_id))
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    loss_sum = token_loss_sum(logits, b["labels"])          # divide by count_target_tokens(...)

Labels follow Hugging Face's convention: ``labels[t]`` is the target at position ``t`` and the
model shifts them (position ``t`` predicts token ``t + 1``); ``IGNORE_INDEX`` marks prompt and
padding positions, so they add nothing to the loss or its gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .labels import stdlib_docstrings

__all__ = ["IGNORE_INDEX", "tokenize_pairs", "PadCollator", "token_loss_sum", "count_target_tokens",
           "stdlib_docstring_pairs"]

IGNORE_INDEX = -100
"""Label of positions left out of the loss (PyTorch's ``cross_entropy`` default ``ignore_index``)."""


def tokenize_pairs(prompts: Sequence[str], responses: Sequence[str], tokenizer: Any, *, max_length: int,
                   ) -> tuple[list[dict[str, list[int]]], int]:
    """Tokenise pairs as ``prompt + response + EOS`` with the prompt's labels set to ``IGNORE_INDEX``.

    Prompt and response are tokenised separately, so the boundary between them is exact: the
    prompt gets the tokenizer's special tokens (e.g. Llama's BOS), the response none, and EOS
    ends the response (and is learned, so generation stops). Sequences are cut at
    ``max_length``; a pair whose cut leaves no response token is dropped and counted.

    Returns:
        ``(examples, dropped)``: each example ``{"input_ids": [...], "labels": [...]}`` of equal
        lengths, unpadded.

    Raises:
        ValueError: the lists differ in length, or the tokenizer has no EOS token.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: responses need one to end")
    prompt_ids = tokenizer(list(prompts), add_special_tokens=True, verbose=False)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False, verbose=False)["input_ids"]
    examples, dropped = [], 0
    for p, r in zip(prompt_ids, response_ids, strict=True):
        ids = (p + r + [eos])[:max_length]
        labels = ([IGNORE_INDEX] * len(p) + r + [eos])[:max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):  # nothing left to predict
            dropped += 1
            continue
        examples.append({"input_ids": ids, "labels": labels})
    return examples, dropped


@dataclass(frozen=True)
class PadCollator:
    """Batch variable-length examples with right padding and an attention mask.

    ``input_ids`` is padded with ``pad_token_id``, ``attention_mask`` (made here) with 0 and, when
    ``sequence_labels`` (causal LM), ``labels`` with ``IGNORE_INDEX``, whatever the tokenizer's own
    ``padding_side``: right padding keeps every real token at the position it has unpadded, so a
    causal model's logits there do not change. Otherwise ``labels`` (one per example: an id, a
    multi-hot list or a number) are stacked. Other keys are left out.

    Args:
        pad_token_id: Token id written into padded positions (never attended to or learned).
        sequence_labels: Labels are per token (pad them) rather than per example (stack them).
        pad_to_multiple_of: Round the padded length up (tensor-core friendly shapes on GPUs).

    Example:
        >>> PadCollator(0)([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [5], "labels": [5]}])
        {'input_ids': tensor([[5, 6, 7], [5, 0, 0]]), 'attention_mask': tensor([[1, 1, 1], [1, 0, 0]]),
         'labels': tensor([[-100, 6, 7], [5, -100, -100]])}
    """

    pad_token_id: int
    sequence_labels: bool = True
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, : len(e["input_ids"])] = torch.as_tensor(e["input_ids"])
            mask[i, : len(e["input_ids"])] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in examples[0]:
            if self.sequence_labels:
                labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
                for i, e in enumerate(examples):
                    labels[i, : len(e["labels"])] = torch.as_tensor(e["labels"])
                batch["labels"] = labels
            else:
                batch["labels"] = torch.tensor([e["labels"] for e in examples])
        return batch


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The summed next-token cross-entropy over positions whose label is not ``IGNORE_INDEX``.

    ``logits`` ``(B, T, V)`` and ``labels`` ``(B, T)`` in Hugging Face's unshifted convention.
    Computed in fp32 (bf16 log-softmax over a large vocabulary loses digits). A sum, not a mean,
    so a trainer can divide by the tokens of a whole accumulation window on every rank
    (:meth:`acceltrain.BaseTrainer.count_loss_items`) and padding or micro-batch size cannot
    change the result.
    """
    shifted = logits[:, :-1].float()  # position t predicts token t + 1: (B, T-1, V)
    target = labels[:, 1:]  # (B, T-1)
    return torch.nn.functional.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def count_target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many terms :func:`token_loss_sum` adds up: labels after the shift that are not ignored."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def stdlib_docstring_pairs(max_response_chars: int = 400) -> tuple[list[str], list[str]]:
    """The offline default fine-tuning task: write a function's docstring from its signature.

    Built at call time from the running Python's standard library (see
    :func:`acceltrain.data.labels.stdlib_docstrings`): the prompt is ``def name(args):`` plus the
    opening quotes of a docstring, the response is the docstring's first paragraph (cut at
    ``max_response_chars``) and the closing quotes. Duplicate pairs are dropped. About 9,000 pairs
    on CPython 3.11.
    """
    seen: set[tuple[str, str]] = set()
    prompts, responses = [], []
    for doc in stdlib_docstrings():
        if not doc.signature.startswith(("def ", "async def ")):
            continue
        summary = doc.text.split("\n\n", 1)[0].strip()[:max_response_chars]
        pair = (f'{doc.signature}\n    """', f'{summary}"""')
        if len(summary) < 10 or pair in seen:
            continue
        seen.add(pair)
        prompts.append(pair[0])
        responses.append(pair[1])
    return prompts, responses
