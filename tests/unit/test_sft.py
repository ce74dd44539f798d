"""acceltrain/data/sft.py: prompt masking, right padding, the summed token loss and its count."""

from __future__ import annotations

import pytest
import torch

from acceltrain.data.sft import (
    IGNORE_INDEX,
    PadCollator,
    count_target_tokens,
    stdlib_docstring_pairs,
    token_loss_sum,
    tokenize_pairs,
)

PROMPTS = ["add two numbers:", "name a colour please, any colour at all:", "say hi:"]
RESPONSES = [" 2 + 2 = 4", " red", " hello there, how are you today"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from acceltrain.data import train_bpe_tokenizer

    texts = [p + r for p, r in zip(PROMPTS, RESPONSES, strict=True)] * 20
    return train_bpe_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def test_tokenize_pairs_masks_the_prompt_and_ends_with_eos(tokenizer):
    examples, dropped = tokenize_pairs(PROMPTS, RESPONSES, tokenizer, max_length=64)
    assert dropped == 0 and len(examples) == 3
    for e, prompt, response in zip(examples, PROMPTS, RESPONSES, strict=True):
        p = tokenizer(prompt)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        assert e["input_ids"] == p + r + [tokenizer.eos_token_id]
        assert e["labels"] == [IGNORE_INDEX] * len(p) + r + [tokenizer.eos_token_id]


def test_tokenize_pairs_cuts_at_max_length_and_drops_pairs_with_no_response_left(tokenizer):
    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    cut = sorted(lengths)[1] + 1  # the two shorter prompts keep a response token, the longest none
    examples, dropped = tokenize_pairs(PROMPTS, RESPONSES, tokenizer, max_length=cut)
    assert dropped == 1 and len(examples) == 2
    for e in examples:
        assert len(e["input_ids"]) == len(e["labels"]) <= cut and e["labels"][-1] != IGNORE_INDEX
    with pytest.raises(ValueError, match="3 prompts but 2 responses"):
        tokenize_pairs(PROMPTS, RESPONSES[:2], tokenizer, max_length=8)


def test_pad_collator_pads_right_with_a_mask_and_ignored_labels():
    batch = PadCollator(pad_token_id=7)([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
                                          {"input_ids": [4], "labels": [4]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]
    rounded = PadCollator(pad_token_id=0, pad_to_multiple_of=4)([{"input_ids": [1, 2, 3, 4, 5], "labels": [1] * 5}])
    assert rounded["input_ids"].shape == (1, 8) and rounded["labels"][0, 5:].tolist() == [-100] * 3
    stacked = PadCollator(pad_token_id=0, sequence_labels=False)([{"input_ids": [1], "labels": [0.0, 1.0]},
                                                                  {"input_ids": [1, 2], "labels": [1.0, 1.0]}])
    assert stacked["labels"].dtype == torch.float32 and stacked["labels"].tolist() == [[0.0, 1.0], [1.0, 1.0]]


def test_token_loss_sum_is_the_manual_sum_over_response_tokens_and_matches_transformers(tokenizer, model):
    examples, _ = tokenize_pairs(PROMPTS, RESPONSES, tokenizer, max_length=64)
    batch = PadCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    manual, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(logits.shape[0]):
        for t in range(1, logits.shape[1]):
            if batch["labels"][b, t] != IGNORE_INDEX:
                manual -= torch.log_softmax(logits[b, t - 1].double(), -1)[batch["labels"][b, t]]
                count += 1
    got = token_loss_sum(logits, batch["labels"])
    assert int(count_target_tokens(batch["labels"])) == count
    assert count == sum(len(tokenizer(r, add_special_tokens=False)["input_ids"]) + 1 for r in RESPONSES)
    torch.testing.assert_close(got.double(), manual, atol=1e-4, rtol=1e-6)
    with torch.no_grad():  # transformers' own loss is the same sum divided by the same count
        hf = model(**batch).loss
    torch.testing.assert_close(got / count, hf, atol=1e-6, rtol=1e-6)


def test_prompt_positions_contribute_no_loss_and_no_gradient(tokenizer, model):
    examples, _ = tokenize_pairs(PROMPTS, RESPONSES, tokenizer, max_length=64)
    batch = PadCollator(tokenizer.pad_token_id)(examples)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits.requires_grad_(True)
    loss = token_loss_sum(logits, batch["labels"])
    loss.backward()
    # position t predicts token t + 1: it is masked when labels[t + 1] is ignored (prompt, padding)
    # and the last position predicts nothing
    masked = torch.ones(logits.shape[:2], dtype=torch.bool)
    masked[:, :-1] = batch["labels"][:, 1:] == IGNORE_INDEX
    assert masked.any() and (~masked).any()
    assert logits.grad[masked].abs().max() == 0
    assert (logits.grad[~masked].abs().sum(-1) > 0).all()
    noisy = logits.detach().clone()
    noisy[masked] += 10 * torch.randn_like(noisy[masked])  # change every prediction at prompt positions
    assert token_loss_sum(noisy, batch["labels"]) == loss.detach()


def test_padded_batch_gives_the_sum_of_unpadded_examples(tokenizer, model):
    examples, _ = tokenize_pairs(PROMPTS, RESPONSES, tokenizer, max_length=64)
    collate = PadCollator(tokenizer.pad_token_id)
    batch = collate(examples)
    assert (batch["attention_mask"] == 0).any()  # the batch really is padded
    with torch.no_grad():
        padded = token_loss_sum(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                batch["labels"])
        alone = []
        for e in examples:
            one = collate([e])
            alone.append(token_loss_sum(model(input_ids=one["input_ids"]).logits, one["labels"]))
    torch.testing.assert_close(padded, torch.stack(alone).sum(), atol=1e-5, rtol=1e-6)
    assert count_target_tokens(batch["labels"]) == sum(count_target_tokens(collate([e])["labels"]) for e in examples)


def test_stdlib_docstring_pairs_are_signatures_and_first_paragraphs():
    prompts, responses = stdlib_docstring_pairs()
    assert len(prompts) == len(responses) > 1000
    assert len(set(zip(prompts, responses, strict=True))) == len(prompts)
    assert all(p.startswith(("def ", "async def ")) and p.endswith('):\n    """') or '->' in p for p in prompts)
    assert all(r.endswith('"""') and "\n\n" not in r for r in responses)
    i = next(i for i, p in enumerate(prompts) if p.startswith("def urljoin("))
    assert responses[i].startswith("Join a base URL")
