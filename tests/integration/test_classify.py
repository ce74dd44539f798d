"""recipes/classify.py end to end on toy data made here: single-label, multi-label and regression,
exports that load without acceltrain, LoRA adapters, exact metrics on two processes, the offline
default task, resume and bad input."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, torchrun
from tests.helpers import BEST, LATEST, STEP_GLOB, ckpt_root, run_step_dir, step_folder_name

RECIPE = ROOT / "recipes" / "classify.py"
TINY = ["--batch_size", "16", "--max_length", "32", "--vocab_size", "300", "--d_model", "32", "--n_heads", "2",
        "--log_interval", "10", "--eval_interval", "50", "--save_interval", "50", "--warmup_steps", "10", "--lr", "3e-3"]
FILLER = "the a of and to in is was for on with as by at from this that it be are".split()

# Scores a model folder on a jsonl file with transformers only, one text at a time (no padding):
# accuracy and macro-F1 computed by hand, the loss as transformers computes it.
EVAL_CHECK = """
import json, sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
folder, rows = sys.argv[1], [json.loads(line) for line in open(sys.argv[2])]
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
label2id = model.config.label2id
pred, true, loss = [], [], 0.0
with torch.no_grad():
    for row in rows:
        y = torch.tensor([label2id[row["label"]]])
        out = model(**tok([row["text"]], return_tensors="pt", truncation=True, max_length=32), labels=y)
        pred.append(int(out.logits.argmax(-1))); true.append(int(y)); loss += float(out.loss)
f1 = []
for c in sorted(set(pred) | set(true)):
    tp = sum(p == t == c for p, t in zip(pred, true)); fp = sum(p == c != t for p, t in zip(pred, true))
    fn = sum(t == c != p for p, t in zip(pred, true)); f1.append(2 * tp / (2 * tp + fp + fn))
assert "acceltrain" not in sys.modules
print(json.dumps({"accuracy": sum(p == t for p, t in zip(pred, true)) / len(rows), "f1": sum(f1) / len(f1),
                  "loss": loss / len(rows), "samples": len(rows), "problem_type": model.config.problem_type,
                  "labels": sorted(label2id)}))
"""


def keyword_rows(n: int, seed: int, classes: tuple[str, ...] = ("apple", "banana")) -> list[dict]:
    """Texts of filler words with one keyword that decides the class."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        c = i % len(classes)
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 12))]
        words.insert(rng.randint(0, len(words)), classes[c])
        rows.append({"text": " ".join(words), "label": f"has_{classes[c]}"})
    return rows


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(*args: str, cache: Path, expect: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELTRAIN_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(RECIPE), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def evals(out: Path) -> list[dict]:
    return [r for r in records(out) if "eval/loss" in r]


def eval_check(folder: Path, rows: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", EVAL_CHECK, str(folder), str(rows)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_recipe():
    spec = importlib.util.spec_from_file_location("classify_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_inprocess(module, argv: list[str]) -> Path:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return module.main(argv)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"train": write(root / "train.jsonl", keyword_rows(240, seed=0)),
            "eval": write(root / "eval.jsonl", keyword_rows(23, seed=1))}  # 23: no batch or world size divides it


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, data):
    out = tmp_path_factory.mktemp("single") / "run"
    proc = run("--dataset", str(data["train"]), "--eval_dataset", str(data["eval"]), "--output_dir", str(out),
               "--max_steps", "150", *TINY, cache=tmp_path_factory.mktemp("cache"))
    return out, proc


def test_single_label_learns_the_keyword_and_the_export_predicts_without_acceltrain(single_run, data):
    out, proc = single_run
    losses = [r["loss"] for r in records(out) if "loss" in r]
    assert sum(losses[-3:]) / 3 < 0.3 < sum(losses[:3]) / 3
    final = evals(out)[-1]
    assert final["eval/accuracy"] > 0.9 and final["eval/samples"] == 23
    check = eval_check(out / "final", data["eval"])
    assert check["accuracy"] > 0.9 and check["labels"] == ["has_apple", "has_banana"]
    assert check["problem_type"] == "single_label_classification"
    assert "classes: has_apple, has_banana" in (out / "final" / "README.md").read_text()
    best = (ckpt_root(out) / BEST).resolve().name  # kept by eval/accuracy, ties to the newest
    top = max(evals(out), key=lambda r: (r["eval/accuracy"], r["step"]))
    assert best == step_folder_name(top['step']) and f"Saved {out / 'final'} from step {top['step']}" in proc.stdout


def test_exported_best_checkpoint_is_the_best_not_the_last(tmp_path, data):
    """Too high a learning rate to hold on: the export is the best evaluation's weights."""
    out = tmp_path / "best"
    run("--dataset", str(data["train"]), "--eval_dataset", str(data["eval"]), "--output_dir", str(out),
        "--max_steps", "40", *TINY, "--eval_interval", "10", "--save_interval", "10", "--keep_checkpoints", "1",
        "--best_metric", "loss", "--lr", "0.05", cache=tmp_path / "cache")
    by_loss = min(evals(out), key=lambda r: r["eval/loss"])
    check = eval_check(out / "final", data["eval"])
    assert check["loss"] == pytest.approx(by_loss["eval/loss"], abs=1e-5)
    kept = sorted(p.name for p in ckpt_root(out).glob(STEP_GLOB))
    assert kept == sorted({step_folder_name(by_loss['step']), step_folder_name(40)})


def test_multi_label(tmp_path):
    rng = random.Random(0)
    rows = []
    for _ in range(300):
        tags = [t for t in ("apple", "banana", "cherry") if rng.random() < 0.5]
        words = [rng.choice(FILLER) for _ in range(rng.randint(4, 10))] + tags
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "tags": tags})
    out = tmp_path / "multi"
    run("--dataset", str(write(tmp_path / "multi.jsonl", rows)), "--label_column", "tags", "--output_dir", str(out),
        "--problem_type", "multi_label_classification", "--max_steps", "150", *TINY, "--d_model", "64", "--dropout", "0",
        cache=tmp_path / "cache")
    final = evals(out)[-1]
    assert final["eval/f1"] > 0.9 and final["eval/accuracy"] > 0.8
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification"
    assert config["id2label"] == {"0": "apple", "1": "banana", "2": "cherry"}


def test_regression(tmp_path):
    rows = [{"text": r["text"], "score": 2.0 if r["label"] == "has_apple" else -1.0} for r in keyword_rows(240, seed=2)]
    out = tmp_path / "reg"
    run("--dataset", str(write(tmp_path / "reg.csv.jsonl", rows)), "--label_column", "score", "--output_dir", str(out),
        "--problem_type", "regression", "--max_steps", "150", *TINY, cache=tmp_path / "cache")
    first, last = evals(out)[0], evals(out)[-1]
    assert last["eval/mse"] < 0.1 * 2.25 and last["eval/mse"] <= first["eval/mse"]  # 2.25: the labels' variance
    config = json.loads((out / "final" / "config.json").read_text())
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1


def test_lora_trains_only_the_adapter_and_head_and_peft_loads_it(tmp_path, single_run, data):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    base = single_run[0] / "final"
    out = tmp_path / "lora"
    proc = run("--model", str(base), "--dataset", str(data["train"]), "--output_dir", str(out), "--max_steps", "10",
               *TINY, "--eval_interval", "5", "--save_interval", "5", "--lora_r", "4", "--merge_lora", "true",
               cache=tmp_path / "cache")
    model = AutoModelForSequenceClassification.from_pretrained(base)
    linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "classifier"]
    head = sum(p.numel() for p in model.classifier.parameters())  # peft trains a copy of the new head
    expected = sum(4 * (m.in_features + m.out_features) for m in linear) + head
    assert f"{expected:,} trainable" in proc.stdout
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in adapter.values()) == expected
    assert all("lora_" in k or ".classifier." in k for k in adapter)
    ckpt = run_step_dir(out, 10)
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert sum(v.numel() for s in optim["state"].values() for k, v in s.items() if k == "exp_avg") == expected
    check = f"""
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from peft import LoraConfig, PeftModel, get_peft_model
tok = AutoTokenizer.from_pretrained(r'{out / "final"}')
probe = tok(["the apple is", "banana on the a"], return_tensors="pt", padding=True)
trained = get_peft_model(AutoModelForSequenceClassification.from_pretrained(r'{base}'),
                         LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="SEQ_CLS"))
# the model at the last step: the checkpoint holds only what trains, the base comes from its folder
missing, unexpected = trained.load_state_dict(load_file(r'{ckpt / "model.safetensors"}'), strict=False)
assert not unexpected and missing and all("lora_" not in k and "modules_to_save" not in k for k in missing)
want = trained.eval()(**probe).logits
lora = PeftModel.from_pretrained(AutoModelForSequenceClassification.from_pretrained(r'{base}'), r'{out / "final"}')
torch.testing.assert_close(lora.eval()(**probe).logits, want, atol=1e-5, rtol=0)
merged = AutoModelForSequenceClassification.from_pretrained(r'{out / "merged"}').eval()
torch.testing.assert_close(merged(**probe).logits, want, atol=1e-5, rtol=0)
assert type(merged).__name__ == "BertForSequenceClassification" and "acceltrain" not in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.multiproc
def test_two_processes_give_the_exact_single_process_metrics(tmp_path):
    """23 evaluation texts over 2 ranks x batch 4: 24 slots, one padding sample that must not count."""
    classes = ("apple", "banana", "cherry")
    train = write(tmp_path / "train.jsonl", keyword_rows(120, seed=0, classes=classes))
    evaluation = write(tmp_path / "eval.jsonl", keyword_rows(23, seed=1, classes=classes))
    out = tmp_path / "ddp"
    torchrun(RECIPE, "--dataset", str(train), "--eval_dataset", str(evaluation), "--output_dir", str(out),
             "--max_steps", "12", *TINY, "--batch_size", "4", "--eval_interval", "12", "--save_interval", "12",
             env={"ACCELTRAIN_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
    got = evals(out)[-1]
    want = eval_check(out / "final", evaluation)  # one process, transformers only
    assert got["eval/samples"] == want["samples"] == 23
    assert 0.2 < want["accuracy"] < 1.0  # half-trained: the metrics are not trivially perfect
    assert got["eval/accuracy"] == want["accuracy"] and got["eval/f1"] == pytest.approx(want["f1"], abs=1e-12)
    assert got["eval/loss"] == pytest.approx(want["loss"], abs=1e-5)


def test_offline_default_task_through_acceltrain_train(tmp_path):
    """`acceltrain train --config` runs the recipe the shipped YAML names, on the stdlib task."""
    out = tmp_path / "default"
    proc = subprocess.run(
        [sys.executable, "-m", "acceltrain.cli", "train", "--config", str(ROOT / "recipes/configs/classify_stdlib.yaml"),
         "--output_dir", str(out), "--max_steps", "3", *TINY, "--eval_interval", "3", "--save_interval", "3"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
        env={**os.environ, "ACCELTRAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "8 classes" in proc.stdout
    config = json.loads((out / "final" / "config.json").read_text())
    assert set(config["label2id"]) == {"asyncio", "email", "importlib", "logging", "multiprocessing", "unittest",
                                       "web", "xml"}


def test_resume_continues_exactly(tmp_path, data):
    module = load_recipe()
    os.environ["ACCELTRAIN_CACHE"] = str(tmp_path / "cache")
    args = ["--dataset", str(data["train"]), *TINY, "--max_steps", "6", "--eval_interval", "3", "--save_interval", "3",
            "--log_interval", "1"]
    run_inprocess(module, [*args, "--output_dir", str(tmp_path / "a")])
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b, symlinks=True)
    for name in (step_folder_name(6), LATEST, BEST):
        path = ckpt_root(b) / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    shutil.rmtree(b / "final")
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(tmp_path / "a") if r["step"] <= 3))
    run_inprocess(module, [*args, "--output_dir", str(b), "--resume", "true"])
    untimed = [{k: v for k, v in r.items() if not k.endswith("_time")} for r in records(tmp_path / "a")]
    assert [{k: v for k, v in r.items() if not k.endswith("_time")} for r in records(b)] == untimed
    # same losses (dropout included), gradient norms and evaluations, bit for bit


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("vit")
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    return folder


@pytest.mark.parametrize("args, message", [
    (["--label_column", "stars"], "no label column 'stars'; available columns: text, label"),
    (["--num_labels", "1"], "2 label names (has_apple, has_banana...) but num_labels is 1"),
    (["--problem_type", "regression"], "row 0: regression labels must be numbers, got 'has_apple' (str)"),
    (["--model", "{vit}"], "transformers has no AutoModelForSequenceClassification for model type 'vit'"),
    (["--model", "{empty}"], "not a Hugging Face model folder (no config.json)"),
    (["--model", "{base}", "--lora_r", "2", "--lora_target_modules", "query,qkv"],
     "lora_target_modules: qkv matches no module of BertForSequenceClassification; its linear layers: classifier"),
    (["--lora_r", "2"], "LoRA adapts pretrained weights: pass --model"),
    (["--save_interval", "30"], "save_interval (30) must be a multiple of eval_interval (50)"),
    (["--eval_dataset", "{bad_eval}"], "row 1: label 'has_cherry' is not a training label (has_apple, has_banana)"),
    (["--eval_split", "test"], "eval_split 'test' names a Hub split, but --dataset"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, data, vit_folder, single_run, args, message):
    (tmp_path / "empty").mkdir()
    bad_eval = write(tmp_path / "bad_eval.jsonl", [{"text": "x", "label": "has_apple"}, {"text": "y", "label": "has_cherry"}])
    names = {"vit": vit_folder, "empty": tmp_path / "empty", "base": single_run[0] / "final", "bad_eval": bad_eval}
    module = load_recipe()
    os.environ["ACCELTRAIN_CACHE"] = str(tmp_path / "cache")
    argv = ["--dataset", str(data["train"]), "--output_dir", str(tmp_path / "o"), *TINY, *[a.format(**names) for a in args]]
    with pytest.raises(SystemExit) as e:
        run_inprocess(module, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-1]
    assert not ckpt_root(tmp_path / "o").exists()


def test_labels_out_of_range_exit_2(tmp_path):
    rows = [{"text": f"t {i}", "label": i % 3} for i in range(10)]
    proc = run("--dataset", str(write(tmp_path / "ids.jsonl", rows)), "--num_labels", "2", "--output_dir",
               str(tmp_path / "o"), *TINY, cache=tmp_path / "cache", expect=2)
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'ids.jsonl'}: row 2: label 2 is out of range: with num_labels 2 ids must be 0..1")


@pytest.mark.parametrize("config", sorted((ROOT / "recipes" / "configs").glob("classify_*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_parse(config):
    from acceltrain.config import load_yaml, parse_config

    assert load_yaml(config)["recipe"] == "classify"
    parse_config(load_recipe().ClassifyConfig, ["--config", str(config)]).validate()
