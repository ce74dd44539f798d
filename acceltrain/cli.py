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
from .utils import folder_problem

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
    the config names (every field is also a flag). LLM Trainer's ``scripts/train.py`` command
    line works too: a nested ``model:``/``training:``/``data:`` config (YAML or JSON),
    ``--resume_from_checkpoint PATH``, ``--force_retrain_tokenizer``, ``--log_level LEVEL``
    (see :mod:`acceltrain.compat.llm_trainer_cli`).
    """
    from .compat.selgis_cli import is_selgis_config, run_selgis_train

    if config and is_selgis_config(config):  # a SELGIS config file: SELGIS's `selgis train --config`
        return run_selgis_train(config, overrides)
    if "-h" in overrides or "--help" in overrides:
        from .config import parse_config

        script = recipe_script(config)
        config_cls, _ = _load_recipe(script).RECIPE
        parse_config(config_cls, (["--config", config] if config else []) + overrides, prog="acceltrain train")
        return 0  # parse_config printed the help and exited
    from .compat.llm_trainer_cli import train_arguments

    recipe_config, argv, cleanup = train_arguments(config, overrides)
    script = recipe_script(recipe_config)
    try:
        sys.argv = [str(script), *argv]
        runpy.run_path(str(script), run_name="__main__")
    finally:
        cleanup()
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
    trainer.build()
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


def generation_settings(args: argparse.Namespace) -> Any:
    """The decoding settings of `acceltrain generate`'s flags, checked (one-line errors), before
    any model is loaded."""
    from .generation import GenerationSettings

    if not args.prompts and not args.interactive:
        raise UserError("the following arguments are required: --prompt (or --prompts, or --interactive)")
    for prompt in args.prompts or []:
        _check(prompt != "", "--prompt", "non-empty text", prompt)
    if args.max_length is not None and args.max_new_tokens is not None:
        raise UserError("--max_length and --max_new_tokens: give one (max_length counts the prompt too)")
    settings = GenerationSettings(
        max_new_tokens=args.max_new_tokens if args.max_length is None and args.max_new_tokens is not None else 64,
        max_length=args.max_length, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, num_beams=args.num_beams, seed=args.seed)
    settings.check(lambda name: f"--{name}")
    return settings


def check_generate_args(args: argparse.Namespace) -> None:
    """One-line errors for `acceltrain generate` flags, before any model is loaded."""
    generation_settings(args)


def run_generate(args: argparse.Namespace) -> int:
    """Sample from a model folder through transformers' generate (KV cache on).

    ``--temperature 0`` or ``--num_beams > 1`` decode deterministically (greedy or beam search);
    otherwise tokens are sampled with temperature, top-k and top-p, seeded by ``--seed``. Each of
    ``--prompts a b ...`` gets its own continuation; ``--interactive`` then reads more prompts
    from the terminal until EOF (Ctrl-D), ``quit`` or ``exit``.
    """
    from .generation import generate_texts, prompt_loop

    settings = generation_settings(args)
    if args.interactive and not sys.stdin.isatty():
        raise UserError("--interactive needs a terminal (stdin is not a TTY); pass prompts with --prompts instead")
    model, tok = _load_causal_lm(args.model, args.trust_remote_code)
    for text in generate_texts(model, tok, args.prompts or [], settings):
        print(text, flush=True)
    if args.interactive:
        def answer(prompt: str) -> str:
            try:
                return generate_texts(model, tok, [prompt], settings)[0]
            except UserError as e:  # a prompt the tokenizer cannot use: say so and ask again
                return f"error: {e}"

        prompt_loop(answer, banner=f"{args.model}: type a prompt and Enter; quit, exit or Ctrl-D ends")
    return 0


def run_evaluate(args: argparse.Namespace) -> int:
    """Perplexity of a model folder on text: every full seq_len window, mean next-token loss, exp of it.

    The text is streamed and tokenized as the pretraining recipe does (bounded memory, every core,
    the content-keyed shard cache), so a corpus larger than RAM can be scored; a window never spans
    two 16 MB shards.

    Every window predicts ``seq_len - 1`` tokens, so the mean over windows is the mean over tokens.
    Then ``--generation_samples`` greedy continuations of held-out windows (their first half as
    the prompt, the next tokens as the reference) give distinct-n, repetition and BLEU. The
    result is one JSON line, and with ``--output_path`` a JSON file. LLM Trainer's
    ``scripts/evaluate.py`` line works too: ``--model_path``, ``--dataset_config FILE.json``
    (an evaluation config: dataset_name, dataset_config, text_column, max_length, batch_size),
    ``--output_path``, ``--max_batches``.
    """
    import json

    import torch

    from .compat.llm_trainer_cli import eval_config_file
    from .data import SourceSpec, TextSource, build_mixture, ingest
    from .data.mixture import SourceWindows
    from .metrics import generation_samples
    from .recipe_kit import cache_root

    eval_config_file(args)  # fills dataset, dataset_config, ... from a --dataset_config file
    if not args.dataset:
        raise UserError("the following arguments are required: --dataset (or --dataset_config FILE.json)")
    _check(args.seq_len >= 2, "--seq_len", ">= 2 (a window predicts seq_len - 1 tokens)", args.seq_len)
    _check(args.batch_size >= 1, "--batch_size", ">= 1", args.batch_size)
    _check(args.max_bytes >= 0, "--max_bytes", ">= 0 (0: all)", args.max_bytes)
    _check(args.max_batches is None or args.max_batches >= 1, "--max_batches", ">= 1", args.max_batches)
    _check(args.generation_samples >= 0, "--generation_samples", ">= 0 (0: none)", args.generation_samples)
    _check(args.generation_tokens >= 1, "--generation_tokens", ">= 1", args.generation_tokens)
    if args.output_path is not None and Path(args.output_path).is_dir():
        raise UserError(f"--output_path {args.output_path}: is a folder; give a file name")
    if args.output_path is not None:  # checked before the model is loaded and the text read
        parent = Path(args.output_path).absolute().parent
        if problem := folder_problem(parent):
            where = f"{parent} {problem}" if problem.startswith("is ") else problem
            raise UserError(f"--output_path {args.output_path}: {where}")
    model, tok = _load_causal_lm(args.model, args.trust_remote_code)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit and args.seq_len > limit:
        raise UserError(f"--seq_len {args.seq_len}: the model in {args.model} takes at most {limit} positions")
    cache = cache_root()
    # The pretraining recipe's streaming path: read in bounded pieces, tokenized on every core
    # into the content-keyed shard cache (a second evaluation of the same text tokenizes nothing).
    source = TextSource(SourceSpec(args.dataset, 1.0, args.text_column or "text"), max_bytes=args.max_bytes or None,
                        config_name=args.dataset_config, split=args.split, hash_cache=cache / "filehash")
    corpus = ingest(source.documents(), tok, cache / "shards", key=source.key())
    # Every full window of every shard is scored: the corpus is a mixture's named validation source.
    if SourceWindows(corpus, args.seq_len).num_windows == 0:
        raise UserError(f"--dataset {args.dataset}: {corpus.num_tokens} tokens found, fewer than one window of "
                        f"--seq_len {args.seq_len}; give more text or a smaller --seq_len")
    windows = build_mixture([corpus], seq_len=args.seq_len, eval_corpus=corpus)[1]
    loader = torch.utils.data.DataLoader(windows, batch_size=args.batch_size)
    total, count, batches = 0.0, 0, 0
    with torch.no_grad():
        for batch in loader:
            if args.max_batches is not None and batches >= args.max_batches:
                break
            ids = batch["input_ids"].to(model.device)
            loss = model(input_ids=ids, labels=ids).loss
            total += loss.item() * len(batch["input_ids"])
            count += len(batch["input_ids"])
            batches += 1
    loss = total / count
    result = {"model": args.model, "windows": count, "batches": batches, "seq_len": args.seq_len,
              "tokens": corpus.num_tokens,
              # JSON has no infinity: a perplexity too large for a float is null.
              "loss": round(loss, 6), "perplexity": round(math.exp(loss), 4) if loss < 700 else None}
    if args.generation_samples:
        result["generation"] = generation_samples(model, tok, windows, args.generation_samples, args.generation_tokens)
    print(json.dumps(result))
    if args.output_path is not None:
        out = Path(args.output_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)
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
    gen.add_argument("--model", "--model_path", dest="model", required=True,
                     help="a Hugging Face model folder (e.g. runs/pretrain/final)")
    gen.add_argument("--prompt", "--prompts", dest="prompts", nargs="+",
                     help="the text(s) to continue (non-empty), each continued on its own")
    gen.add_argument("--max_new_tokens", type=int, default=None, help="tokens to generate (>= 1; default 64)")
    gen.add_argument("--max_length", type=int, default=None,
                     help="instead of --max_new_tokens: total tokens, the prompt's included (transformers' meaning)")
    gen.add_argument("--interactive", action="store_true",
                     help="then read prompts from the terminal until EOF (Ctrl-D), quit or exit")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (>= 0; 0: greedy)")
    gen.add_argument("--top_k", type=int, default=40, help="sample from the k likeliest tokens (0: no limit)")
    gen.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass, in (0, 1] (1: no limit)")
    gen.add_argument("--repetition_penalty", type=float, default=1.0, help="> 0; above 1 discourages repeats")
    gen.add_argument("--num_beams", type=int, default=1,
                     help="beam search width (>= 1); above 1 decodes deterministically, without sampling")
    gen.add_argument("--seed", type=int, default=0, help="seed for sampling")
    ev = sub.add_parser("evaluate", help="perplexity of a model folder on text (every full window)")
    ev.add_argument("--model", "--model_path", dest="model", required=True,
                    help="a Hugging Face model folder (e.g. runs/pretrain/final)")
    ev.add_argument("--dataset", help="a local .txt/.jsonl/.csv/.parquet file or folder, or a Hub name")
    ev.add_argument("--dataset_config", help="Hub dataset config name, or an evaluation config file (.json/.yaml: "
                                             "dataset_name, dataset_config, text_column, max_length, batch_size)")
    ev.add_argument("--split", default="train", help="Hub dataset split")
    ev.add_argument("--text_column", default=None, help="column holding the text (jsonl/csv/parquet/Hub; default text)")
    ev.add_argument("--seq_len", type=int, default=None, help="tokens per window (>= 2; default 256)")
    ev.add_argument("--batch_size", type=int, default=None, help="windows per forward pass (default 8)")
    ev.add_argument("--max_bytes", type=int, default=0, help="read at most this much text (0: all)")
    ev.add_argument("--max_batches", type=int, default=None, help="evaluate at most this many batches (default: all)")
    ev.add_argument("--output_path", help="also write the results to this JSON file")
    ev.add_argument("--generation_samples", type=int, default=4,
                    help="greedy continuations of held-out windows scored for distinct-n, repetition, BLEU (0: none)")
    ev.add_argument("--generation_tokens", type=int, default=32, help="tokens per continuation")
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
