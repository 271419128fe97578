"""Stage 2: the elastic model — nested sub-networks that share weights (METHOD §1, §3).

Input: a HF decoder and an :class:`~flextron.config.ElasticConfig`. :func:`convert` swaps each
layer's attention and MLP, in place, for :class:`ElasticAttention` / :class:`ElasticMLP`, which own
the *same* projection modules under the same names (so state-dict keys do not change and the
weights stay a plain HF checkpoint). Output: an :class:`ElasticModel` that runs any
:class:`ArchConfig` either *sliced* (only the kept neurons/heads are computed: real savings) or
*masked* (full width, per-sequence soft masks from router probabilities, differentiable).

A layer at MLP width ``m`` keeps the first ``m`` intermediate neurons; at ``a`` heads per group it
keeps, in every KV group, the first ``a`` query heads (``G·a`` heads; K/V and ``head_dim`` kept).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from flextron.config import ElasticConfig, from_dict
from flextron.errors import TargetError
from flextron.model.families import FamilyAdapter, Geometry, adapter_for
from flextron.model.ranking import Importance, apply_permutation, compute_importance, make_permutation
from flextron.model.space import ArchConfig, SearchSpace


def _slice_bias(lin: nn.Linear, n: int) -> torch.Tensor | None:
    return None if lin.bias is None else lin.bias[:n]


class ElasticMLP(nn.Module):
    """Gated MLP whose intermediate width is elastic (METHOD §3).

    Holds the original ``gate_proj``/``up_proj``/``down_proj``/``act_fn``. Sliced mode uses the first
    ``width`` neurons; masked mode (``mask`` set, shape ``(B or 1, intermediate_size)``) multiplies the
    ``down_proj`` input by the mask: ``Σ_k π_k MLP_{m_k}(x)`` for nested candidates. Grouped mode
    (``token_widths`` set, shape ``(B, T)``, set by :mod:`flextron.routing.runtime`): every token runs at its
    own width, tokens grouped by width so each group computes only its slice.
    """

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate, up, down, act
        self.full_width = gate.out_features
        self.width = self.full_width
        self.mask: torch.Tensor | None = None
        self.token_widths: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d)
        if self.token_widths is not None and self.mask is None:
            return self._grouped(x, self.token_widths)
        m = self.width
        if self.mask is not None or m == self.full_width:
            z = self.act_fn(self.gate_proj(x)) * self.up_proj(x)  # (B, T, D)
            if self.mask is not None:
                z = z * self.mask[:, None, :].to(z.dtype)
            return self.down_proj(z)
        return self._sliced(x, m)

    def _grouped(self, x: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
        """Per-token widths ``(B, T)``: gather the tokens of each width, run that slice, scatter back."""
        B, T, d = x.shape
        flat, w = x.reshape(B * T, d), widths.reshape(B * T)
        out = x.new_empty(B * T, self.down_proj.out_features)
        for m in torch.unique(w).tolist():
            idx = (w == m).nonzero().squeeze(1)  # (n_m,)
            out.index_copy_(0, idx, self._sliced(flat.index_select(0, idx), int(m)))
        return out.view(B, T, -1)

    def _sliced(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """The first ``m`` neurons only: ``(..., d) → (..., d)``."""
        if m == self.full_width:
            return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        g = F.linear(x, self.gate_proj.weight[:m], _slice_bias(self.gate_proj, m))  # (B, T, m)
        u = F.linear(x, self.up_proj.weight[:m], _slice_bias(self.up_proj, m))
        return F.linear(self.act_fn(g) * u, self.down_proj.weight[:, :m], self.down_proj.bias)  # (B, T, d)


class ElasticAttention(nn.Module):
    """GQA attention with an elastic number of query heads per KV group (METHOD §1, §3).

    Holds the original ``q/k/v/o_proj`` (and ``q_norm``/``k_norm`` when the family has them).
    Called like the HF attention it replaces; returns ``(output (B, T, d), None)``. Masked mode:
    ``mask`` of shape ``(B or 1, num_attention_heads)`` scales each head's output before ``o_proj``.
    """

    def __init__(
        self, projections: dict[str, nn.Linear], norms: dict[str, nn.Module], geo: Geometry, layer_idx: int
    ) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (projections[k] for k in "qkvo")
        for name, mod in norms.items():
            self.add_module(name, mod)
        self.has_qk_norm = bool(norms)
        self.layer_idx = layer_idx
        self.head_dim = geo.head_dim
        self.num_key_value_heads = geo.num_key_value_heads
        self.full_heads_per_group = geo.heads_per_group
        self.heads_per_group = geo.heads_per_group
        self.scaling = geo.head_dim**-0.5
        self.mask: torch.Tensor | None = None

    def _q_o_weights(self, a: int):
        """q_proj rows and o_proj columns of the first ``a`` heads of every group."""
        G, R, hd = self.num_key_value_heads, self.full_heads_per_group, self.head_dim
        wq = self.q_proj.weight.view(G, R, hd, -1)[:, :a].reshape(G * a * hd, -1)  # (G·a·hd, d)
        bq = None if self.q_proj.bias is None else self.q_proj.bias.view(G, R, hd)[:, :a].reshape(-1)
        wo = self.o_proj.weight.view(-1, G, R, hd)[:, :, :a].reshape(-1, G * a * hd)  # (d, G·a·hd)
        return wq, bq, wo

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, None]:
        B, T, _ = hidden_states.shape
        a = self.full_heads_per_group if self.mask is not None else self.heads_per_group
        full = a == self.full_heads_per_group
        if full:
            q = self.q_proj(hidden_states)
        else:
            wq, bq, wo = self._q_o_weights(a)
            q = F.linear(hidden_states, wq, bq)
        q = q.view(B, T, -1, self.head_dim)  # (B, T, G·a, hd)
        k = self.k_proj(hidden_states).view(B, T, -1, self.head_dim)  # (B, T, G, hd)
        v = self.v_proj(hidden_states).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, G, T, hd)
        if self.has_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = position_embeddings
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        # Same dispatch as transformers' sdpa path: causal flag without a mask, else the 4-D mask.
        is_causal = attention_mask is None and T > 1
        if is_causal and k.shape[2] > T:  # prefill into an empty static cache
            k, v = k[:, :, :T], v[:, :, :T]
        if attention_mask is not None:
            attention_mask = attention_mask[:, :, :, : k.shape[2]]
            k = k.repeat_interleave(a, dim=1)  # (B, G·a, S, hd)
            v = v.repeat_interleave(a, dim=1)
            gqa = {}
        else:
            gqa = {"enable_gqa": a > 1}
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attention_mask, is_causal=is_causal, scale=self.scaling, **gqa
        )
        out = out.transpose(1, 2)  # (B, T, G·a, hd)
        if self.mask is not None:
            out = out * self.mask[:, None, :, None].to(out.dtype)
        out = out.reshape(B, T, -1)
        if full:
            return self.o_proj(out), None
        return F.linear(out, wo, self.o_proj.bias), None


class ElasticModel(nn.Module):
    """A HF causal LM whose layers run any sub-network of :class:`SearchSpace` (METHOD §1, §3).

    ``model`` is the wrapped HF model (modules swapped in place; the state dict keys are the HF
    ones). ``router`` is an optional object with ``route(target: float) -> ArchConfig`` (attached
    by the router stage) used by :meth:`set_target`.
    """

    def __init__(
        self, model: nn.Module, adapter: FamilyAdapter, space: SearchSpace, elastic_config: ElasticConfig
    ) -> None:
        super().__init__()
        self.model = model
        self.adapter = adapter
        self.space = space
        self.elastic_config = elastic_config
        self.router = None
        self.ranking: dict = {"ordering": "none", "applied": False}
        layers = adapter.layers(model)
        self.mlps: list[ElasticMLP] = [adapter.mlp(layer) for layer in layers]
        self.attns: list[ElasticAttention] = [adapter.attention(layer) for layer in layers]

    # -- configuration ------------------------------------------------------------------------
    @property
    def config(self):
        """The wrapped model's HF config."""
        return self.model.config

    @property
    def arch(self) -> ArchConfig:
        """The active (sliced) configuration."""
        return ArchConfig(mlp=tuple(m.width for m in self.mlps), heads=tuple(a.heads_per_group for a in self.attns))

    def set_arch(self, arch: ArchConfig | None) -> "ElasticModel":
        """Activate a configuration (``None``: the full model) for sliced forwards.

        Raises:
            ConfigError: ``arch`` is not in the search space.
        """
        arch = self.space.full() if arch is None else self.space.validate(arch)
        for mlp, attn, m, a in zip(self.mlps, self.attns, arch.mlp, arch.heads):
            mlp.width, attn.heads_per_group = m, a
        return self

    def set_masks(self, mlp: Sequence[torch.Tensor] | None, heads: Sequence[torch.Tensor] | None) -> None:
        """Masked mode: per layer, ``mlp[l]`` of shape ``(B or 1, intermediate_size)`` and ``heads[l]``
        of shape ``(B or 1, num_attention_heads)``; ``None`` clears that axis' masks."""
        for i, (m, a) in enumerate(zip(self.mlps, self.attns)):
            m.mask = None if mlp is None else mlp[i]
            a.mask = None if heads is None else heads[i]

    def set_target(self, target: float) -> ArchConfig:
        """Route ``target`` (fraction of full latency, 0 < t ≤ 1) with the attached router and
        activate the result.

        Raises:
            TargetError: no router attached, or the target is out of range (raised by the router).
        """
        if self.router is None:
            raise TargetError("this elastic model has no trained router; run the router stage or use set_arch()")
        arch = self.router.route(target)
        self.set_arch(arch)
        return arch

    def num_parameters_of(self, arch: ArchConfig | None = None) -> int:
        """Exact parameter count of ``arch`` (default: active configuration) as a sliced model."""
        return self.space.num_parameters(self.arch if arch is None else arch)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        """The HF model's forward (``input_ids (B, T)`` → ``CausalLMOutput`` with logits ``(B, T, V)``)."""
        return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """``transformers`` generation at the active configuration (KV cache supported)."""
        return self.model.generate(*args, **kwargs)

    # -- ranking ------------------------------------------------------------------------------
    def rank(self, batches, ordering: str | None = None, seed: int = 0, progress: bool = True) -> Importance:
        """Score units on calibration ``batches`` (token ids ``(B, T)``) and permute the weights so
        the most important come first (METHOD §2). The full model's function is unchanged.

        Returns the :class:`Importance` measured *before* the permutation.
        """
        ordering = ordering or self.elastic_config.ordering
        self.set_masks(None, None)
        self.set_arch(None)
        imp = compute_importance(self.model, self.adapter, batches, progress=progress)
        apply_permutation(self.model, self.adapter, make_permutation(imp, self.adapter, ordering, seed))
        self.ranking = {"ordering": ordering, "applied": True, "seed": seed}
        return imp

    def metadata(self) -> dict:
        """JSON-ready description saved next to the weights (``flextron.json``)."""
        from flextron.version import __version__

        return {
            "flextron_version": __version__,
            "elastic_config": {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self.elastic_config).items()
            },
            "search_space": self.space.to_dict(),
            "ranking": self.ranking,
        }


def convert(model: nn.Module, elastic_config: ElasticConfig | None = None) -> ElasticModel:
    """Make ``model`` elastic in place (like PEFT's ``get_peft_model``) and return the wrapper.

    Args:
        model: a HF ``*ForCausalLM`` of a supported family.
    Raises:
        UnsupportedModelError: unknown family; ConfigError: candidates do not fit the model.
    """
    elastic_config = elastic_config or ElasticConfig()
    adapter = adapter_for(model.config)
    geo = adapter.geometry
    total = sum(p.numel() for p in model.parameters())
    space = SearchSpace.build(geo, elastic_config, total)
    # Our attention reads HF's 4-D (sdpa/eager) masks; flash-style 2-D masks are not supported.
    if getattr(model.config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        model.set_attn_implementation("sdpa")
    for i, layer in enumerate(adapter.layers(model)):
        attn = adapter.attention(layer)
        if not isinstance(attn, ElasticAttention):
            adapter.set_attention(
                layer, ElasticAttention(adapter.attention_projections(attn), adapter.qk_norms(attn), geo, i)
            )
        mlp = adapter.mlp(layer)
        if not isinstance(mlp, ElasticMLP):
            p = adapter.mlp_projections(mlp)
            adapter.set_mlp(layer, ElasticMLP(p["gate"], p["up"], p["down"], p["act"]))
    return ElasticModel(model, adapter, space, elastic_config)


def elastic_config_from_metadata(meta: dict) -> ElasticConfig:
    """The :class:`ElasticConfig` stored in ``flextron.json``."""
    return from_dict(ElasticConfig, meta["elastic_config"], "elastic_config")
