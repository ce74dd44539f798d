"""recipes/causal_lm.py end to end on tiny models made here: SFT with prompt masking, exact token
normalisation and perplexity, LoRA exports, packed text, the pretrain -> fine-tune chain, resume,
two processes and bad input."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, torchrun
from tests.helpers import LATEST, ckpt_root, run_step_dir

RECIPE = ROOT / "recipes" / "causal_lm.py"
TINY = ["--batch_size", "8", "--max_length", "64", "--log_interval", "1", "--eval_interval", "10",
        "--save_interval", "10", "--sample_tokens", "6", "--warmup_steps", "2", "--lr", "3e-3"]
PAIRS = ["--prompt_column", "prompt", "--response_column", "response"]
NAMES = ["alice", "bob", "carol", "dave", "erin", "frank"]

# Computes the token-mean loss of a model folder on prompt/response pairs with transformers only:
# an independent check of the recipe's masking, padding and reduction.
EVAL_CHECK = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, pairs = sys.argv[1], [json.loads(line) for line in open(sys.argv[2])]
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder).eval()
total, count = 0.0, 0
with torch.no_grad():
    for pair in pairs:
        p = tok(pair["prompt"])["input_ids"]
        r = tok(pair["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        logits = model(torch.tensor([p + r])).logits[0].double()
        logp = torch.log_softmax(logits[len(p) - 1:-1], -1)            # the positions predicting r
        total -= logp.gather(1, torch.tensor(r).unsqueeze(1)).sum().item()
        count += len(r)
ids = tok(pairs[0]["prompt"], return_tensors="pt")
out = model.generate(**ids, max_new_tokens=5, do_sample=False)
assert "acceltrain" not in sys.modules and out.shape[1] > ids["input_ids"].shape[1]
print(json.dumps({"loss": total / count, "tokens": count, "class": type(model).__name__}))
"""


def make_pairs(path: Path, n: int, seed: int) -> Path:
    """Pairs of varied lengths (so padding and token counts differ between micro-batches and ranks)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, a, b = rng.choice(NAMES), rng.randint(0, 20), rng.randint(0, 20)
        prompt = f"{name} has {a} apples" + " and some pears" * rng.randint(0, 3) + f", then gets {b} more. how many?"
        rows.append({"prompt": prompt, "response": f" {name} has {a + b} apples." + " yes" * rng.randint(0, 4)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run(*args: str, cache: Path, expect: int = 0, cwd: Path = ROOT, script: Path = RECIPE) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELTRAIN_CACHE": str(cache), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in records(out) if "loss" in r]


def last_eval(out: Path) -> dict:
    return [r for r in records(out) if "eval/loss" in r][-1]


def eval_check(folder: Path, pairs: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", EVAL_CHECK, str(folder), str(pairs)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_recipe():
    spec = importlib.util.spec_from_file_location("causal_lm_recipe", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def run_inprocess(module, argv: list[str], trainer_class=None) -> Path:
    """Run the recipe in this process (no interpreter start-up); a fresh Accelerate state each time."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    if trainer_class is None:
        return module.main(argv)
    from acceltrain.config import parse_config

    cfg = parse_config(module.CausalLMConfig, argv)
    cfg.validate()
    trainer = trainer_class(cfg)
    trainer.train()
    return trainer.finish()


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    return {"train": make_pairs(root / "train.jsonl", 200, seed=0), "eval": make_pairs(root / "eval.jsonl", 7, seed=1)}


@pytest.fixture(scope="module")
def base(tmp_path_factory, data) -> Path:
    """A tiny Llama and its BPE tokenizer, saved as a Hugging Face folder (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from acceltrain.data import train_bpe_tokenizer

    folder = tmp_path_factory.mktemp("base")
    texts = [r["prompt"] + r["response"] for r in map(json.loads, data["train"].read_text().splitlines())]
    tok = train_bpe_tokenizer(texts, 300, folder)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, base, data):
    out = tmp_path_factory.mktemp("sft") / "run"
    proc = run("--model", str(base), "--dataset", str(data["train"]), "--eval_dataset", str(data["eval"]), *PAIRS,
               "--output_dir", str(out), "--max_steps", "20", *TINY, cache=tmp_path_factory.mktemp("cache"))
    return out, proc


def test_sft_loss_falls_and_perplexity_is_the_exact_token_mean(sft_run, data):
    out, proc = sft_run
    got = losses(out)
    assert len(got) == 20 and sum(got[-3:]) / 3 < sum(got[:3]) / 3 - 1.0
    ev = last_eval(out)
    assert ev["eval/perplexity"] == pytest.approx(math.exp(ev["eval/loss"]), rel=1e-12)
    assert "Sample 20/20:" in proc.stdout and "Saved" in proc.stdout
    check = eval_check(out / "final", data["eval"])  # transformers only, one pair at a time, no padding
    assert check["class"] == "LlamaForCausalLM"
    assert ev["eval/tokens"] == check["tokens"]
    assert ev["eval/loss"] == pytest.approx(check["loss"], abs=1e-5)
    card = (out / "final" / "README.md").read_text()
    assert "final evaluation perplexity" in card and "prompt/response, prompt masked" in card


def test_accumulation_and_padding_do_not_change_the_loss(tmp_path, base, data):
    """k micro-batches of differently padded examples give the unaccumulated token mean exactly."""
    from safetensors.torch import load_file

    from acceltrain import BaseTrainer
    from acceltrain.data.sft import count_target_tokens

    module = load_recipe()
    common = ["--model", str(base), "--dataset", str(data["train"]), "--eval_dataset", str(data["eval"]), *PAIRS,
              "--max_steps", "4", *TINY, "--sample_tokens", "0"]
    os.environ["ACCELTRAIN_CACHE"] = str(tmp_path / "cache")
    whole = run_inprocess(module, [*common, "--output_dir", str(tmp_path / "whole")])
    split = run_inprocess(module, [*common, "--output_dir", str(tmp_path / "split"), "--batch_size", "2",
                                   "--gradient_accumulation_steps", "4"])
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "whole"), rel=1e-5)
    a, b = load_file(str(whole / "model.safetensors")), load_file(str(split / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)

    class MeanOfMeans(module.CausalLMTrainer):  # what a per-micro-batch mean would give instead
        count_loss_items = BaseTrainer.count_loss_items

        def forward(self, batch):
            loss, records = super().forward(batch)
            return loss / count_target_tokens(batch["labels"]), records

    naive = run_inprocess(module, [*common, "--output_dir", str(tmp_path / "naive"), "--batch_size", "2",
                                   "--gradient_accumulation_steps", "4"], trainer_class=MeanOfMeans)
    c = load_file(str(naive / "model.safetensors"))
    assert max((a[name] - c[name]).abs().max() for name in a) > 1e-3  # 1,000x the tolerance above


def test_lora_trains_and_exports_an_adapter_peft_loads(tmp_path, base, data):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    proc = run("--model", str(base), "--dataset", str(data["train"]), *PAIRS, "--output_dir", str(out),
               "--max_steps", "6", *TINY, "--lora_r", "4", "--merge_lora", "true", cache=tmp_path / "cache")
    model = AutoModelForCausalLM.from_pretrained(base)
    linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    expected = sum(4 * (m.in_features + m.out_features) for m in linear)  # A (r x in) + B (out x r)
    assert f"{expected:,} trainable" in proc.stdout
    adapter = load_file(str(out / "final" / "adapter_model.safetensors"))
    assert all("lora_A" in k or "lora_B" in k for k in adapter) and len(adapter) == 2 * len(linear)
    assert sum(t.numel() for t in adapter.values()) == expected
    assert not (out / "final" / "model.safetensors").exists()
    ckpt = run_step_dir(out, 6)
    optim = torch.load(ckpt / "optimizer.pt", weights_only=True)
    moments = sum(v.numel() for s in optim["state"].values() for k, v in s.items() if k in ("exp_avg", "exp_avg_sq"))
    assert moments == 2 * expected  # AdamW state for the adapter only
    weights = load_file(str(ckpt / "model.safetensors"))
    assert sum(t.numel() for k, t in weights.items() if "lora_" in k) == expected
    assert all("lora_" in k or "rotary" in k for k in weights)  # the checkpoint holds no base weight
    check = f"""
import sys, torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from peft import LoraConfig, PeftModel, get_peft_model
probe = torch.arange(12).unsqueeze(0)
# the trained model as the trainer held it at its last step (the checkpoint), rebuilt with peft
trained = get_peft_model(AutoModelForCausalLM.from_pretrained(r'{base}'),
                         LoraConfig(r=4, lora_alpha=16, lora_dropout=0.05, target_modules='all-linear', task_type='CAUSAL_LM'))
# the checkpoint holds only what trains: the frozen base comes from the base folder
missing, unexpected = trained.load_state_dict(load_file(r'{ckpt / "model.safetensors"}'), strict=False)
assert not unexpected and missing and all("lora_" not in k for k in missing)
want = trained.eval()(probe).logits
lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(r'{base}'), r'{out / "final"}').eval()
torch.testing.assert_close(lora(probe).logits, want, atol=1e-5, rtol=0)
merged = AutoModelForCausalLM.from_pretrained(r'{out / "merged"}').eval()
torch.testing.assert_close(merged(probe).logits, want, atol=1e-5, rtol=0)
base = AutoModelForCausalLM.from_pretrained(r'{base}').eval()
assert (base(probe).logits - want).abs().max() > 1e-4      # training did change the model
assert 'acceltrain' not in sys.modules and type(merged).__name__ == 'LlamaForCausalLM'
"""
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "library_name: peft" in (out / "final" / "README.md").read_text()


def test_lr_find_runs_on_the_recipe_trainer(tmp_path, base, data):
    config = tmp_path / "lr.yaml"
    config.write_text(f"recipe: causal_lm\nmodel: {base}\ndataset: {data['train']}\nprompt_column: prompt\n"
                      f"response_column: response\nmax_length: 64\noutput_dir: {tmp_path / 'run'}\n")
    proc = subprocess.run([sys.executable, "-m", "acceltrain.cli", "lr-find", "--config", str(config), "--num_steps", "30"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "ACCELTRAIN_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("suggested learning rate: ") and 1e-5 < float(line.split(": ")[1].split()[0]) < 10
    assert not ckpt_root(tmp_path / "run").exists()


def test_lora_default_targets_cover_gpt2_conv1d_layers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from acceltrain.recipe_kit import LoraFields, apply_lora

    model = apply_lora(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2)),
                       LoraFields(lora_r=2), task_type="CAUSAL_LM")
    adapted = {n.split(".")[-4] for n, p in model.named_parameters() if p.requires_grad}
    assert adapted == {"c_attn", "c_proj", "c_fc"}
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)


def test_packed_text_with_gradient_checkpointing(tmp_path, base, data):
    out = tmp_path / "text"
    run("--model", str(base), "--dataset", str(data["train"]), "--text_column", "prompt", "--output_dir", str(out),
        "--max_steps", "12", *TINY, "--max_length", "32", "--gradient_checkpointing", "true", cache=tmp_path / "cache")
    got = losses(out)
    assert len(got) == 12 and sum(got[-3:]) / 3 < sum(got[:3]) / 3 - 0.5
    ev = last_eval(out)
    assert ev["eval/tokens"] % 31 == 0  # whole windows of 32 tokens predict 31 each
    assert (out / "final" / "model.safetensors").is_file()


def test_chain_from_pretrain_uses_its_output_by_default(tmp_path, data):
    cache = tmp_path / "cache"
    missing = run("--dataset", str(data["train"]), *PAIRS, cache=cache, cwd=tmp_path, expect=2)
    assert missing.stderr.strip().splitlines()[-1] == (
        "error: --model runs/pretrain/final: no such folder; run `accelerate launch recipes/pretrain.py` first "
        "(it writes it) or pass --model")
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(json.loads(line)["prompt"] for line in data["train"].read_text().splitlines()))
    run("--dataset", str(text), "--max_steps", "2", "--d_model", "32", "--n_heads", "2", "--n_layers", "2",
        "--d_ff", "64", "--seq_len", "32", "--batch_size", "4", "--vocab_size", "300", "--sample_tokens", "0",
        "--warmup_steps", "1", cache=cache, cwd=tmp_path, script=ROOT / "recipes" / "pretrain.py")
    proc = run("--dataset", str(data["train"]), *PAIRS, "--max_steps", "3", *TINY, cache=cache, cwd=tmp_path)
    assert f"from {tmp_path / 'runs' / 'pretrain' / 'final'}" in proc.stdout
    assert (tmp_path / "runs" / "causal_lm" / "final" / "model.safetensors").is_file()


def test_resume_continues_exactly(tmp_path, base, data):
    module = load_recipe()
    os.environ["ACCELTRAIN_CACHE"] = str(tmp_path / "cache")
    args = ["--model", str(base), "--dataset", str(data["train"]), *PAIRS, *TINY, "--max_steps", "6",
            "--save_interval", "3", "--eval_interval", "3", "--sample_tokens", "0", "--lora_r", "2"]
    run_inprocess(module, [*args, "--output_dir", str(tmp_path / "a")])
    b = tmp_path / "b"
    shutil.copytree(tmp_path / "a", b, symlinks=True)
    shutil.rmtree(run_step_dir(b, 6))
    shutil.rmtree(b / "final")
    (ckpt_root(b) / LATEST).unlink()
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records(tmp_path / "a") if r["step"] <= 3))
    run_inprocess(module, [*args, "--output_dir", str(b), "--resume", "true"])
    assert losses(b) == losses(tmp_path / "a")  # exact: same batches, LoRA dropout RNG, optimizer state
    assert last_eval(b)["eval/loss"] == last_eval(tmp_path / "a")["eval/loss"]


@pytest.mark.multiproc
def test_two_processes_match_one_and_perplexity_is_exact(tmp_path, sft_run, base, data):
    """Ranks hold different token counts; normalising by the global count gives one process's losses."""
    out = tmp_path / "ddp"
    torchrun(RECIPE, "--model", str(base), "--dataset", str(data["train"]), "--eval_dataset", str(data["eval"]),
             *PAIRS, "--output_dir", str(out), "--max_steps", "20", *TINY, "--batch_size", "4",
             env={"ACCELTRAIN_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"})
    assert losses(out) == pytest.approx(losses(sft_run[0]), rel=1e-4)
    ev = last_eval(out)  # 7 evaluation pairs over 2 ranks x batch 4: the padding sample must not count
    check = eval_check(out / "final", data["eval"])
    assert ev["eval/tokens"] == check["tokens"] and ev["eval/loss"] == pytest.approx(check["loss"], abs=1e-5)


@pytest.fixture(scope="module")
def odd_folders(tmp_path_factory) -> dict[str, Path]:
    from transformers import BertConfig, BertForSequenceClassification

    root = tmp_path_factory.mktemp("odd")
    BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32)).save_pretrained(root / "classifier")
    (root / "empty").mkdir()
    (root / "adapter").mkdir()
    (root / "adapter" / "adapter_config.json").write_text("{}")
    return {k: root / k for k in ("classifier", "empty", "adapter")}


@pytest.mark.parametrize("args, message", [
    (["--model", "{classifier}", *PAIRS], "holds a BertForSequenceClassification, not a language model"),
    (["--model", "{empty}", *PAIRS], "not a Hugging Face model folder (no config.json)"),
    (["--model", "{adapter}", *PAIRS], "holds a LoRA adapter, not a model"),
    (["--lora_r", "4", "--lora_target_modules", "q_proj,nope", *PAIRS],
     "lora_target_modules: nope matches no module of LlamaForCausalLM; its linear layers: down_proj"),
    (["--prompt_column", "prompt", "--response_column", "answer"],
     "no response column 'answer'; available columns: prompt, response"),
    (["--prompt_column", "prompt"], "prompt_column and response_column go together"),
    (["--max_length", "500", *PAIRS], "max_length 500 is longer than --model's 128 positions"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, base, data, odd_folders, args, message):
    module = load_recipe()
    os.environ["ACCELTRAIN_CACHE"] = str(tmp_path / "cache")
    argv = ["--model", str(base), "--dataset", str(data["train"]), "--output_dir", str(tmp_path / "o"), "--max_length", "64",
            *[a.format(**odd_folders) for a in args]]
    with pytest.raises(SystemExit) as e:
        run_inprocess(module, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err[-1]
    assert not ckpt_root(tmp_path / "o").exists()


@pytest.mark.parametrize("config", sorted((ROOT / "recipes" / "configs").glob("causal_lm_*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_parse(config):
    from acceltrain.config import load_yaml, parse_config

    assert load_yaml(config)["recipe"] == "causal_lm"
    parse_config(load_recipe().CausalLMConfig, ["--config", str(config)]).validate()
