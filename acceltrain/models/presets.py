"""Decoder-only Transformer configs: one dataclass, named sizes, and builders for ``transformers`` models.

``ModelConfig`` describes the architecture in framework-neutral terms; ``build_config`` turns it
into a ``LlamaConfig`` (RoPE, RMSNorm, SwiGLU, no biases) or a ``GPT2Config`` (learned positions,
LayerNorm, GELU), and ``build_model`` instantiates the matching ``AutoModelForCausalLM`` with
fresh weights. The result is a plain Hugging Face model: ``save_pretrained`` output loads with
``transformers`` alone.

Example:
    >>> cfg = preset("tiny", vocab_size=len(tokenizer))
    >>> model = build_model(cfg)                      # LlamaForCausalLM, ~1.4M parameters
    >>> gpt = build_model(preset("124m", arch="gpt2"))  # GPT-2 small
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # transformers is imported on first build: it takes a second or two
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = ["ARCHS", "ACTIVATIONS", "ModelConfig", "PRESETS", "build_config", "build_model", "preset"]

ARCHS = ("llama", "gpt2")

# Activation name -> the name transformers' ACT2FN uses, per architecture. Llama's MLP is always
# gated (down(act(gate(x)) * up(x))), so "silu" *is* SwiGLU there; GPT-2's MLP is not gated and
# cannot express SwiGLU/GeGLU.
ACTIVATIONS: dict[str, dict[str, str]] = {
    "llama": {"swiglu": "silu", "silu": "silu", "geglu": "gelu", "gelu": "gelu", "relu": "relu"},
    "gpt2": {"gelu_new": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"},
}
_DEFAULT_ACTIVATION = {"llama": "swiglu", "gpt2": "gelu_new"}


@dataclass
class ModelConfig:
    """Architecture of a decoder-only language model (every size field must be positive)."""

    arch: str = "llama"
    """``"llama"`` (rotary positions, RMSNorm, gated MLP, no biases) or ``"gpt2"`` (learned
    position embeddings, LayerNorm, plain MLP with biases)."""
    vocab_size: int = 50257
    """Token embedding rows; set it to ``len(tokenizer)``."""
    d_model: int = 768
    """Width of the residual stream (hidden size)."""
    n_heads: int = 12
    """Attention heads; must divide ``d_model``."""
    n_kv_heads: int | None = None
    """Key/value heads for grouped-query attention (llama only); ``None`` means ``n_heads``."""
    n_layers: int = 12
    """Transformer blocks."""
    d_ff: int | None = None
    """MLP hidden width; ``None`` picks the arch default: ``4 * d_model`` for gpt2, and
    ``8/3 * d_model`` rounded up to a multiple of 64 for llama (same MLP parameters as 4x
    un-gated, since the gated MLP has three matrices)."""
    max_seq_len: int = 1024
    """Longest sequence: the learned position table size (gpt2) or the RoPE context (llama)."""
    dropout: float = 0.0
    """Residual and embedding dropout (gpt2 only: transformers' Llama has none)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    activation: str | None = None
    """MLP activation; ``None`` picks ``"swiglu"`` (llama) or ``"gelu_new"`` (gpt2). See ``ACTIVATIONS``."""
    learned_positions: bool | None = None
    """Learned absolute position embeddings. Fixed by ``arch`` (gpt2: yes, llama: no, RoPE);
    ``None`` follows it and a contradicting value is an error."""
    tie_embeddings: bool = True
    """Share the input embedding matrix with the output head."""
    gradient_checkpointing: bool = False
    """Recompute each block's activations in the backward pass: less memory, ~30% more compute."""
    norm_eps: float = 1e-5
    """Epsilon of RMSNorm (llama) or LayerNorm (gpt2)."""
    rope_theta: float = 10000.0
    """RoPE base frequency (llama only)."""
    initializer_range: float = 0.02
    """Standard deviation of the normal weight initialisation."""

    def __post_init__(self) -> None:
        self.validate()

    # ---------------------------------------------------------------- derived
    @property
    def d_head(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used."""
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        """MLP hidden width actually used (``d_ff`` or the arch default)."""
        if self.d_ff is not None:
            return self.d_ff
        if self.arch == "gpt2":
            return 4 * self.d_model
        return 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def hf_activation(self) -> str:
        """The activation name transformers uses for this arch."""
        return ACTIVATIONS[self.arch][self.activation or _DEFAULT_ACTIVATION[self.arch]]

    # ---------------------------------------------------------------- checks
    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that is out of range or inconsistent."""
        if self.arch not in ARCHS:
            raise ValueError(f"ModelConfig.arch={self.arch!r} is unknown; expected one of {', '.join(ARCHS)}")
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "max_seq_len", "d_ff", "n_kv_heads"):
            value = getattr(self, name)
            if value is None and name in ("d_ff", "n_kv_heads"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{name} must be a positive integer, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_kv_heads is not None:
            if self.arch == "gpt2" and self.n_kv_heads != self.n_heads:
                raise ValueError(
                    f"ModelConfig.n_kv_heads={self.n_kv_heads} needs arch='llama': GPT-2 attention has no grouped KV heads"
                )
            if self.n_heads % self.n_kv_heads:
                raise ValueError(
                    f"ModelConfig.n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}"
                )
        if self.arch == "llama" and self.d_head % 2:
            raise ValueError(
                f"ModelConfig.d_model / n_heads = {self.d_head} must be even for rotary embeddings"
            )
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"ModelConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if self.arch == "llama" and self.dropout > 0:
            raise ValueError(
                f"ModelConfig.dropout={self.dropout} needs arch='gpt2': transformers' Llama has no residual "
                "dropout (use attention_dropout)"
            )
        if self.activation is not None and self.activation not in ACTIVATIONS[self.arch]:
            known = sorted({a for acts in ACTIVATIONS.values() for a in acts})
            if self.activation in known:
                raise ValueError(
                    f"ModelConfig.activation={self.activation!r} is not supported by arch={self.arch!r}; "
                    f"it supports {', '.join(ACTIVATIONS[self.arch])}"
                )
            raise ValueError(
                f"ModelConfig.activation={self.activation!r} is unknown; expected one of {', '.join(known)}"
            )
        if self.learned_positions is not None and self.learned_positions != (self.arch == "gpt2"):
            raise ValueError(
                f"ModelConfig.learned_positions={self.learned_positions} contradicts arch={self.arch!r} "
                "(gpt2 always learns positions, llama always uses RoPE)"
            )
        for name in ("norm_eps", "rope_theta", "initializer_range"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)!r}")

    # ---------------------------------------------------------------- dicts
    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (for YAML/JSON)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict, refusing unknown keys by name."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {', '.join(unknown)}")
        return cls(**data)


PRESETS: dict[str, ModelConfig] = {
    # CPU demo: ~1.4M parameters with a 4k vocabulary; a few hundred steps run in minutes.
    "tiny": ModelConfig(vocab_size=4096, d_model=128, n_heads=4, n_layers=4, max_seq_len=256),
    # GPT-2 small / medium shapes (124M / 355M with the GPT-2 vocabulary).
    "124m": ModelConfig(d_model=768, n_heads=12, n_layers=12, max_seq_len=1024),
    "350m": ModelConfig(d_model=1024, n_heads=16, n_layers=24, max_seq_len=1024),
    # Llama 3.2 1B shape (GQA 32/8, d_ff 8192), ~1.1B with the GPT-2 vocabulary.
    "1b": ModelConfig(
        d_model=2048, n_heads=32, n_kv_heads=8, n_layers=16, d_ff=8192, max_seq_len=2048, rope_theta=500_000.0
    ),
}
"""Named sizes (llama-style). Use :func:`preset` to get a copy with overrides."""


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A copy of ``PRESETS[name]`` with fields replaced.

    With ``arch="gpt2"`` a preset's grouped-query ``n_kv_heads`` is dropped (GPT-2 has none)
    unless given explicitly.

    Raises:
        ValueError: Unknown preset (the message lists them), unknown field, or a bad value.

    Example:
        >>> preset("124m", arch="gpt2").ffn_dim
        3072
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {', '.join(PRESETS)}")
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(ModelConfig)})
    if unknown:
        raise ValueError(f"ModelConfig has no field(s) {', '.join(unknown)}")
    if overrides.get("arch") == "gpt2" and "n_kv_heads" not in overrides:
        overrides["n_kv_heads"] = None
    return dataclasses.replace(PRESETS[name], **overrides)


def build_config(cfg: ModelConfig, **hf_overrides: Any) -> PretrainedConfig:
    """The ``transformers`` config for ``cfg``: a ``LlamaConfig`` or a ``GPT2Config``.

    Token ids (``bos_token_id``, ``eos_token_id``, ``pad_token_id``) default to ``None`` rather
    than the Llama/GPT-2 vocabularies' ids; pass the tokenizer's through ``hf_overrides``.
    Attention uses PyTorch SDPA.

    Example:
        >>> hf = build_config(preset("tiny"), eos_token_id=tok.eos_token_id)
    """
    from transformers import GPT2Config, LlamaConfig

    cfg.validate()
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    common = {**ids, "attn_implementation": "sdpa", **hf_overrides}
    if cfg.arch == "gpt2":
        return GPT2Config(
            vocab_size=cfg.vocab_size,
            n_positions=cfg.max_seq_len,
            n_embd=cfg.d_model,
            n_layer=cfg.n_layers,
            n_head=cfg.n_heads,
            n_inner=cfg.ffn_dim,
            activation_function=cfg.hf_activation,
            resid_pdrop=cfg.dropout,
            embd_pdrop=cfg.dropout,
            attn_pdrop=cfg.attention_dropout,
            layer_norm_epsilon=cfg.norm_eps,
            initializer_range=cfg.initializer_range,
            tie_word_embeddings=cfg.tie_embeddings,
            **common,
        )
    # transformers 5 takes RoPE settings as rope_parameters; 4.x as rope_theta.
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:
        rope: dict[str, Any] = {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta}}
    else:
        rope = {"rope_theta": cfg.rope_theta}
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        hidden_act=cfg.hf_activation,
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.initializer_range,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_dropout=cfg.attention_dropout,
        attention_bias=False,
        mlp_bias=False,
        **rope,
        **common,
    )


def build_model(cfg: ModelConfig, **hf_overrides: Any) -> PreTrainedModel:
    """A freshly initialised ``AutoModelForCausalLM`` for ``cfg``.

    Gradient checkpointing is switched on when ``cfg.gradient_checkpointing`` is set (non-reentrant,
    the variant that works with DDP/FSDP and frozen inputs). Build under ``torch.device("meta")``
    to count parameters without allocating them.

    Example:
        >>> model = build_model(preset("tiny", vocab_size=len(tok)), eos_token_id=tok.eos_token_id)
        >>> out = model(input_ids=x, labels=x)      # out.loss: mean next-token cross-entropy
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(build_config(cfg, **hf_overrides), attn_implementation="sdpa")
    if cfg.gradient_checkpointing:
        # transformers 5 renamed gradient_checkpointing_enable (deprecated there) to activation_...
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model
