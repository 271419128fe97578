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
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from flextron.config import ElasticConfig, from_dict
from flextron.errors import TargetError
from flextron.model.families import FamilyAdapter, adapter_for
from flextron.model.ranking import Importance, apply_permutation, compute_importance, make_permutation
from flextron.model.space import ArchConfig, SearchSpace


class ElasticMLP(nn.Module):
    """Gated MLP whose intermediate width is elastic (METHOD §3).

    Owns the original MLP's modules under their own names (``gate_proj``/``up_proj``/``down_proj``,
    or Phi-3's fused ``gate_up_proj``), so state-dict keys do not change; the gate and up
    projections are :class:`~flextron.model.families.Rows` of them. Sliced mode uses the first
    ``width`` neurons; masked mode (``mask`` set, shape ``(B or 1, intermediate_size)``) multiplies
    the ``down_proj`` input by the mask: ``Σ_k π_k MLP_{m_k}(x)`` for nested candidates. Grouped mode
    (``token_widths`` set, shape ``(B, T)``, set by :mod:`flextron.routing.runtime`): every token runs
    at its own width, tokens grouped by width so each group computes only its slice.
    """

    def __init__(self, mlp: nn.Module, adapter: FamilyAdapter) -> None:
        super().__init__()
        for name, child in mlp.named_children():
            self.add_module(name, child)
        p = adapter.mlp_projections(self)
        # plain attributes (a dict is not registered), so no parameter gets a second state-dict key
        self.proj = {"gate": p["gate"], "up": p["up"], "down": p["down"], "act": p["act"]}
        self.fused = p["gate"].linear is p["up"].linear
        self.full_width = p["gate"].size
        self.width = self.full_width
        self.mask: torch.Tensor | None = None
        self.token_widths: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d)
        if self.token_widths is not None and self.mask is None:
            return self._grouped(x, self.token_widths)
        m = self.width
        if self.mask is not None:
            z = self._hidden(x, self.full_width) * self.mask[:, None, :].to(x.dtype)  # (B, T, D)
            return self.proj["down"](z)
        return self._sliced(x, m)

    def _hidden(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """``act(gate(x)) * up(x)`` of the first ``m`` neurons: ``(..., d) → (..., m)``."""
        g, u, act = self.proj["gate"], self.proj["up"], self.proj["act"]
        if m == self.full_width and self.fused:  # one matmul over the fused projection
            gu = g.linear(x)
            return act(gu[..., g.start : g.start + m]) * gu[..., u.start : u.start + m]
        gb, ub = g.bias, u.bias
        gate = F.linear(x, g.weight[:m], None if gb is None else gb[:m])
        return act(gate) * F.linear(x, u.weight[:m], None if ub is None else ub[:m])

    def _grouped(self, x: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
        """Per-token widths ``(B, T)``: gather the tokens of each width, run that slice, scatter back."""
        B, T, d = x.shape
        flat, w = x.reshape(B * T, d), widths.reshape(B * T)
        out = x.new_empty(B * T, self.proj["down"].out_features)
        for m in torch.unique(w).tolist():
            idx = (w == m).nonzero().squeeze(1)  # (n_m,)
            out.index_copy_(0, idx, self._sliced(flat.index_select(0, idx), int(m)))
        return out.view(B, T, -1)

    def _sliced(self, x: torch.Tensor, m: int) -> torch.Tensor:
        """The first ``m`` neurons only: ``(..., d) → (..., d)``."""
        down = self.proj["down"]
        if m == self.full_width:
            return down(self._hidden(x, m))
        return F.linear(self._hidden(x, m), down.weight[:, :m], down.bias)  # (..., d)


class ElasticAttention(nn.Module):
    """Attention with an elastic number of query heads per KV group (METHOD §1, §3).

    Owns the original attention module's children under their own names (``q/k/v/o_proj`` or
    Phi-3's fused ``qkv_proj``, ``q_norm``/``k_norm``) and runs the family's own pieces
    (:class:`~flextron.model.families.AttentionCall`: rotary embedding, scaling, sliding window,
    softcap), then transformers' attention function for ``config._attn_implementation`` — only
    the query rows and ``o_proj`` columns are sliced. Called like the HF attention it replaces;
    returns ``(output (B, T, d), attention weights or None)``. Masked mode: ``mask`` of shape
    ``(B or 1, num_attention_heads)`` scales each head's output before ``o_proj``.
    """

    def __init__(self, attn: nn.Module, adapter: FamilyAdapter, layer_idx: int, head_axis: str) -> None:
        super().__init__()
        for name, child in attn.named_children():
            self.add_module(name, child)
        geo = adapter.geometry
        self.proj = adapter.attention_projections(self)  # plain dict: no second state-dict key
        self.norms = adapter.qk_norms(self)
        self.call = adapter.attention_call(attn)
        self.config = attn.config
        self.layer_idx = layer_idx
        self.layer_type = adapter.layer_type(layer_idx)
        self.head_dim = geo.head_dim
        self.num_key_value_heads = geo.num_key_value_heads
        self.query_heads_per_group = geo.heads_per_group
        self.groups_axis = head_axis == "kv_groups"
        # attention units: query heads per KV group, or whole KV groups on the kv_groups axis
        self.full_heads_per_group = geo.num_key_value_heads if self.groups_axis else geo.heads_per_group
        self.heads_per_group = self.full_heads_per_group  # the active number of units
        self.num_key_value_groups = geo.heads_per_group  # read by transformers' attention functions
        self.scaling = self.call.scaling
        self.is_causal = self.call.is_causal
        self.sliding_window = self.call.kwargs.get("sliding_window")
        q = self.proj["q"]
        self.fused_qkv = q.linear is self.proj["k"].linear is self.proj["v"].linear
        self.mask: torch.Tensor | None = None

    def kv_rows(self, a: int) -> slice:
        """Key/value rows kept at ``a`` units: all, or those of the first ``a`` groups (a prefix)."""
        return slice(0, a * self.head_dim) if self.groups_axis else slice(None)

    def query_rows(self, a: int) -> torch.Tensor | slice:
        """Query rows (``o_proj`` columns) of the first ``a`` units: the first ``a`` heads of every
        group, or every head of the first ``a`` groups (a prefix). Used by the forward and the export."""
        G, R, hd = self.num_key_value_heads, self.query_heads_per_group, self.head_dim
        if a == self.full_heads_per_group:
            return slice(None)
        if self.groups_axis:
            return slice(0, a * R * hd)
        return torch.arange(G * R * hd, device=self.proj["o"].weight.device).view(G, R, hd)[:, :a].reshape(-1)

    def _qkv(self, x: torch.Tensor, a: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(B, T, d)`` → q ``(B, T, G·a, hd)``, k and v ``(B, T, G, hd)``."""
        B, T, _ = x.shape
        p, hd = self.proj, self.head_dim
        if self.fused_qkv and a == self.full_heads_per_group:
            qkv = p["q"].linear(x)
            q, k, v = (qkv[..., r.start : r.start + r.size] for r in (p["q"], p["k"], p["v"]))
        else:
            rows, qr = self.query_rows(a), p["q"]
            q = F.linear(x, qr.weight[rows], None if qr.bias is None else qr.bias[rows])
            kv = self.kv_rows(a)  # K/V rows of the kept groups
            k, v = (F.linear(x, r.weight[kv], None if r.bias is None else r.bias[kv]) for r in (p["k"], p["v"]))
        return q.view(B, T, -1, hd), k.view(B, T, -1, hd), v.view(B, T, -1, hd)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = hidden_states.shape
        a = self.full_heads_per_group if self.mask is not None else self.heads_per_group
        q, k, v = self._qkv(hidden_states, a)
        if self.norms:
            q, k = self.norms["q_norm"](q), self.norms["k_norm"](k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
        cos, sin = position_embeddings
        q, k = self.call.rotary(q, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, self.layer_idx)
        self.num_key_value_groups = self.query_heads_per_group if self.groups_axis else a
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.call.eager)
        out, weights = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.call.dropout if self.training else 0.0,
            scaling=self.scaling,
            **self.call.kwargs,
            **kwargs,
        )  # out: (B, T, G·a, hd)
        if self.mask is not None:
            out = out * self.mask[:, None, :, None].to(out.dtype)
        out = out.reshape(B, T, -1)
        o = self.proj["o"]
        if a == self.full_heads_per_group:
            return o(out), weights
        return F.linear(out, o.weight[:, self.query_rows(a)], o.bias), weights


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
        perm = make_permutation(imp, self.adapter, ordering, seed, head_axis=self.space.head_axis)
        apply_permutation(self.model, self.adapter, perm)
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
            adapter.set_attention(layer, ElasticAttention(attn, adapter, i, space.head_axis))
        mlp = adapter.mlp(layer)
        if not isinstance(mlp, ElasticMLP):
            adapter.set_mlp(layer, ElasticMLP(mlp, adapter))
    return ElasticModel(model, adapter, space, elastic_config)


def elastic_config_from_metadata(meta: dict) -> ElasticConfig:
    """The :class:`ElasticConfig` stored in ``flextron.json``. A checkpoint written before
    ``head_axis`` existed had only the heads-per-group axis, whatever ``auto`` means now."""
    stored = meta["elastic_config"]
    if isinstance(stored, dict) and "head_axis" not in stored:
        stored = {**stored, "head_axis": "heads_per_group"}
    return from_dict(ElasticConfig, stored, "elastic_config")
