"""DeepSpeed checkpoints in acceltrain's own folder layout (see :mod:`acceltrain.checkpoint`).

The folder is written and finished exactly like any other checkpoint (temporary name, every
rank writes, a manifest with sizes and CRC32 written last, ``checkpoint_latest``); only the
model and optimizer files differ::

    model.safetensors        ZeRO 0-2: the module's weights (replicated; written by rank 0)
    buffers.safetensors      ZeRO-3: the module's buffers (the weights are in the shards below)
    optimizer.pt             ZeRO 0: the (replicated) torch optimizer's state_dict
    optimizer_shard_{r}.pt   ZeRO 1-3: rank r's partition: fp32 master weights, the base optimizer's
                             state (AdamW moments, step, param_groups with the LR) and ZeRO's layout

Why not ``engine.save_checkpoint``: its files pickle DeepSpeed objects (``LossScaler``,
``ZeroStageEnum``, ``fragment_address``), so loading them needs ``torch.load(weights_only=False)``,
which the safe-loading rule forbids (DeepSpeed's own ``load_checkpoint`` calls it that way).
Here the ZeRO optimizer's ``state_dict()`` (the same partitions ``save_checkpoint`` writes) is
reduced to tensors and plain values before ``torch.save``: the loss scaler becomes a dict of its
numbers, the stage an int, the slice mappings ``[start, numel]`` lists; anything else that is not
plain fails the save loudly. Loading rebuilds the objects from the live engine and hands the
state to the optimizer's own ``load_state_dict`` (fp32 master weights restored exactly), as
``engine.load_checkpoint`` would, with ``weights_only=True`` throughout.

A ZeRO checkpoint resumes on any number of processes: on another one than it was saved by, every
rank reads all the saved shards and :mod:`acceltrain.zero_reshard` cuts its new partition from
them (ZeRO-1/2/3; stage 0 holds full state anyway). The ZeRO stage and the mixed precision must be
the saved run's (refused otherwise in one line, exit 2, naming the mismatch).

Not supported (refused before training): NVMe optimizer offload (the state lives in swap
files outside the folder), MoE layers, ``elastic_checkpoint``, and stage 0 with mixed
precision (DeepSpeed's ``FP16_Optimizer``/``BF16_Optimizer`` wrappers).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .checkpoint_io import (
    CheckpointError,
    add_frozen_weights,
    restore_tied,
    write_weights,
)
from .checkpoint_io import frozen_digest as _frozen_digest
from .checkpoint_io import frozen_names as _frozen
from .checkpoint_io import load_safetensors as _load_safetensors
from .checkpoint_io import safe_load as _load

if TYPE_CHECKING:
    from .trainer import BaseTrainer

__all__ = ["check_supported", "check_fits", "live_setup", "setup_mismatch", "optimizer_state", "training_state", "save_deepspeed", "load_deepspeed"]

# The engine's own counters (engine.load_checkpoint restores them too); plain ints.
_ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")
_PLAIN = (bool, int, float, str, type(None), torch.dtype)


def _stage(trainer: BaseTrainer) -> int:
    return int(trainer.model.zero_optimization_stage())


def check_supported(trainer: BaseTrainer) -> None:
    """Refuse (before training, by the hook) the DeepSpeed setups whose state this cannot save."""
    engine = trainer.model
    opt = engine.optimizer
    stage = _stage(trainer)
    why = None
    if engine.zero_nvme_offload_optimizer():
        why = "NVMe optimizer offload keeps optimizer state in swap files outside the checkpoint folder"
    elif getattr(engine, "has_moe_layers", False):
        why = "MoE layers keep expert states in files of their own"
    elif getattr(opt, "elastic_checkpoint", False):
        why = "elastic_checkpoint (deprecated by DeepSpeed) is not supported; turn it off"
    elif stage == 0 and not isinstance(opt, torch.optim.Optimizer):
        why = (f"stage 0 wraps the optimizer in {type(opt).__name__} (mixed precision), whose state "
               "cannot be saved safely yet; use ZeRO stage 1-3")
    if why is not None:
        raise CheckpointError(f"CheckpointingHook under DeepSpeed ZeRO-{stage}: {why}")


def _check_plain(obj: Any, where: str) -> None:
    """Fail the save, naming the entry, if anything would need unpickling to load."""
    if isinstance(obj, torch.Tensor) or isinstance(obj, _PLAIN):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise CheckpointError(f"{where}: key {key!r} is a {type(key).__name__}, not saved safely")
            _check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
        return
    raise CheckpointError(f"{where} is a {type(obj).__module__}.{type(obj).__name__}: the DeepSpeed optimizer "
                          "state holds something acceltrain cannot save without pickling it")


def _scaler_numbers(scaler: Any) -> dict[str, Any]:
    """A DeepSpeed loss scaler as its plain attributes (cur_scale, cur_iter, ... for a dynamic one)."""
    return {k: v for k, v in vars(scaler).items() if isinstance(v, (bool, int, float, str)) or v is None}


def _slice_mappings(mappings: list[dict[str, Any]]) -> list[dict[str, list[int]]]:
    return [{name: [int(a.start), int(a.numel)] for name, a in group.items()} for group in mappings]


def optimizer_state(trainer: BaseTrainer) -> dict[str, Any]:
    """The DeepSpeed optimizer's state on this rank, as tensors and plain values only."""
    from deepspeed.checkpoint.constants import LOSS_SCALER, PARAM_SLICE_MAPPINGS, ZERO_STAGE

    opt = trainer.model.optimizer
    if isinstance(opt, torch.optim.Optimizer):  # stage 0 in fp32: the client's optimizer itself
        return opt.state_dict()
    sd = dict(opt.state_dict())  # the same partitions engine.save_checkpoint writes
    if LOSS_SCALER in sd:
        sd[LOSS_SCALER] = _scaler_numbers(sd[LOSS_SCALER])
    sd[ZERO_STAGE] = int(sd[ZERO_STAGE])
    if PARAM_SLICE_MAPPINGS in sd:
        sd[PARAM_SLICE_MAPPINGS] = _slice_mappings(sd[PARAM_SLICE_MAPPINGS])
    _check_plain(sd, "optimizer state")
    return sd


def training_state(trainer: BaseTrainer) -> dict[str, Any]:
    """``BaseTrainer.state_dict()`` (whose model and optimizer are ``None`` under DeepSpeed:
    :func:`save_deepspeed` writes them) plus the engine's step counters."""
    state = trainer.state_dict()
    state["deepspeed_engine"] = {k: int(getattr(trainer.model, k)) for k in _ENGINE_COUNTERS}
    return state


def _restore_training_state(trainer: BaseTrainer, state: dict[str, Any], strict: bool) -> None:
    """``BaseTrainer.load_state_dict`` for what :func:`training_state` saved, plus the counters."""
    for key, value in (state.get("deepspeed_engine") or {}).items():
        setattr(trainer.model, key, int(value))
    trainer.load_state_dict(state, strict_data=strict)


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = {n for n, _ in module.named_parameters(remove_duplicate=False)}
    return {k: v.detach().contiguous() for k, v in module.state_dict().items() if k not in params}


def save_deepspeed(trainer: BaseTrainer, tmp: Path) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Write this rank's model and optimizer files into ``tmp``.

    Returns the training state (for ``trainer_state.pt`` and ``rank_state_{r}.pt``), the names of
    the files this rank wrote, and the manifest entries.
    """
    from safetensors.torch import save_file

    check_supported(trainer)
    acc = trainer.accelerator
    rank, stage = acc.process_index, _stage(trainer)
    model = trainer.unwrapped_model
    state = training_state(trainer)
    frozen = _frozen(model)
    names: list[str] = []
    if acc.is_main_process:
        if stage < 3:
            write_weights(model, tmp / "model.safetensors", frozen, flat=stage > 0)
            names.append("model.safetensors")
        else:
            buffers = _buffers(model)  # ZeRO-3 partitions parameters only; buffers are whole on every rank
            if buffers:
                save_file(buffers, str(tmp / "buffers.safetensors"))
                names.append("buffers.safetensors")
    if stage == 0:
        if acc.is_main_process:
            torch.save(optimizer_state(trainer), tmp / "optimizer.pt")
            names.append("optimizer.pt")
    else:
        torch.save(optimizer_state(trainer), tmp / f"optimizer_shard_{rank}.pt")
        names.append(f"optimizer_shard_{rank}.pt")
    extra = {"sharded": False, "frozen": _frozen_digest(model, frozen) if frozen else None,
             "deepspeed": {"zero_stage": stage, "mixed_precision": trainer.mixed_precision}}
    if stage == 3:  # the partitions' parameter order, which a resume on another world size checks
        extra["zero3_params"] = zero3_params(trainer.model.optimizer)
    return state, names, extra


def zero3_params(opt: Any) -> list[list[Any]]:
    """``[name, numel]`` of every parameter a ZeRO-3 optimizer partitions, in its sub-groups' order."""
    names = getattr(opt, "param_names", None) or {}
    return [[names.get(p, f"#{i}"), int(p.ds_numel)] for i, p in enumerate(p for sub in opt.fp16_groups for p in sub)]


def _describe(ds: dict[str, Any] | None) -> str:
    if not ds:
        return "without DeepSpeed"
    return f"with DeepSpeed ZeRO-{ds['zero_stage']} (mixed precision {ds.get('mixed_precision') or 'no'})"


def live_setup(trainer: BaseTrainer) -> dict[str, Any] | None:
    """This run's ZeRO stage and mixed precision as a manifest records them (None: no DeepSpeed);
    known from the Accelerator's plugin, before the engine is built."""
    if trainer.engine_kind != "deepspeed":
        return None
    engine = getattr(trainer, "model", None)  # the engine once built, else the plugin's setting
    stage = (int(engine.zero_optimization_stage()) if hasattr(engine, "zero_optimization_stage")
             else int(trainer.accelerator.state.deepspeed_plugin.zero_stage))
    return {"zero_stage": stage, "mixed_precision": trainer.mixed_precision}


def setup_mismatch(folder: Path, saved: dict[str, Any] | None, live: dict[str, Any] | None) -> str | None:
    """Why a checkpoint saved with DeepSpeed setup ``saved`` cannot resume with ``live`` (None: it can)."""
    if saved is None and live is None:
        return None
    if saved is None or live is None or saved["zero_stage"] != live["zero_stage"] or (
            (saved.get("mixed_precision") or None) != (live.get("mixed_precision") or None)):
        return (f"{folder}: saved {_describe(saved)}, this run is {_describe(live)}; resume with the same "
                "DeepSpeed stage and precision (ZeRO partitions are laid out for one configuration)")
    return None


def check_fits(trainer: BaseTrainer, folder: Path, manifest: dict[str, Any]) -> None:
    """Refuse a checkpoint of another ZeRO stage or mixed precision than this run's (or a run with
    DeepSpeed on one side only); :func:`acceltrain.checkpoint.load_checkpoint` calls it first."""
    problem = setup_mismatch(folder, manifest.get("deepspeed"), live_setup(trainer))
    if problem is not None:
        raise CheckpointError(problem)


def _check_layout(opt: Any, sd: dict[str, Any], path: Path) -> None:
    """The saved partitions must have the live partitions' sizes (same model, same config)."""
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, PARAM_SLICE_MAPPINGS

    if FP32_FLAT_GROUPS in sd:  # ZeRO-3
        saved = [int(t.numel()) for t in sd[FP32_FLAT_GROUPS]]
        live = [int(t.numel()) for t in opt.fp32_partitioned_groups_flat]
    else:
        saved = sd.get(PARAM_SLICE_MAPPINGS)
        live = _slice_mappings(opt._param_slice_mappings)
    if saved != live:
        raise CheckpointError(f"{path}: its ZeRO partitions do not fit this model ({str(saved)[:120]} saved, "
                              f"{str(live)[:120]} here): a different model or DeepSpeed config?")


def _load_optimizer(trainer: BaseTrainer, sd: dict[str, Any], path: Path) -> None:
    from deepspeed.checkpoint.constants import CLIP_GRAD, LOSS_SCALER, ZERO_STAGE
    from deepspeed.runtime.zero.config import ZeroStageEnum

    engine = trainer.model
    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):
        opt.load_state_dict(sd)
        return
    _check_layout(opt, sd, path)
    numbers = sd.pop(LOSS_SCALER, None) or {}
    sd[LOSS_SCALER] = opt.loss_scaler  # the live object; its numbers are restored below
    sd[ZERO_STAGE] = ZeroStageEnum(sd[ZERO_STAGE])
    if CLIP_GRAD in sd:
        sd[CLIP_GRAD] = opt.clip_grad  # this run's grad_clip wins over the saved one
    # A rigid checkpoint: each rank's optimizer reads only its own entry of the list.
    state_list = [sd] * engine.dp_world_size
    if hasattr(opt, "checkpoint_event_prologue"):  # ZeRO-3: partition every parameter first
        opt.checkpoint_event_prologue()
    opt.load_state_dict(state_list, load_optimizer_states=True, load_from_fp32_weights=True)
    if hasattr(opt, "checkpoint_event_epilogue"):  # ZeRO-3: gather the persistent parameters again
        opt.checkpoint_event_epilogue()
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state") and opt.optimizer.state:
        # ZeRO-1/2 re-links its parameters' fragments on load but not their optimizer state, which
        # it links only once, after a first step: without this, DeepSpeed's per-parameter API
        # (safe_get_full_optimizer_state) fails after a resume until the next step (or for good).
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    for key, value in numbers.items():
        setattr(opt.loss_scaler, key, value)


def load_deepspeed(trainer: BaseTrainer, folder: Path, manifest: dict[str, Any], state: dict[str, Any],
                   strict: bool = True) -> None:
    """Restore a checkpoint written by :func:`save_deepspeed` (``state``: the loaded training state),
    saved by this or any other number of processes (:func:`check_fits` has passed)."""
    acc = trainer.accelerator
    stage = manifest["deepspeed"]["zero_stage"]
    model = trainer.unwrapped_model
    saved_world = int(manifest["world_size"])
    optim_path = folder / ("optimizer.pt" if stage == 0 else f"optimizer_shard_{acc.process_index}.pt")
    if stage == 0 or saved_world == trainer.model.dp_world_size:
        optim_sd = _load(optim_path)
    else:  # another number of processes: this rank's new partition, cut from every saved one
        from .zero_reshard import reshard

        optim_path = folder / f"optimizer_shard_{{0..{saved_world - 1}}}.pt"
        shards = [_load(folder / f"optimizer_shard_{r}.pt", mmap=True) for r in range(saved_world)]
        optim_sd = reshard(trainer.model.optimizer, shards, folder, saved_params=manifest.get("zero3_params"))
        del shards
    if stage < 3:
        weights = _load_safetensors(folder / "model.safetensors")
        if manifest.get("frozen"):
            add_frozen_weights(model, weights, manifest["frozen"], folder)
        restore_tied(model, weights)
        model.load_state_dict(weights)  # copies into the parameters ZeRO flattened (views stay views)
    else:
        if manifest.get("frozen"):  # frozen parameters are not in the shards: they come from build_model
            add_frozen_weights(model, {}, manifest["frozen"], folder)
        if "buffers.safetensors" in manifest["files"]:
            buffers = _load_safetensors(folder / "buffers.safetensors")
            if set(buffers) != set(_buffers(model)):
                raise CheckpointError(f"{folder / 'buffers.safetensors'}: the buffers differ from this model's")
            model.load_state_dict(buffers, strict=False)
    _load_optimizer(trainer, optim_sd, optim_path)
    _restore_training_state(trainer, state, strict)
