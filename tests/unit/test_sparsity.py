"""SparsityHook: the cubic ramp reaches its target, masks survive AdamW, LoRA and small layers are skipped."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from acceltrain import BaseHook, BaseTrainer, CheckpointingHook
from acceltrain.hooks.sparsity import SparsityHook
from tests.helpers import params


class PruneTrainer(BaseTrainer):
    """An MLP with layers of 2048, 4096 and 64 weights, trained with AdamW (weight decay on)."""

    def __init__(self, *, hooks=(), lora: bool = False, **kw):
        super().__init__(**kw)
        self._hooks, self.lora = list(hooks), lora

    def build_data_loader(self):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(128, 32, generator=g)
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :1] - x[:, 1:2]), batch_size=16)

    def build_model(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))
        if self.lora:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=4, target_modules=["0", "2"]))
        return model

    def build_optimizer(self):
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)

    def build_hooks(self):
        return self._hooks

    def forward(self, input):
        x, y = input
        return nn.functional.mse_loss(self.model(x), y), {}


class Infos(BaseHook):
    def __init__(self):
        self.sparsity: dict[int, float] = {}

    def on_after_step(self, trainer):
        self.sparsity[trainer.step] = trainer.step_info["sparsity"]


def _cubic(step: int, target: float, start: int, end: int) -> float:
    p = min(1.0, (step - start) / (end - start))
    return target * (1 - (1 - p) ** 3)


def test_cubic_ramp_reaches_the_target_and_small_layers_are_skipped():
    hook, infos = SparsityHook(0.8, start_step=5, frequency=5, min_params_to_prune=1000), Infos()
    t = PruneTrainer(max_steps=30, device="cpu", hooks=[hook, infos])
    t.train()
    assert sorted(hook.modules) == ["0", "2"]  # the 64-weight output layer is too small
    assert not hasattr(t.model[4], "weight_mask")
    sizes = {"0": 2048, "2": 4096}
    for step in (10, 15, 20, 25):  # pruning events: the sparsity follows the cubic ramp, layer by layer
        expected = sum(round(_cubic(step, 0.8, 5, 30) * n) for n in sizes.values()) / 6144
        assert infos.sparsity[step] == pytest.approx(expected)
        assert infos.sparsity[step + 1] == infos.sparsity[step]  # constant between events
    assert infos.sparsity[5] == 0.0
    assert abs(t.step_info["sparsity"] - 0.8) < 0.01
    for name, n in sizes.items():
        mask = t.model[int(name)].weight_mask
        assert int((mask == 0).sum()) == round(0.8 * n)
        assert t.step_info["sparsity_layers"][name] == pytest.approx(round(0.8 * n) / n)


def test_pruned_weights_stay_zero_through_adamw_steps():
    snap = {}

    class Keep(BaseHook):
        def on_after_step(self, trainer):
            if trainer.step == 10:
                snap["orig"] = trainer.model[2].weight_orig.detach().clone()

    hook = SparsityHook(0.5, frequency=10, end_step=10, schedule="constant")
    t = PruneTrainer(max_steps=25, device="cpu", hooks=[hook, Keep()])
    t.train()
    layer = t.model[2]
    # prune re-parametrised the same Parameter object: the optimizer still updates it.
    held = [p for g in t.optimizer.param_groups for p in g["params"]]
    assert any(p is layer.weight_orig for p in held) and "weight" not in layer._parameters
    mask = layer.weight_mask.bool()
    assert (~mask).sum() == 2048
    t.model(torch.randn(4, 32))  # the forward pre-hook recomputes the effective weight
    assert torch.equal(layer.weight[~mask], torch.zeros(2048))
    # AdamW kept moving weight_orig (decay, momentum) where masked, and trained the rest:
    assert not torch.equal(layer.weight_orig[~mask], snap["orig"][~mask])
    assert not torch.equal(layer.weight_orig[mask], snap["orig"][mask])


def test_lora_modules_are_skipped_unless_asked():
    pytest.importorskip("peft")
    for skip, expect_lora in ((True, False), (False, True)):
        hook = SparsityHook(0.5, frequency=2, min_params_to_prune=100, skip_lora=skip)
        t = PruneTrainer(max_steps=2, device="cpu", lora=True, hooks=[hook])
        t.train()
        names = sorted(hook.modules)
        assert "base_model.model.0.base_layer" in names and "base_model.model.2.base_layer" in names
        assert any("lora_" in n for n in names) == expect_lora
        base = t.unwrapped_model.base_model.model[2].base_layer
        assert int((base.weight_mask == 0).sum()) == 2048  # frozen base weights are pruned


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_the_smallest_magnitudes_are_pruned(scope):
    hook = SparsityHook(0.6, start_step=6, frequency=100, schedule="constant", scope=scope)
    t = PruneTrainer(max_steps=6, device="cpu", hooks=[hook])
    t.train()  # one pruning event, after the last update: weight_orig is what was ranked
    layers = [t.model[0], t.model[2]]
    if scope == "layer":
        groups = [[m] for m in layers]
    else:
        groups = [layers]
        assert hook.layer_sparsity["0"] != hook.layer_sparsity["2"]  # global: the layers differ
    for group in groups:
        kept = torch.cat([m.weight_orig[m.weight_mask.bool()].abs() for m in group])
        cut = torch.cat([m.weight_orig[~m.weight_mask.bool()].abs() for m in group])
        assert cut.max() <= kept.min()
    assert hook.sparsity == pytest.approx(0.6, abs=1e-3)


def test_make_permanent_leaves_plain_zeroed_weights_held_by_the_optimizer():
    hook = SparsityHook(0.5, frequency=3, permanent_at_end=True)
    t = PruneTrainer(max_steps=3, device="cpu", hooks=[hook])
    t.train()
    layer = t.model[0]
    assert not hasattr(layer, "weight_orig") and not hasattr(layer, "weight_mask")
    assert isinstance(layer._parameters["weight"], nn.Parameter)
    assert int((layer.weight == 0).sum()) == 1024
    assert any(p is layer.weight for g in t.optimizer.param_groups for p in g["params"])
    assert set(t.unwrapped_model.state_dict()) == {f"{i}.{k}" for i in (0, 2, 4) for k in ("weight", "bias")}


def test_resume_with_masks_is_exact(tmp_path):
    def run(max_steps, workspace=None):
        hooks = [SparsityHook(0.7, start_step=2, frequency=2, end_step=8)]
        if workspace is not None:
            hooks.append(CheckpointingHook(interval=100, exit_signals=[]))
        t = PruneTrainer(max_steps=max_steps, device="cpu", workspace=workspace, hooks=hooks)
        t.train()
        return t, hooks[0]

    ref, _ = run(10)
    run(5, tmp_path)  # saves at step 5, in the middle of the ramp
    resumed, hook = run(10, tmp_path)
    assert hook.sparsity == pytest.approx(0.7, abs=1e-3)
    for a, b in zip(params(ref.model), params(resumed.model), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(ref.model[2].weight_mask, resumed.model[2].weight_mask)


def test_tied_weights_are_not_selected():
    model = nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 40), nn.Linear(40, 40), nn.Conv2d(16, 16, 3))
    model[1].weight = model[0].weight  # tied: masking one copy would untie them
    assert sorted(SparsityHook(0.5, min_params_to_prune=1000).select(model)) == ["2", "3"]
    assert sorted(SparsityHook(0.5, min_params_to_prune=1601).select(model)) == ["3"]  # 40 * 40 < 1601


def test_hook_order_and_arguments_are_checked(tmp_path):
    t = PruneTrainer(max_steps=1, device="cpu", workspace=tmp_path, hooks=[CheckpointingHook(load="latest", exit_signals=[]),
                                                       SparsityHook(0.5)])
    with pytest.raises(ValueError, match="put SparsityHook before CheckpointingHook"):
        t.train()
    with pytest.raises(ValueError, match="target_sparsity must be in"):
        SparsityHook(1.0)
    with pytest.raises(ValueError, match="end_step"):
        SparsityHook(0.5, start_step=10, end_step=5)
    with pytest.raises(ValueError, match="schedule must be"):
        SparsityHook(0.5, schedule="linear")
