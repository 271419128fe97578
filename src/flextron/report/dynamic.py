"""Report of dynamic routing: Markdown tables and PNG plots of :func:`flextron.eval.dynamic.evaluate_dynamic`.

Input: the results dict (``dynamic_results.json``) and, optionally, the router training metrics
(``metrics.jsonl`` of the dynamic directory). Output, in a folder: ``dynamic_report.md`` and
``dynamic_latency_perplexity.png`` (static curve and dynamic points, predicted and timed latency),
``dynamic_domain_compute.png`` (average predicted latency per domain and target, with each
domain's full-model perplexity), ``dynamic_domain_widths.png`` (mean MLP width per layer and
domain), ``dynamic_training.png`` (latency error, router loss and choice entropy per step, the
surrogate path next to the direct ablation). Written atomically with the helpers of
:mod:`flextron.report`.
"""

from __future__ import annotations

from pathlib import Path

from flextron.files import atomic_write_text
from flextron.report.format import fmt, md_table, new_figure, read_metrics, save_figure

STAGES = ("dynamic_routers", "dynamic_joint")


def plot_latency_perplexity(res: dict, path: Path) -> bool:
    """Perplexity against latency (fraction of full): static curve and dynamic points, one panel
    for the lookup table's prediction and one for timed prefill (when timed)."""
    timed = any(r.get("timed_fraction") is not None for r in res["dynamic"])
    fig = new_figure(figsize=(11 if timed else 6, 4.2))
    panels = [("predicted_fraction", "predicted_fraction", "predicted latency (fraction of full)")]
    if timed:
        panels.append(("timed_fraction", "timed_fraction", "timed prefill latency (fraction of full)"))
    for i, (skey, dkey, label) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        st = sorted((s[skey], s["perplexity"]) for s in res["static"] if s.get(skey) is not None)
        ax.plot([p[0] for p in st], [p[1] for p in st], marker="o", label="static router")
        for r in res["dynamic"]:
            x = r.get(dkey)
            if x is None:
                continue
            lo, hi = r["perplexity_ci"]
            ax.errorbar(
                [x],
                [r["perplexity"]],
                yerr=[[r["perplexity"] - lo], [hi - r["perplexity"]]],
                marker="s",
                color="C3",
                capsize=3,
                ls="none",
                label="dynamic router" if r is res["dynamic"][0] else None,
            )
            ax.annotate(
                f"t={r['target']:g}", (x, r["perplexity"]), fontsize=7, xytext=(4, 4), textcoords="offset points"
            )
        ax.set_xlabel(label)
        ax.set_ylabel("perplexity (mixed domains)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Dynamic vs static routing (held-out blocks of every domain)")
    save_figure(fig, path)
    return True


def plot_domain_compute(res: dict, path: Path) -> bool:
    """Average predicted latency per domain at every target (bars), domains labelled with their
    full-model perplexity; the dashed line per target is the target."""
    rows = res["dynamic"]
    domains = list(res["domains"])
    fig = new_figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(domains))
    for k, d in enumerate(domains):
        xs = [i + k * width for i in range(len(rows))]
        ax.bar(
            xs,
            [r["per_domain"][d]["mean_fraction"] for r in rows],
            width,
            label=f"{d} (full-model ppl {res['domains'][d]['full_perplexity']:.1f})",
        )
    for i, r in enumerate(rows):
        ax.hlines(r["target"], i - width / 2, i + 0.8 - width / 2, colors="k", linestyles="--", lw=1)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))], [f"target {r['target']:g}" for r in rows])
    lo = min(r["per_domain"][d]["mean_fraction"] for r in rows for d in domains)
    ax.set_ylim(max(0.0, lo - 0.1), 1.0)
    ax.set_ylabel("average predicted latency (fraction of full)")
    ax.set_title("Compute per domain (dashed: target)")
    ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def plot_domain_widths(res: dict, path: Path) -> bool:
    """Mean MLP width (fraction of full) per layer and domain, one panel per target."""
    rows = res["dynamic"]
    fig = new_figure(figsize=(4.2 * len(rows), 3.6))
    for i, r in enumerate(rows):
        ax = fig.add_subplot(1, len(rows), i + 1)
        for d, v in r["per_domain"].items():
            ax.plot(range(len(v["mlp_width_per_layer"])), v["mlp_width_per_layer"], marker=".", label=d)
        ax.set_title(f"target {r['target']:g}")
        ax.set_xlabel("layer")
        ax.set_ylabel("mean MLP width (fraction)")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def plot_training(metrics: list[dict], path: Path) -> bool:
    """Latency error of the batch average, router loss and choice entropy over inputs per step,
    for every dynamic training stage present (surrogate path, direct ablation, joint)."""
    recs = _by_stage(metrics)
    if not recs:
        return False
    fig = new_figure(figsize=(12, 3.6))
    for i, (key, label) in enumerate(
        (
            ("latency_error", "batch-average latency error (rel.)"),
            ("router_loss", "router loss"),
            ("choice_entropy_nats", "choice entropy over inputs (nats)"),
        )
    ):
        ax = fig.add_subplot(1, 3, i + 1)
        for s, v in recs.items():
            ax.plot([m["step"] for m in v], [m.get(key) for m in v], marker=".", label=s)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    return True


def _by_stage(metrics: list[dict]) -> dict[str, list[dict]]:
    """Training records per stage (labelled ``variant: stage`` when the records come from several
    router directories), in the order of ``STAGES``; stages without records are left out."""
    out: dict[str, list[dict]] = {}
    for s in STAGES:
        for m in metrics:
            if m.get("stage") == s and m.get("phase", "train") == "train":
                label = s.replace("dynamic_", "")
                out.setdefault(f"{m['variant']}: {label}" if "variant" in m else label, []).append(m)
    return out


def _verdict(v: dict | None) -> list[str]:
    if not v or "delta_nll" not in v:
        return [fmt(v.get("latency") if v else None, 3), "—", "—", (v or {}).get("verdict", "—")]
    lo, hi = v["ppl_ratio_ci"]
    return [
        fmt(v["latency"], 3),
        f"{v['dynamic_ppl']:.2f} / {v['static_ppl']:.2f}",
        f"{v['ppl_ratio']:.3f} [{lo:.3f}, {hi:.3f}]",
        v["verdict"],
    ]


def _ratio(v: dict) -> str:
    if "ppl_ratio" not in v:
        return v.get("verdict", "—")
    return f"{v['ppl_ratio']:.3f} [{v['ppl_ratio_ci'][0]:.3f}, {v['ppl_ratio_ci'][1]:.3f}]"


def _training_lines(summary: dict) -> list[str]:
    """How the router was trained: surrogate steps with a gradient, the surrogate's held-out
    accuracy, and the validation against the warm start (which router was kept)."""
    r, val = summary.get("routers") or {}, summary.get("validation") or {}
    if not r and not val:
        return []
    lines = ["## Training", ""]
    if r:
        lines.append(
            f"{r.get('steps')} router steps, {r.get('router_steps_with_surrogate_grad')} with the surrogate's gradient "
            f"(held-out Spearman {fmt(r.get('surrogate_spearman'), 3)}, "
            f"error {fmt(r.get('surrogate_relative_error'), 2)} of a constant predictor's)."
        )
    if val:
        nll = val.get("nll", {})
        lines.append(
            f"Validation against the warm start (the static router), both calibrated, on {val.get('blocks')} blocks: "
            f"routed NLL {fmt(nll.get('trained'), 4)} trained, {fmt(nll.get('warm_start'), 4)} warm start; "
            f"kept: **{val.get('kept')}**."
        )
    return lines + [""]


def render_dynamic_markdown(res: dict, plots: dict[str, bool], metrics: list[dict]) -> str:
    """The Markdown text of the dynamic report."""
    rows = res["dynamic"]
    domains = list(res["domains"])
    md = [
        "# Dynamic (input-adaptive) routing",
        "",
        "Held-out blocks per domain: "
        + ", ".join(f"{d} {v['blocks']}×{v['seq_len']}" for d, v in res["domains"].items())
        + "; "
        "full-model perplexity "
        + ", ".join(f"{d} {v['full_perplexity']:.2f}" for d, v in res["domains"].items())
        + ". "
        f"Per-token MLP routing: {'yes' if res.get('per_token') else 'no'}. "
        f"Evaluation took {res.get('wall_s', 0):.0f} s.",
        "",
    ]
    md += _training_lines(res.get("router_summary") or {})
    md += [
        "## Latency targets",
        "",
        "Average over all held-out blocks of the predicted latency (lookup table) of each block's routed sub-network, "
        "and the timed prefill latency (batch of one, paired with the full model; mean of per-block ratios).",
        "",
        md_table(
            ["target", "avg predicted", "error vs target", "range over blocks", "timed", "perplexity [95% CI]"],
            [
                [
                    fmt(r["target"]),
                    fmt(r["predicted_fraction"], 3),
                    f"{100 * r['predicted_latency_error']:+.1f}%",
                    f"{r['predicted_fraction_range'][0]:.3f}–{r['predicted_fraction_range'][1]:.3f}",
                    fmt(r.get("timed_fraction"), 3),
                    f"{r['perplexity']:.2f} [{r['perplexity_ci'][0]:.2f}, {r['perplexity_ci'][1]:.2f}]",
                ]
                for r in rows
            ],
        ),
        "",
    ]
    md += [
        "## Dynamic against static at equal latency",
        "",
        "Static perplexity interpolated (log-perplexity linear in latency, block by block) "
        "between the two static points "
        "that bracket the dynamic point's latency; ratio = dynamic / static perplexity, 95% bootstrap CI over blocks.",
        "",
    ]
    hdr = ["target", "latency", "ppl dynamic / static", "ratio [95% CI]", "verdict"]
    md += [
        "By predicted latency:",
        "",
        md_table(hdr, [[fmt(r["target"])] + _verdict(r.get("vs_static_predicted")) for r in rows]),
        "",
    ]
    if any(r.get("vs_static_timed") for r in rows):
        md += [
            "By timed latency:",
            "",
            md_table(hdr, [[fmt(r["target"])] + _verdict(r.get("vs_static_timed")) for r in rows]),
            "",
        ]
    if plots.get("dynamic_latency_perplexity.png"):
        md += ["![dynamic vs static](dynamic_latency_perplexity.png)", ""]
    if any("vs_shuffled" in r for r in rows):
        md += [
            "## Input adaptivity (shuffled control)",
            "",
            "Every block runs at the configuration routed for another block (a random permutation): the same "
            "configurations and the same average latency, no longer matched to their inputs. "
            "Ratio = dynamic / shuffled "
            "perplexity, 95% bootstrap CI over blocks; below 1 means the input dependence itself helps.",
            "",
            md_table(
                ["target", "configurations", "ppl dynamic / shuffled", "ratio [95% CI]", "verdict"],
                [
                    [
                        fmt(r["target"]),
                        str(r["vs_shuffled"]["distinct_configs"]),
                        f"{r['perplexity']:.2f} / {r['vs_shuffled']['perplexity']:.2f}",
                        _ratio(r["vs_shuffled"]),
                        r["vs_shuffled"]["verdict"],
                    ]
                    for r in rows
                    if "vs_shuffled" in r
                ],
            ),
            "",
        ]
    md += [
        "## Compute per domain",
        "",
        md_table(
            ["target"] + [f"{d} (full ppl {res['domains'][d]['full_perplexity']:.1f})" for d in domains],
            [
                [fmt(r["target"])]
                + [
                    f"{r['per_domain'][d]['mean_fraction']:.3f} (ppl {r['per_domain'][d]['perplexity']:.1f})"
                    for d in domains
                ]
                for r in rows
            ],
        ),
        "",
    ]
    if all("vs_static_predicted" in r["per_domain"][d] for r in rows for d in domains):
        md += [
            "Per domain, dynamic / static perplexity at that domain's average predicted latency (95% CI):",
            "",
            md_table(
                ["target"] + domains,
                [
                    [fmt(r["target"])] + [_ratio(r["per_domain"][d]["vs_static_predicted"]) for d in domains]
                    for r in rows
                ],
            ),
            "",
        ]
    hardest = max(domains, key=lambda d: res["domains"][d]["full_perplexity"])
    most = [max(domains, key=lambda d: r["per_domain"][d]["mean_fraction"]) for r in rows]
    md += [
        f"The domain with the highest full-model perplexity is **{hardest}**; it received the most compute at "
        f"{sum(m == hardest for m in most)} of {len(rows)} targets "
        "(" + ", ".join(f"{r['target']:g}: {m}" for r, m in zip(rows, most)) + ").",
        "",
    ]
    for name, cap in (
        ("dynamic_domain_compute.png", "compute per domain"),
        ("dynamic_domain_widths.png", "MLP width per layer and domain"),
    ):
        if plots.get(name):
            md += [f"![{cap}]({name})", ""]
    md += [
        "## Collapse",
        "",
        "Entropy of the choices over inputs (mean over layers; 0 = every input gets the same sub-network) "
        "and the share of "
        "layers whose MLP width and head count do not depend on the input.",
        "",
        md_table(
            ["target", "entropy (nats)", "input-independent layers", "collapsed"],
            [
                [
                    fmt(r["target"]),
                    fmt(r["collapse"]["entropy_nats"], 3),
                    f"{100 * r['collapse']['input_independent_layers']:.0f}%",
                    "yes" if r["collapse"]["collapsed"] else "no",
                ]
                for r in rows
            ],
        ),
        "",
        f"Identical choices at every target (targets collapsed): {'yes' if res.get('targets_collapsed') else 'no'}.",
        "",
    ]
    by = _by_stage(metrics)
    if by:
        md += [
            "## Router training",
            "",
            md_table(
                ["stage", "steps", "final latency error (abs.)", "mean entropy (nats)", "surrogate-gradient steps"],
                [
                    [
                        s,
                        str(len(v)),
                        f"{100 * abs(v[-1]['latency_error']):.1f}%",
                        fmt(sum(m["choice_entropy_nats"] for m in v) / len(v), 3),
                        str(v[-1].get("router_steps_with_surrogate_grad", "—")),
                    ]
                    for s, v in by.items()
                    if v
                ],
            ),
            "",
        ]
        if plots.get("dynamic_training.png"):
            md += ["![router training](dynamic_training.png)", ""]
    return "\n".join(md).rstrip() + "\n"


def write_dynamic_report(
    out_dir: str | Path, res: dict, metrics_paths: list[str | Path] | str | Path | None = None
) -> Path:
    """Write ``dynamic_report.md`` and its plots into ``out_dir``; ``metrics_paths``: the
    ``metrics.jsonl`` file(s) of the router training (e.g. surrogate path and direct ablation).
    Returns the Markdown path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if isinstance(metrics_paths, (str, Path)):
        metrics_paths = [metrics_paths]
    paths = [Path(p) for p in metrics_paths or []]
    metrics = [m | {"variant": p.parent.name} if len(paths) > 1 else m for p in paths for m in read_metrics(p)]
    makers = {
        "dynamic_latency_perplexity.png": lambda p: plot_latency_perplexity(res, p),
        "dynamic_domain_compute.png": lambda p: plot_domain_compute(res, p),
        "dynamic_domain_widths.png": lambda p: plot_domain_widths(res, p),
        "dynamic_training.png": lambda p: plot_training(metrics, p),
    }
    plots = {}
    for name, make in makers.items():
        plots[name] = bool(res["dynamic"]) and make(out_dir / name)
    text = render_dynamic_markdown(res, plots, metrics)
    path = out_dir / "dynamic_report.md"
    atomic_write_text(path, text)
    return path
