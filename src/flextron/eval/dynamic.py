"""Evaluation of dynamic (input-adaptive) routing on held-out blocks of several domains.

Gives, per target: the average predicted and timed latency, perplexity, per-domain compute and
width shares per layer, collapse statistics, the shuffled control (:func:`shuffled_control`: the
same configurations, not matched to their inputs), and dynamic against static routing at equal
latency (interpolated along the static curve, bootstrap CIs over blocks);
:func:`append_dynamic_rows` adds ``mode: dynamic`` rows to ``results.json``.
"""

from __future__ import annotations

import logging
import math
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flextron.cost.timing import paired_ratio, prefill_fn, time_models
from flextron.eval.perplexity import perplexity
from flextron.eval.stats import bootstrap_ci
from flextron.files import atomic_write_json
from flextron.model.space import ArchConfig
from flextron.routing.calibrate import choice_statistics
from flextron.routing.dynamic_router import DynamicRouter
from flextron.routing.runtime import DynamicRouting

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- measurements


@torch.no_grad()
def _routed(fx, router: DynamicRouter, t: float, blocks: torch.Tensor, table, batch_size: int, per_token: bool) -> dict:
    """Per-block NLL and predicted fraction, and the choices ``mlp`` (N, L, K) / ``heads`` (N, L, K)."""
    sp = fx.space
    nll, frac, mlp, heads = [], [], [], []
    with DynamicRouting(fx, router, t, per_token=per_token) as r:
        for s in range(0, blocks.shape[0], batch_size):
            b = blocks[s : s + batch_size]
            nll += perplexity(fx, b, batch_size=b.shape[0], progress=False)["nll_per_block"]
            m, h = r.stacked()
            frac += (table.expected(m, h, sp.mlp_choices, sp.head_choices) / table.full).tolist()
            mlp.append(m.float())
            heads.append(h.float())
    return {"nll": nll, "fraction": frac, "mlp": torch.cat(mlp), "heads": torch.cat(heads)}


@torch.no_grad()
def shuffled_control(fx, routed: dict, blocks: torch.Tensor, *, batch_size: int, seed: int = 0) -> dict:
    """Is the *input* dependence worth anything? Every block ``i`` of ``blocks`` ``(N, T)`` runs at
    the configuration the router chose for block ``π(i)`` (a seeded random permutation), so the
    configurations and their average latency are exactly those of dynamic routing, only no longer
    matched to their inputs. ``routed``: :func:`_routed`'s output for these blocks (per-sequence
    choices). Returns the per-block NLL ``"nll"`` (N,), the paired difference dynamic − shuffled
    (nats, bootstrap CI over blocks), and ``verdict``: ``input adaptivity helps`` / ``hurts`` /
    ``tie``; ``distinct_configs``: the number of different configurations routed."""
    sp = fx.space
    mi, hi = routed["mlp"].argmax(-1).tolist(), routed["heads"].argmax(-1).tolist()  # (N, L) each
    archs = [sp.from_indices(a, b) for a, b in zip(mi, hi)]
    perm = torch.randperm(len(archs), generator=torch.Generator().manual_seed(seed)).tolist()
    nll = [0.0] * len(archs)
    groups: dict = {}
    for i, j in enumerate(perm):
        groups.setdefault(archs[j], []).append(i)
    for arch, ix in groups.items():
        fx.set_arch(arch)
        for i, v in zip(ix, perplexity(fx, blocks[ix], batch_size=batch_size, progress=False)["nll_per_block"]):
            nll[i] = v
    fx.set_arch(None)
    diff = [d - s for d, s in zip(routed["nll"], nll)]
    ci = bootstrap_ci(diff, seed=seed)
    return {
        "nll": nll,
        "perplexity": math.exp(sum(nll) / len(nll)),
        "delta_nll": sum(diff) / len(diff),
        "delta_nll_ci": list(ci),
        "ppl_ratio": math.exp(sum(diff) / len(diff)),
        "ppl_ratio_ci": [math.exp(ci[0]), math.exp(ci[1])],
        "verdict": "input adaptivity helps" if ci[1] < 0 else "input adaptivity hurts" if ci[0] > 0 else "tie",
        "distinct_configs": len(set(archs)),
    }


def compare_at_equal_latency(
    static: list[tuple[float, list[float]]], latency: float, nll: list[float], *, seed: int = 0
) -> dict:
    """Dynamic against static at equal latency: ``static`` is a list of ``(latency, per-block NLL)``
    points of the static curve (same blocks, same order as ``nll``), ``latency`` the dynamic point's.
    The static NLL at ``latency`` is interpolated linearly between the two static points that
    bracket it, block by block (log-perplexity linear in latency); the difference dynamic − static
    is averaged over blocks with a percentile bootstrap CI over blocks (nats). Returns
    ``{"latency", "dynamic_ppl", "static_ppl", "delta_nll", "delta_nll_ci", "ppl_ratio", "ppl_ratio_ci",
    "verdict", "between"}``; ``verdict`` is ``dynamic better``/``static better``/``tie`` (CI excluding 0
    or not), or ``outside the static curve`` when no two static points bracket ``latency``.
    """
    pts = sorted(static, key=lambda p: p[0])
    lo = max((p for p in pts if p[0] <= latency), default=None, key=lambda p: p[0])
    hi = min((p for p in pts if p[0] >= latency), default=None, key=lambda p: p[0])
    if lo is None or hi is None:
        return {
            "latency": latency,
            "verdict": "outside the static curve",
            "static_range": [pts[0][0], pts[-1][0]] if pts else None,
        }
    w = 0.0 if hi[0] == lo[0] else (latency - lo[0]) / (hi[0] - lo[0])
    interp = [(1 - w) * a + w * b for a, b in zip(lo[1], hi[1])]
    diff = [d - s for d, s in zip(nll, interp)]
    mean = sum(diff) / len(diff)
    ci = bootstrap_ci(diff, seed=seed)
    verdict = "dynamic better" if ci[1] < 0 else "static better" if ci[0] > 0 else "tie"
    return {
        "latency": latency,
        "dynamic_ppl": math.exp(sum(nll) / len(nll)),
        "static_ppl": math.exp(sum(interp) / len(interp)),
        "delta_nll": mean,
        "delta_nll_ci": list(ci),
        "ppl_ratio": math.exp(mean),
        "ppl_ratio_ci": [math.exp(ci[0]), math.exp(ci[1])],
        "verdict": verdict,
        "between": [lo[0], hi[0]],
    }


def _timed(fx, cases: dict[str, tuple], blocks: torch.Tensor, repeats: int, progress: bool) -> dict[str, float]:
    """Mean over ``blocks`` (each a batch of one) of the paired prefill-time ratio of every case to
    the full model, all timed interleaved in one :func:`time_models` run per block. A case is
    ``("static", arch)`` or ``("dynamic", router, target, per_token)``."""
    ratios: dict[str, list[float]] = {k: [] for k in cases}
    seconds: dict[str, list[float]] = {k: [] for k in [*cases, "full"]}
    for i in tqdm(range(blocks.shape[0]), desc="dynamic: timing", disable=not progress, leave=False):
        ids = blocks[i : i + 1]

        def static_fn(arch):
            run = prefill_fn(fx, ids)
            return lambda: (fx.set_arch(arch), run())

        def dynamic_fn(router, t, per_token):
            run = prefill_fn(fx, ids)

            def go():
                fx.set_arch(None)
                with DynamicRouting(fx, router, t, per_token=per_token):
                    run()

            return go

        fns = {k: static_fn(c[1]) if c[0] == "static" else dynamic_fn(*c[1:]) for k, c in cases.items()}
        fns["full"] = static_fn(None)
        res = time_models(fns, repeats=repeats, warmup=1)
        for k in cases:
            ratios[k].append(paired_ratio(res, k, "full"))
        for k in fns:
            seconds[k].append(res[k]["median_s"])
    fx.set_arch(None)
    return {
        k: {"fraction": sum(v) / len(v), "median_s": sum(seconds[k]) / len(seconds[k])} for k, v in ratios.items()
    } | {"full": {"fraction": 1.0, "median_s": sum(seconds["full"]) / len(seconds["full"])}}


def evaluate_dynamic(
    run,
    router: DynamicRouter,
    held: dict[str, torch.Tensor],
    *,
    targets: list[float] | None = None,
    static_targets: list[float] | None = None,
    timed_blocks: int = 2,
    repeats: int = 3,
    per_token: bool = False,
    batch_size: int = 4,
    progress: bool = True,
) -> dict:
    """Static against dynamic routing on held-out blocks of several domains (module docstring).

    ``run``: a :class:`~flextron.eval.deploy.LoadedRun` (its static router attached); ``held``:
    ``{domain: blocks (n, T)}``; ``targets``: dynamic targets (default: the router's targets < 1);
    ``static_targets``: points of the static curve (default: the router's and the static
    router's trained targets, floor to 1.0); ``timed_blocks`` blocks per domain are timed (batch
    of one, ``repeats`` interleaved rounds each) for every static and dynamic point.

    Returns the JSON-ready results (see :mod:`flextron.report.dynamic` for their rendering).
    Raises TargetError for a target the router was not trained for.
    """
    fx, table, sp = run.fx, run.table, run.fx.space
    targets = [t for t in (targets or router.trained_targets) if t < 1.0]
    for t in targets:
        router.check_target(t)
    floor = run.fx.router.floor
    static_targets = sorted(
        {
            round(t, 4)
            for t in (static_targets or [*router.trained_targets, *run.fx.router.router.targets.tolist()])
            if t >= floor
        }
        | {1.0}
    )
    names = list(held)
    blocks = torch.cat([held[d] for d in names])  # (N, T), domain-major
    owner = [d for d in names for _ in range(held[d].shape[0])]
    t0 = time.time()
    fx.set_arch(None)
    full = perplexity(fx, blocks, batch_size=batch_size, progress=False)["nll_per_block"]
    static = []
    for s in tqdm(static_targets, desc="dynamic: static curve", disable=not progress, leave=False):
        arch = fx.set_target(s)
        static.append(
            {
                "target": s,
                "config": arch.to_dict(),
                "predicted_fraction": table.fraction(arch),
                "nll": perplexity(fx, blocks, batch_size=batch_size, progress=False)["nll_per_block"],
            }
        )
    fx.set_arch(None)
    dyn = {}
    for t in tqdm(targets, desc="dynamic: routed", disable=not progress, leave=False):
        dyn[t] = _routed(fx, router, t, blocks, table, batch_size, per_token)
    timed_ids = torch.cat([held[d][:timed_blocks] for d in names])
    cases = {f"static {s['target']:g}": ("static", ArchConfig.from_dict(s["config"])) for s in static}
    cases |= {f"dynamic {t:g}": ("dynamic", router, t, per_token) for t in targets}
    timed = _timed(fx, cases, timed_ids, repeats, progress) if timed_blocks > 0 else {}

    def mean(xs):
        return sum(xs) / len(xs)

    def domain_mean(values, d):
        return mean([v for v, o in zip(values, owner) if o == d])

    def per_domain_fraction(r, ix):
        return mean([r["fraction"][i] for i in ix])

    rows = []
    static_pred = [(s["predicted_fraction"], s["nll"]) for s in static]
    static_timed = [(timed[f"static {s['target']:g}"]["fraction"], s["nll"]) for s in static] if timed else []
    for t, r in dyn.items():
        sel = {d: [i for i, o in enumerate(owner) if o == d] for d in names}
        per_domain = {}
        for d, ix in sel.items():
            st = choice_statistics(r["mlp"][ix], r["heads"][ix], router.n_mlp, router.n_heads)
            width = (r["mlp"][ix] * torch.tensor(sp.mlp_choices, dtype=torch.float32)).sum(-1).mean(
                0
            ) / sp.intermediate_size  # (L,)
            heads = (r["heads"][ix] * torch.tensor(sp.head_choices, dtype=torch.float32)).sum(-1).mean(
                0
            ) / sp.head_choices[-1]
            per_domain[d] = {
                "mean_fraction": domain_mean(r["fraction"], d),
                "perplexity": math.exp(domain_mean(r["nll"], d)),
                "full_perplexity": math.exp(domain_mean(full, d)),
                "mlp_width_per_layer": width.tolist(),
                "heads_per_layer": heads.tolist(),
                "mlp_share": st["mlp_share"],
                "head_share": st["head_share"],
                "entropy_nats": st["entropy_nats"],
                # this domain's blocks only: its own average latency against the static curve on the same blocks
                "vs_static_predicted": compare_at_equal_latency(
                    [(p, [nll[i] for i in ix]) for p, nll in static_pred],
                    per_domain_fraction(r, ix),
                    [r["nll"][i] for i in ix],
                ),
            }
        stats = choice_statistics(r["mlp"], r["heads"], router.n_mlp, router.n_heads)
        row = {
            "target": t,
            "mode": "dynamic",
            "predicted_fraction": mean(r["fraction"]),
            "predicted_latency_error": mean(r["fraction"]) / t - 1,
            "predicted_fraction_range": [min(r["fraction"]), max(r["fraction"])],
            "perplexity": math.exp(mean(r["nll"])),
            "perplexity_ci": list(bootstrap_ci(r["nll"], transform=math.exp)),
            "collapse": {k: stats[k] for k in ("entropy_nats", "input_independent_layers", "collapsed")},
            "per_domain": per_domain,
            "vs_static_predicted": compare_at_equal_latency(static_pred, mean(r["fraction"]), r["nll"]),
        }
        if not per_token:
            row["vs_shuffled"] = {
                k: v for k, v in shuffled_control(fx, r, blocks, batch_size=batch_size).items() if k != "nll"
            }
        if timed:
            tf = timed[f"dynamic {t:g}"]["fraction"]
            row |= {
                "timed_fraction": tf,
                "latency_s": timed[f"dynamic {t:g}"]["median_s"],
                "full_latency_s": timed["full"]["median_s"],
                "vs_static_timed": compare_at_equal_latency(static_timed, tf, r["nll"]),
            }
        rows.append(row)
    same = [
        bool(torch.equal(dyn[a]["mlp"], dyn[b]["mlp"]) and torch.equal(dyn[a]["heads"], dyn[b]["heads"]))
        for a, b in zip(targets, targets[1:])
    ]
    return {
        "domains": {
            d: {
                "blocks": held[d].shape[0],
                "seq_len": held[d].shape[1],
                "full_perplexity": math.exp(domain_mean(full, d)),
            }
            for d in names
        },
        "full_perplexity": math.exp(mean(full)),
        "static": [
            {k: v for k, v in s.items() if k != "nll"}
            | {
                "perplexity": math.exp(mean(s["nll"])),
                "timed_fraction": timed.get(f"static {s['target']:g}", {}).get("fraction"),
            }
            for s in static
        ],
        "dynamic": rows,
        "targets_collapsed": bool(same) and all(same),
        "timing": {"blocks_per_domain": timed_blocks, "repeats": repeats, "threads": torch.get_num_threads()},
        "per_token": per_token,
        "python": platform.python_version(),
        "wall_s": round(time.time() - t0, 1),
    }


def append_dynamic_rows(run_dir: str | Path, results: dict) -> Path:
    """Add the dynamic rows (``mode: dynamic``) to ``RUN/results.json`` (replacing earlier dynamic
    rows of the same targets, keeping every other row) and write ``RUN/dynamic_results.json``; both
    atomically. Returns ``results.json``'s path."""
    from flextron.eval.static import read_results

    run_dir = Path(run_dir)
    atomic_write_json(run_dir / "dynamic_results.json", results)
    path = run_dir / "results.json"
    main = read_results(path) or {"rows": []}
    redone = {r["target"] for r in results["dynamic"]}
    rows = [r for r in main.get("rows", []) if r.get("mode", "static") != "dynamic" or r.get("target") not in redone]
    for r in results["dynamic"]:
        rows.append(
            {
                "target": r["target"],
                "mode": "dynamic",
                "config": None,
                "predicted_latency_s": None,
                "predicted_fraction": r["predicted_fraction"],
                "latency_s": r.get("latency_s"),
                "full_latency_s": r.get("full_latency_s"),
                "latency_ratio": r.get("timed_fraction"),
                "perplexity": r["perplexity"],
                "perplexity_ci": r["perplexity_ci"],
                "per_domain_fraction": {d: v["mean_fraction"] for d, v in r["per_domain"].items()},
            }
        )
    main["rows"] = rows
    return atomic_write_json(path, main)
