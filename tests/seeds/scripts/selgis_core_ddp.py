"""Two gloo ranks run SELGIS's manual loop through SelgisCore under DDP (test_selgis_core.py).

Each rank takes its half of every batch of 16; gradient_accumulation_steps=2, so the first
backward of each window runs under no_sync and the second synchronises. Writes each rank's final
weights and what optimizer_step said when called after one backward of a window.
"""

import json
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from acceltrain.compat.selgis import SelgisConfig, SelgisCore, get_optimizer_grouped_params


def main(out: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    cfg = SelgisConfig(device="cpu", lr_finder_enabled=False, gradient_accumulation_steps=2, state_storage="memory")
    optimizer = torch.optim.AdamW(get_optimizer_grouped_params(model, cfg.weight_decay), lr=1e-2)
    core = SelgisCore(model, optimizer, None, cfg, "cpu")
    acc = core.trainer.accelerator
    rank, world = acc.process_index, acc.num_processes
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 8, generator=g)
    y = (x[:, 0] > 0).long()
    errors = []
    for i in range(8):
        xb, yb = x[i * 16:(i + 1) * 16][rank::world], y[i * 16:(i + 1) * 16][rank::world]
        loss = F.cross_entropy(core.model(xb), yb)
        assert core.check_loss(loss)
        core.backward_step(loss)
        if i == 0:
            try:
                core.optimizer_step()
            except RuntimeError as e:
                errors.append(str(e))
        if i % 2 == 1:
            assert core.optimizer_step()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()]).tolist()
    with open(f"{out}.{rank}.json", "w") as f:
        json.dump({"world": world, "ddp": type(core.model).__name__, "step": core.trainer.step, "errors": errors,
                   "weights": weights}, f)
    core.trainer.close()


if __name__ == "__main__":
    main(sys.argv[1])
