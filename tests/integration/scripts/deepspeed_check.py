"""Run under torchrun (2 CPU ranks): the trainer on DeepSpeed ZeRO-2/3, or DDP for reference.

Usage: deepspeed_check.py {ds2,ds3,ddp,cpu_ds} OUT  -> OUT/{mode}.json (full parameters after 8 steps)
DeepSpeed runs with ACCELERATE_USE_DEEPSPEED=true and a gloo process group (no GPU here): ds2 lets
the trainer build its Accelerator from the environment, ds3 passes its own; cpu_ds asks for
DeepSpeed with device="cpu", which must be refused rather than silently run as DDP.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.helpers import ToyTrainer, skip_deepspeed_shm_build  # noqa: E402


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    if mode.startswith("ds"):
        skip_deepspeed_shm_build()
    kw = dict(max_steps=8, gradient_accumulation_steps=2, batch_size=4, n=128, optimizer="adamw", grad_clip=0.5,
              scheduler=True)
    if mode == "ds2":
        # The trainer builds its Accelerator from the launcher's environment (ACCELERATE_USE_DEEPSPEED,
        # ACCELERATE_DEEPSPEED_ZERO_STAGE), as under `accelerate launch --config_file deepspeed_zero2.yaml`:
        # without a GPU it must pick the gloo backend itself, or each rank thinks it is rank 0 of 1.
        trainer = ToyTrainer(**kw)
    elif mode.startswith("ds"):
        from accelerate import Accelerator
        from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

        plugin = DeepSpeedPlugin(zero_stage=int(mode[2]), zero3_save_16bit_model=True)
        acc = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
        trainer = ToyTrainer(accelerator=acc, **kw)
    else:
        trainer = ToyTrainer(device="cpu", **kw)  # cpu_ds: DeepSpeed asked for, and refused, here
    trainer.train()
    full = trainer.accelerator.get_state_dict(trainer.model)  # gathers ZeRO-3 partitions
    if trainer.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{mode}.json").write_text(json.dumps({
            "engine": type(trainer.model).__name__, "world": trainer.accelerator.num_processes,
            "params": {k: v.float().flatten().tolist() for k, v in full.items()}}))
    trainer.close()


if __name__ == "__main__":
    main()
