"""One CUDA GPU, one process: autocast, the GradScaler, fused AdamW with zero host syncs on a quiet
step, CUDA memory figures and bit-exact resume with CUDA RNG, workers and accumulation."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

from acceltrain import BaseHook, BaseTrainer, CheckpointingHook, CudaMaxMemoryHook, LoggingHook, ProgressHook
from tests.helpers import regression_data


class CudaToy(BaseTrainer):
    """A small MLP with dropout on CUDA; records the dtype its first linear layer computes in."""

    def __init__(self, *, fused: bool = True, dropout: float = 0.0, workers: int = 0, shuffle: bool = False,
                 hooks: list | None = None, scaler: torch.amp.GradScaler | None = None, nan_at: frozenset = frozenset(),
                 **kwargs):
        super().__init__(**kwargs)
        self.fused, self.dropout, self.workers, self.shuffle = fused, dropout, workers, shuffle
        self._extra_hooks, self._scaler, self.nan_at, self.seen = hooks or [], scaler, set(nan_at), 0
        self.compute_dtypes: list[torch.dtype] = []

    def build_data_loader(self):
        return torch.utils.data.DataLoader(regression_data(256, d=8), batch_size=8, shuffle=self.shuffle,
                                           num_workers=self.workers, pin_memory=True,
                                           generator=torch.Generator().manual_seed(1) if self.shuffle else None)

    def build_model(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 64), nn.GELU(), nn.Dropout(self.dropout), nn.Linear(64, 1)).to(self.device)
        # Seen from inside the root module's forward, so FSDP's and DeepSpeed's wrappers run as usual.
        model[0].register_forward_hook(lambda module, args, out: self.compute_dtypes.append(out.dtype))
        return model

    def build_optimizer(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-2, fused=self.fused)

    def build_lr_scheduler(self):
        return torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: 1.0 / (1 + s))

    def build_grad_scaler(self):
        return self._scaler if self._scaler is not None else super().build_grad_scaler()

    def build_hooks(self):
        return list(self._extra_hooks)

    def forward(self, input):
        x, y = input
        loss = nn.functional.mse_loss(self.model(x).float(), y)
        if self.seen in self.nan_at:
            loss = loss * float("nan")
        self.seen += 1
        return loss, {}


class Keep(BaseHook):
    def __init__(self):
        self.infos: list[dict] = []

    def on_after_step(self, trainer):
        self.infos.append(dict(trainer.step_info))


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().cpu().clone() for p in model.parameters()]


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_computes_in_half_precision_and_trains(precision, dtype):
    keep = Keep()
    t = CudaToy(max_steps=20, mixed_precision=precision, device="cuda", hooks=[keep, LoggingHook(interval=1)])
    t.train()
    assert t.step == 20 and set(t.compute_dtypes) == {dtype}
    assert all(p.dtype == torch.float32 for p in t.model.parameters())  # fp32 master weights
    assert (t.grad_scaler is not None) == (precision == "fp16")
    losses = [float(i["loss"]) for i in keep.infos]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_grad_scaler_overflow_backs_off_and_redoes_the_step_in_place():
    """A read step (LoggingHook every step): the overflow is found on the host, the scale is
    lowered and the same step redone with the next batch, spending no retry."""
    keep = Keep()
    # 2**40 overflows fp16 on the first backward; backed off once, 2**10 fits fp16 gradients.
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40, backoff_factor=2.0**-30)
    t = CudaToy(max_steps=3, mixed_precision="fp16", device="cuda", scaler=scaler,
                hooks=[keep, LoggingHook(interval=1, tensorboard=False, jsonl=False)])
    t.train()
    assert t.step == 3
    assert keep.infos[0]["skipped_batches"] == [0] and keep.infos[0]["non_finite_retries"] == 0
    assert keep.infos[0]["batches"] == [1]
    assert t.grad_scaler.get_scale() == pytest.approx(2.0**10)


def test_grad_scaler_overflow_on_a_quiet_step_is_skipped_on_the_device():
    keep = Keep()
    # 2**40 overflows fp16 on the first backward; backed off once, 2**10 fits fp16 gradients.
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40, backoff_factor=2.0**-30)
    t = CudaToy(max_steps=3, mixed_precision="fp16", device="cuda", scaler=scaler, hooks=[keep])
    t.train()
    assert [float(i["found_inf"]) for i in keep.infos] == [1.0, 0.0, 0.0]
    assert t.grad_scaler.get_scale() == pytest.approx(2.0**10)
    assert float(t.unwrapped_optimizer.state_dict()["state"][0]["step"]) == 2.0


def test_fused_adamw_matches_foreach_adamw():
    fused = CudaToy(max_steps=10, device="cuda", fused=True)
    fused.train()
    plain = CudaToy(max_steps=10, device="cuda", fused=False)
    plain.train()
    for a, b in zip(_params(fused.model), _params(plain.model), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


class SyncGuard(BaseHook):
    """Makes any host sync an error during the steps it is told are quiet."""

    def __init__(self, quiet: set[int]):
        self.quiet = quiet

    def on_before_step(self, trainer):
        torch.cuda.set_sync_debug_mode("error" if trainer.step + 1 in self.quiet else "default")

    def on_after_train(self, trainer):
        torch.cuda.set_sync_debug_mode("default")

    def on_teardown(self, trainer):
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("precision", [None, "bf16"])
def test_quiet_steps_do_not_synchronise_the_device(precision):
    """torch.cuda.set_sync_debug_mode('error') turns any host sync into an exception: the steps
    between LoggingHook's/ProgressHook's logging steps must run through it (pinned batches copied
    non-blocking, fused AdamW taking found_inf, clipping, the scheduler, all hooks)."""
    hooks = [SyncGuard(quiet={2, 3, 5, 6, 7}), CudaMaxMemoryHook(),
             ProgressHook(interval=4, bar=False, stream=io.StringIO()), LoggingHook(interval=4, tensorboard=False)]
    t = CudaToy(max_steps=8, grad_clip=1.0, gradient_accumulation_steps=2, mixed_precision=precision, device="cuda",
                hooks=hooks)
    t.train()
    assert t.step == 8


def test_cuda_max_memory_hook_reports_max_allocated():
    keep = Keep()
    t = CudaToy(max_steps=2, device="cuda", hooks=[CudaMaxMemoryHook(), keep])
    torch.cuda.reset_peak_memory_stats()
    big = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # 256 MiB
    t.train()
    del big
    reported = keep.infos[-1]["max_memory"]
    assert reported == pytest.approx(torch.cuda.max_memory_allocated() / 2**30)
    assert reported >= 0.25


def _resumable(workspace, max_steps):
    return CudaToy(max_steps=max_steps, dropout=0.2, workers=2, shuffle=True, gradient_accumulation_steps=2,
                   grad_clip=1.0, mixed_precision="bf16", device="cuda", workspace=workspace,
                   hooks=[CheckpointingHook(interval=3, exit_signals=[])])


def test_resume_is_bit_exact_with_cuda_rng_workers_and_accumulation(tmp_path):
    full = _resumable(tmp_path / "full", 6)
    full.train()
    first = _resumable(tmp_path / "split", 3)
    first.train()
    torch.cuda.manual_seed_all(1234)  # a resumed run must restore the CUDA RNG, not inherit this
    torch.manual_seed(1234)
    second = _resumable(tmp_path / "split", 6)
    second.train()
    assert second.step == 6
    for a, b in zip(_params(full.model), _params(second.model), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
