"""Non-finite steps: the per-step agreement across ranks, and steps decided on the device.

A mixin of :class:`~acceltrain.trainer.BaseTrainer` (not public API; the trainer's step loop
calls it). Host syncs: a step reads nothing from the device on the host unless some hook reads
it (``BaseHook.reads_step``: a logging hook on its logging steps, a hook that inspects the
update in ``on_before_optimizer_step`` on every step). The non-finite check then works as
follows (``defer_non_finite``):

- On a step some hook reads (and wherever deferral does not apply) the finite flag is read
  on the host (one read, together with the flags of earlier quiet steps): a non-finite
  attempt is discarded and redone with fresh micro-batches, neither the step counter nor
  the scheduler advances, and ``step_info["non_finite_retries"]``/``["skipped_batches"]``
  say so; an fp16 overflow lowers the scale and redoes the step without spending a retry.
- On a *quiet* step (no hook reads it, one process, plain gradients, and an optimizer
  that takes ``found_inf``: torch's fused Adam, AdamW, SGD, Adagrad) the flag stays on the
  device: ``found_inf = not isfinite(grad_norm)`` goes to the fused kernel (or to the
  GradScaler's own found_inf path), which leaves weights, moments and the optimizer's step
  count untouched when it is set, as ``torch.amp`` does. The host cannot know, so such a
  skipped step still counts: ``trainer.step`` and the scheduler advance and the next step
  draws fresh batches, which is the retry. ``step_info["found_inf"]`` holds the device flag.
  The flags are read at the next step a hook reads (at the latest every 100 steps, at the
  end of training and in ``state_dict()``): skipped steps are logged as a warning and
  reported in that step's ``step_info["skipped_steps"]``/``["skipped_batches"]``, and more
  than ``max_non_finite_grad_retries`` skipped steps in a row raise :class:`NonFiniteError`
  naming them.
- Several processes (DDP, FSDP, DeepSpeed) read the per-step agreement on the host (one
  read per step): it carries stop requests and loss counts the host needs at once.
"""

from __future__ import annotations

import math

import torch

__all__ = ["NonFiniteError", "NonFiniteChecks", "MAX_SCALER_BACKOFFS"]

# The fp16 scaler halves its scale on every overflow; past this many overflows in a row the
# scale is below 2**-48 and the model, not the scale, is the problem.
MAX_SCALER_BACKOFFS = 64
# Device-side finiteness flags are read on the host at least this often, even when no hook
# reads a step: a run gone non-finite is then reported within this many steps.
_MAX_DEFERRED_STEPS = 100


class NonFiniteError(RuntimeError):
    """Gradients (or the loss) stayed non-finite after every allowed retry."""


class NonFiniteChecks:
    """The trainer's finiteness decisions (see the module docstring for when each applies)."""

    def _start_agreement(self, contributed: int) -> None:
        """Launch the step's agreement (micro-batches with a loss, anyone stopping?) before the
        window's last backward, so it completes beside it (see ``_agree_early``)."""
        flags = torch.tensor([float(contributed), float(self._stop_local)], device=self.device)
        self._agreement = (flags, torch.distributed.all_reduce(flags, async_op=True))  # SUM

    def _agree(self, grad_norm: torch.Tensor, contributed: int) -> tuple[bool, int, bool]:
        """One collective per step: (all finite?, micro-batches with a loss, anyone stopping?)."""
        if not self._sync_needed:
            if self._pending_flags:  # one read for this step's norm and the quiet steps' flags
                values = torch.stack([grad_norm.detach().reshape(()).float(),
                                      *(flag for _, _, flag in self._pending_flags)]).tolist()
                self._settle(values[1:])
                return math.isfinite(values[0]), contributed, self._stop_local
            return math.isfinite(grad_norm.item()), contributed, self._stop_local
        if self._agreement is not None:
            # The gradients were reduced across ranks, so finiteness is the same everywhere.
            (flags, work), self._agreement = self._agreement, None
            work.wait()
            # One read from the device for the flags and the norm (on a GPU: one host sync).
            total, stop, norm = torch.cat([flags, grad_norm.detach().reshape(1).to(flags)]).tolist()
            return math.isfinite(norm), int(total), stop > 0
        flags = torch.stack(
            [
                (~torch.isfinite(grad_norm)).to(torch.float32),
                torch.tensor(float(contributed), device=grad_norm.device),
                torch.tensor(float(self._stop_local), device=grad_norm.device),
            ]
        ).to(self.device)
        torch.distributed.all_reduce(flags)  # SUM: gloo has no AVG
        bad, total, stop = flags.tolist()
        return bad == 0, int(total), stop > 0

    def _quiet(self) -> bool:
        """Whether the coming step may keep its finite flag on the device (no hook reads it)."""
        if not self._defer or self._reads_every_step or len(self._pending_flags) >= _MAX_DEFERRED_STEPS:
            return False
        step = self.step + 1
        return not any(h.reads_step(self, step) for h in self._step_readers)

    def _settle_pending(self) -> None:
        """Read the quiet steps' device-side finite flags now (one host read), if any."""
        if self._pending_flags:
            self._settle(torch.stack([flag for _, _, flag in self._pending_flags]).tolist())

    def _settle(self, flags: list[float]) -> None:
        """Account for the quiet steps whose flags were just read: warn about the ones the
        optimizer skipped on the device, and raise once more than ``max_non_finite_grad_retries``
        of them came in a row (each was already "retried" by the next step's fresh batches)."""
        # An fp16 overflow is the scaler's routine (it lowered the scale on the device), not a
        # fault: as on the host path, that many in a row spend no retry.
        allowed = self.max_non_finite_grad_retries + (MAX_SCALER_BACKOFFS if self.grad_scaler is not None else 0)
        pending, self._pending_flags = self._pending_flags, []
        steps: list[int] = []
        batches: list[int] = []
        too_long: list[tuple[int, list[int]]] | None = None  # the first run past the retries, in full
        for (step, positions, _), flag in zip(pending, flags, strict=True):
            if flag:
                steps.append(step)
                batches.extend(positions)
                self._deferred_run.append((step, positions))
                if too_long is None and len(self._deferred_run) > allowed:
                    too_long = self._deferred_run
            else:
                self._deferred_run = []
        if not steps:
            return
        if self.grad_scaler is None:
            self.logger.warning("steps %s: non-finite gradients, the update was skipped on the device (batches %s)",
                                steps, batches)
        else:
            self.logger.info("steps %s: fp16 overflow or non-finite gradients, the update was skipped and the "
                             "scale lowered on the device (batches %s)", steps, batches)
        if self._settled is not None:
            steps, batches = self._settled[0] + steps, self._settled[1] + batches
        self._settled = (steps, batches)
        run = too_long
        if run is not None:
            raise NonFiniteError(
                f"steps {run[0][0]}-{run[-1][0]}: non-finite gradients in {len(run)} consecutive steps, each "
                f"skipped on the device (max_non_finite_grad_retries={self.max_non_finite_grad_retries}"
                f"{f', plus {MAX_SCALER_BACKOFFS} scaler back-offs' if self.grad_scaler is not None else ''}); "
                f"skipped batches {[b for _, positions in run for b in positions]}")

    def _recovered(self, why: str, skipped: list[int]) -> bool:
        """Retries are spent: a hook (e.g. GuardHook) may roll back and return True to go on."""
        return any(hook.on_non_finite(self, why, skipped) for hook in self._hooks_for["on_non_finite"])
