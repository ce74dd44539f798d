"""Re-partition a DeepSpeed ZeRO-1/2/3 checkpoint for another number of processes.

A ZeRO checkpoint (:mod:`acceltrain.checkpoint_deepspeed`) holds one ``optimizer_shard_{r}.pt``
per saved rank: that rank's partition of the fp32 master weights and of every optimizer moment,
flattened. To resume on W' processes, :func:`reshard` merges the W saved partitions back into
full tensors per parameter and cuts this rank's partition of the *live* engine (its own layout
for W') from them. The result is a state dict in the saved format, which the ZeRO optimizer's
own ``load_state_dict`` takes exactly as it takes a checkpoint of the same world size (fp32 master
weights restored bit for bit). DeepSpeed does the same offline with ``ds_to_universal`` (and did
it at load time for stage-1/2 "elastic" checkpoints, ``_restore_elastic_base_optimizer_state``),
but both read DeepSpeed's pickled layout; this reads acceltrain's safe-loading files, with no
conversion step.

The layouts (DeepSpeed 0.19; the ones ``deepspeed/utils/zero_to_fp32.py`` reads too):

- **ZeRO-1/2**: each parameter group is one flat buffer (its trainable parameters in order,
  possibly round-robin reordered and aligned, padded at the end) cut into equal partitions, one
  per rank. Rank r's ``param_slice_mappings[g][name] = [start, numel]`` says where its fragment of
  ``name`` lies in its partition; the fragments in rank order make the parameter. Where each piece
  goes in the new partition comes from the live engine's own fragment addresses
  (``param._hp_mapping``), so reordering and alignment need no arithmetic here.
- **ZeRO-3**: every parameter is partitioned on its own: rank r holds its elements
  ``[r*P, (r+1)*P)`` with ``P = ceil(numel / W)`` (the last ranks' tails are padding), and a
  sub-group's flat buffer concatenates its parameters' partitions in order. The parameters come
  in the same order on any world size (same model, same parameter groups; the sub-groups may
  split differently, so a rank's sub-groups are read as one run), and the live ``ds_numel`` of
  each gives the saved partition sizes, checked against the files.

Values that are not partitioned (AdamW's ``step``, the param groups with the LR, the loss scaler)
are rank 0's. Memory: every rank maps all W saved shards from their files (``mmap``: the pages
are the node's page cache, read as touched, not each rank's own copy). ZeRO-1/2 then materialises
its new partition plus one merged parameter at a time. ZeRO-3 first joins each saved rank's
sub-groups into one run per key, a copy of the whole saved optimizer state in each rank's memory
(to be replaced by reading the sub-groups in place), then cuts one parameter at a time. Every rank
reads the whole saved optimizer state once; reading only the parts that overlap its new partition
would scale further.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from .checkpoint_io import CheckpointError

__all__ = ["reshard"]

_FP32 = "fp32"  # the master weights, beside the optimizer's moments (exp_avg, exp_avg_sq)


def reshard(opt: Any, shards: list[dict[str, Any]], where: Path, *,
            saved_params: list[list[Any]] | None = None) -> dict[str, Any]:
    """This rank's state dict for the live ZeRO optimizer ``opt``, cut from the saved ranks' ``shards``.

    Args:
        opt: The live engine's ZeRO optimizer (``DeepSpeedZeroOptimizer`` or ``..._Stage3``).
        shards: Every saved rank's optimizer state, in rank order (as
            :func:`acceltrain.checkpoint_deepspeed.optimizer_state` wrote them).
        where: The checkpoint folder, for messages.
        saved_params: ZeRO-3: the manifest's ``zero3_params`` (``[name, numel]`` in partition
            order), compared with the live optimizer's; None (older checkpoints) checks only sizes.

    Raises:
        CheckpointError: the shards do not fit this model (other parameters, sizes or groups).
    """
    from deepspeed.checkpoint.constants import ZERO_STAGE

    stages = {int(sd[ZERO_STAGE]) for sd in shards}
    if len(stages) != 1:
        raise CheckpointError(f"{where}: its optimizer shards disagree on the ZeRO stage ({sorted(stages)})")
    if stages.pop() == 3:
        return _reshard_zero3(opt, shards, where, saved_params)
    return _reshard_zero12(opt, shards, where)


def _moment_keys(state: dict[str, Any]) -> list[str]:
    """The partitioned entries of a flat parameter's optimizer state (AdamW: exp_avg, exp_avg_sq)."""
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0]


def _misfit(where: Path, what: str) -> CheckpointError:
    return CheckpointError(f"{where}: its ZeRO partitions do not fit this model ({what}): a different model or "
                           "parameter groups?")


# ------------------------------------------------------------------------------------------ ZeRO-1/2
def _reshard_zero12(opt: Any, shards: list[dict[str, Any]], where: Path) -> dict[str, Any]:
    from deepspeed.checkpoint.constants import (
        BASE_OPTIMIZER_STATE,
        GROUP_PADDINGS,
        PARAM_ALIGNMENT_PADDINGS,
        PARAM_SLICE_MAPPINGS,
        PARTITION_COUNT,
        SINGLE_PARTITION_OF_FP32_GROUPS,
    )

    from .checkpoint_deepspeed import _slice_mappings

    groups = len(opt.bit16_groups)
    for r, sd in enumerate(shards):
        if len(sd[SINGLE_PARTITION_OF_FP32_GROUPS]) != groups:
            raise _misfit(where, f"rank {r} saved {len(sd[SINGLE_PARTITION_OF_FP32_GROUPS])} parameter groups, "
                                 f"this optimizer has {groups}")
    first = shards[0][BASE_OPTIMIZER_STATE]
    fp32_out: list[torch.Tensor] = []
    state_out: dict[int, dict[str, Any]] = {}
    for g in range(groups):
        # Per saved rank: its fp32 partition, its optimizer state of the group, its fragment addresses.
        sources = []
        for sd in shards:
            base = sd[BASE_OPTIMIZER_STATE]
            index = base["param_groups"][g]["params"][0]
            state = {_FP32: sd[SINGLE_PARTITION_OF_FP32_GROUPS][g], **base["state"].get(index, {})}
            sources.append((state, sd[PARAM_SLICE_MAPPINGS][g]))
        keys = [_FP32, *(k for k in _moment_keys(sources[0][0]) if k != _FP32)]
        live = {opt.param_names[p]: p for p in opt.bit16_groups[g]}
        saved_names = set().union(*(mapping.keys() for _, mapping in sources))
        if saved_names != set(live):
            raise _misfit(where, f"group {g}: saved parameters {sorted(saved_names - set(live))[:3]} are not here, "
                                 f"{sorted(set(live) - saved_names)[:3]} here are not saved")
        size = opt.single_partition_of_fp32_groups[g].numel()  # this rank's partition, padding included
        dest = {k: torch.zeros(size, dtype=sources[0][0][k].dtype) for k in keys}
        for name, param in live.items():
            mapping = param._hp_mapping  # None: no element of this parameter is in this rank's partition
            if mapping is None:
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            for key in keys:
                pieces = [state[key].narrow(0, m[name][0], m[name][1]) for state, m in sources if name in m]
                full = torch.cat(pieces)  # the whole parameter, flat (numel,)
                if full.numel() != param.numel():
                    raise _misfit(where, f"{name}: {full.numel()} elements saved, {param.numel()} here")
                dest[key].narrow(0, hp.start, hp.numel).copy_(full.narrow(0, lp.start, lp.numel))
        fp32_out.append(dest.pop(_FP32)[:size - opt.groups_padding[g]])  # saved without the end padding
        index = first["param_groups"][g]["params"][0]
        scalars = {k: v for k, v in first["state"].get(index, {}).items() if k not in dest}
        if dest or scalars:
            state_out[index] = {**scalars, **dest}
    out = dict(shards[0])
    out[SINGLE_PARTITION_OF_FP32_GROUPS] = fp32_out
    out[BASE_OPTIMIZER_STATE] = {"state": state_out, "param_groups": first["param_groups"]}
    # The live layout's bookkeeping: what this rank would have saved.
    out[GROUP_PADDINGS] = list(opt.groups_padding)
    out[PARAM_ALIGNMENT_PADDINGS] = [list(p) for p in opt.round_robin_bit16_padding]
    out[PARTITION_COUNT] = opt.partition_count
    out[PARAM_SLICE_MAPPINGS] = _slice_mappings(opt._param_slice_mappings)
    return out


# -------------------------------------------------------------------------------------------- ZeRO-3
def _reshard_zero3(opt: Any, shards: list[dict[str, Any]], where: Path,
                   saved_params: list[list[Any]] | None) -> dict[str, Any]:
    from deepspeed import comm as dist
    from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT, PARTITION_COUNT

    from .checkpoint_deepspeed import zero3_params

    if any("ds_zero_partition_groups" in sd for sd in shards):
        raise CheckpointError(f"{where}: saved with AutoEP partition groups, which resume only on the same "
                              f"{len(shards)} processes")
    saved_world = len(shards)
    params = [p for sub in opt.fp16_groups for p in sub]
    numels = [int(p.ds_numel) for p in params]
    if saved_params is not None:  # the same parameters, in the same partition order
        live_params = zero3_params(opt)
        if [list(x) for x in saved_params] != live_params:
            i = next((i for i, (a, b) in enumerate(zip(saved_params, live_params, strict=False)) if list(a) != b),
                     min(len(saved_params), len(live_params)))
            saved = saved_params[i] if i < len(saved_params) else "nothing"
            live = live_params[i] if i < len(live_params) else "nothing"
            raise _misfit(where, f"parameter {i} was {saved} (name, elements) when saved, is {live} here")
    saved_sizes = [math.ceil(n / saved_world) for n in numels]
    offsets = [0]
    for s in saved_sizes:
        offsets.append(offsets[-1] + s)

    # Each saved rank's sub-groups as one run per key: [param 0's partition | param 1's | ...].
    first_state = shards[0][OPTIMIZER_STATE_DICT]
    order0 = [i for pg in first_state["param_groups"] for i in pg["params"]]
    keys = [_FP32, *_moment_keys(first_state["state"].get(order0[0], {}) if order0 else {})]
    runs: list[dict[str, torch.Tensor]] = []
    for r, sd in enumerate(shards):
        base = sd[OPTIMIZER_STATE_DICT]
        order = [i for pg in base["param_groups"] for i in pg["params"]]
        if len(order) != len(sd[FP32_FLAT_GROUPS]):
            raise _misfit(where, f"rank {r}: {len(order)} optimizer entries for {len(sd[FP32_FLAT_GROUPS])} flat groups")
        run = {_FP32: torch.cat([t.reshape(-1) for t in sd[FP32_FLAT_GROUPS]])}
        for key in keys[1:]:
            try:
                run[key] = torch.cat([base["state"][i][key].reshape(-1) for i in order])
            except KeyError:
                raise _misfit(where, f"rank {r} lacks {key!r} for some of its sub-groups") from None
        if any(t.numel() != offsets[-1] for t in run.values()):
            raise _misfit(where, f"rank {r} saved {run[_FP32].numel()} elements; {len(params)} parameters "
                                 f"partitioned over {saved_world} processes make {offsets[-1]}")
        runs.append(run)

    group_of = [opt.sub_group_to_group_id[s] for s in range(len(opt.fp16_groups))]
    if group_of != sorted(group_of):  # the runs above join the sub-groups in parameter-group order
        raise CheckpointError(f"{where}: this DeepSpeed orders ZeRO-3 sub-groups across parameter groups "
                              f"({group_of}), a layout this code does not know")
    rank = dist.get_rank(group=opt.dp_process_group)
    world = dist.get_world_size(group=opt.dp_process_group)
    fp32_out: list[torch.Tensor] = []
    pieces_by_sub: list[dict[str, torch.Tensor]] = []
    j = 0
    for sub in opt.fp16_groups:
        pieces: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
        for param in sub:
            n, size = numels[j], int(param.partition_numel())
            if size != math.ceil(n / world):
                raise CheckpointError(f"{where}: a ZeRO-3 partition of {size} elements for {n} on {world} "
                                      "processes: not DeepSpeed's layout this code knows")
            lo, hi = rank * size, min((rank + 1) * size, n)  # this rank's elements of the parameter
            for key in keys:
                full = torch.cat([run[key][offsets[j]:offsets[j + 1]] for run in runs])[:n]
                piece = torch.zeros(size, dtype=full.dtype)
                if hi > lo:
                    piece[:hi - lo] = full[lo:hi]
                pieces[key].append(piece)
            j += 1
        pieces_by_sub.append({k: torch.cat(v) if v else torch.zeros(0) for k, v in pieces.items()})
    # The live optimizer numbers its flat sub-groups group by group (torch's state_dict order).
    n_groups = len(first_state["param_groups"])
    if n_groups != len(opt.optimizer.param_groups):
        raise _misfit(where, f"{n_groups} parameter groups saved, {len(opt.optimizer.param_groups)} here")
    state_out: dict[int, dict[str, Any]] = {}
    param_groups = []
    index = 0
    for g in range(n_groups):
        saved_ids = first_state["param_groups"][g]["params"]
        scalars = {k: v for k, v in first_state["state"].get(saved_ids[0], {}).items()
                   if k not in keys} if saved_ids else {}
        ids = []
        for s, flat in enumerate(pieces_by_sub):
            if group_of[s] != g:
                continue
            if len(keys) > 1:
                state_out[index] = {**scalars, **{k: v for k, v in flat.items() if k != _FP32}}
            ids.append(index)
            index += 1
        param_groups.append({**first_state["param_groups"][g], "params": ids})
    for flat in pieces_by_sub:
        fp32_out.append(flat[_FP32])
    out = dict(shards[0])
    out[FP32_FLAT_GROUPS] = fp32_out
    out[OPTIMIZER_STATE_DICT] = {"state": state_out, "param_groups": param_groups}
    out[PARTITION_COUNT] = opt.partition_count
    return out
