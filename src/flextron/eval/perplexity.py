"""Evaluation measures: held-out perplexity with a bootstrap confidence interval, and decode speed.

Works for plain HF causal LMs and for :class:`~flextron.model.elastic.ElasticModel` (at its active
configuration) alike: both take ``input_ids`` and return ``.logits``.
"""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
from torch import nn

from flextron.config import RunConfig
from flextron.cost.timing import time_models
from flextron.errors import ConfigError
from flextron.eval.stats import bootstrap_ci
from flextron.model.scoring import block_nll, hf_model

logger = logging.getLogger(__name__)


def perplexity(model: nn.Module, blocks: torch.Tensor, *, batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexity of ``model`` on token blocks ``(N, T)`` (each block predicts its tokens 2..T),
    from :func:`~flextron.model.scoring.block_nll`.

    Returns:
        ``{"perplexity": exp(token-mean NLL), "nll": token-mean NLL, "nll_per_block": [N floats],
        "tokens": number of predicted tokens, "ci95": [lo, hi] bootstrap interval of the
        perplexity over blocks}``.
    Raises:
        DataError: ``blocks`` is empty or shorter than 2 tokens; ConfigError: ``batch_size < 1``.
    """
    nll = block_nll(model, blocks, batch_size=batch_size, progress=progress)
    return {
        **nll,
        "perplexity": math.exp(nll["nll"]),
        "ci95": list(bootstrap_ci(nll["nll_per_block"], transform=math.exp)),
    }


def generate_fn(model: nn.Module, ids: torch.Tensor, k: int) -> Callable[[], torch.Tensor]:
    """A callable running greedy ``generate`` of exactly ``k`` new tokens from ``ids (B, P)`` with the
    KV cache (no grad), for a plain HF causal LM or an elastic model at its active configuration;
    it returns ``(B, P + k)`` token ids."""
    mask = torch.ones_like(ids)
    pad = getattr(hf_model(model).config, "pad_token_id", None)
    pad = 0 if pad is None else pad

    def run() -> torch.Tensor:
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=k,
                min_new_tokens=k,
                pad_token_id=pad,
                use_cache=True,
                temperature=None,
                top_p=None,
                top_k=None,
            )
        assert out.shape[1] == ids.shape[1] + k, (out.shape, ids.shape, k)
        return out

    return run


def decode_tokens_per_s(
    model: nn.Module, *, prompt_len: int = 32, new_tokens: int = 32, repeats: int = 3, seed: int = 0
) -> float:
    """Greedy decoding speed with the KV cache, in tokens per second.

    Times ``generate`` of exactly ``new_tokens`` and of 1 new token on the same random prompt
    (interleaved, via :func:`~flextron.cost.measure.time_models`), so the prompt's prefill cancels:
    ``(new_tokens - 1) / (t_N - t_1)`` (median times). Falls back to ``new_tokens / t_N`` when
    ``new_tokens == 1`` or the difference is not positive (noise).
    """
    if prompt_len < 1 or new_tokens < 1 or repeats < 1:
        raise ConfigError(
            f"decode_tokens_per_s needs prompt_len, new_tokens, repeats >= 1, got {prompt_len}, {new_tokens}, {repeats}"
        )
    hf = hf_model(model)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, hf.config.vocab_size, (1, prompt_len), generator=gen).to(device)
    was_training = model.training
    model.eval()
    fns = {"n": generate_fn(model, ids, new_tokens)}
    if new_tokens > 1:
        fns["1"] = generate_fn(model, ids, 1)
    try:
        res = time_models(fns, repeats=repeats, warmup=1)
    finally:
        model.train(was_training)
    t_n = res["n"]["median_s"]
    if new_tokens > 1:
        dt = t_n - res["1"]["median_s"]
        if dt > 0:
            return (new_tokens - 1) / dt
        logger.warning("decode timing: %d tokens not slower than 1 token (noise); including prefill", new_tokens)
    return new_tokens / t_n


def perplexity_of(model, blocks, cfg: RunConfig) -> dict:
    return perplexity(model, blocks, batch_size=cfg.eval.batch_size, progress=False)
