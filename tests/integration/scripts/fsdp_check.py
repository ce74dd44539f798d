"""Run under torchrun (2 CPU ranks, gloo): the trainer on FSDP2 (or DDP for reference).

Usage: fsdp_check.py toy OUT [--ddp]   -> OUT/params.json (full parameters after 10 steps)
       fsdp_check.py hf OUT            -> OUT/hf (save_pretrained of a tiny Llama) + OUT/logits.pt, and
                                          OUT/reload.json: the step-2 checkpoint's weights loaded back
                                          at the end (load_checkpoint_weights, as classify's export_best)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from acceltrain import BaseHook, BaseTrainer, CheckpointingHook  # noqa: E402
from tests.helpers import ToyTrainer, cpu_fsdp2_accelerator  # noqa: E402


class TinyLlama(BaseTrainer):
    def __init__(self, hooks: list | None = None, **kw):
        super().__init__(**kw)
        self._extra_hooks = hooks or []

    def build_hooks(self):
        return list(self._extra_hooks)

    def build_data_loader(self):
        ids = torch.randint(0, 64, (32, 12), generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids), batch_size=2)

    def build_model(self):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                            tie_word_embeddings=False))

    def build_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-2)

    def forward(self, input):
        (ids,) = input
        return self.model(input_ids=ids, labels=ids).loss, {}


class FullAt(BaseHook):
    """The full weights after step ``step`` (gathered on rank 0; collective)."""

    def __init__(self, step: int):
        self.step, self.weights = step, None

    def on_after_step(self, trainer):
        if trainer.step == self.step:
            self.weights = {k: v.clone() for k, v in trainer.accelerator.get_state_dict(trainer.model).items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["toy", "hf"])
    ap.add_argument("out", type=Path)
    ap.add_argument("--ddp", action="store_true")
    args = ap.parse_args()
    # hf: with accelerate_configs/fsdp2.yaml's auto-wrap and CPU-RAM-efficient loading.
    acc = None if args.ddp else cpu_fsdp2_accelerator(like_fsdp2_yaml=args.mode == "hf")
    kw = {"accelerator": acc} if acc is not None else {"device": "cpu"}
    if args.mode == "toy":
        t = ToyTrainer(max_steps=10, gradient_accumulation_steps=2, batch_size=4, n=128, optimizer="adamw",
                       grad_clip=0.5, scheduler=True, **kw)
        t.train()
        full = t.accelerator.get_state_dict(t.model)  # gathers FSDP shards on rank 0
        if t.is_main_process:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "params.json").write_text(json.dumps({k: v.flatten().tolist() for k, v in full.items()}))
            print("distributed_type", t.accelerator.distributed_type.value, "model", type(t.model).__name__)
    else:
        at2 = FullAt(2)
        t = TinyLlama(max_steps=4, workspace=str(args.out / "ws"), hooks=[at2, CheckpointingHook(interval=2)], **kw)
        t.train()
        if t.is_main_process and not args.ddp:
            from torch.distributed.fsdp import FSDPModule

            units = [type(m).__name__ for m in t.model.modules() if isinstance(m, FSDPModule)]
            print("fsdp units", " ".join(units))
        t.save_pretrained(args.out / "hf")
        probe = torch.arange(10).unsqueeze(0)
        t.model.eval()
        with torch.no_grad():
            logits = t.model(input_ids=probe).logits  # every rank: FSDP forwards are collective
        if t.is_main_process:
            torch.save(logits, args.out / "logits.pt")
        from acceltrain.checkpoint import verify_checkpoint
        from acceltrain.recipe_kit import load_checkpoint_weights
        from tests.helpers import run_step_dir

        folder = run_step_dir(args.out / "ws", 2)
        load_checkpoint_weights(t, folder)  # the optimizer and the step stay at step 4's
        back = t.accelerator.get_state_dict(t.model)
        if t.is_main_process:
            (args.out / "reload.json").write_text(json.dumps({
                "sharded": verify_checkpoint(folder)["sharded"], "step": t.step,
                "names": sorted(back) == sorted(at2.weights),
                "unequal": [k for k in at2.weights if not torch.equal(back[k], at2.weights[k])]}))
    t.close()


if __name__ == "__main__":
    main()
