"""One process on one GPU: the CudaToy trainer plain, on FSDP2 or on DeepSpeed ZeRO-2.

Usage: engine_check.py plain|fsdp2|zero2 OUT   -> OUT/params.pt (full parameters after 10 steps)

FSDP2 and DeepSpeed need a process group even for one process: the test sets RANK,
WORLD_SIZE=1, LOCAL_RANK and MASTER_ADDR/PORT, as torchrun would, and Accelerate starts NCCL.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from tests.gpu.test_cuda import CudaToy  # noqa: E402


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    from accelerate import Accelerator

    kwargs = {"step_scheduler_with_optimizer": False}
    if mode == "fsdp2":
        from accelerate.utils import FullyShardedDataParallelPlugin

        acc = Accelerator(fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2), **kwargs)
    elif mode == "zero2":
        from accelerate.utils import DeepSpeedPlugin

        acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(zero_stage=2), **kwargs)
    else:
        acc = Accelerator(**kwargs)
    # DeepSpeed builds its own fused optimizer around ours; FSDP2 parameters are DTensors.
    t = CudaToy(max_steps=10, grad_clip=1.0, gradient_accumulation_steps=2, accelerator=acc, fused=mode == "plain")
    try:
        t.train()
        state = t.accelerator.get_state_dict(t.model)
        if t.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.detach().float().cpu() for k, v in state.items()}, out / "params.pt")
            print("distributed_type", t.accelerator.distributed_type.value, flush=True)
    finally:
        t.close()


if __name__ == "__main__":
    main()
