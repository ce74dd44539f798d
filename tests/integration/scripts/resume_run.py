"""A training run that can be interrupted by a signal at a chosen point, for the exact-resume tests.

Usage: resume_run.py WORKSPACE --max-steps N [--kill-at K [--mid-window] [--kill-rank R]]
       [--workers W] [--accum A] [--batch-size B] [--slow-save-at S] [--fsdp | --deepspeed STAGE]
       [--dump-loaded PATH] [--dump-at STEP]

Shuffling, dropout, an LR schedule, AdamW, accumulation and DataLoader workers are all on, so
every source of state a resume must restore matters. Each rank appends one JSON line per
step to WORKSPACE/steps_rank{r}.jsonl (loss and the sample indices of the step) and, at the
end, writes its model and optimizer state to WORKSPACE/final_rank{r}.pt.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from acceltrain import BaseHook, BaseTrainer, CheckpointingHook  # noqa: E402
from acceltrain.config import exit_on_user_error  # noqa: E402


def dataset(n: int = 96) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, :3].sum(1, keepdim=True) > 0).float()
    return torch.utils.data.TensorDataset(x, y, torch.arange(n))


class StepLog(BaseHook):
    def __init__(self, path: Path):
        self.path = path
        self.indices: list[int] = []

    def on_before_step(self, trainer):
        self.indices = []

    def on_after_step(self, trainer):
        line = {"step": trainer.step, "loss": trainer.step_info["loss"].item(), "indices": self.indices,
                "lr": trainer.step_info["lr"][0]}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


class ResumeTrainer(BaseTrainer):
    def __init__(self, args: argparse.Namespace, **kwargs):
        super().__init__(**kwargs)
        self.args = args
        self.micro = 0

    def build_data_loader(self):
        return torch.utils.data.DataLoader(dataset(), batch_size=self.args.batch_size, shuffle=not self.args.no_shuffle,
                                           num_workers=self.args.workers)

    def build_model(self):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(self.args.dropout), nn.Linear(32, 1))

    def build_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=3e-2, weight_decay=0.1)

    def build_lr_scheduler(self):
        total = self.max_steps

        def warmup_cosine(s: int) -> float:
            return min(1.0, (s + 1) / 3) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total))

        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, warmup_cosine)

    def build_hooks(self):
        rank = self.accelerator.process_index
        hooks = [StepLog(self.workspace / f"steps_rank{rank}.jsonl"),
                 CheckpointingHook(interval=self.args.interval, keep_previous=None)]
        if self.args.log_interval:  # before CheckpointingHook, so a save includes the step's figures
            from acceltrain import LoggingHook

            hooks.insert(1, LoggingHook(interval=self.args.log_interval, tensorboard=False))
        if self.args.dump_at is not None:
            hooks.append(DumpLoaded(self.workspace / f"state_at_{self.args.dump_at}.pt", at=self.args.dump_at))
        return [*hooks, DumpLoaded(self.args.dump_loaded)] if self.args.dump_loaded else hooks

    def forward(self, input):
        x, y, idx = input
        a = self.args
        rank = self.accelerator.process_index
        micro_in_window = self.micro % self.gradient_accumulation_steps
        self.micro += 1
        # --mid-window: the signal lands on micro-batch 1 of step kill_at (0-based), inside the window.
        if a.mid_window and rank == a.kill_rank and self.step == a.kill_at - 1 and micro_in_window == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        self.hooks[0].indices.extend(idx.tolist())
        logits = self.model(x)
        return nn.functional.binary_cross_entropy_with_logits(logits, y), {}


def full_state(trainer) -> tuple[dict, dict]:
    """The full weights and optimizer state, world-size independent; every rank must call it.

    Under DeepSpeed, gathered per parameter by DeepSpeed's own API (``safe_get_full_fp32_param``,
    ``safe_get_full_optimizer_state``: the fp32 master weights and AdamW moments), so a test of
    acceltrain's ZeRO re-partitioning does not check it with acceltrain's code.
    """
    if trainer.engine_kind == "deepspeed":
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        opt = trainer.model.optimizer
        steps = sorted({float(st["step"]) for st in opt.optimizer.state.values() if "step" in st})
        state = {}
        for name, param in trainer.model.module.named_parameters():
            state[name] = {"fp32": safe_get_full_fp32_param(param).detach().cpu().clone(),
                           **{key: safe_get_full_optimizer_state(param, key).detach().cpu().clone()
                              for key in ("exp_avg", "exp_avg_sq")}}
        return {}, {"state": state, "steps": steps, "lr": [g["lr"] for g in opt.param_groups],
                    "engine": [trainer.model.global_steps, trainer.model.global_samples,
                               trainer.model.gradient_accumulation_steps()]}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(trainer.model, trainer.unwrapped_optimizer, options=StateDictOptions(full_state_dict=True))


class DumpLoaded(BaseHook):
    """After the resume (it runs after CheckpointingHook): the full weights and optimizer state as
    loaded; with ``at``, instead the state after step ``at`` (what a checkpoint of that step holds)."""

    def __init__(self, path: Path, at: int | None = None):
        self.path, self.at = path, at

    def _dump(self, trainer):
        model, optim = full_state(trainer)  # every rank: collective
        if trainer.is_main_process:
            torch.save({"model": model, "optimizer": optim, "step": trainer.step,
                        "accumulation": trainer.gradient_accumulation_steps}, self.path)

    def on_before_train(self, trainer):
        if self.at is None:
            self._dump(trainer)

    def on_after_step(self, trainer):
        if trainer.step == self.at:
            self._dump(trainer)


class KillAfterStep(BaseHook):
    def __init__(self, step: int, rank: int):
        self.step, self.rank = step, rank

    def on_after_step(self, trainer):
        if trainer.step == self.step and trainer.accelerator.process_index == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


def real_elements(trainer: BaseTrainer, group: int, flat: torch.Tensor) -> torch.Tensor:
    """This rank's ZeRO-3 fp32 partition of sub-group ``group`` without the padding of each parameter."""
    rank, pieces, offset = trainer.accelerator.process_index, [], 0
    for param in trainer.model.optimizer.fp16_groups[group]:
        size = param.partition_numel()
        pieces.append(flat[offset:offset + min(size, max(0, param.ds_numel - rank * size))])
        offset += size
    return torch.cat(pieces)


@exit_on_user_error
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--max-steps", type=int, required=True)
    ap.add_argument("--kill-at", type=int)
    ap.add_argument("--mid-window", action="store_true")
    ap.add_argument("--kill-rank", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--interval", type=int, default=4)
    ap.add_argument("--slow-save-at", type=int)
    ap.add_argument("--log-interval", type=int, help="add a LoggingHook (metrics.jsonl) at this interval")
    ap.add_argument("--no-shuffle", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.3)
    ap.add_argument("--dump-loaded", type=Path, help="write the state as loaded by the resume here")
    ap.add_argument("--dump-at", type=int, help="write the state after this step to WORKSPACE/state_at_STEP.pt")
    ap.add_argument("--allow-global-batch-change", action="store_true")
    ap.add_argument("--second-signal", action="store_true", help="SIGTERM again in the middle of the save")
    ap.add_argument("--fsdp", action="store_true", help="FSDP2 on the CPU ranks (tests.helpers shim)")
    ap.add_argument("--deepspeed", type=int, metavar="STAGE", help="DeepSpeed ZeRO-STAGE (gloo, CPU)")
    args = ap.parse_args()

    if args.slow_save_at is not None:
        # Make the checkpoint write slow so the test can kill -9 the process in the middle of it.
        import acceltrain.checkpoint as ckpt

        original = ckpt._write_manifest

        def slow_manifest(folder, step, *rest, **kw):
            if step == args.slow_save_at:
                (folder.parent / "SAVING").write_text(str(step))
                time.sleep(60)
            return original(folder, step, *rest, **kw)

        ckpt._write_manifest = slow_manifest

    if args.second_signal:
        import acceltrain.checkpoint as ckpt

        original_rng_state = ckpt.rng_state

        def rng_state_then_signal():  # runs inside save_checkpoint, between the files it writes
            state = original_rng_state()
            os.kill(os.getpid(), signal.SIGTERM)
            return state

        ckpt.rng_state = rng_state_then_signal

    placement = {"device": "cpu"}
    if args.fsdp:
        from tests.helpers import cpu_fsdp2_accelerator

        placement = {"accelerator": cpu_fsdp2_accelerator()}
    if args.deepspeed is not None:
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        from tests.helpers import skip_deepspeed_shm_build

        skip_deepspeed_shm_build()

        plugin = DeepSpeedPlugin(zero_stage=args.deepspeed, zero3_save_16bit_model=True)
        if args.deepspeed == 3:  # partition every parameter, however small (the default keeps these whole)
            plugin.deepspeed_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        placement = {"accelerator": Accelerator(deepspeed_plugin=plugin, step_scheduler_with_optimizer=False,
                                                kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])}
    trainer = ResumeTrainer(args, max_steps=args.max_steps, gradient_accumulation_steps=args.accum,
                            grad_clip=1.0, workspace=args.workspace,
                            allow_global_batch_change=args.allow_global_batch_change, **placement)
    if args.kill_at is not None and not args.mid_window:
        original_build = trainer.build_hooks
        trainer.build_hooks = lambda: [*original_build(), KillAfterStep(args.kill_at, args.kill_rank)]
    trainer.train()
    rank = trainer.accelerator.process_index
    if args.deepspeed is not None:
        # torch's get_state_dict cannot read a ZeRO optimizer: gather the weights through
        # Accelerate and take this rank's partition (fp32 master, moments, step) as plain tensors.
        from acceltrain.checkpoint_deepspeed import optimizer_state

        full = trainer.accelerator.get_state_dict(trainer.model) or {}  # ZeRO-3: on rank 0 only
        model = {k: v.detach().clone() for k, v in full.items()}
        flat: dict[str, torch.Tensor] = {}

        def collect(obj, path: str) -> None:
            if isinstance(obj, torch.Tensor):
                flat[path] = obj.detach().clone()
            elif isinstance(obj, dict):
                for k, v in obj.items():
                    collect(v, f"{path}.{k}")
            elif isinstance(obj, (list, tuple)):
                for i, v in enumerate(obj):
                    collect(v, f"{path}.{i}")

        zero = optimizer_state(trainer)
        if args.deepspeed == 3:  # the tail of each parameter's partition is padding, never initialised
            zero["fp32_flat_groups"] = [real_elements(trainer, i, g) for i, g in enumerate(zero["fp32_flat_groups"])]
        collect(zero, "zero")
        torch.save({"model": model, "optimizer": {"state": {"zero": flat}}, "step": trainer.step,
                    "lr": [g["lr"] for g in trainer.model.optimizer.param_groups],
                    "engine": [trainer.model.global_steps, trainer.model.global_samples, trainer.model.skipped_steps]},
                   args.workspace / f"final_rank{rank}.pt")
        trainer.close()
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    full_model, full_optim = get_state_dict(trainer.model, trainer.unwrapped_optimizer,
                                            options=StateDictOptions(full_state_dict=True))  # collective
    if trainer.is_main_process:  # world-size independent, for the elastic tests
        torch.save({"model": full_model, "optimizer": full_optim, "step": trainer.step}, args.workspace / "final_full.pt")
    state = trainer.state_dict()
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731  (FSDP2 shards)
    from acceltrain.utils import map_nested_tensor

    torch.save({"model": map_nested_tensor(local, state["model"]), "optimizer": map_nested_tensor(local, state["optimizer"]),
                "step": trainer.step}, args.workspace / f"final_rank{rank}.pt")


if __name__ == "__main__":
    main()
