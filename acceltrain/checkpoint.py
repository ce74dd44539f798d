"""Checkpoint folders: atomic writes, a manifest written last, latest-valid discovery, safe loading.

A checkpoint is a folder ``checkpoint_step_{N}`` (every name is spelled in
:mod:`acceltrain.checkpoint_names`)::

    model.safetensors       weights (safetensors: no code runs on load)
    optimizer.pt            optimizer state keyed by parameter name (loaded with weights_only=True)
    trainer_state.pt        step, scheduler, scaler (weights_only=True)
    rank_state_{rank}.pt    what differs per rank: Python / NumPy / torch / CUDA generator
                            states, the data position and every hook's state
    manifest.json           written last: step, world size, every file with its size and CRC32

Under FSDP2 the parameters are sharded DTensors: each rank writes its own
``model_shard_{rank}.safetensors`` and ``optimizer_shard_{rank}.pt`` (local shards as plain
tensors) and loading rebuilds the DTensors on the live mesh. That is torch.distributed.checkpoint's
layout idea without its pickled ``.metadata`` file, which the safe-loading rule forbids; the
price is that a sharded checkpoint resumes only on the same number of processes (refused
otherwise). ``save_pretrained`` consolidates to one safetensors file for export.

Under DeepSpeed the same folder holds ``model.safetensors`` (ZeRO 0-2) and one
``optimizer_shard_{rank}.pt`` per rank with its ZeRO partition, reduced to plain tensors so it
loads with weights_only=True (see :mod:`acceltrain.checkpoint_deepspeed`); on another number of
processes the partitions are re-cut (:mod:`acceltrain.zero_reshard`).

Every rank writes into ``.tmp_checkpoint_step_{N}``; after a barrier the main rank checks the
files, writes the manifest, renames the folder and points ``checkpoint_latest`` at it. A
folder without a valid manifest is torn and never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint_deepspeed import check_fits, load_deepspeed, save_deepspeed
from .checkpoint_io import (
    CheckpointError,
    add_frozen_weights,
    frozen_digest,
    frozen_names,
    fsync_dir,
    is_dtensor,
    load_safetensors,
    local_tensor,
    restore_tied,
    safe_load,
    write_weights,
)
from .checkpoint_names import LATEST, TMP_GLOB, checkpoint_step, step_folder_name, tmp_folder_name
from .config import UserError
from .elastic import dtensor_shapes, full_from_shards, manifest_layout, plan_resize, seed_new_rank
from .rng import rng_state, set_rng_state
from .utils import dedupe_tensors, map_nested_tensor

if TYPE_CHECKING:
    from .trainer import BaseTrainer

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "SaveHandle",
    "load_checkpoint",
    "find_latest_checkpoint",
    "verify_checkpoint",
    "list_checkpoints",
    "checkpoint_step",
    "point_link",
    "full_model_from_shards",
    # Re-exported: the file-format helpers (checkpoint_io), RNG capture (rng), naming (checkpoint_names).
    "add_frozen_weights",
    "restore_tied",
    "write_weights",
    "fsync_dir",
    "rng_state",
    "set_rng_state",
    "LATEST",
]

logger = logging.getLogger("acceltrain")
MANIFEST = "manifest.json"
_PER_RANK = ("hooks", "data")
_CRC_CHUNK = 1 << 24


def _crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CRC_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint folders under ``root``, oldest first (not yet verified)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def verify_checkpoint(folder: Path) -> dict[str, Any]:
    """The manifest of ``folder`` if every file it lists is there with its size and CRC32.

    Raises:
        CheckpointError: naming the first missing, truncated or altered file.
    """
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no {MANIFEST} (the save did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest ({e})") from None
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size != meta["size"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {meta['size']} (truncated?)")
        if _crc32(path) != meta["crc32"]:
            raise CheckpointError(f"{path}: CRC32 differs from the manifest (altered or corrupt)")
    return manifest


def find_latest_checkpoint(root: Path, *, clean: bool = True, required: str | None = None) -> Path | None:
    """The newest folder under ``root`` whose manifest checks out; torn ones are warned about.

    With ``clean`` (main process only), temporary folders of interrupted saves are removed
    (they never held a complete checkpoint: the rename is the save's last act).

    Args:
        required: The setting that asked for a resume (e.g. ``"--resume true"``). With it, a
            ``checkpoint_step_N`` folder that exists while none checks out is an error naming
            every folder's problem, never a silent fresh start: a resume that was asked for and
            cannot be honoured must not train from step 0 (and let retention delete the evidence).

    Raises:
        CheckpointError: with ``required``, when checkpoints exist and none is valid.
    """
    root = Path(root)
    if clean and root.is_dir():
        for stale in root.glob(TMP_GLOB):
            logger.warning("removing %s: an interrupted checkpoint save", stale)
            shutil.rmtree(stale, ignore_errors=True)
    problems = []
    for folder in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(folder)
        except CheckpointError as e:
            logger.warning("skipping checkpoint %s", e)
            problems.append(str(e))
            continue
        return folder
    if required and problems:
        raise CheckpointError(f"{required}: no checkpoint in {root} can be resumed from: {'; '.join(problems)}")
    return None


def _file_report(folder: Path, names: list[str]) -> dict[str, dict[str, int]]:
    """fsync each file and record its size and CRC32 (what the manifest promises)."""
    report = {}
    for name in names:
        path = folder / name
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        report[name] = {"size": path.stat().st_size, "crc32": _crc32(path)}
    return report


def _write_manifest(folder: Path, step: int, world_size: int, extra: dict[str, Any],
                    files: dict[str, dict[str, int]] | None = None) -> None:
    import accelerate
    import transformers

    if files is None:
        names = [str(p.relative_to(folder)) for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
        files = _file_report(folder, names)
    manifest = {
        "format": 1,
        "step": step,
        "world_size": world_size,
        "files": dict(sorted(files.items())),
        "versions": {
            "acceltrain": __import__("acceltrain").__version__,
            "torch": torch.__version__,
            "accelerate": accelerate.__version__,
            "transformers": transformers.__version__,
        },
        **extra,
    }
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)


class SaveHandle:
    """A checkpoint whose files are written; its finalisation may still run in the background.

    ``wait()`` blocks until the folder is complete (manifest written, renamed, latest link
    moved, ``on_complete`` run) and re-raises anything that failed there.
    """

    def __init__(self, folder: Path, thread: threading.Thread | None):
        self.folder = folder
        self._thread = thread
        self.error: BaseException | None = None

    def wait(self) -> Path:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise CheckpointError(f"{self.folder}: the save did not complete ({error})") from error
        return self.folder

    @property
    def done(self) -> bool:
        return self._thread is None or not self._thread.is_alive()


def _finish(handle: SaveHandle, tmp: Path, final: Path, rank: int, world: int, step: int,
            names: list[str], extra: dict[str, Any], on_complete: Callable[[Path], None] | None,
            timeout: float) -> None:
    """Runs off the training thread: no collectives here, ranks meet through files."""
    try:
        (tmp / f".rank{rank}.json.tmp").write_text(json.dumps(_file_report(tmp, names)))
        os.replace(tmp / f".rank{rank}.json.tmp", tmp / f".rank{rank}.json")
        if rank != 0:
            return
        reports = [tmp / f".rank{r}.json" for r in range(world)]
        deadline = time.monotonic() + timeout
        while not all(p.is_file() for p in reports):
            if time.monotonic() > deadline:
                raise CheckpointError(f"{tmp}: ranks did not finish writing within {timeout:.0f} s")
            time.sleep(0.02)
        files: dict[str, dict[str, int]] = {}
        for report in reports:
            files.update(json.loads(report.read_text()))
            report.unlink()
        _write_manifest(tmp, step, world, extra, files)
        if final.exists():  # a save of the same step after a resume: replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(final.parent)
        point_link(final.parent, LATEST, final)
        if on_complete is not None:
            on_complete(final)
    except BaseException as e:  # kept for wait(), which raises it on the training thread
        handle.error = e


def point_link(root: Path, name: str, target: Path) -> None:
    """Atomically point the symlink ``root/name`` at ``target`` (a sibling folder)."""
    link = root / name
    tmp = root / (name + ".tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target.name, tmp)
    os.replace(tmp, link)


def save_checkpoint(trainer: BaseTrainer, root: Path, extra: dict[str, Any] | None = None, *,
                    background: bool = False, on_complete: Callable[[Path], None] | None = None,
                    timeout: float = 600.0) -> SaveHandle:
    """Save the trainer's full state as ``root/checkpoint_step_{step}``; every rank must call it.

    Training is blocked only while the state is serialised. With ``background=True`` the rest
    (fsync, CRC32 of every file, the manifest, the rename, moving ``checkpoint_latest``,
    ``on_complete`` e.g. retention) runs on a thread of each rank and ``SaveHandle.wait()``
    joins it; until then the folder is a ``.tmp_`` one that loading ignores. The ranks meet
    through small per-rank report files, not collectives, so the thread never races the
    training loop's own collectives.
    """
    from safetensors.torch import save_file

    acc = trainer.accelerator
    root = Path(root)
    final = root / step_folder_name(trainer.step)
    tmp = root / tmp_folder_name(trainer.step)
    if acc.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()

    rank = acc.process_index
    names = [f"rank_state_{rank}.pt"]
    if trainer.engine_kind == "deepspeed":
        # ZeRO partitions: every rank writes its own (see acceltrain.checkpoint_deepspeed).
        state, own_names, own_extra = save_deepspeed(trainer, tmp)
        names += own_names
    else:
        state = trainer.state_dict()
        sharded = any(is_dtensor(v) for v in state["model"].values())
        frozen = frozen_names(trainer.unwrapped_model)
        if sharded:
            # FSDP2: every rank writes its own shards, as plain tensors (safetensors and a
            # weights_only pickle); loading rebuilds the DTensors on the same mesh.
            names += [f"model_shard_{rank}.safetensors", f"optimizer_shard_{rank}.pt"]
            # Tied weights (an LM head sharing the embedding) share storage, which safetensors
            # refuses: store each storage once and name the aliases in the manifest.
            local = {k: local_tensor(v) for k, v in state["model"].items()}
            unique = dedupe_tensors(local)
            first = {(t.untyped_storage().data_ptr(), t.storage_offset()): k for k, t in reversed(local.items())}
            tied = {k: first[(t.untyped_storage().data_ptr(), t.storage_offset())]
                    for k, t in local.items() if k not in unique}
            save_file(unique, str(tmp / names[1]))
            torch.save(map_nested_tensor(local_tensor, state["optimizer"]), tmp / names[2])
        elif acc.is_main_process:
            names += ["model.safetensors", "optimizer.pt"]
            write_weights(trainer.unwrapped_model, tmp / "model.safetensors", frozen)
            torch.save(state["optimizer"], tmp / "optimizer.pt")
        own_extra = {"sharded": sharded, "frozen": frozen_digest(trainer.unwrapped_model, frozen)
                     if frozen and not sharded else None}
        if sharded:  # what full_from_shards needs to reassemble the shards on another world size

            own_extra["dtensor_shapes"] = {"model": dtensor_shapes(state["model"]),
                                           "optimizer": dtensor_shapes(state["optimizer"])}
            own_extra["tied"] = tied
    own_extra = {**own_extra, **manifest_layout(trainer)}
    if acc.is_main_process:
        names.append("trainer_state.pt")
        torch.save({k: v for k, v in state.items() if k not in ("model", "optimizer", *_PER_RANK)},
                   tmp / "trainer_state.pt")
    # Hook states (interval sums, guard snapshots of FSDP shards) and the data position
    # (this rank's next samples) are per rank: each rank keeps its own.
    torch.save({"rng": rng_state(), **{k: state[k] for k in _PER_RANK}}, tmp / f"rank_state_{rank}.pt")

    handle = SaveHandle(final, None)
    args = (handle, tmp, final, rank, acc.num_processes, trainer.step, names, {**own_extra, **(extra or {})},
            on_complete, timeout)
    if background:
        handle._thread = threading.Thread(target=_finish, args=args, name="acceltrain-checkpoint", daemon=True)
        handle._thread.start()
        return handle
    _finish(*args)
    handle.wait()
    acc.wait_for_everyone()  # every rank returns after the folder is complete
    return handle


def _reshard(trainer: BaseTrainer, model_local: dict[str, torch.Tensor],
             optim_local: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """This rank's saved shards as DTensors laid out like the live (FSDP2) parameters."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.tensor import DTensor

    template, _ = get_state_dict(trainer.model, trainer.unwrapped_optimizer, options=trainer.state_dict_options)

    def like(local: torch.Tensor, ref: Any) -> torch.Tensor:
        if not isinstance(ref, DTensor) or local.dim() == 0:  # e.g. AdamW's scalar step
            return local
        return DTensor.from_local(local.to(ref.device), ref.device_mesh, ref.placements,
                                  shape=ref.shape, stride=ref.stride())

    missing = sorted(set(template) - set(model_local))
    if missing:
        raise CheckpointError(f"the checkpoint's model shards lack {missing[:3]}: a different model?")
    model_sd = {k: like(model_local[k], template[k]) for k in template}
    optim_sd = dict(optim_local)
    optim_sd["state"] = {fqn: {key: like(v, template.get(fqn)) if isinstance(v, torch.Tensor) else v
                               for key, v in st.items()} for fqn, st in optim_local.get("state", {}).items()}
    return model_sd, optim_sd


def load_checkpoint(trainer: BaseTrainer, folder: Path, *, verify: bool = True, strict: bool = True) -> dict[str, Any]:
    """Restore ``folder`` into a built trainer; returns its manifest.

    ``strict=False`` turns a failed resume self-check (the next batch is not the saved one)
    into a warning.
    """
    folder = Path(folder)
    manifest = verify_checkpoint(folder) if verify else json.loads((folder / MANIFEST).read_text())
    acc = trainer.accelerator
    rank, saved_world = acc.process_index, int(manifest["world_size"])
    deepspeed = manifest.get("deepspeed") or trainer.engine_kind == "deepspeed"
    if deepspeed:  # another stage or precision is refused before the batch plan is looked at
        check_fits(trainer, folder, manifest)
    plan = resize_plan(trainer, folder, manifest)
    state = safe_load(folder / "trainer_state.pt")
    # A rank the saved run did not have takes rank 0's hook states (hooks that decide together,
    # like early stopping, must agree) and data position (global, the same on every rank).
    own = rank < saved_world
    rank_state = safe_load(folder / f"rank_state_{rank if own else 0}.pt")
    state.update({k: rank_state[k] for k in _PER_RANK})
    if plan is not None:  # each hook makes this rank's state from every saved rank's (BaseHook.resize_state)
        from .hooks.base import resized_hook_states

        per_rank = [rank_state if r == (rank if own else 0) else safe_load(folder / f"rank_state_{r}.pt", mmap=True)
                    for r in range(saved_world)]
        state["hooks"] = resized_hook_states(trainer.hooks, [rs.get("hooks") or {} for rs in per_rank], rank,
                                             acc.num_processes)
    if deepspeed:  # ZeRO partitions of another world size are re-cut (acceltrain.zero_reshard)
        if plan is not None:
            trainer.set_gradient_accumulation_steps(plan.accumulation)
        load_deepspeed(trainer, folder, manifest, state, strict=strict)
        _resumed(trainer, rank_state, own, plan)
        return manifest
    live_sharded = any(is_dtensor(p) for p in trainer.model.parameters())
    full = True
    if manifest.get("sharded") and plan is None and live_sharded:
        full = False  # the same mesh: each rank reads only its own shards
        state["model"], state["optimizer"] = _reshard(
            trainer, _model_shard(folder, manifest, rank), safe_load(folder / f"optimizer_shard_{rank}.pt"))
    elif manifest.get("sharded"):
        state["model"], state["optimizer"] = _full_from_shards(folder, manifest)
    else:
        state["model"] = load_safetensors(folder / "model.safetensors")
        state["optimizer"] = safe_load(folder / "optimizer.pt")
        if manifest.get("frozen"):
            add_frozen_weights(trainer.unwrapped_model, state["model"], manifest["frozen"], folder)
        restore_tied(trainer.unwrapped_model, state["model"])
    if plan is not None:
        trainer.set_gradient_accumulation_steps(plan.accumulation)
    # Full tensors into FSDP2 parameters: laid out on the live mesh by set_state_dict.
    trainer.load_state_dict(state, strict_data=strict, full_state_dict=full and live_sharded)
    _resumed(trainer, rank_state, own, plan)
    return manifest


def _resumed(trainer: BaseTrainer, rank_state: dict[str, Any], own: bool, plan: Any) -> None:
    """After the state is loaded: this rank's generators (saved, or seeded for a rank the saved run
    did not have) and the resize line."""
    if own:
        set_rng_state(rank_state["rng"])
    else:
        position = trainer.data.position
        seed = position.seed if position is not None else int(trainer.data_seed or 0)
        seed_new_rank(seed, trainer.step, trainer.accelerator.process_index)
    if plan is not None and trainer.accelerator.is_main_process and not getattr(trainer, "_resize_announced", False):
        logger.warning("%s", plan.message)


def resize_plan(trainer: BaseTrainer, folder: Path, manifest: dict[str, Any]) -> Any:
    """The :class:`~acceltrain.elastic.ResizePlan` for resuming ``manifest`` in this trainer (None:
    the same world size); raises CheckpointError when the global batch cannot be kept."""
    position = trainer.data.position if trainer.data is not None else None
    try:
        return plan_resize(manifest, folder=folder, world=trainer.accelerator.num_processes,
                           micro_batch=position.batch_size if position is not None else None,
                           accumulation=trainer.gradient_accumulation_steps,
                           allow_global_batch_change=trainer.allow_global_batch_change)
    except UserError as e:
        raise CheckpointError(str(e)) from None


def _model_shard(folder: Path, manifest: dict[str, Any], rank: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s saved FSDP2 weight shards, tied names (stored once) given back their tensor."""
    weights = load_safetensors(folder / f"model_shard_{rank}.safetensors")
    for alias, source in (manifest.get("tied") or {}).items():
        weights[alias] = weights[source]
    return weights


def _shard_shapes(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    shapes = manifest.get("dtensor_shapes")
    if shapes is None:
        raise CheckpointError(f"{folder}: sharded by {manifest['world_size']} processes before shard shapes were "
                              f"recorded; resume with {manifest['world_size']} processes")
    return shapes


def full_model_from_shards(folder: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The full model weights from every saved rank's FSDP2 shards (the optimizer shards unread)."""
    shapes = _shard_shapes(folder, manifest)
    return full_from_shards([_model_shard(folder, manifest, r) for r in range(int(manifest["world_size"]))],
                            shapes["model"])


def _full_from_shards(folder: Path, manifest: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full model and optimizer state from every saved rank's FSDP2 shards (world-size independent)."""
    shapes = _shard_shapes(folder, manifest)
    world = int(manifest["world_size"])
    optim = full_from_shards([safe_load(folder / f"optimizer_shard_{r}.pt") for r in range(world)], shapes["optimizer"],
                             prefix="")
    return full_model_from_shards(folder, manifest), optim
