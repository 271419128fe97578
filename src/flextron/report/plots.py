"""The run report's PNG plots, from ``results.json`` and ``metrics.jsonl``: latency against
perplexity per target, per-layer widths, sampled budgets, training curves, downstream accuracy,
and the benchmarks' latency–perplexity frontier (:func:`plot_pareto`). Also the helpers that read
configurations and task rows of ``results.json``, shared with the Markdown
(:mod:`flextron.report.static`). Every plot returns what it drew (falsy: nothing).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flextron.report.format import as_number, finish_axes, fmt, new_figure, save_figure

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- configurations


def _full_size(results: dict, key: str, choices_key: str) -> int | None:
    """``search_space[key]`` (e.g. ``intermediate_size``), else the largest of its choices."""
    space = results.get("search_space") or {}
    v = space.get(key)
    if isinstance(v, int) and v > 0:
        return v
    choices = [c for c in space.get(choices_key) or [] if isinstance(c, int)]
    return max(choices) if choices else None


def intermediate_size(results: dict) -> int | None:
    """The full MLP width of the run's search space (None when ``results`` does not say)."""
    return _full_size(results, "intermediate_size", "mlp_choices")


def _head_units(results: dict) -> int | None:
    """Full count of attention units (query heads per group, or KV groups on the kv_groups axis)."""
    return _full_size(results, "head_units", "head_choices")


def _head_axis_title(results: dict) -> str:
    groups = (results.get("search_space") or {}).get("head_axis") == "kv_groups"
    return "KV groups kept" if groups else "query heads per KV group"


def summarize_config(cfg: Any, inter: int | None) -> tuple[float | None, float | None]:
    """(mean MLP fraction of ``inter``, mean query heads per group) of a per-layer config."""
    if not isinstance(cfg, dict):
        return None, None
    mlp = [m for m in cfg.get("mlp") or [] if as_number(m) is not None]
    heads = [h for h in cfg.get("heads") or [] if as_number(h) is not None]
    frac = sum(mlp) / len(mlp) / inter if mlp and inter else None
    mh = sum(heads) / len(heads) if heads else None
    return frac, mh


def plot_latency_perplexity(results: dict, path: Path) -> bool:
    """Held-out perplexity against the lookup table's predicted latency (ms): the routed
    configurations (95% intervals), the same configurations untrained, the homogeneous baseline
    of nearest predicted latency and the homogeneous perplexity interpolated at the routed
    configuration's predicted latency. Predicted latency is the one axis every series has (the
    timed ratios, noisy at ±10 % here, are in the table)."""
    rows = results.get("rows") or []
    fig = new_figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    drawn = False

    def series(xs_ys: list[tuple[float | None, float | None]], **kw: Any) -> list[tuple[float, float]]:
        pts = [(x * 1e3, y) for x, y in xs_ys if x is not None and y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], **kw)
        return pts

    pred = [as_number(r.get("predicted_latency_s")) for r in rows]
    drawn |= bool(
        series(
            [(x, as_number(r.get("perplexity"))) for x, r in zip(pred, rows)],
            marker="o",
            label="routed (after training)",
        )
    )
    for x, r in zip(pred, rows):  # confidence intervals of the routed points
        y, ci = as_number(r.get("perplexity")), r.get("perplexity_ci")
        if x is not None and y is not None and isinstance(ci, (list, tuple)) and len(ci) == 2:
            lo, hi = as_number(ci[0]), as_number(ci[1])
            if lo is not None and hi is not None:
                ax.errorbar([x * 1e3], [y], yerr=[[max(y - lo, 0)], [max(hi - y, 0)]], color="C0", capsize=3)
    drawn |= bool(
        series(
            [(x, as_number(r.get("untrained_perplexity"))) for x, r in zip(pred, rows)],
            marker="s",
            ls="--",
            color="C1",
            label="same config, untrained",
        )
    )
    homog = [r.get("homogeneous") or {} for r in rows]
    drawn |= bool(
        series(
            [(as_number(h.get("predicted_latency_s")), as_number(h.get("perplexity"))) for h in homog],
            marker="^",
            ls=":",
            color="C2",
            label="homogeneous (nearest predicted latency)",
        )
    )
    drawn |= bool(
        series(
            [(x, as_number((h.get("interpolated") or {}).get("perplexity"))) for x, h in zip(pred, homog)],
            marker="v",
            ls="none",
            color="C3",
            label="homogeneous, interpolated at equal predicted latency",
        )
    )
    full = next((x for x, r in zip(pred, rows) if r.get("target") == 1.0 and x is not None), None)
    orig = as_number(results.get("original_perplexity"))
    if full is not None and orig is not None:
        ax.plot([full * 1e3], [orig], marker="*", ms=14, ls="none", color="k", label="original model")
        drawn = True
    return drawn and finish_axes(
        fig, ax, path, "held-out perplexity", "Predicted latency vs perplexity", xlabel="predicted latency (ms)"
    )


def plot_layer_widths(results: dict, path: Path) -> bool:
    rows = [r for r in results.get("rows") or [] if isinstance(r.get("config"), dict)]
    inter, hpg = intermediate_size(results), _head_units(results)
    if not rows:
        return False
    mlp = [[float(m) / inter if inter else float(m) for m in r["config"].get("mlp") or []] for r in rows]
    heads = [[float(h) for h in r["config"].get("heads") or []] for r in rows]
    if not all(mlp) or not all(heads) or len({len(m) for m in mlp + heads}) != 1:
        log.warning("per-layer configurations are missing or of unequal length; layer_widths.png skipped")
        return False
    labels = [fmt(r.get("target")) for r in rows]
    n_layers = len(mlp[0])
    fig = new_figure(figsize=(max(6.0, 0.25 * n_layers + 2.5), 1.6 + 0.9 * len(rows)))
    axes = fig.subplots(2, 1, sharex=True)
    for ax, data, title, vmax in (
        (
            axes[0],
            mlp,
            "MLP width (fraction of intermediate_size)" if inter else "MLP width (neurons)",
            1.0 if inter else None,
        ),
        (axes[1], heads, _head_axis_title(results), float(hpg) if hpg else None),
    ):
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_ylabel("target")
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    axes[1].set_xlabel("layer")
    step = max(1, n_layers // 15)
    axes[1].set_xticks(range(0, n_layers, step))
    save_figure(fig, path)
    return True


def plot_budget_histogram(metrics: list[dict], path: Path) -> tuple[int, int] | None:
    """Histogram of sampled budgets of elastic-training steps; full-model steps (budget null)
    get their own bar. Returns (budgeted steps, full steps) or ``None`` when there are none."""
    recs = [m for m in metrics if m.get("stage") == "elastic" and "budget" in m]
    budgets = [as_number(m["budget"]) for m in recs if m["budget"] is not None]
    budgets = [b for b in budgets if b is not None]
    n_full = sum(1 for m in recs if m["budget"] is None)
    if not budgets and not n_full:
        return None
    fig = new_figure(figsize=(6.4, 3.6))
    ax_h, ax_f = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [5, 1]})
    if budgets:
        ax_h.hist(budgets, bins=min(20, max(5, len(set(budgets)))), color="C0", edgecolor="white")
    ax_h.set_xlabel("sampled budget (fraction of full latency)")
    ax_h.set_ylabel("training steps")
    ax_h.set_title(f"Elastic training: {len(budgets)} budgeted steps, {n_full} full-model steps", fontsize=9)
    ax_f.bar(["full\nmodel"], [n_full], color="C3")
    save_figure(fig, path)
    return len(budgets), n_full


def plot_training_curves(metrics: list[dict], path: Path) -> list[str]:
    """lm_loss / kd_loss over step, one panel per stage; returns the stages drawn."""
    by_stage: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for m in metrics:
        stage, step = m.get("stage"), as_number(m.get("step"))
        if not isinstance(stage, str) or step is None:
            continue
        for key in ("lm_loss", "kd_loss"):
            v = as_number(m.get(key))
            if v is not None:
                by_stage.setdefault(stage, {}).setdefault(key, []).append((step, v))
    if not by_stage:
        return []
    stages = list(by_stage)
    fig = new_figure(figsize=(6.4, 2.6 * len(stages)))
    axes = fig.subplots(len(stages), 1, squeeze=False)[:, 0]
    for ax, stage in zip(axes, stages):
        for key, pts in by_stage[stage].items():
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key, lw=1)
        ax.set_title(f"stage: {stage}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return stages


def plot_pareto(rows: list[dict], path: Path) -> bool:
    """Latency–perplexity plot of benchmark rows (``method``, ``latency_s``, ``perplexity``,
    optional ``perplexity_ci``): one colour per method, 95% intervals as error bars, each
    method's Pareto frontier (no point of that method is both faster and better) as a line.
    Perplexity on a log axis (untrained cuts are orders of magnitude worse). Returns False when
    no row has both values."""
    from flextron.eval.stats import pareto_frontier

    pts: dict[str, list[dict]] = {}
    for r in rows:
        if as_number(r.get("latency_s")) is not None and as_number(r.get("perplexity")) is not None:
            pts.setdefault(str(r.get("method")), []).append(r)
    if not pts:
        return False
    fig = new_figure(figsize=(7.2, 4.8))
    ax = fig.add_subplot()
    for i, (method, rs) in enumerate(pts.items()):
        color = f"C{i % 10}"
        for r in rs:
            x, y, ci = 1e3 * r["latency_s"], r["perplexity"], r.get("perplexity_ci")
            err = None
            if (
                isinstance(ci, (list, tuple))
                and len(ci) == 2
                and as_number(ci[0]) is not None
                and as_number(ci[1]) is not None
            ):
                err = [[max(y - ci[0], 0)], [max(ci[1] - y, 0)]]
            ax.errorbar([x], [y], yerr=err, color=color, marker="o", ms=4, capsize=2, ls="none")
        front = pareto_frontier([(1e3 * r["latency_s"], r["perplexity"]) for r in rs])
        ax.plot([p[0] for p in front], [p[1] for p in front], color=color, lw=1.2, label=method)
    ax.set_yscale("log")
    ax.set_xlabel("timed prefill latency (ms)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("Latency vs perplexity, frontier per method")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def task_rows(results: dict) -> list[dict]:
    """The rows of ``results`` with downstream task scores."""
    return [r for r in results.get("rows") or [] if isinstance(r.get("tasks"), dict) and r["tasks"]]


def task_names(rows: list[dict]) -> list[str]:
    """The tasks scored in ``rows``, in order of first appearance."""
    names: list[str] = []
    for r in rows:
        names += [n for n in r["tasks"] if n not in names]
    return names


def _primary_metric(rows: list[dict], task: str) -> str | None:
    """``acc_norm`` where a task has it (lm-eval's usual headline for ARC, PIQA, HellaSwag), else ``acc``."""
    have = {k for r in rows for k in (r["tasks"].get(task) or {})}
    return "acc_norm" if "acc_norm" in have else "acc" if "acc" in have else None


def plot_downstream(results: dict, path: Path) -> bool:
    """Accuracy of every task against the timed latency of the routed sub-model (one line per task)."""
    rows = task_rows(results)
    fig = new_figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    drawn = False
    for i, task in enumerate(task_names(rows)):
        metric = _primary_metric(rows, task)
        pts = sorted(
            (as_number(r.get("latency_s")), as_number((r["tasks"].get(task) or {}).get(metric))) for r in rows if metric
        )
        pts = [(x * 1e3, y) for x, y in pts if x is not None and y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=f"{task} ({metric})")
            drawn = True
    return drawn and finish_axes(fig, ax, path, "accuracy", "Downstream accuracy vs latency (routed sub-models)")
