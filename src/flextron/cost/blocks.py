"""Timing one layer's MLP and attention blocks for the latency lookup table (METHOD §5).

Input: an :class:`~flextron.model.elastic.ElasticModel` and the workload's token ids ``(B, T)``.
Output: the trimmed-mean time (seconds) of one layer's MLP at every width (key ``mlp:{m}``) and of
one layer's attention at every unit count, per layer type (key ``attn:{a}``; ``attn:{type}:{a}``
when the model's layers differ, e.g. Gemma 3's ``sliding_attention`` and ``full_attention``).

The attention of each type is timed on the first layer of that type, called exactly as the model
calls it: its input hidden states and keyword arguments (the rotary ``position_embeddings`` of its
type, its attention mask: causal, or sliding-window for local layers) are captured from one
forward of the workload, so no family's rotary embedding or mask is rebuilt here.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from flextron.config import LatencyConfig
from flextron.cost.timing import time_models
from flextron.model.elastic import ElasticModel

logger = logging.getLogger(__name__)


def layer_types(fx: ElasticModel) -> list[str] | None:
    """Per-layer attention types (``config.layer_types``), or None when every layer is alike."""
    types = [a.layer_type for a in fx.attns]
    return types if len(set(types)) > 1 else None


def attention_inputs(fx: ElasticModel, ids: torch.Tensor, layers: list[int]) -> dict[int, tuple]:
    """``{layer: (hidden_states (B, T, d), kwargs)}``: what each listed layer's attention receives
    in one full forward of ``ids`` (``position_embeddings`` and ``attention_mask``)."""
    got: dict[int, tuple] = {}
    hooks = []
    for i in layers:

        def capture(_mod, args, kwargs, i=i):
            x = args[0] if args else kwargs["hidden_states"]
            got[i] = (x, {k: kwargs.get(k) for k in ("position_embeddings", "attention_mask")})

        hooks.append(fx.attns[i].register_forward_pre_hook(capture, with_kwargs=True))
    try:
        fx.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return got


def time_blocks(fx: ElasticModel, cfg: LatencyConfig, ids: torch.Tensor, *, progress: bool = True) -> dict[str, float]:
    """Trimmed-mean seconds of every MLP width and attention unit count (per layer type), all
    interleaved round-robin (``cfg.block_repeats`` rounds). Call in inference mode at the full
    configuration; the timed layers' widths are changed (the caller restores them).

    Logs a warning when the workload is not longer than a sliding window: local and global
    layers then cost the same.
    """
    space = fx.space
    types = layer_types(fx)
    first = {t: types.index(t) for t in dict.fromkeys(types)} if types else {None: 0}
    inputs = attention_inputs(fx, ids, list(first.values()))
    windows = [a.sliding_window for a in fx.attns if a.sliding_window]
    if windows and ids.shape[1] <= min(windows):
        logger.warning(
            "latency.seq_len=%d is not longer than the sliding window (%d): local and global layers cost the "
            "same at this workload; raise latency.seq_len to price them apart",
            ids.shape[1],
            min(windows),
        )
    mlp_mod, x = fx.mlps[0], inputs[0][0]

    def mlp_at(m: int) -> Callable[[], object]:
        def run():
            mlp_mod.width = m
            return mlp_mod(x)

        return run

    def attn_at(layer: int, a: int) -> Callable[[], object]:
        attn, (h, kw) = fx.attns[layer], inputs[layer]

        def run():
            attn.heads_per_group = a
            return attn(h, **kw)

        return run

    fns: dict[str, Callable[[], object]] = {f"mlp:{m}": mlp_at(m) for m in space.mlp_choices}
    for t, layer in first.items():
        prefix = "attn:" if t is None else f"attn:{t}:"
        fns.update({f"{prefix}{a}": attn_at(layer, a) for a in space.head_choices})
    res = time_models(
        fns, repeats=cfg.block_repeats, warmup=cfg.warmup, trim=cfg.trim, progress=progress, desc="latency blocks"
    )
    return {k: v["trimmed_mean_s"] for k, v in res.items()}
