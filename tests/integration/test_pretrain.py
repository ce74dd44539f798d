"""recipes/pretrain.py end to end on tiny settings: golden losses, HF loading, caches, bad input."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, torchrun
from tests.helpers import run_step_dir, step_folder_name

RECIPE = ROOT / "recipes" / "pretrain.py"
GOLDEN = Path(__file__).parent / "golden" / "pretrain_tiny_losses.json"
TINY = ["--d_model", "32", "--n_heads", "2", "--n_layers", "2", "--d_ff", "64", "--seq_len", "32",
        "--batch_size", "4", "--vocab_size", "300", "--log_interval", "1", "--eval_interval", "5",
        "--save_interval", "5", "--sample_tokens", "8", "--warmup_steps", "2"]


def make_corpus(path: Path, docs: int = 200, seed: int = 0) -> Path:
    """A small learnable corpus written by the test (no dependence on this Python's stdlib)."""
    rng = random.Random(seed)
    subjects = ["the trainer", "a model", "the optimizer", "each rank", "the sampler", "a checkpoint"]
    verbs = ["saves", "loads", "skips", "reduces", "steps", "resumes"]
    objects = ["the state", "a batch", "its gradients", "the manifest", "every shard", "the loss"]
    lines = []
    for _ in range(docs):
        sentences = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}." for _ in range(rng.randint(3, 8))]
        lines.append(json.dumps({"text": " ".join(sentences)}))
    path.write_text("\n".join(lines) + "\n")
    return path


def run(*args: str, cache: Path, expect: int = 0, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELTRAIN_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(RECIPE), *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def losses(output_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return make_corpus(tmp_path_factory.mktemp("corpus") / "docs.jsonl")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("run")
    cache = tmp_path_factory.mktemp("cache")
    proc = run("--output_dir", str(out / "run"), "--dataset", str(corpus), "--max_steps", "10", *TINY, cache=cache)
    return out / "run", cache, proc


def test_first_ten_losses_match_the_golden_file(tiny_run):
    out, _, _ = tiny_run
    got = losses(out)
    assert len(got) == 10
    if os.environ.get("ACCELTRAIN_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert got[-1] < got[0] - 0.3


def test_throughput_mfu_and_eval_perplexity_are_logged(tiny_run):
    out, _, proc = tiny_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in steps)
    evals = [r for r in records if "eval/loss" in r]
    assert [r["step"] for r in evals] == [5, 10]  # every --eval_interval steps
    for r in evals:
        assert r["eval/perplexity"] == pytest.approx(math.exp(r["eval/loss"]), rel=1e-9)
    progress = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Step")]
    assert progress and all("tokens/s" in line and "mfu" in line for line in progress)
    assert (out / "tensorboard").is_dir()


def test_gradient_checkpointing_flag_reaches_the_model_config(tmp_path):
    recipe = _load_recipe()
    from acceltrain.config import parse_config

    cfg = parse_config(recipe.PretrainConfig, ["--output_dir", str(tmp_path), "--gradient_checkpointing", "true",
                                               "--activation", "gelu", "--arch", "gpt2"])
    model_cfg = cfg.model_config(300)
    assert model_cfg.gradient_checkpointing is True and model_cfg.hf_activation == "gelu"


def test_export_loads_and_generates_without_acceltrain(tiny_run):
    out, _, proc = tiny_run
    final = out / "final"
    assert "Saved" in proc.stdout and "Sample:" in proc.stdout
    card = (final / "README.md").read_text()
    assert "final validation perplexity" in card and "parameters" in card
    code = f"""
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained(r'{final}')
model = AutoModelForCausalLM.from_pretrained(r'{final}')
ids = tok('the trainer', return_tensors='pt').input_ids
out = model.generate(ids, max_new_tokens=12, do_sample=False)
text = tok.decode(out[0], skip_special_tokens=True)
assert 'acceltrain' not in sys.modules and text.startswith('the trainer') and len(out[0]) > len(ids[0])
print(type(model).__name__, repr(text))
"""
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr[-3000:]
    assert check.stdout.startswith("LlamaForCausalLM")


def test_second_run_hits_the_tokenizer_and_packing_caches(tiny_run, corpus, tmp_path):
    _, cache, first = tiny_run
    assert "(cached)" not in first.stdout
    second = run("--output_dir", str(tmp_path / "again"), "--dataset", str(corpus), "--max_steps", "1", *TINY, cache=cache)
    assert "300 tokens (cached)" in second.stdout and "tokens packed (cached)" in second.stdout


def test_an_existing_tokenizer_is_used_not_trained(tiny_run, corpus, tmp_path):
    from transformers import AutoTokenizer

    out, _, _ = tiny_run
    tok_dir = tmp_path / "tok"
    AutoTokenizer.from_pretrained(out / "final").save_pretrained(tok_dir)
    run_dir = tmp_path / "with_tok"
    # --vocab_size 100 would be refused if a BPE were to be trained: with --tokenizer it is unused.
    run("--output_dir", str(run_dir), "--dataset", str(corpus), "--max_steps", "2", *TINY, "--vocab_size", "100",
        "--tokenizer", str(tok_dir), cache=tmp_path / "fresh_cache")
    assert not (tmp_path / "fresh_cache" / "tokenizers").exists()
    assert (run_dir / "final" / "tokenizer.json").read_text() == (tok_dir / "tokenizer.json").read_text()
    assert f"tokenizer | {tok_dir} |" in (run_dir / "final" / "README.md").read_text()


def test_default_corpus_gpt2_arch_loss_falls(tmp_path):
    """No --dataset: the standard library of this Python, read at run time."""
    out = tmp_path / "stdlib"
    run("--output_dir", str(out), "--arch", "gpt2", "--max_corpus_bytes", "300000", "--max_steps", "25",
        *TINY, cache=tmp_path / "cache")
    got = losses(out)
    assert sum(got[-3:]) / 3 < sum(got[:3]) / 3 - 0.5
    assert json.loads((out / "final" / "config.json").read_text())["model_type"] == "gpt2"


@pytest.mark.multiproc
def test_two_processes(tmp_path, corpus):
    out = tmp_path / "ddp"
    env = {"ACCELTRAIN_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    torchrun(RECIPE, "--output_dir", str(out), "--dataset", str(corpus), "--max_steps", "8", *TINY, env=env)
    got = losses(out)
    assert len(got) == 8 and got[-1] < got[0]
    assert (out / "final" / "model.safetensors").is_file()
    manifest = json.loads((run_step_dir(out, 8) / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and {"rank_state_0.pt", "rank_state_1.pt"} <= set(manifest["files"])


def test_resume_after_the_run_continues(tiny_run, corpus, tmp_path):
    import shutil

    out, cache, _ = tiny_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy, symlinks=True)
    proc = run("--output_dir", str(copy), "--dataset", str(corpus), "--max_steps", "12", "--resume", "true", *TINY,
               cache=cache)
    assert "resumed from" in proc.stderr and step_folder_name(10) in proc.stderr
    assert len(losses(copy)) == 12


def test_gradient_checkpointing_keeps_the_losses(tiny_run, corpus, tmp_path):
    # That the flag reaches the model is checked in tests/unit/test_models.py; recomputation
    # (non-reentrant, RNG state preserved) must not change what is learned.
    out, cache, _ = tiny_run
    ckpt = tmp_path / "ckpt"
    run("--output_dir", str(ckpt), "--dataset", str(corpus), "--max_steps", "10", "--gradient_checkpointing", "true",
        *TINY, cache=cache)
    assert losses(ckpt) == pytest.approx(losses(out), rel=1e-6)


def test_compile_matches_eager_exports_plain_keys_and_resumes_eagerly(tiny_run, corpus, tmp_path):
    """--compile (inductor, on the CPU): the eager run's losses to float tolerance, a final folder
    without torch.compile's `_orig_mod.` prefix, and checkpoints an eager run resumes from."""
    import shutil

    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out, cache, _ = tiny_run
    comp = tmp_path / "compiled"
    # No sample generation: its growing prompt recompiles the blocks at every length, which costs
    # most of this test's time and tests nothing of training.
    run("--output_dir", str(comp), "--dataset", str(corpus), "--max_steps", "10", "--compile", "true", *TINY,
        "--sample_tokens", "0", cache=cache, timeout=900)
    assert losses(comp) == pytest.approx(losses(out), rel=1e-4)
    with safe_open(str(comp / "final" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "_orig_mod" in k]
    _, info = AutoModelForCausalLM.from_pretrained(comp / "final", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    eager = tmp_path / "eager"
    shutil.copytree(comp, eager, symlinks=True)
    proc = run("--output_dir", str(eager), "--dataset", str(corpus), "--max_steps", "12", "--resume", "true", *TINY,
               cache=cache)
    assert step_folder_name(10) in proc.stderr and len(losses(eager)) == 12


def run_refused(capsys, monkeypatch, *args: str, cache: Path) -> list[str]:
    """The recipe's main in this process (no interpreter start-up); it must exit 2. Its stderr lines."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    monkeypatch.setenv("ACCELTRAIN_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        _load_recipe().main(list(args))
    err = capsys.readouterr().err
    assert e.value.code == 2, err[-3000:]
    return err.strip().splitlines()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "/nonexistent/data.txt"], "/nonexistent/data.txt"),
        (["--model_size", "7b"], "model_size '7b' is not a preset"),
        (["--n_heads", "3"], "d_model=32 is not divisible by n_heads=3"),
        (["--max_steps", "0"], "max_steps must be >= 1"),
        (["--vocab_size", "100"], "vocab_size must be >= 258"),
        (["--num_workers", "-1"], "num_workers must be >= 0"),
        (["--activation", "relu2"], "activation='relu2' is unknown"),
        (["--dropout", "1.5"], "dropout must be in [0, 1)"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, monkeypatch, args, message):
    err = run_refused(capsys, monkeypatch, "--output_dir", str(tmp_path / "o"), "--max_corpus_bytes", "100000",
                      *TINY, *args, cache=tmp_path / "cache")
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "o").exists()  # checked before anything is read, trained or written


def test_empty_corpus_is_an_error(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    err = run_refused(capsys, monkeypatch, "--output_dir", str(tmp_path / "o"), "--dataset", str(empty), *TINY,
                      cache=tmp_path / "c")
    assert err[-1].startswith("error: ") and "empty" in err[-1]


def test_output_dir_of_another_run_is_not_touched(tiny_run, corpus, capsys, monkeypatch):
    out, cache, _ = tiny_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    err = run_refused(capsys, monkeypatch, "--output_dir", str(out), "--dataset", str(corpus), "--max_steps", "3",
                      *TINY, cache=cache)
    assert "holds checkpoints of an earlier run" in err[-1] and "--resume" in err[-1]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("config", sorted((ROOT / "recipes" / "configs").glob("pretrain_*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_parse(config):
    from acceltrain.config import parse_config

    cfg = parse_config(_load_recipe().PretrainConfig, ["--config", str(config)])
    cfg.validate()
    assert cfg.model_size in config.stem


def test_yaml_list_of_sources_parses_to_weighted_specs():
    from acceltrain.config import parse_config
    from acceltrain.data.sources import SourceSpec, parse_sources

    cfg = parse_config(_load_recipe().PretrainConfig, ["--config", str(ROOT / "recipes" / "configs" / "pretrain_tiny_mixture.yaml")])
    assert parse_sources(cfg.dataset) == [SourceSpec("data/code/", 0.7), SourceSpec("data/prose.jsonl", 0.3)]


def test_a_weighted_mixture_trains_and_logs_its_realised_shares(corpus, tmp_path):
    second = make_corpus(tmp_path / "other.jsonl", docs=120, seed=3)
    shards = tmp_path / "parts"
    shards.mkdir()
    for i in range(3):  # a glob over several input files is one source
        make_corpus(shards / f"part{i}.jsonl", docs=60, seed=10 + i)
    held = make_corpus(tmp_path / "held.jsonl", docs=40, seed=99)
    cache = tmp_path / "cache"
    proc = run("--output_dir", str(tmp_path / "mix"), "--dataset", f"{corpus}:0.5,{second}:0.3,{shards}/*.jsonl:0.2",
               "--eval_dataset", str(held), "--tokenize_workers", "2", "--max_steps", "2", *TINY, cache=cache)
    assert f"held out (from {held})" in proc.stdout
    line = next(x for x in proc.stdout.splitlines() if x.startswith("mixture"))
    shares = [float(part.rsplit(" ", 1)[1]) for part in line.split(": ", 1)[1].split(", ")]
    assert shares == pytest.approx([0.5, 0.3, 0.2], abs=0.01)
    assert len(list((cache / "shards").iterdir())) == 4  # one shard folder per source, validation included
    card = (tmp_path / "mix" / "final" / "README.md").read_text()
    assert f"{corpus}:0.5" in card and " shards |" in card


@pytest.mark.parametrize("make, args, message", [
    ("badline", ["--tokenizer_sample_bytes", "300"], "bad.jsonl:40: not valid JSON"),
    ("nocolumn", [], "bad.jsonl:1: no column 'text'; keys: body"),  # found while sampling for the tokenizer
])
def test_bad_data_is_one_line_exit_2_and_leaves_no_cache_entry(tmp_path, corpus, capsys, monkeypatch, make, args,
                                                              message):
    """Bad input found after the tokenizer was trained on its sample: the tokenizer goes too."""
    bad = tmp_path / "bad.jsonl"
    lines = corpus.read_bytes().splitlines(keepends=True)
    if make == "badline":
        bad.write_bytes(b"".join(lines[:39]) + b'{"text": "cut\n' + b"\n" + b"".join(lines[39:]))
    elif make == "nocolumn":
        bad.write_bytes(corpus.read_bytes().replace(b'"text"', b'"body"'))
    dataset = f"{corpus}:0.7,{bad}:0.3"
    cache = tmp_path / "cache"
    err = run_refused(capsys, monkeypatch, "--output_dir", str(tmp_path / "o"), "--dataset", dataset, *TINY, *args,
                      cache=cache)
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    if make in ("badline", "nocolumn"):  # (every other kind of bad file: tests/unit/test_data_shards.py)
        assert str(bad) in err[0]
    left = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    assert left == [], left
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("dataset, message", [
    ("{corpus}:0.7,{corpus}:0", "weight of '{corpus}' must be > 0, got '0'"),
    ("{corpus}:0.7,{corpus}:-1", "weight of '{corpus}' must be > 0, got '-1'"),
    ("{tmp}/none/*.jsonl", "{tmp}/none/*.jsonl: glob matches no"),
])
def test_bad_dataset_specs_exit_2_in_process(tmp_path, corpus, capsys, dataset, message):
    fill = {"corpus": corpus, "tmp": tmp_path}
    with pytest.raises(SystemExit) as e:
        _load_recipe().main(["--output_dir", str(tmp_path / "o"), "--dataset", dataset.format(**fill),
                             "--cache_dir", str(tmp_path / "cache"), *TINY])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message.format(**fill) in err[0]
    assert not (tmp_path / "o").exists() and not (tmp_path / "cache").exists()


def _load_recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("pretrain_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module
