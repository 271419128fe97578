"""Model-family adapters: the only place that names model modules.

Input: a Hugging Face ``PreTrainedModel``/``PretrainedConfig``. Output: a :class:`Geometry` read
from the config (never from module attributes) and accessors for decoder layers, attention and MLP
projections, q/k norms. Ranking, elastic and export talk to an adapter, not to ``q_proj`` names
(SliceGPT's seam). Families register with :func:`register_family`, keyed on ``config.model_type``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from torch import nn

from flextron.errors import UnsupportedModelError

_REGISTRY: dict[str, type["FamilyAdapter"]] = {}


def register_family(*model_types: str) -> Callable[[type["FamilyAdapter"]], type["FamilyAdapter"]]:
    """Class decorator registering an adapter for the given ``config.model_type`` values."""

    def deco(cls: type[FamilyAdapter]) -> type[FamilyAdapter]:
        for t in model_types:
            _REGISTRY[t] = cls
        return cls

    return deco


def supported_model_types() -> list[str]:
    """The ``config.model_type`` values that have an adapter, sorted."""
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class Geometry:
    """Model geometry from the HF config.

    ``num_attention_heads`` = H query heads, ``num_key_value_heads`` = G groups, so each KV group
    serves ``H / G`` query heads (``heads_per_group``).
    """

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    qk_norm: bool

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


class FamilyAdapter:
    """Llama-style decoder: ``model.model.layers[i].{self_attn,mlp}`` with ``q/k/v/o_proj`` and
    ``gate/up/down_proj`` (SwiGLU), pre-norm blocks, RoPE on ``head_dim``.

    Subclasses override only what differs. Raises :class:`UnsupportedModelError` for a config the
    family cannot handle.
    """

    has_qk_norm = False

    def __init__(self, config) -> None:
        self.config = config
        self.geometry = self._geometry(config)

    # -- geometry -----------------------------------------------------------------------------
    def _geometry(self, c) -> Geometry:
        heads = int(c.num_attention_heads)
        kv = int(getattr(c, "num_key_value_heads", None) or heads)
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        if heads % kv:
            raise UnsupportedModelError(
                f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}; this config is invalid"
            )
        act = getattr(c, "hidden_act", "silu")
        if act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh"):
            raise UnsupportedModelError(f"hidden_act={act!r} is not supported; flextron supports gated SiLU/GELU MLPs")
        return Geometry(
            num_hidden_layers=int(c.num_hidden_layers),
            hidden_size=int(c.hidden_size),
            intermediate_size=int(c.intermediate_size),
            num_attention_heads=heads,
            num_key_value_heads=kv,
            head_dim=int(head_dim),
            vocab_size=int(c.vocab_size),
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(c, "attention_bias", False)),
            mlp_bias=bool(getattr(c, "mlp_bias", False)),
            qk_norm=self.has_qk_norm,
        )

    # -- modules ------------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """Decoder layers of a ``*ForCausalLM`` model."""
        return model.model.layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def set_attention(self, layer: nn.Module, module: nn.Module) -> None:
        layer.self_attn = module

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def set_mlp(self, layer: nn.Module, module: nn.Module) -> None:
        layer.mlp = module

    def attention_projections(self, attn: nn.Module) -> dict[str, nn.Linear]:
        """``{"q": q_proj, "k": k_proj, "v": v_proj, "o": o_proj}`` of an attention module."""
        return {"q": attn.q_proj, "k": attn.k_proj, "v": attn.v_proj, "o": attn.o_proj}

    def qk_norms(self, attn: nn.Module) -> dict[str, nn.Module]:
        """Per-``head_dim`` q/k norms (empty for families without them)."""
        return {}

    def mlp_projections(self, mlp: nn.Module) -> dict[str, nn.Module]:
        """``{"gate", "up", "down", "act"}`` of a gated MLP."""
        return {"gate": mlp.gate_proj, "up": mlp.up_proj, "down": mlp.down_proj, "act": mlp.act_fn}


@register_family("llama", "mistral")
class LlamaAdapter(FamilyAdapter):
    """Llama, SmolLM/SmolLM2 (``model_type`` llama) and Mistral."""


@register_family("qwen2")
class Qwen2Adapter(FamilyAdapter):
    """Qwen2: biases on q/k/v (``attention_bias`` is not in its config)."""

    def _geometry(self, c) -> Geometry:
        g = super()._geometry(c)
        return dataclasses.replace(g, attention_bias=True)


@register_family("qwen3")
class Qwen3Adapter(FamilyAdapter):
    """Qwen3: RMS q/k norms over ``head_dim`` (unaffected by head slicing)."""

    has_qk_norm = True

    def qk_norms(self, attn: nn.Module) -> dict[str, nn.Module]:
        return {"q_norm": attn.q_norm, "k_norm": attn.k_norm}


def adapter_for(config) -> FamilyAdapter:
    """The adapter for ``config.model_type``.

    Raises:
        UnsupportedModelError: no adapter for this model type; the message lists the supported ones.
    """
    mt = getattr(config, "model_type", None)
    cls = _REGISTRY.get(mt)
    if cls is None:
        raise UnsupportedModelError(
            f"model_type {mt!r} is not supported; flextron supports: {', '.join(supported_model_types())}"
        )
    return cls(config)
