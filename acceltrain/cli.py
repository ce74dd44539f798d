"""The ``acceltrain`` command: ``--version``, ``env`` and the subcommands the recipes add."""

from __future__ import annotations

import argparse
import importlib.metadata
import math
import os
import platform
import runpy
import sys
from pathlib import Path
from typing import Any

from . import __version__
from .config import UserError, exit_on_user_error, load_yaml
from .plot import add_plot_parser
from .slurm import add_slurm_parser
from .sweep import add_sweep_parser

_PACKAGES = ("torch", "accelerate", "transformers", "peft", "datasets", "tokenizers", "safetensors", "deepspeed")


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def env_report() -> str:
    """What `acceltrain env` prints: versions, devices, threads, Accelerate's view of the launch."""
    import torch

    lines = [f"acceltrain {__version__}", f"python {platform.python_version()} ({sys.executable})",
             f"platform {platform.platform()}"]
    lines += [f"{name} {_version(name)}" for name in _PACKAGES]
    lines.append(f"torch threads {torch.get_num_threads()} (cpu count {os.cpu_count()})")
    if torch.cuda.is_available():
        lines.append(f"cuda {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)")
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            lines.append(f"  gpu {i}: {props.name}, {props.total_memory / 2**30:.1f} GiB, bf16 "
                         f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    else:
        lines.append("cuda not available: training runs on the CPU (bf16 autocast works, fp16 does not)")
    from accelerate.state import PartialState

    state = PartialState()
    lines.append(
        f"accelerate launch view: {state.distributed_type.value}, process {state.process_index} of "
        f"{state.num_processes}, device {state.device}"
    )
    launch_vars = {k: v for k, v in os.environ.items()
                   if k.startswith(("ACCELERATE_", "SLURM_JOB_ID", "SLURM_NNODES")) or k in
                   ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    for key in sorted(launch_vars):
        lines.append(f"  {key}={launch_vars[key]}")
    return "\n".join(lines)


def recipes_dir() -> Path:
    """The recipes/ folder of this checkout (or ``$ACCELTRAIN_RECIPES``)."""
    path = Path(os.environ.get("ACCELTRAIN_RECIPES") or Path(__file__).resolve().parents[1] / "recipes")
    if not path.is_dir():
        raise UserError(f"{path}: no recipes folder; run from a source checkout or set ACCELTRAIN_RECIPES")
    return path


def recipe_script(config: str | None) -> Path:
    """The recipe file a YAML config names with its ``recipe:`` key (default: pretrain)."""
    recipe = str(load_yaml(config).get("recipe", "pretrain")) if config else "pretrain"
    script = recipes_dir() / f"{recipe}.py"
    if not script.is_file():
        known = sorted(p.stem for p in recipes_dir().glob("*.py") if not p.stem.startswith("_"))
        raise UserError(f"{config}: recipe {recipe!r} does not exist; known recipes: {', '.join(known)}")
    return script


def _load_recipe(script: Path) -> Any:
    """Import a recipe file as a module (its dataclasses resolve annotations through sys.modules)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"acceltrain_recipe_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run_train(config: str | None, overrides: list[str]) -> int:
    """`acceltrain train --config FILE.yaml [--field value ...]`: run the recipe the file names.

    With no ``--config`` it runs the pretraining demo. ``--help`` lists the fields of the recipe
    the config names (every field is also a flag).
    """
    from .compat.selgis_cli import is_selgis_config, run_selgis_train

    if config and is_selgis_config(config):  # a SELGIS config file: SELGIS's `selgis train --config`
        return run_selgis_train(config, overrides)
    script = recipe_script(config)
    argv = (["--config", config] if config else []) + overrides
    if "-h" in overrides or "--help" in overrides:
        from .config import parse_config

        config_cls, _ = _load_recipe(script).RECIPE
        parse_config(config_cls, argv, prog="acceltrain train")  # prints, exits 0
    sys.argv = [str(script), *argv]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def run_lr_find(config: str | None, overrides: list[str], plot: str | None, num_steps: int) -> int:
    """`acceltrain lr-find --config FILE.yaml`: the LR range test on the recipe's own trainer.

    Builds the recipe's trainer from the config (each recipe module names its classes in
    ``RECIPE = (ConfigClass, TrainerClass)``), sweeps the LR with its forward, data and
    optimizer, restores everything, prints the suggestion and saves the plot.
    """
    from .config import parse_config

    config_cls, trainer_cls = _load_recipe(recipe_script(config)).RECIPE
    cfg = parse_config(config_cls, (["--config", config] if config else []) + overrides, prog="acceltrain lr-find")
    if hasattr(cfg, "validate"):
        cfg.validate()
    trainer = trainer_cls(cfg)
    trainer._build()
    path = Path(plot) if plot else (trainer.workspace or Path(".")) / "lr_find.png"
    lr = trainer.find_lr(plot=path, num_steps=num_steps)
    if trainer.is_main_process:
        print(f"suggested learning rate: {lr:.3g} (plot: {path})")
    trainer.close()
    return 0


def _load_causal_lm(folder: str, trust_remote_code: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise UserError(f"--model {folder}: not a Hugging Face model folder (no config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(f"--model {folder}: cannot load a causal LM and tokenizer ({str(e).splitlines()[0]})") from None
    import torch

    # One device: the first GPU when there is one (not yet run on a GPU in CI: README, Limits).
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tok


def _check(ok: bool, flag: str, expected: str, value: Any) -> None:
    # `not ok` rather than the negated comparison: NaN fails every comparison, so it is rejected too.
    if not ok:
        raise UserError(f"{flag} must be {expected}, got {value!r}")


def check_generate_args(args: argparse.Namespace) -> None:
    """One-line errors for `acceltrain generate` flags, before any model is loaded."""
    _check(args.prompt != "", "--prompt", "non-empty text", args.prompt)
    _check(args.max_new_tokens >= 1, "--max_new_tokens", ">= 1", args.max_new_tokens)
    _check(args.temperature >= 0 and math.isfinite(args.temperature), "--temperature", ">= 0 (0: greedy)",
           args.temperature)
    _check(args.top_k >= 0, "--top_k", ">= 0 (0: no top-k filter)", args.top_k)
    _check(0 < args.top_p <= 1, "--top_p", "in (0, 1]", args.top_p)
    _check(args.repetition_penalty > 0 and math.isfinite(args.repetition_penalty), "--repetition_penalty",
           "> 0 (1: none)", args.repetition_penalty)
    _check(args.num_beams >= 1, "--num_beams", ">= 1", args.num_beams)


def run_generate(args: argparse.Namespace) -> int:
    """Sample from a model folder through transformers' generate (KV cache on).

    ``--temperature 0`` or ``--num_beams > 1`` decode deterministically (greedy or beam search);
    otherwise tokens are sampled with temperature, top-k and top-p, seeded by ``--seed``.
    """
    import torch

    check_generate_args(args)
    model, tok = _load_causal_lm(args.model, args.trust_remote_code)
    ids = tok(args.prompt, return_tensors="pt").input_ids.to(model.device)
    if ids.shape[1] == 0:
        raise UserError(f"--prompt {args.prompt!r}: the tokenizer of {args.model} turns it into no tokens")
    sample = args.temperature > 0 and args.num_beams == 1
    torch.manual_seed(args.seed)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=sample,
            temperature=args.temperature if sample else None, top_k=args.top_k if sample else None,
            top_p=args.top_p if sample else None, repetition_penalty=args.repetition_penalty,
            num_beams=args.num_beams, use_cache=True,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    print(tok.decode(out[0], skip_special_tokens=True))
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Perplexity of a model folder on text: every full seq_len window, mean next-token loss, exp of it.

    Every window predicts ``seq_len - 1`` tokens, so the mean over windows is the mean over tokens.
    """
    import json

    import torch

    from .data import PackedTokens, load_texts, pack_texts, texts_fingerprint
    from .recipe_kit import cache_root

    _check(args.seq_len >= 2, "--seq_len", ">= 2 (a window predicts seq_len - 1 tokens)", args.seq_len)
    _check(args.batch_size >= 1, "--batch_size", ">= 1", args.batch_size)
    _check(args.max_bytes >= 0, "--max_bytes", ">= 0 (0: all)", args.max_bytes)
    model, tok = _load_causal_lm(args.model, args.trust_remote_code)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and args.seq_len > limit:
        raise UserError(f"--seq_len {args.seq_len}: the model in {args.model} takes at most {limit} positions")
    cache = cache_root()
    texts = load_texts(args.dataset, text_column=args.text_column, config_name=args.dataset_config,
                       max_bytes=args.max_bytes or None, cache_dir=cache / "datasets")
    corpus = pack_texts(texts, tok, cache / "packed", fingerprint=texts_fingerprint(texts))
    windows = PackedTokens(corpus, args.seq_len)
    if len(windows) == 0:
        raise UserError(f"--dataset {args.dataset}: {corpus.num_tokens} tokens found, fewer than one window of "
                        f"--seq_len {args.seq_len}; give more text or a smaller --seq_len")
    loader = torch.utils.data.DataLoader(windows, batch_size=args.batch_size)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            ids = batch["input_ids"].to(model.device)
            loss = model(input_ids=ids, labels=ids).loss
            total += loss.item() * len(batch["input_ids"])
            count += len(batch["input_ids"])
    loss = total / count
    print(json.dumps({"model": args.model, "windows": count, "seq_len": args.seq_len, "tokens": corpus.num_tokens,
                      # JSON has no infinity: a perplexity too large for a float is null.
                      "loss": round(loss, 6), "perplexity": round(math.exp(loss), 4) if loss < 700 else None}))
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors follow the project rule: one ``error: ...`` line, exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {self.prog}: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="acceltrain", description="Training toolkit on Hugging Face Accelerate.")
    parser.add_argument("--version", action="version", version=f"acceltrain {__version__}")
    sub = parser.add_subparsers(dest="command")  # subparsers are _OneLineParser too (argparse's default)
    sub.add_parser("env", help="versions, devices and Accelerate's view of the launch environment")
    sub.add_parser("version", help="print the version (as --version)")
    sub.add_parser("device", help="the compute device (CUDA/MPS/CPU) and GPU details")
    # No -h of its own: `acceltrain train [--config FILE] --help` prints the recipe's fields.
    train = sub.add_parser("train", add_help=False,
                           help="run the recipe a YAML config names (no config: the pretraining demo); "
                                "--help lists the recipe's fields")
    train.add_argument("--config", help="a recipe YAML with a `recipe:` key (pretrain, causal_lm, classify)")
    lr_find = sub.add_parser("lr-find", help="LR range test on the recipe a YAML config names")
    lr_find.add_argument("--config", help="a recipe YAML (its fields can be overridden with flags)")
    lr_find.add_argument("--plot", help="where to save the loss-vs-LR plot (default: output_dir/lr_find.png)")
    lr_find.add_argument("--num_steps", type=int, default=100, help="LR values tried between 1e-7 and 10")
    gen = sub.add_parser("generate", help="sample text from a model folder")
    gen.add_argument("--model", required=True, help="a Hugging Face model folder (e.g. runs/pretrain/final)")
    gen.add_argument("--prompt", required=True, help="the text to continue (non-empty)")
    gen.add_argument("--max_new_tokens", type=int, default=64, help="tokens to generate (>= 1)")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (>= 0; 0: greedy)")
    gen.add_argument("--top_k", type=int, default=40, help="sample from the k likeliest tokens (0: no limit)")
    gen.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (1: no limit)")
    gen.add_argument("--repetition_penalty", type=float, default=1.0, help="> 0; above 1 discourages repeats")
    gen.add_argument("--num_beams", type=int, default=1,
                     help="beam search width (>= 1); above 1 decodes deterministically, without sampling")
    gen.add_argument("--seed", type=int, default=0, help="seed for sampling")
    ev = sub.add_parser("evaluate", help="perplexity of a model folder on text (every full window)")
    ev.add_argument("--model", required=True, help="a Hugging Face model folder (e.g. runs/pretrain/final)")
    ev.add_argument("--dataset", required=True, help="a local .txt/.jsonl/.csv/.parquet file or folder, or a Hub name")
    ev.add_argument("--dataset_config", help="Hub dataset config name")
    ev.add_argument("--text_column", default="text", help="column holding the text (jsonl/csv/parquet/Hub)")
    ev.add_argument("--seq_len", type=int, default=256, help="tokens per window (>= 2)")
    ev.add_argument("--batch_size", type=int, default=8, help="windows per forward pass")
    ev.add_argument("--max_bytes", type=int, default=0, help="read at most this much text (0: all)")
    for p in (gen, ev):
        p.add_argument("--trust_remote_code", action="store_true", help="run code shipped with the model (off by default)")
    # These set `handler`: main() calls it with the parsed arguments.
    add_slurm_parser(sub)
    add_sweep_parser(sub)
    add_plot_parser(sub)
    return parser


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in ("train", "lr-find"):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "env":
        print(env_report())
        return 0
    if args.command == "version":
        print(f"acceltrain {__version__}")
        return 0
    if args.command == "device":
        from .compat.selgis_cli import device_report

        print(device_report())
        return 0
    if args.command == "train":
        return run_train(args.config, rest)
    if args.command == "lr-find":
        return run_lr_find(args.config, rest, args.plot, args.num_steps)
    if args.command == "generate":
        return run_generate(args)
    if args.command == "evaluate":
        return run_evaluate(args)
    if getattr(args, "handler", None) is not None:
        return args.handler(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
