"""Stage 1: activation-based importance ranking and weight permutation (METHOD §2).

Input: a HF decoder (through its family adapter) and calibration batches ``(B, T)`` of token ids.
Output: :class:`Importance` (per layer: one score per MLP neuron, one per query head) and a
:class:`Permutation` applied physically to the weights, so that the most important units come
first and a layer at width *k* keeps the first *k*. The permuted model computes the same function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from tqdm.auto import tqdm

from flextron.model.families import FamilyAdapter


@dataclass
class Importance:
    """Importance scores (METHOD §2, Minitron aggregation).

    ``mlp[l]``: shape ``(intermediate_size,)``, ``s_i = ‖ mean_t |z_{b,t,i}| ‖₂ over b`` with ``z``
    the input of ``down_proj``. ``heads[l]``: shape ``(num_attention_heads,)``, the same statistic
    over each head's slice of the ``o_proj`` input (L2 over ``head_dim`` first).
    """

    mlp: list[torch.Tensor]
    heads: list[torch.Tensor]


@dataclass
class Permutation:
    """New order of units, per layer: ``mlp[l]`` indexes intermediate neurons, ``heads[l]`` query
    heads (every head stays with its KV group's keys and values); ``groups[l]`` (``kv_groups``
    axis only, else None) the KV groups themselves, whose ``k_proj``/``v_proj`` rows move with them."""

    mlp: list[torch.Tensor]
    heads: list[torch.Tensor]
    groups: list[torch.Tensor] | None = None


class _Accumulator:
    """Sum over sequences of (per-sequence mean over non-padding tokens of |activation|)²."""

    def __init__(self) -> None:
        self.sq: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None  # (B, T), 1 for real tokens

    def add(self, act: torch.Tensor) -> None:  # act: (B, T, U) non-negative
        act = act.detach().double()
        if self.token_mask is not None:
            m = self.token_mask.to(act.dtype)[..., None]  # (B, T, 1)
            per_seq = (act * m).sum(1) / m.sum(1).clamp_min(1)  # (B, U)
        else:
            per_seq = act.mean(1)  # (B, U)
        sq = per_seq.pow(2).sum(0)  # (U,)
        self.sq = sq if self.sq is None else self.sq + sq

    def result(self) -> torch.Tensor:
        assert self.sq is not None, "no calibration batch was seen"
        return self.sq.sqrt().float()


@torch.no_grad()
def compute_importance(
    model: torch.nn.Module, adapter: FamilyAdapter, batches: Iterable[torch.Tensor | dict], *, progress: bool = True
) -> Importance:
    """Run calibration batches through ``model`` and score every MLP neuron and query head.

    Args:
        batches: token ids ``(B, T)`` or dicts with ``input_ids`` and optional ``attention_mask``
            ``(B, T)``; padding tokens (mask 0) are excluded from the means.
    Returns:
        :class:`Importance`, float32 scores on CPU.
    Raises:
        DataError: ``batches`` is empty.
    """
    from flextron.errors import DataError

    geo = adapter.geometry
    layers = adapter.layers(model)
    mlp_acc = [_Accumulator() for _ in layers]
    head_acc = [_Accumulator() for _ in layers]
    hooks = []

    def mlp_hook(acc):
        def fn(_mod, args):
            acc.add(args[0].abs())  # (B, T, D)

        return fn

    def head_hook(acc):
        def fn(_mod, args):
            x = args[0]  # (B, T, H*hd)
            acc.add(x.unflatten(-1, (-1, geo.head_dim)).norm(dim=-1))  # (B, T, H)

        return fn

    for layer, ma, ha in zip(layers, mlp_acc, head_acc):
        hooks.append(adapter.mlp_projections(adapter.mlp(layer))["down"].register_forward_pre_hook(mlp_hook(ma)))
        hooks.append(
            adapter.attention_projections(adapter.attention(layer))["o"].register_forward_pre_hook(head_hook(ha))
        )
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seen = 0
    try:
        for batch in tqdm(batches, desc="rank: calibration", disable=not progress, leave=False):
            if isinstance(batch, dict):
                ids, mask = batch["input_ids"], batch.get("attention_mask")
            else:
                ids, mask = batch, None
            for acc in mlp_acc + head_acc:
                acc.token_mask = None if mask is None else mask.to(device)
            model(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device), use_cache=False)
            seen += ids.shape[0]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if seen == 0:
        raise DataError("the calibration set is empty; give at least one calibration sequence")
    return Importance(mlp=[a.result() for a in mlp_acc], heads=[a.result() for a in head_acc])


def make_permutation(
    importance: Importance,
    adapter: FamilyAdapter,
    ordering: str = "importance",
    seed: int = 0,
    head_axis: str = "heads_per_group",
) -> Permutation:
    """Order units by descending importance (``importance``), keep them (``none``) or shuffle them
    (``random``, seeded) — the last two are the ablations of METHOD §2. Heads move only within
    their KV group, so GQA stays valid; on the ``kv_groups`` axis the groups are ordered too
    (group score = the sum of its heads' scores, METHOD §2) and carry their heads along."""
    geo = adapter.geometry
    G, R = geo.num_key_value_heads, geo.heads_per_group
    gen = torch.Generator().manual_seed(seed)
    mlp, heads, groups = [], [], []
    for s_mlp, s_head in zip(importance.mlp, importance.heads):
        if ordering == "importance":
            mlp.append(torch.argsort(s_mlp, descending=True, stable=True))
            within = torch.argsort(s_head.view(G, R), dim=1, descending=True, stable=True)  # (G, R)
            order = torch.argsort(s_head.view(G, R).sum(1), descending=True, stable=True)  # (G,)
        elif ordering == "none":
            mlp.append(torch.arange(s_mlp.numel()))
            within, order = torch.arange(R).expand(G, R), torch.arange(G)
        elif ordering == "random":
            mlp.append(torch.randperm(s_mlp.numel(), generator=gen))
            within = torch.stack([torch.randperm(R, generator=gen) for _ in range(G)])
            order = torch.randperm(G, generator=gen) if head_axis == "kv_groups" else torch.arange(G)
        else:
            raise ValueError(f"unknown ordering {ordering!r}")
        if head_axis != "kv_groups":
            order = torch.arange(G)
        groups.append(order)
        heads.append((within[order] + order[:, None] * R).reshape(-1))  # (H,)
    return Permutation(mlp=mlp, heads=heads, groups=groups if head_axis == "kv_groups" else None)


def _rows(weight: torch.Tensor, idx: torch.Tensor) -> None:
    weight.data.copy_(weight.data.index_select(0, idx.to(weight.device)))


@torch.no_grad()
def apply_permutation(model: torch.nn.Module, adapter: FamilyAdapter, perm: Permutation) -> None:
    """Permute weights in place: rows of ``gate/up_proj`` and columns of ``down_proj`` by
    ``perm.mlp``; query-head blocks of ``q_proj`` rows (and bias) and ``o_proj`` columns by
    ``perm.heads``. K/V projections, norms and ``head_dim`` are untouched, so the function is
    unchanged (invariant 1)."""
    hd = adapter.geometry.head_dim
    for i, (layer, pm, ph) in enumerate(zip(adapter.layers(model), perm.mlp, perm.heads)):
        mp = adapter.mlp_projections(adapter.mlp(layer))
        for name in ("gate", "up"):
            _rows(mp[name].weight, pm)
            if mp[name].bias is not None:
                _rows(mp[name].bias, pm)
        down = mp["down"].weight  # (d, D)
        down.data.copy_(down.data.index_select(1, pm.to(down.device)))
        ap = adapter.attention_projections(adapter.attention(layer))
        rows = (ph[:, None] * hd + torch.arange(hd)).reshape(-1)  # head blocks -> row indices
        _rows(ap["q"].weight, rows)
        if ap["q"].bias is not None:
            _rows(ap["q"].bias, rows)
        o = ap["o"].weight  # (d, H*hd)
        o.data.copy_(o.data.index_select(1, rows.to(o.device)))
        if perm.groups is not None:  # whole KV groups move: their key and value rows too
            pg = perm.groups[i]
            kv_rows = (pg[:, None] * hd + torch.arange(hd)).reshape(-1)
            for name in ("k", "v"):
                _rows(ap[name].weight, kv_rows)
                if ap[name].bias is not None:
                    _rows(ap[name].bias, kv_rows)
