"""`acceltrain` flag checks that run before any model or data is loaded: one `error:` line, exit 2."""

from __future__ import annotations

import pytest

from tests.helpers import cli_error


@pytest.mark.parametrize(
    "flag, value",
    [("--num_beams", "0"), ("--prompt", ""), ("--temperature", "-1"), ("--temperature", "nan"),
     ("--max_new_tokens", "0"), ("--max_new_tokens", "-5"), ("--top_p", "0"), ("--top_p", "1.5"),
     ("--top_k", "-1"), ("--repetition_penalty", "0"), ("--repetition_penalty", "-1")],
)
def test_generate_flags(capsys, flag, value):
    # The model folder does not exist: every flag is checked before anything is loaded.
    args = {"--model": "/nonexistent", "--prompt": "the trainer", flag: value}
    assert cli_error(capsys, "generate", *[x for kv in args.items() for x in kv]).startswith(f"error: {flag} must be ")


@pytest.mark.parametrize(
    "flag, value, expected",
    [("--seq_len", "0", "--seq_len must be >= 2"), ("--seq_len", "1", "--seq_len must be >= 2"),
     ("--batch_size", "0", "--batch_size must be >= 1"), ("--max_bytes", "-1", "--max_bytes must be >= 0")],
)
def test_evaluate_flags(capsys, flag, value, expected):
    # The model folder does not exist: the flag is checked first, so that is not what is reported.
    assert expected in cli_error(capsys, "evaluate", "--model", "/nonexistent", "--dataset", "x.txt", flag, value)


@pytest.mark.parametrize(
    "argv, expected",
    [(["generate", "--model", "m"], "the following arguments are required: --prompt"),
     (["generate", "--model", "m", "--prompt", "x", "--num_beams", "two"], "argument --num_beams: invalid int value"),
     (["evaluate", "--model", "m", "--dataset", "d", "--bogus", "1"], "unrecognized arguments: --bogus 1"),
     (["nope"], "invalid choice: 'nope'")],
)
def test_argparse_errors_are_one_line(capsys, argv, expected):
    assert expected in cli_error(capsys, *argv)
