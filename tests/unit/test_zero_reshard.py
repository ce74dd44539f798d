"""acceltrain.zero_reshard without an engine: saved ZeRO shards that do not fit the live model are
refused in one line naming the folder and what differs. The re-partitioning itself runs on real
DeepSpeed engines (2 -> 1 and 1 -> 2, ZeRO-2 and ZeRO-3) in tests/integration/test_deepspeed_cpu.py."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("deepspeed", reason="the deepspeed extra is not installed")

from acceltrain.checkpoint import CheckpointError  # noqa: E402
from acceltrain.zero_reshard import reshard  # noqa: E402

FOLDER = Path("/runs/x/checkpoints/checkpoint_step_3")


def _zero2_shard(names: dict[str, int]) -> dict:
    total = sum(names.values())
    mapping, start = {}, 0
    for name, numel in names.items():
        mapping[name] = [start, numel]
        start += numel
    return {"zero_stage": 2, "single_partition_of_fp32_groups": [torch.zeros(total)],
            "base_optimizer_state": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(total)}},
                                     "param_groups": [{"lr": 0.1, "params": [0]}]},
            "param_slice_mappings": [mapping]}


def _zero2_live(names: dict[str, int]) -> SimpleNamespace:
    params = [torch.nn.Parameter(torch.zeros(n)) for n in names.values()]
    return SimpleNamespace(bit16_groups=[params], param_names=dict(zip(params, names, strict=True)))


def test_zero2_shards_of_other_parameters_are_refused_naming_them():
    live = _zero2_live({"w": 4, "b": 2})
    with pytest.raises(CheckpointError) as e:
        reshard(live, [_zero2_shard({"w": 4, "c": 2})], FOLDER)
    assert str(e.value) == (f"{FOLDER}: its ZeRO partitions do not fit this model (group 0: saved parameters ['c'] "
                            "are not here, ['b'] here are not saved): a different model or parameter groups?")


def test_zero2_shards_with_another_number_of_groups_are_refused():
    live = _zero2_live({"w": 4})
    live.bit16_groups.append([])
    with pytest.raises(CheckpointError, match=r"rank 0 saved 1 parameter groups, this optimizer has 2"):
        reshard(live, [_zero2_shard({"w": 4})], FOLDER)


def test_zero3_shards_of_another_size_are_refused_before_any_collective():
    # Over 2 saved ranks, a 5- and a 4-element parameter make ceil(5/2) + ceil(4/2) = 5 elements per rank.
    params = [SimpleNamespace(ds_numel=5), SimpleNamespace(ds_numel=4)]  # 3 + 2 = 5 per rank; saved: 6
    shard = {"zero_stage": 3, "fp32_flat_groups": [torch.zeros(6)],
             "optimizer_state_dict": {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(6)}},
                                      "param_groups": [{"lr": 0.1, "params": [0]}]}}
    live = SimpleNamespace(fp16_groups=[params])
    with pytest.raises(CheckpointError) as e:
        reshard(live, [shard, shard], FOLDER)
    assert str(e.value) == (f"{FOLDER}: its ZeRO partitions do not fit this model (rank 0 saved 6 elements; 2 "
                            "parameters partitioned over 2 processes make 5): a different model or parameter groups?")


class _Param:  # what the ZeRO-3 checks read of a partitioned parameter
    def __init__(self, numel: int):
        self.ds_numel = numel


def test_zero3_shards_of_other_parameters_are_refused_naming_the_first_that_differs():
    """Same sizes, another order: only the manifest's zero3_params (name, elements) tells."""
    w, b = _Param(4), _Param(4)
    live = SimpleNamespace(fp16_groups=[[w, b]], param_names={w: "w", b: "b"})
    shard = {"zero_stage": 3, "fp32_flat_groups": [torch.zeros(4)],
             "optimizer_state_dict": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}]}}
    with pytest.raises(CheckpointError) as e:
        reshard(live, [shard, shard], FOLDER, saved_params=[["b", 4], ["w", 4]])
    assert str(e.value) == (f"{FOLDER}: its ZeRO partitions do not fit this model (parameter 0 was ['b', 4] "
                            "(name, elements) when saved, is ['w', 4] here): a different model or parameter groups?")
    with pytest.raises(CheckpointError, match=r"parameter 2 was nothing \(name, elements\) when saved"):
        reshard(SimpleNamespace(fp16_groups=[[w, b, _Param(1)]], param_names={w: "w", b: "b"}), [shard, shard],
                FOLDER, saved_params=[["w", 4], ["b", 4]])


def test_shards_that_disagree_on_the_stage_are_refused():
    with pytest.raises(CheckpointError, match=r"disagree on the ZeRO stage \(\[2, 3\]\)"):
        reshard(SimpleNamespace(), [{"zero_stage": 2}, {"zero_stage": 3}], FOLDER)
