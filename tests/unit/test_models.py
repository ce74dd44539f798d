"""acceltrain.models: presets, Llama/GPT-2 builders, validation, FLOPs per token and MFU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from acceltrain.models import (
    GPU_PEAK_FLOPS,
    PRESETS,
    ModelConfig,
    build_config,
    build_model,
    device_peak_flops,
    flops_per_token,
    gpu_peak_flops,
    mfu,
    non_embedding_params,
    preset,
)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once


def _meta_model(cfg: ModelConfig) -> nn.Module:
    with torch.device("meta"):  # shapes only: no memory, no init time
        return build_model(cfg)


# ---------------------------------------------------------------------------- presets
def test_every_preset_builds_a_config_for_both_archs():
    assert set(PRESETS) == {"tiny", "124m", "350m", "1b"}
    for name in PRESETS:
        assert type(build_config(preset(name))).__name__ == "LlamaConfig"
        assert type(build_config(preset(name, arch="gpt2"))).__name__ == "GPT2Config"


@pytest.mark.parametrize(
    ("name", "arch", "expected"),
    [
        ("124m", "llama", 124e6),
        ("124m", "gpt2", 124e6),
        ("350m", "llama", 355e6),
        ("350m", "gpt2", 355e6),
        ("1b", "llama", 1.0e9),
    ],
)
def test_parameter_counts_match_the_names(name, arch, expected):
    n = _count(_meta_model(preset(name, arch=arch)))
    assert abs(n - expected) / expected < 0.15, f"{name}/{arch}: {n / 1e6:.1f}M"


def test_gpt2_124m_is_exactly_gpt2_small():
    cfg = preset("124m", arch="gpt2")
    assert cfg.ffn_dim == 3072 and preset("124m").ffn_dim == 2048  # llama: 8/3 d, same MLP size
    assert _count(_meta_model(cfg)) == 124_439_808


def test_tiny_is_a_cpu_sized_model():
    n = _count(build_model(preset("tiny")))
    assert 1e6 <= n <= 3e6


def test_preset_returns_a_copy_and_adapts_gqa_to_gpt2():
    cfg = preset("1b", arch="gpt2")
    assert cfg.n_kv_heads is None and PRESETS["1b"].n_kv_heads == 8
    cfg.vocab_size = 7
    assert PRESETS["1b"].vocab_size == 50257
    assert ModelConfig.from_dict(preset("tiny").to_dict()) == preset("tiny")


# ---------------------------------------------------------------------------- architectures
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_tiny_forward_backward(arch, checkpointing):
    torch.manual_seed(0)
    cfg = preset("tiny", arch=arch, vocab_size=512, n_layers=2, gradient_checkpointing=checkpointing)
    model = build_model(cfg)
    model.train()
    # transformers 5 renamed the flag (the old name warns); 4.x only has the old one.
    flag = (
        "is_activation_checkpointing"
        if hasattr(model, "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    assert getattr(model, flag) == checkpointing
    x = torch.randint(0, 512, (2, 32))
    out = model(input_ids=x, labels=x)
    assert out.logits.shape == (2, 32, 512)
    assert torch.isfinite(out.loss) and abs(out.loss.item() - torch.log(torch.tensor(512.0)).item()) < 1.0
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_gpt2_has_learned_positions_and_layernorm():
    cfg = preset("tiny", arch="gpt2", vocab_size=256, n_layers=1)
    model = build_model(cfg)
    hf = model.config
    assert hf.activation_function == "gelu_new" and hf.n_positions == cfg.max_seq_len
    assert model.config._attn_implementation == "sdpa"
    assert isinstance(model.transformer.wpe, nn.Embedding) and model.transformer.wpe.weight.shape == (
        256,
        128,
    )
    norms = [type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__]
    assert norms and set(norms) == {"LayerNorm"}
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied


def test_llama_has_rmsnorm_rotary_and_swiglu():
    cfg = preset("tiny", vocab_size=256, n_layers=1, n_kv_heads=2)
    model = build_model(cfg)
    hf = model.config
    assert hf.hidden_act == "silu" and hf.num_key_value_heads == 2 and hf.intermediate_size == 384
    assert model.config._attn_implementation == "sdpa"
    norms = {type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}
    assert norms == {"LlamaRMSNorm"}
    assert any("Rotary" in type(m).__name__ for m in model.modules())
    assert sum(isinstance(m, nn.Embedding) for m in model.modules()) == 1  # tokens only, no positions
    mlp = model.model.layers[0].mlp
    assert {"gate_proj", "up_proj", "down_proj"} <= {n for n, _ in mlp.named_children()}
    assert build_config(cfg, eos_token_id=0).eos_token_id == 0 and build_config(cfg).bos_token_id is None


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"d_model": 100, "n_heads": 3}, "d_model"),
        ({"n_layers": 0}, "n_layers"),
        ({"vocab_size": -5}, "vocab_size"),
        ({"d_ff": 0}, "d_ff"),
        ({"n_heads": 2.5}, "n_heads"),
        ({"arch": "bert"}, "arch"),
        ({"activation": "tanh"}, "activation"),
        ({"arch": "gpt2", "activation": "swiglu"}, "activation"),
        ({"learned_positions": True}, "learned_positions"),
        ({"arch": "gpt2", "learned_positions": False}, "learned_positions"),
        ({"n_kv_heads": 3}, "n_kv_heads"),
        ({"arch": "gpt2", "n_kv_heads": 2}, "n_kv_heads"),
        ({"dropout": 0.1}, "dropout"),
        ({"arch": "gpt2", "dropout": 1.5}, "dropout"),
        ({"d_model": 96, "n_heads": 32}, "d_model / n_heads"),  # odd head width: no RoPE
    ],
)
def test_bad_configs_name_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        preset("tiny", **overrides)


def test_unknown_preset_and_field():
    with pytest.raises(ValueError, match="unknown model preset 'huge'; expected one of tiny, 124m, 350m, 1b"):
        preset("huge")
    with pytest.raises(ValueError, match="no field.*d_modle"):
        preset("tiny", d_modle=64)
    with pytest.raises(ValueError, match="no field.*heads"):
        ModelConfig.from_dict({"heads": 4})
    cfg = preset("tiny")
    bad = dataclasses.replace(cfg)
    bad.n_heads = 5  # mutated after construction: caught when building
    with pytest.raises(ValueError, match="d_model=128 is not divisible by n_heads=5"):
        build_config(bad)


# ---------------------------------------------------------------------------- flops
def test_flops_formula_on_a_hand_computed_case():
    # 6 * 1e6 + 12 * 2 layers * 64 width * 128 tokens = 6,000,000 + 196,608
    assert flops_per_token(1_000_000, n_layers=2, d_model=64, seq_len=128) == 6_196_608
    assert flops_per_token(0, 1, 1, 1) == 12
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(1, 1, 1, -1)


def test_non_embedding_params_by_hand():
    cfg = preset("tiny")  # d=128, 4 layers, d_ff=384, vocab 4096, tied
    d, layers, ff, vocab = 128, 4, 384, 4096
    blocks = layers * (4 * d * d + 3 * d * ff + 2 * d) + d  # attention, gated MLP, 2 norms; final norm
    assert blocks == 853_120
    model = _meta_model(cfg)
    assert non_embedding_params(model, include_output_head=False) == blocks
    assert non_embedding_params(model) == blocks + vocab * d  # the tied head still does a matmul
    untied = _meta_model(preset("tiny", tie_embeddings=False))
    assert non_embedding_params(untied) == blocks + vocab * d
    assert _count(untied) == blocks + 2 * vocab * d
    gpt2 = _meta_model(preset("tiny", arch="gpt2"))
    positions = 256 * d
    assert non_embedding_params(gpt2, include_output_head=False) == _count(gpt2) - vocab * d - positions
    expected = 6 * (blocks + vocab * d) + 12 * layers * d * 256
    assert flops_per_token(model, layers, d, 256) == expected


def test_mfu_arithmetic():
    assert mfu(tokens_per_s=1000, flops_per_token=6e9, peak=312e12) == pytest.approx(6e12 / 312e12)
    assert mfu(0, 1e9, 1e12) == 0
    with pytest.raises(ValueError, match="peak"):
        mfu(1, 1, 0)


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100 80GB PCIe", "A100"),
        ("NVIDIA A10G", "A10G"),
        ("NVIDIA A10", "A10"),
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("NVIDIA RTX A6000", "RTX A6000"),
        ("Tesla V100-SXM2-16GB", "V100 SXM2"),
        ("Tesla T4", "T4"),
    ],
)
def test_gpu_names_map_to_the_table(name, key):
    assert gpu_peak_flops(name) == GPU_PEAK_FLOPS[key]


def test_device_peak_flops():
    assert gpu_peak_flops("NVIDIA GeForce GTX 1080") is None
    assert GPU_PEAK_FLOPS["A100"] == 312e12 and GPU_PEAK_FLOPS["H100 SXM"] == 989.4e12
    cpu = device_peak_flops("cpu", torch.float32)
    assert 1e8 < cpu < 1e14
    assert device_peak_flops(torch.device("cpu"), torch.float32) == cpu  # measured once, cached
    assert device_peak_flops("meta") is None


def test_compile_blocks_compiles_each_transformer_block_in_place_keeping_keys(arch="llama"):
    from acceltrain.models import build_model, compile_blocks, preset, transformer_blocks

    torch.manual_seed(0)
    cfg = preset("tiny", arch=arch, vocab_size=300, n_layers=2, d_model=32, n_heads=2, d_ff=64, max_seq_len=16)
    model = build_model(cfg)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    eager = model(input_ids=ids, labels=ids).loss
    keys = list(model.state_dict())
    # backend="eager": dynamo traces each block (the part that can break) without inductor's compile time.
    assert compile_blocks(model, backend="eager") == 2
    blocks = transformer_blocks(model)
    assert [type(b).__name__ for b in blocks] == ["LlamaDecoderLayer"] * 2
    assert all(b._compiled_call_impl is not None for b in blocks) and model._compiled_call_impl is None
    assert list(model.state_dict()) == keys  # no _orig_mod. prefix: checkpoints and exports unchanged
    torch.testing.assert_close(model(input_ids=ids, labels=ids).loss, eager, atol=0, rtol=0)


def test_compile_blocks_without_named_blocks_compiles_the_whole_model():
    from acceltrain.models import compile_blocks

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert compile_blocks(model, backend="eager") == 0 and model._compiled_call_impl is not None
