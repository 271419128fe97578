"""Model-family adapters: the only place that names model modules.

Input: a Hugging Face ``PreTrainedModel``/``PretrainedConfig``. Output: a :class:`Geometry` read
from the config (never from module attributes) and accessors for decoder layers, attention and MLP
projections, q/k norms, and the family's own attention pieces (rotary embedding, attention
function, scaling, sliding window). Ranking, elastic and export talk to an adapter, not to
``q_proj`` names (SliceGPT's seam). Families register with :func:`register_family`, keyed on
``config.model_type``; structures that break head slicing are refused with the reason.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from flextron.errors import UnsupportedModelError

_REGISTRY: dict[str, type["FamilyAdapter"]] = {}

# Families whose structure breaks head slicing, with the reason given to the user.
REFUSED_FAMILIES: dict[str, str] = {
    "olmo2": "its q/k norms normalise the whole q/k projection (all heads at once), so dropping a head "
    "changes the kept heads' outputs",
    "olmo3": "its q/k norms normalise the whole q/k projection (all heads at once), so dropping a head "
    "changes the kept heads' outputs",
}


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


@dataclass(frozen=True)
class Rows:
    """One logical projection: rows ``[start, start + size)`` of a (possibly fused) ``nn.Linear``.

    A separate ``q_proj`` is ``Rows(q_proj, 0, out_features)``; Phi-3's query block of ``qkv_proj``
    is ``Rows(qkv_proj, 0, H·head_dim)``. ``weight`` (``(size, in_features)``) and ``bias``
    (``(size,)`` or None) are views of the owning module's parameters, so in-place edits (the
    ranking permutation) and gradients reach the checkpoint's own tensors and keys.
    """

    linear: nn.Linear
    start: int
    size: int

    @classmethod
    def whole(cls, linear: nn.Linear) -> "Rows":
        return cls(linear, 0, linear.out_features)

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight.narrow(0, self.start, self.size)

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.linear.bias
        return None if b is None else b.narrow(0, self.start, self.size)


@dataclass(frozen=True)
class AttentionCall:
    """What a family's attention forward uses besides its projections (read from the HF module).

    ``rotary``: the family's ``apply_rotary_pos_emb(q, k, cos, sin)`` (full or partial rotary);
    ``eager``: its ``eager_attention_forward`` (the fallback of ``ALL_ATTENTION_FUNCTIONS``);
    ``scaling``: the softmax scale (``query_pre_attn_scalar ** -0.5`` for Gemma);
    ``kwargs``: extra arguments of the attention function (``sliding_window``, ``softcap``).
    """

    rotary: Callable
    eager: Callable
    scaling: float
    is_causal: bool
    dropout: float
    kwargs: dict


class FamilyAdapter:
    """Llama-style decoder: ``model.model.layers[i].{self_attn,mlp}`` with ``q/k/v/o_proj`` and
    ``gate/up/down_proj`` (gated MLP), RoPE on ``head_dim``, the family's attention function.

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
        act = getattr(c, "hidden_act", None) or getattr(c, "hidden_activation", None) or "silu"
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

    def attention_projections(self, attn: nn.Module) -> dict[str, Rows | nn.Linear]:
        """``{"q": Rows, "k": Rows, "v": Rows, "o": o_proj}`` of an attention module (HF or elastic)."""
        return {
            "q": Rows.whole(attn.q_proj),
            "k": Rows.whole(attn.k_proj),
            "v": Rows.whole(attn.v_proj),
            "o": attn.o_proj,
        }

    def qk_norms(self, attn: nn.Module) -> dict[str, nn.Module]:
        """Per-``head_dim`` q/k norms (empty for families without them)."""
        return {}

    def mlp_projections(self, mlp: nn.Module) -> dict[str, Rows | nn.Module]:
        """``{"gate": Rows, "up": Rows, "down": down_proj, "act": activation}`` of a gated MLP."""
        return {
            "gate": Rows.whole(mlp.gate_proj),
            "up": Rows.whole(mlp.up_proj),
            "down": mlp.down_proj,
            "act": mlp.act_fn,
        }

    def attention_call(self, attn: nn.Module) -> AttentionCall:
        """The family's attention pieces, read from its HF attention module ``attn``: the rotary and
        eager functions of the module's own modeling file, its ``scaling``, its sliding window
        (per layer: ``attn.sliding_window``, or the config's for Mistral/Phi-3) and logit softcap."""
        modeling = sys.modules[type(attn).__module__]
        kwargs: dict = {}
        window = getattr(attn, "sliding_window", getattr(self.config, "sliding_window", None))
        if window is not None:
            kwargs["sliding_window"] = window
        softcap = getattr(attn, "attn_logit_softcapping", None)
        if softcap is not None:
            kwargs["softcap"] = softcap
        return AttentionCall(
            rotary=modeling.apply_rotary_pos_emb,
            eager=modeling.eager_attention_forward,
            scaling=float(attn.scaling),
            is_causal=bool(getattr(attn, "is_causal", True)),
            dropout=float(getattr(attn, "attention_dropout", 0.0) or 0.0),
            kwargs=kwargs,
        )

    def layer_type(self, layer_idx: int) -> str:
        """``config.layer_types[layer_idx]`` (``full_attention``/``sliding_attention``), else ``full_attention``."""
        types = getattr(self.config, "layer_types", None)
        return str(types[layer_idx]) if types else "full_attention"


@register_family("llama", "mistral")
class LlamaAdapter(FamilyAdapter):
    """Llama 2/3.x (``rope_scaling`` of type ``llama3`` lives in the model's rotary embedding),
    SmolLM/SmolLM2 (``model_type`` llama) and Mistral (sliding window from its config)."""


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
        """Raises UnsupportedModelError when a norm spans more than one head (slicing would change it)."""
        norms = {"q_norm": attn.q_norm, "k_norm": attn.k_norm}
        for name, norm in norms.items():
            w = getattr(norm, "weight", None)
            if w is not None and w.numel() != self.geometry.head_dim:
                raise UnsupportedModelError(
                    f"{name} normalises {w.numel()} features, not one head's head_dim={self.geometry.head_dim}; "
                    "dropping heads would change the kept heads' outputs, so this model cannot be made elastic"
                )
        return norms


@register_family("gemma3_text")
class Gemma3Adapter(Qwen3Adapter):
    """Gemma 3 text: q/k norms over ``head_dim``, ``query_pre_attn_scalar`` scaling, local
    (sliding-window) and global layers with their own RoPE bases, pre- and post-norms and a scaled
    embedding (the decoder layer and model handle those; attention and MLP are sliced here)."""


@register_family("phi3")
class Phi3Adapter(FamilyAdapter):
    """Phi-3 / Phi-4-mini: fused ``qkv_proj`` (query, key, value row blocks) and ``gate_up_proj``
    (gate rows, then up rows), partial rotary embedding (its own ``apply_rotary_pos_emb``)."""

    def attention_projections(self, attn: nn.Module) -> dict[str, Rows | nn.Linear]:
        g = self.geometry
        q, kv = g.num_attention_heads * g.head_dim, g.num_key_value_heads * g.head_dim
        return {
            "q": Rows(attn.qkv_proj, 0, q),
            "k": Rows(attn.qkv_proj, q, kv),
            "v": Rows(attn.qkv_proj, q + kv, kv),
            "o": attn.o_proj,
        }

    def mlp_projections(self, mlp: nn.Module) -> dict[str, Rows | nn.Module]:
        D = self.geometry.intermediate_size
        return {
            "gate": Rows(mlp.gate_up_proj, 0, D),
            "up": Rows(mlp.gate_up_proj, D, D),
            "down": mlp.down_proj,
            "act": mlp.activation_fn,
        }


def check_model_type(model_type, where: str | None = None) -> None:
    """Refuse a ``model_type`` without adapter (one line listing the supported ones) or one whose
    structure breaks head slicing (one line saying why); ``where`` names the file it was read from.

    Raises:
        UnsupportedModelError: as above.
    """
    of = f" of {where}" if where else ""
    supported = ", ".join(supported_model_types())
    if model_type in REFUSED_FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r}{of} cannot be made elastic: {REFUSED_FAMILIES[model_type]}; "
            f"flextron supports: {supported}"
        )
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(f"model_type {model_type!r}{of} is not supported; flextron supports: {supported}")


def adapter_for(config) -> FamilyAdapter:
    """The adapter for ``config.model_type``.

    Raises:
        UnsupportedModelError: as :func:`check_model_type`.
    """
    mt = getattr(config, "model_type", None)
    check_model_type(mt)
    return _REGISTRY[mt](config)
