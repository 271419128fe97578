"""Scoring: the negative log-likelihood of token blocks under a causal LM (model stage helper).

Takes a plain HF causal LM or an :class:`~flextron.model.elastic.ElasticModel` (at its active
configuration) and token blocks ``(N, T)``; gives per-block mean NLL in nats. The decoder runs
once per batch and the LM head in chunks of tokens, so the ``(B, T, V)`` logits of a large
vocabulary are never held at once. Used by training (router measurements) and evaluation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from flextron.errors import ConfigError, DataError

# Logits are computed for at most this many elements at a time (≈ 67 MB of fp32: 341 tokens at vocab
# 49152); cross-entropy adds a log-softmax of the same size.
_LOGIT_BUDGET = 2**24


def hf_model(model: nn.Module) -> nn.Module:
    """The HF ``*ForCausalLM`` (unwraps an ElasticModel)."""
    from flextron.model.elastic import ElasticModel

    return model.model if isinstance(model, ElasticModel) else model


def _split_lm(model: nn.Module):
    """``(decoder, lm_head, softcap)`` of a HF causal LM, or ``None`` when it is not laid out so."""
    hf = hf_model(model)
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


def block_nll(model: nn.Module, blocks: torch.Tensor, *, batch_size: int = 8, progress: bool = True) -> dict:
    """NLL of ``model`` on token blocks ``(N, T)`` (each block predicts its tokens 2..T), without
    gradients; the train/eval mode is restored afterwards.

    Returns:
        ``{"nll": token-mean NLL (nats), "nll_per_block": [N floats], "tokens": predicted tokens}``.
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
    return {"nll": total / count, "nll_per_block": per_block, "tokens": count}
