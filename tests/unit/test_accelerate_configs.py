"""Every file in accelerate_configs/ is accepted by Accelerate's own config loader and launcher."""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "accelerate_configs").glob("*.yaml"))
EXPECTED = {
    "cpu": "NO", "multi_cpu": "MULTI_CPU", "single_gpu": "NO", "ddp": "MULTI_GPU", "fsdp2": "FSDP",
    "fsdp2_offload": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED",
    "deepspeed_zero3_offload": "DEEPSPEED", "multi_node": "MULTI_GPU", "multi_node_cpu": "MULTI_GPU",
}


def test_every_documented_config_exists():
    assert {c.stem for c in CONFIGS} == set(EXPECTED)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_accelerate_loads_and_validates_it(path):
    config = load_config_from_file(str(path))
    assert config.distributed_type.value == EXPECTED[path.stem]
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, _, _ = _validate_launch_command(args)
    assert args.num_processes == config.num_processes


@pytest.mark.parametrize("name, offload", [("fsdp2", False), ("fsdp2_offload", True)])
def test_fsdp_configs_build_an_fsdp2_plugin(name, offload):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = next(c for c in CONFIGS if c.stem == name)
    args = launch_command_parser().parse_args(["--config_file", str(path), "train.py"])
    args, _, _ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    with mock.patch.dict(os.environ, {k: v for k, v in env.items() if k.startswith(("FSDP_", "ACCELERATE_"))}):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2
    assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
    assert plugin.cpu_ram_efficient_loading is True
    # FSDP2 expresses offload as a policy object: CPUOffloadPolicy, or the plain OffloadPolicy (none).
    assert (type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy") is offload


@pytest.mark.parametrize("name, stage, offload", [("deepspeed_zero2", 2, "none"), ("deepspeed_zero3", 3, "none"),
                                                  ("deepspeed_zero3_offload", 3, "cpu")])
def test_deepspeed_configs(name, stage, offload):
    config = load_config_from_file(str(next(c for c in CONFIGS if c.stem == name)))
    assert config.deepspeed_config["zero_stage"] == stage
    assert config.deepspeed_config["offload_optimizer_device"] == offload
