"""The ``acceltrain`` command: ``--version``, ``env`` and the subcommands the recipes add."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import sys

from . import __version__

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="acceltrain", description=__doc__)
    parser.add_argument("--version", action="version", version=f"acceltrain {__version__}")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("env", help="versions, devices and Accelerate's view of the launch environment")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "env":
        print(env_report())
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
