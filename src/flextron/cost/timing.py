"""Timing primitives of the cost stage (METHOD §5): interleaved wall-clock timing of callables with
warm-up, medians and trimmed means, paired ratios, and a prefill closure (the workload every
latency in flextron refers to). :func:`time_models` is the one timing primitive used everywhere.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from flextron.errors import ConfigError

logger = logging.getLogger(__name__)

#: the clock of :func:`time_models` (seconds; a module attribute so tests can substitute a fake one)
clock = time.perf_counter


# --------------------------------------------------------------------------- timing primitive


def trimmed_mean(values: Sequence[float], trim: float) -> float:
    """Mean after dropping ``floor(trim · n)`` values at each end (``0 <= trim < 0.5``)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("trimmed_mean of no values")
    k = int(math.floor(trim * len(xs)))
    kept = xs[k : len(xs) - k] or xs
    return sum(kept) / len(kept)


def median(values: Sequence[float]) -> float:
    xs = sorted(values)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _cuda_sync_needed() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def time_models(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 2,
    trim: float = 0.2,
    progress: bool = False,
    desc: str = "timing",
) -> dict[str, dict]:
    """Interleaved wall-clock timing of several callables.

    Every round calls each function once (round-robin, the starting point rotating by one each
    round so no candidate always runs right after the same neighbour); ``warmup`` untimed rounds
    come first. CUDA is synchronised around each call when it is in use.

    Returns:
        per name ``{"median_s", "trimmed_mean_s", "times_s"}`` (``times_s``: the ``repeats`` raw
        times in call order; ``trimmed_mean_s`` with trim fraction ``trim``).
    """
    if repeats < 1:
        raise ConfigError(f"time_models needs repeats >= 1, got {repeats}")
    if warmup < 0:
        raise ConfigError(f"time_models needs warmup >= 0, got {warmup}")
    names = list(fns)
    sync = torch.cuda.synchronize if _cuda_sync_needed() else (lambda: None)
    times: dict[str, list[float]] = {n: [] for n in names}
    total = warmup + repeats
    for r in tqdm(range(total), desc=desc, disable=not progress, leave=False):
        k = r % max(1, len(names))
        for name in names[k:] + names[:k]:
            fn = fns[name]
            sync()
            t0 = clock()
            fn()
            sync()
            dt = clock() - t0
            if r >= warmup:
                times[name].append(dt)
    return {
        n: {"median_s": median(ts), "trimmed_mean_s": trimmed_mean(ts, trim), "times_s": ts} for n, ts in times.items()
    }


def paired_ratio(res: dict[str, dict], num: str, den: str) -> float:
    """Median over rounds of ``num``'s time divided by ``den``'s time in the same round (from
    :func:`time_models`). Pairing cancels slow phases of a shared machine that hit both calls of
    a round, so the ratio is steadier than a ratio of medians."""
    return median([a / b for a, b in zip(res[num]["times_s"], res[den]["times_s"])])


def prefill_fn(model: torch.nn.Module, input_ids: torch.Tensor) -> Callable[[], object]:
    """A callable running the prefill workload: a no-grad forward of ``input_ids (B, T)`` with
    ``use_cache=False, logits_to_keep=1`` (the LM head runs on the last token only). Works for plain
    HF causal LMs and :class:`~flextron.model.elastic.ElasticModel` alike."""

    def run():
        with torch.inference_mode():
            return model(input_ids=input_ids, use_cache=False, logits_to_keep=1)

    return run
