"""acceltrain.checkpoint_deepspeed without an engine: what is refused, and that nothing pickled gets saved.

The save/resume itself runs on real DeepSpeed engines in tests/integration/test_deepspeed_cpu.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from acceltrain import CheckpointingHook
from acceltrain.checkpoint import CheckpointError
from acceltrain.checkpoint_deepspeed import _check_plain, check_supported


def _trainer(stage: int = 2, nvme: bool = False, moe: bool = False, elastic: bool = False, optimizer=None):
    opt = optimizer if optimizer is not None else SimpleNamespace(elastic_checkpoint=elastic)
    engine = SimpleNamespace(optimizer=opt, has_moe_layers=moe, zero_optimization_stage=lambda: stage,
                             zero_nvme_offload_optimizer=lambda: nvme)
    return SimpleNamespace(model=engine, _deepspeed=True, engine_kind="deepspeed")


@pytest.mark.parametrize("kwargs, wanted", [
    ({"nvme": True}, "ZeRO-2: NVMe optimizer offload"),
    ({"moe": True}, "ZeRO-2: MoE layers"),
    ({"elastic": True}, "ZeRO-2: elastic_checkpoint"),
    ({"stage": 0}, "ZeRO-0: stage 0 wraps the optimizer in SimpleNamespace"),
])
def test_unsupported_deepspeed_setups_are_refused_naming_why(kwargs, wanted):
    with pytest.raises(CheckpointError, match=wanted):
        check_supported(_trainer(**kwargs))


def test_supported_setups_pass():
    check_supported(_trainer(stage=3))
    check_supported(_trainer(stage=0, optimizer=torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)))


def test_the_hook_refuses_before_training():
    with pytest.raises(CheckpointError, match="NVMe"):
        CheckpointingHook(exit_signals=[]).on_before_train(_trainer(nvme=True))


def test_only_tensors_and_plain_values_are_saved():
    _check_plain({"a": [torch.zeros(2), 1, 2.0, "x", None, True, (1, 2)], 3: {"dtype": torch.float32}}, "state")
    with pytest.raises(CheckpointError, match=r"state\['a'\]\[1\] is a builtins.object"):
        _check_plain({"a": [1, object()]}, "state")
    with pytest.raises(CheckpointError, match="key 1.5 is a float"):
        _check_plain({1.5: 0}, "state")
