"""Evaluation: held-out perplexity with bootstrap confidence intervals, and decode speed.

Works for plain HF causal LMs and for :class:`~flextron.elastic.ElasticModel` (at its active
configuration) alike: both take ``input_ids`` and return ``.logits``.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .errors import ConfigError, DataError
from .latency import time_models

logger = logging.getLogger(__name__)

__all__ = ["perplexity", "decode_tokens_per_s", "bootstrap_ci"]

# Logits are computed for at most this many elements at a time (≈ 67 MB of fp32: 341 tokens at vocab
# 49152); cross-entropy adds a log-softmax of the same size.
_LOGIT_BUDGET = 2**24


def _hf_model(model: nn.Module) -> nn.Module:
    """The HF ``*ForCausalLM`` (unwraps an ElasticModel)."""
    from .elastic import ElasticModel

    return model.model if isinstance(model, ElasticModel) else model


def _split_lm(model: nn.Module):
    """``(decoder, lm_head, softcap)`` of a HF causal LM, or ``None`` when it is not laid out so."""
    hf = _hf_model(model)
    try:
        decoder = hf.get_decoder()
        head = hf.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is hf:
        return None
    return decoder, head, getattr(hf.config, "final_logit_softcapping", None)


def _nll_from_hidden(hidden: torch.Tensor, targets: torch.Tensor, head: nn.Module, softcap) -> torch.Tensor:
    """Per-token NLL ``(B, T-1)`` from last hidden states ``(B, T, d)``, the LM head applied in chunks."""
    B, T, d = hidden.shape
    h = hidden[:, :-1].reshape(-1, d)
    y = targets[:, 1:].reshape(-1)
    vocab = head.weight.shape[0] if hasattr(head, "weight") else 1
    chunk = max(1, _LOGIT_BUDGET // max(1, vocab))
    out = []
    for s in range(0, h.shape[0], chunk):
        logits = head(h[s : s + chunk])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        out.append(F.cross_entropy(logits, y[s : s + chunk], reduction="none"))
        del logits
    return torch.cat(out).view(B, T - 1)


def _nll_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    B, T, V = logits.shape
    lg = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(lg.reshape(-1, V), targets[:, 1:].reshape(-1), reduction="none").view(B, T - 1)


def perplexity(model: nn.Module, blocks: torch.Tensor, *, batch_size: int = 8, progress: bool = True) -> dict:
    """Perplexity of ``model`` on token blocks ``(N, T)`` (each block predicts its tokens 2..T).

    Runs the decoder once per batch and the LM head in chunks of tokens, so the ``(B, T, V)``
    logits of a large vocabulary are never held at once. No gradients; the train/eval mode is
    restored afterwards.

    Returns:
        ``{"perplexity": exp(token-mean NLL), "nll": token-mean NLL, "nll_per_block": [N floats],
        "tokens": number of predicted tokens, "ci95": [lo, hi] bootstrap interval of the
        perplexity over blocks}``.
    Raises:
        DataError: ``blocks`` is empty or shorter than 2 tokens; ConfigError: ``batch_size < 1``.
    """
    if batch_size < 1:
        raise ConfigError(f"perplexity needs batch_size >= 1, got {batch_size}")
    if blocks.dim() != 2 or blocks.shape[0] < 1 or blocks.shape[1] < 2:
        raise DataError(f"perplexity needs token blocks of shape (N >= 1, T >= 2), got {tuple(blocks.shape)}")
    device = next(model.parameters()).device
    split = _split_lm(model)
    was_training = model.training
    model.eval()
    per_block: list[float] = []
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for s in tqdm(range(0, blocks.shape[0], batch_size), desc="perplexity", disable=not progress, leave=False):
                ids = blocks[s : s + batch_size].to(device)
                if split is not None:
                    decoder, head, softcap = split
                    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
                    nll = _nll_from_hidden(hidden, ids, head, softcap)
                    del hidden
                else:
                    nll = _nll_from_logits(model(input_ids=ids, use_cache=False).logits, ids)
                nll = nll.double()
                per_block.extend(nll.mean(1).tolist())
                total += nll.sum().item()
                count += nll.numel()
    finally:
        model.train(was_training)
    mean = total / count
    return {
        "perplexity": math.exp(mean),
        "nll": mean,
        "nll_per_block": per_block,
        "tokens": count,
        "ci95": list(bootstrap_ci(per_block, transform=math.exp)),
    }


def bootstrap_ci(
    values: Sequence[float],
    *,
    n: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    transform: Callable[[float], float] | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``transform(mean(values))`` (default: the mean itself).

    For perplexity, pass the per-block mean NLLs (equal-length blocks) and ``transform=math.exp``.
    """
    if len(values) == 0:
        raise DataError("bootstrap_ci needs at least one value")
    if not 0 < alpha < 1:
        raise ConfigError(f"bootstrap_ci needs 0 < alpha < 1, got {alpha}")
    if n < 1:
        raise ConfigError(f"bootstrap_ci needs n >= 1, got {n}")
    v = torch.tensor([float(x) for x in values], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(v), (n, len(v)), generator=gen)
    means = v[idx].mean(1)
    lo = torch.quantile(means, alpha / 2).item()
    hi = torch.quantile(means, 1 - alpha / 2).item()
    f = transform or (lambda x: x)
    lo, hi = f(lo), f(hi)
    return (min(lo, hi), max(lo, hi))


def decode_tokens_per_s(
    model: nn.Module, *, prompt_len: int = 32, new_tokens: int = 32, repeats: int = 3, seed: int = 0
) -> float:
    """Greedy decoding speed with the KV cache, in tokens per second.

    Times ``generate`` of exactly ``new_tokens`` and of 1 new token on the same random prompt
    (interleaved, via :func:`~flextron.latency.time_models`), so the prompt's prefill cancels:
    ``(new_tokens - 1) / (t_N - t_1)`` (median times). Falls back to ``new_tokens / t_N`` when
    ``new_tokens == 1`` or the difference is not positive (noise).
    """
    if prompt_len < 1 or new_tokens < 1 or repeats < 1:
        raise ConfigError(
            f"decode_tokens_per_s needs prompt_len, new_tokens, repeats >= 1, got {prompt_len}, {new_tokens}, {repeats}"
        )
    hf = _hf_model(model)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, hf.config.vocab_size, (1, prompt_len), generator=gen).to(device)
    mask = torch.ones_like(ids)
    pad = hf.config.pad_token_id if getattr(hf.config, "pad_token_id", None) is not None else 0
    was_training = model.training
    model.eval()

    def gen_fn(k: int):
        def run():
            with torch.inference_mode():
                out = model.generate(
                    input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=k, min_new_tokens=k,
                    pad_token_id=pad, use_cache=True, temperature=None, top_p=None, top_k=None,
                )
            assert out.shape[1] == prompt_len + k, (out.shape, prompt_len, k)
            return out

        return run

    fns = {"n": gen_fn(new_tokens)}
    if new_tokens > 1:
        fns["1"] = gen_fn(1)
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
