"""acceltrain.utils: the seed's key_average semantics and the small helpers."""

from __future__ import annotations

import math
from collections import namedtuple

import pytest
import torch

from acceltrain.utils import (
    count_parameters,
    flatten_dict,
    format_params,
    key_average,
    map_nested_tensor,
    seed_everything,
)


def test_key_average_nested():
    records = [{"loss": 0.5, "metrics": {"acc": 0.9}}, {"loss": 0.6, "metrics": {"acc": 0.85}}]
    out = key_average(records)
    assert set(out) == {"loss", "metrics"} and set(out["metrics"]) == {"acc"}
    assert out["loss"] == pytest.approx(0.55) and out["metrics"]["acc"] == pytest.approx(0.875)


def test_key_average_union_of_keys_missing_skipped():
    records = [{"a": 1.0, "n": {"x": 2.0}}, {"b": 4.0}, {"a": 3.0, "n": {"y": 6.0}}]
    assert key_average(records) == {"a": 2.0, "n": {"x": 2.0, "y": 6.0}, "b": 4.0}


def test_key_average_nan_propagates_unless_excluded():
    records = [{"a": 1.0, "b": 1.0}, {"a": float("nan"), "b": 3.0}]
    out = key_average(records)
    assert math.isnan(out["a"]) and out["b"] == 2.0
    assert key_average(records, exclude_nan=True) == {"a": 1.0, "b": 2.0}
    all_nan = key_average([{"a": float("nan")}], exclude_nan=True)
    assert math.isnan(all_nan["a"])


def test_key_average_empty_and_tensors_and_non_numbers():
    assert key_average([]) == {}
    out = key_average([{"t": torch.tensor(2.0), "s": "text", "l": [1, 2]}, {"t": torch.tensor([4.0])}])
    assert out == {"t": 3.0}


def test_map_nested_tensor_keeps_structure():
    Pair = namedtuple("Pair", "a b")
    data = {"x": torch.ones(2), "y": [torch.zeros(1), (torch.ones(1), 3)], "p": Pair(torch.ones(1), "k")}
    out = map_nested_tensor(lambda t: t + 1, data)
    assert torch.equal(out["x"], torch.full((2,), 2.0))
    assert isinstance(out["y"], list) and isinstance(out["y"][1], tuple) and out["y"][1][1] == 3
    assert isinstance(out["p"], Pair) and out["p"].b == "k" and out["p"].a.item() == 2.0


def test_flatten_dict():
    assert flatten_dict({"a": {"b": 1, "c": {"d": 2}}, "e": 3}) == {"a/b": 1, "a/c/d": 2, "e": 3}


def test_count_and_format_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(10, 5), torch.nn.Linear(5, 2))
    model[1].weight.requires_grad_(False)
    assert count_parameters(model) == 55 + 12
    assert count_parameters(model, trainable_only=True) == 55 + 2
    tied = torch.nn.Linear(4, 4, bias=False)
    both = torch.nn.ModuleList([tied, tied])
    assert count_parameters(both) == 16
    assert [format_params(n) for n in (950, 1_234_567, 7e9, 12_500)] == ["950", "1.23M", "7.00B", "12.50K"]


def test_seed_everything_is_reproducible():
    seed_everything(7)
    a = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    seed_everything(7)
    b = (torch.rand(3), __import__("random").random(), __import__("numpy").random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
