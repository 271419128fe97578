"""Checks of the router and the latency table for the Pareto benchmark
(:func:`benchmarks.baselines.run_pareto`), and the rows of its printed table.

Router checks (:func:`router_checks`): at the router configuration's predicted latency, the best
homogeneous configuration and the best of a random search (both selected on the true loss of
training text, :func:`search_loss` over :func:`search_batches`) against the router's, on held-out
perplexity. Latency-table check (:func:`lut_check`): predicted vs timed fraction of full latency
over random configurations (mean absolute error). :func:`summary_rows`: the printed Pareto table.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

from flextron.config import RunConfig
from flextron.cost.measure import validate_latency_table
from flextron.cost.table import CostTable
from flextron.eval.stats import paired_comparison
from flextron.model.elastic import ElasticModel
from flextron.model.space import ArchConfig
from flextron.train.loop import BudgetSampler
from flextron.train.routers import lm_loss_at

if TYPE_CHECKING:  # benchmarks.baselines imports this module
    from benchmarks.baselines import ParetoSettings


def search_batches(inp, cfg: RunConfig, settings: ParetoSettings, device: torch.device) -> list[torch.Tensor]:
    """The ``settings.search_batches`` batches of training text (the router stage's blocks) that
    configurations are selected on: never the held-out set."""
    bs = cfg.routers.batch_size
    return [
        inp.router[i * bs : (i + 1) * bs].to(device) for i in range(min(settings.search_batches, len(inp.router) // bs))
    ]


def search_loss(fx: ElasticModel, arch: ArchConfig, search: list[torch.Tensor]) -> float:
    """Mean next-token CE (nats) of ``arch`` over the selection batches; leaves ``fx`` full."""
    loss = sum(lm_loss_at(fx, arch, b) for b in search) / len(search)
    fx.set_arch(None)
    return loss


def router_checks(
    fx: ElasticModel,
    table: CostTable,
    archs: dict,
    inp,
    cfg: RunConfig,
    settings: ParetoSettings,
    results: dict,
    evaluate,
    *,
    progress: bool = True,
) -> list[dict]:
    """For every target below 1: the router's configuration against (a) the best homogeneous
    configuration of nearest predicted cost (one per head count, the best by true loss on
    ``settings.search_batches`` batches of training text) and (b) the best of
    ``settings.random_search`` random per-layer configurations drawn at the router's predicted
    cost (budget sampler), scored the same way. Held-out perplexities with paired comparisons."""
    from tqdm.auto import tqdm

    sp = fx.space
    search = search_batches(inp, cfg, settings, next(fx.parameters()).device)
    sampler = BudgetSampler(sp, table, p_full=0.0, mode="budget")
    gen = torch.Generator().manual_seed(cfg.seed + 4242)

    def loss(a: ArchConfig) -> float:
        return search_loss(fx, a, search)

    out = []
    for t in tqdm([t for t in settings.targets if t < 1], desc="router checks", disable=not progress):
        r_arch = archs[t]
        p = table.predict(r_arch)
        homs = [
            min((sp.homogeneous(m, a) for m in sp.mlp_choices), key=lambda c: abs(table.predict(c) - p))
            for a in sp.head_choices
        ]
        rand = [sampler.for_budget(p / table.full, gen) for _ in range(settings.random_search)]
        scored = {
            "router": [(loss(r_arch), r_arch)],
            "homogeneous": [(loss(a), a) for a in homs],
            "random_search": [(loss(a), a) for a in rand],
        }
        fx.set_arch(None)
        ref = results[("flextron", t)]
        row = {
            "target": t,
            "router": {
                "config": r_arch.to_dict(),
                "predicted_fraction": table.fraction(r_arch),
                "search_loss": scored["router"][0][0],
                "perplexity": ref["perplexity"],
                "perplexity_ci": ref["perplexity_ci"],
            },
        }
        for name in ("homogeneous", "random_search"):
            best_loss, best = min(scored[name], key=lambda x: x[0])
            ev = evaluate(fx, best)
            row[name] = {
                "config": best.to_dict(),
                "predicted_fraction": table.fraction(best),
                "search_loss": best_loss,
                "candidates": len(scored[name]),
                "perplexity": ev["perplexity"],
                "perplexity_ci": ev["perplexity_ci"],
                "router_vs": paired_comparison(ref["nll_per_block"], ev["nll_per_block"]),
            }
        out.append(row)
    fx.set_arch(None)
    return out


def lut_check(
    fx: ElasticModel, table: CostTable, cfg: RunConfig, settings: ParetoSettings, *, progress: bool = True
) -> dict:
    """Predicted vs timed fraction of full latency over ``settings.lut_configs`` random
    configurations (exported and timed against the full model; see
    :func:`~flextron.cost.measure.validate_latency_table`). Skipped, with the reason, when the run's
    table prices parameters or ``lut_configs`` is 0.

    Returns:
        ``{"n", "mae_fraction", "mae_s", "mape_fraction_pct", "configs": [...]}`` or
        ``{"skipped": reason}``.
    """
    if table.unit != "s":
        return {
            "skipped": f"the run's cost table is in {table.unit!r} (latency.budget: params); "
            "there is no latency to check"
        }
    if settings.lut_configs == 0:
        return {"skipped": "lut_configs is 0"}
    lcfg = dataclasses.replace(cfg.latency, repeats=max(cfg.latency.repeats, settings.latency_repeats))
    val = validate_latency_table(fx, table, lcfg, settings.lut_configs, seed=cfg.seed + 77, progress=progress)
    cs = val["configs"]
    return {
        "n": len(cs),
        "mae_fraction": sum(abs(c["predicted_fraction"] - c["measured_fraction"]) for c in cs) / len(cs),
        "mae_s": sum(abs(c["predicted_s"] - c["measured_s"]) for c in cs) / len(cs),
        "mape_fraction_pct": val["mape_fraction"],
        "configs": cs,
    }


def summary_rows(res: dict) -> list[list]:
    """Rows of the printed Pareto table: method, target, timed latency (ms), latency / full,
    perplexity [95% CI], parameters (M), training tokens, verdict against Flextron."""
    verdict = {(c["flextron_vs"], c["target"]): c for c in res["comparisons"]}
    rows = []
    for r in res["rows"]:
        c = verdict.get((r["method"], r["target"]))
        v = (
            "—"
            if c is None
            else f"flextron {c['verdict']} (ppl ×{c['ppl_ratio']:.3f} "
            f"[{c['ppl_ratio_ci95'][0]:.3f}, {c['ppl_ratio_ci95'][1]:.3f}])"
        )
        lo, hi = r["perplexity_ci"]
        rows.append(
            [
                r["method"],
                f"{r['target']:g}",
                f"{1e3 * r['latency_s']:.1f}",
                f"{r['latency_ratio']:.3f}",
                f"{r['perplexity']:.2f} [{lo:.2f}, {hi:.2f}]",
                f"{r['params'] / 1e6:.2f}",
                r["train_tokens"],
                v,
            ]
        )
    return rows
