"""Calibration of dynamic routers on this device (METHOD §6, §9): the latency price β fitted by
bisection so that the average predicted latency over calibration blocks meets each target
(:func:`calibrate_price`), the router's timed overhead (:func:`measure_overhead`), budgets scaled by
timed / predicted latency (:func:`timed_budgets`), and collapse statistics of the choices.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flextron.cost.timing import paired_ratio, prefill_fn, time_models
from flextron.errors import ConfigError
from flextron.model.elastic import ElasticModel
from flextron.routing.dynamic_router import DynamicRouter
from flextron.routing.runtime import DynamicRouting, routed_fractions

log = logging.getLogger(__name__)


def measure_overhead(
    fx: ElasticModel,
    router: DynamicRouter,
    target: float,
    ids: torch.Tensor,
    *,
    repeats: int = 5,
    warmup: int = 1,
    table=None,
    progress: bool = False,
    desc: str = "router overhead",
) -> dict:
    """Router overhead (router forward + dispatch) and timed latency on this device, measured side
    by side: the per-sequence routed prefill of ``ids`` ``(1, T)`` at ``target``, the same
    sub-network sliced without hooks, and the full model, interleaved in one
    :func:`~flextron.cost.measure.time_models` session.

    Returns ``config`` (the routed :class:`~flextron.model.elastic.ArchConfig`), ``routed_s``,
    ``sliced_s``, ``full_s`` (medians, seconds), ``overhead_fraction`` (median over rounds of
    routed / sliced − 1: the share of the sub-network's prefill), ``timed_fraction`` (median over
    rounds of routed / full: the unit of latency targets) and, with the lookup ``table``,
    ``predicted_fraction`` of the routed configuration. Raises ConfigError for ``ids`` that are
    not one sequence.
    """
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ConfigError(f"measure the router overhead on one sequence (1, T), got {tuple(ids.shape)}")
    saved = fx.arch
    with DynamicRouting(fx, router, target) as r:
        prefill_fn(fx, ids)()
        mi, hi = r.indices()
    arch = fx.space.from_indices(mi[0].tolist(), hi[0].tolist())
    run = prefill_fn(fx, ids)

    def sliced():
        fx.set_arch(arch)
        run()

    def routed():
        fx.set_arch(None)
        with DynamicRouting(fx, router, target):
            run()

    def full():
        fx.set_arch(None)
        run()

    res = time_models(
        {"routed": routed, "sliced": sliced, "full": full}, repeats=repeats, warmup=warmup, progress=progress, desc=desc
    )
    fx.set_arch(saved)
    out = {
        "config": arch,
        "routed_s": res["routed"]["median_s"],
        "sliced_s": res["sliced"]["median_s"],
        "full_s": res["full"]["median_s"],
        "overhead_fraction": paired_ratio(res, "routed", "sliced") - 1,
        "timed_fraction": paired_ratio(res, "routed", "full"),
        "repeats": repeats,
    }
    if table is not None:
        out["predicted_fraction"] = table.fraction(arch)
    return out


def calibrate_price(
    fx: ElasticModel,
    router: DynamicRouter,
    table,
    blocks: torch.Tensor,
    *,
    batch_size: int = 8,
    iters: int = 8,
    per_token: bool = False,
    span: float = 1.0,
    budgets: dict[float, float] | None = None,
    progress: bool = False,
) -> dict[str, dict]:
    """Fit the latency price β of every trained target < 1 so that the *average* predicted latency
    of argmax routing over ``blocks`` ``(N, T)`` meets the target (METHOD §7's budget, on the average).
    ``budgets``: ``{target: budget}``, the predicted latency allowed at a target where it differs
    from the target itself (e.g. lowered by the router's measured overhead, so that the *timed*
    latency meets the target; :func:`flextron.train.dynamic.train_dynamic`).

    A higher price lowers the latency. The bracket starts at ``β ± span`` around the current
    (trained) price and widens, doubling its step, until its low end is over budget and its high
    end within it; ``iters`` bisection steps then find the smallest β within budget. Each probe is
    one routed forward (decoder only) over ``blocks``. Returns per target ``{"price",
    "mean_fraction", "budget", "error", "probes"}`` (``error``: mean fraction / budget − 1, ≤ 0
    unless even the highest price probed is over budget).

    Raises:
        ConfigError: a budget outside (0, 1].
    """
    budgets = budgets or {}
    for t, b in budgets.items():
        if not (isinstance(b, (int, float)) and math.isfinite(b) and 0 < b <= 1):
            raise ConfigError(
                f"the latency budget {b!r} for target {t:g} must be a fraction of the full model's latency in (0, 1]"
            )
    out = {}
    targets = [t for t in router.trained_targets if t < 1.0]
    for target in tqdm(targets, desc="dynamic: calibrate price", disable=not progress, leave=False):
        j = router.trained_targets.index(target)
        t = float(budgets.get(target, target))  # the budget of the average predicted latency
        probes = 0

        def mean_at(beta: float) -> float:
            nonlocal probes
            probes += 1
            router.price[j] = beta
            return float(
                routed_fractions(fx, router, target, blocks, table, batch_size=batch_size, per_token=per_token)[
                    0
                ].mean()
            )

        c = float(router.price[j])
        lo, hi, step = c - span, c + span, span
        f_lo, f_hi = mean_at(lo), mean_at(hi)
        while f_lo <= t and step < 1e3:  # within budget even at this low price: look lower
            lo, hi, f_hi, step = lo - 2 * step, lo, f_lo, 2 * step
            f_lo = mean_at(lo)
        while f_hi > t and step < 1e3:  # over budget even at this price: look higher
            lo, hi, step = hi, hi + 2 * step, 2 * step
            f_hi = mean_at(hi)
        if f_lo <= t:  # within budget at every price probed: the lowest (largest sub-networks)
            best, f_best = lo, f_lo
        else:
            best, f_best = hi, f_hi
            for _ in range(iters if f_hi <= t else 0):
                mid = 0.5 * (lo + hi)
                f = mean_at(mid)
                if f <= t:
                    hi, best, f_best = mid, mid, f
                else:
                    lo = mid
        router.price[j] = best
        out[f"{target:g}"] = {
            "price": best,
            "mean_fraction": f_best,
            "budget": t,
            "error": f_best / t - 1,
            "probes": probes,
        }
    return out


def choice_statistics(mlp_idx: torch.Tensor, head_idx: torch.Tensor, n_mlp: int, n_heads: int) -> dict:
    """Collapse diagnostics of argmax choices over ``N`` inputs: MLP ``(N, L)`` and heads ``(N, L)``
    indices (or per-token shares ``(N, L, K)``).

    Returns ``entropy_nats`` (mean over layers of the entropy of the choice distribution over
    inputs, MLP and heads averaged), ``input_independent_layers`` (share of layers where every input
    chose the same MLP width and head count) and ``collapsed`` (True when that share is 1: the
    router ignores its input) plus the per-layer share of every candidate (``mlp_share`` (L, K_mlp),
    ``head_share`` (L, K_heads)).
    """

    def shares(idx: torch.Tensor, k: int) -> torch.Tensor:
        if idx.dim() == 3:  # per-token shares already
            return idx.float().mean(0)
        return F.one_hot(idx, k).float().mean(0)  # (L, K)

    sm, sh = shares(mlp_idx, n_mlp), shares(head_idx, n_heads)

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.clamp_min(1e-12).log()).sum(-1)  # (L,)

    ent = 0.5 * (entropy(sm) + entropy(sh))
    fixed = ((sm.max(-1).values > 1 - 1e-6) & (sh.max(-1).values > 1 - 1e-6)).float()
    return {
        "entropy_nats": float(ent.mean()),
        "input_independent_layers": float(fixed.mean()),
        "collapsed": bool(fixed.mean() == 1.0),
        "mlp_share": sm.tolist(),
        "head_share": sh.tolist(),
    }


def timed_budgets(
    fx: ElasticModel,
    router: DynamicRouter,
    table,
    ids: torch.Tensor,
    repeats: int,
    *,
    max_change: float = 0.15,
    progress: bool = False,
) -> tuple[dict, dict[float, float]]:
    """Budgets of the predicted latency under which the *timed* latency meets each target: for
    every trained target ``t`` < 1, :func:`~flextron.routing.calibrate.measure_overhead` on ``ids`` ``(1, T)``
    gives the timed fraction ``τ`` and the table's prediction ``p`` of the routed sub-network; the
    budget is ``t · p / τ``, kept within ``±max_change`` of ``t`` (a noisy reading cannot move it
    further). Returns the measurements per target (JSON-ready) and ``{t: budget}``."""
    timing, budgets = {}, {}
    for t in [t for t in router.trained_targets if t < 1.0]:
        m = measure_overhead(
            fx, router, t, ids, repeats=repeats, table=table, progress=progress, desc=f"dynamic: timing {t:g}"
        )
        ratio = m["timed_fraction"] / m["predicted_fraction"]
        budgets[t] = min(max(t / ratio, t * (1 - max_change)), min(1.0, t * (1 + max_change)))
        timing[f"{t:g}"] = {**m, "config": m["config"].to_dict(), "timed_over_predicted": ratio, "budget": budgets[t]}
        log.info(
            "dynamic routers at %g: timed %.3f vs predicted %.3f of full (router overhead %+.2f%%); budget %.3f",
            t,
            m["timed_fraction"],
            m["predicted_fraction"],
            100 * m["overhead_fraction"],
            budgets[t],
        )
        if abs(ratio - 1) > max_change:
            log.warning(
                "dynamic routers at %g: timed latency is %.2f× the table's prediction on this machine, "
                "beyond the ±%.0f%% the budget may move; the timed latency will miss this target. "
                "Train the routers on the machine the run's "
                "lookup table was measured on, or use the static router where the router overhead (%+.1f%% of the "
                "sub-network's prefill) is this large (very small models)",
                t,
                ratio,
                100 * max_change,
                100 * m["overhead_fraction"],
            )
    return timing, budgets
