"""acceltrain/data/labels.py: label spaces, table loading, exact metrics, the stdlib family task."""

from __future__ import annotations

import json
import random

import pytest
import torch

from acceltrain.data import DataError
from acceltrain.data.labels import (
    STDLIB_FAMILIES,
    LabelSpace,
    classification_metrics,
    load_columns,
    load_labelled,
    macro_f1,
    stdlib_family_task,
)

SINGLE, MULTI, REG = "single_label_classification", "multi_label_classification", "regression"


def test_single_label_names_are_sorted_and_encoded():
    space = LabelSpace.fit(SINGLE, ["spam", "ham", "spam", "eggs"])
    assert space.names == ("eggs", "ham", "spam") and space.num_labels == 3
    assert space.encode(["ham", "eggs"]) == [1, 0]
    assert space.model_config_kwargs() == {"num_labels": 3, "problem_type": SINGLE,
                                           "id2label": {0: "eggs", 1: "ham", 2: "spam"},
                                           "label2id": {"eggs": 0, "ham": 1, "spam": 2}}
    with pytest.raises(DataError, match=r"eval: row 1: label 'toast' is not a training label \(eggs, ham, spam\)"):
        space.encode(["ham", "toast"], where="eval")


def test_single_label_ids_count_up_to_the_largest_or_num_labels():
    assert LabelSpace.fit(SINGLE, [0, 3, 1]).num_labels == 4
    space = LabelSpace.fit(SINGLE, [0, 1], num_labels=5)
    assert space.num_labels == 5 and space.names is None and "id2label" not in space.model_config_kwargs()
    assert LabelSpace.fit(SINGLE, [1, 0], names=["neg", "pos"]).names == ("neg", "pos")


@pytest.mark.parametrize("values, kwargs, message", [
    ([0, 1, 3], {"num_labels": 3}, "row 2: label 3 is out of range: with num_labels 3 ids must be 0..2"),
    ([0, -1], {}, "row 1: label -1 is out of range"),
    ([0.5, 1.0], {}, "got 0.5 (float)"),
    ([0, None], {}, "row 1 has no label"),
    ([True, False], {}, "got True (bool)"),
    (["a", 1], {}, "all integer ids or all names"),
    (["a", "b", "c"], {"num_labels": 2}, "3 label names"),
    ([0, 0], {}, "1 class(es); a classifier needs at least 2"),
])
def test_bad_single_labels_name_the_row(values, kwargs, message):
    with pytest.raises(DataError) as e:
        LabelSpace.fit(SINGLE, values, where="data.csv", **kwargs)
    assert str(e.value).startswith("data.csv: ") and message in str(e.value)


def test_multi_label_lists_and_separated_strings_become_multi_hot():
    space = LabelSpace.fit(MULTI, [["b", "a"], "c|a", [], "b"])
    assert space.names == ("a", "b", "c")
    assert space.encode([["b", "a"], "c|a", [], "b"]) == [[1.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0] * 3, [0.0, 1.0, 0.0]]
    ids = LabelSpace.fit(MULTI, [[0, 2], [1]], num_labels=4)
    assert ids.encode([[3]]) == [[0.0, 0.0, 0.0, 1.0]]
    with pytest.raises(DataError, match="row 0: label 4 is out of range"):
        ids.encode([[4]])
    with pytest.raises(DataError, match="row 0: a multi-label label must be a list"):
        LabelSpace.fit(MULTI, [3])


def test_regression_labels_are_numbers():
    space = LabelSpace.fit(REG, [1, 2.5, -3])
    assert space.num_labels == 1 and space.encode([1, 2.5]) == [1.0, 2.5]
    with pytest.raises(DataError, match="row 1: regression labels must be numbers, got 'high'"):
        LabelSpace.fit(REG, [1.0, "high"])


def _f1_by_hand(pred: list[int], true: list[int]) -> float:
    scores = []
    for c in sorted(set(pred) | set(true)):
        tp = sum(p == t == c for p, t in zip(pred, true, strict=True))
        fp = sum(p == c != t for p, t in zip(pred, true, strict=True))
        fn = sum(t == c != p for p, t in zip(pred, true, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def test_single_label_metrics_match_a_hand_computation():
    rng = random.Random(0)
    true = [rng.randrange(5) for _ in range(57)]
    logits = torch.randn(57, 6, generator=torch.Generator().manual_seed(1))  # class 5 never true
    pred = logits.argmax(-1).tolist()
    m = classification_metrics(SINGLE, logits, torch.tensor(true))
    assert m["samples"] == 57
    assert m["accuracy"] == pytest.approx(sum(p == t for p, t in zip(pred, true, strict=True)) / 57, abs=1e-12)
    assert m["f1"] == pytest.approx(_f1_by_hand(pred, true), abs=1e-12)
    assert m["loss"] == pytest.approx(float(torch.nn.CrossEntropyLoss()(logits, torch.tensor(true))), abs=1e-6)
    # two classes, hand-checked: class 0 F1 = 2/3, class 1 F1 = 4/5
    tiny = classification_metrics(SINGLE, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]]),
                                  torch.tensor([0, 0, 1, 1]))
    assert tiny["accuracy"] == 0.75 and tiny["f1"] == pytest.approx((2 / 3 + 4 / 5) / 2, abs=1e-12)


def test_multi_label_and_regression_metrics():
    logits = torch.tensor([[2.0, -1.0, 3.0], [-2.0, 1.0, -1.0], [1.0, 1.0, 1.0]])
    true = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    m = classification_metrics(MULTI, logits, true)
    assert m["accuracy"] == pytest.approx(2 / 3)  # row 1 misses class 2
    # per class: 0 -> tp 2; 1 -> tp 2; 2 -> tp 2, fn 1
    assert m["f1"] == pytest.approx((1 + 1 + 0.8) / 3)
    assert m["loss"] == pytest.approx(float(torch.nn.BCEWithLogitsLoss()(logits, true)), abs=1e-6)
    r = classification_metrics(REG, torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([1.0, 3.0, 2.0]))
    assert r["mse"] == pytest.approx(5 / 3) and r["mae"] == pytest.approx(1.0) and r["loss"] == r["mse"]


def test_macro_f1_ignores_classes_that_occur_nowhere():
    pred = torch.tensor([[1, 0, 0], [0, 1, 0]])
    assert macro_f1(pred, pred) == 1.0
    assert macro_f1(torch.zeros(2, 3), torch.zeros(2, 3)) == 0.0


def test_load_labelled_from_files_and_missing_columns(tmp_path):
    rows = [{"text": f"t{i}", "tags": ["a", "b"][: 1 + i % 2], "score": i / 2} for i in range(5)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    texts, labels, names = load_labelled(str(jsonl), text_column="text", label_column="tags")
    assert texts == [f"t{i}" for i in range(5)] and labels[1] == ["a", "b"] and names is None
    csv = tmp_path / "d.csv"
    csv.write_text("body,label\nhello,pos\nbye,neg\n")
    assert load_labelled(str(csv), text_column="body", label_column="label")[1] == ["pos", "neg"]
    with pytest.raises(DataError, match=r"d.csv: no label column 'stars'; available columns: body, label"):
        load_labelled(str(csv), text_column="body", label_column="stars")
    with pytest.raises(DataError, match="column 'score' holds"):
        load_columns(str(jsonl), {"prompt": "score"})
    with pytest.raises(DataError, match="no such file"):
        load_labelled(str(tmp_path / "missing.csv"), text_column="text", label_column="label")


def test_stdlib_family_task_is_deterministic_and_unambiguous():
    texts, labels = stdlib_family_task()
    assert (texts, labels) == stdlib_family_task()
    assert len(texts) == len(labels) > 500 and len(set(texts)) == len(texts)
    assert set(labels) <= set(STDLIB_FAMILIES) and len(set(labels)) >= 6
    assert all(len(t) >= 40 for t in texts)
