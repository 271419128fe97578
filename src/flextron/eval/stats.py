"""Statistics of comparisons (METHOD §9 reporting): bootstrap confidence intervals over blocks,
paired comparisons of two methods on the same blocks (better / worse / tie), Pareto frontiers.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Sequence

import torch

from flextron.errors import ConfigError, DataError

logger = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- statistics and output


def paired_comparison(nll_a: Sequence[float], nll_b: Sequence[float], *, n: int = 1000, seed: int = 0) -> dict:
    """Compare two models on the same held-out blocks: ``a`` minus ``b`` in mean NLL (nats per
    token), with a paired percentile bootstrap over blocks.

    Returns:
        ``{"delta_nll", "ci95": [lo, hi], "ppl_ratio": exp(delta), "ppl_ratio_ci95",
        "verdict": "better" | "worse" | "tie"}`` from ``a``'s side (lower NLL is better; a tie when
        the interval contains 0).
    Raises:
        DataError: the two lists differ in length or are empty.
    """
    if len(nll_a) != len(nll_b) or not nll_a:
        raise DataError(
            f"paired comparison needs per-block NLLs of equal, non-zero length, got {len(nll_a)} and {len(nll_b)}"
        )
    diff = [float(a) - float(b) for a, b in zip(nll_a, nll_b)]
    lo, hi = bootstrap_ci(diff, n=n, seed=seed)
    delta = sum(diff) / len(diff)
    verdict = "tie" if lo <= 0 <= hi else ("better" if hi < 0 else "worse")
    return {
        "delta_nll": delta,
        "ci95": [lo, hi],
        "ppl_ratio": math.exp(delta),
        "ppl_ratio_ci95": [math.exp(lo), math.exp(hi)],
        "verdict": verdict,
    }


def pareto_frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points ``(latency, perplexity)`` no other point beats on both (lower is better on
    both axes), sorted by latency."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front
