"""Evaluation of a finished run at its latency targets (static routing, METHOD §9).

For each target: the routed configuration, parameters, timed against predicted latency, held-out and
out-of-domain perplexity after and before training, the homogeneous configurations of nearest and
of interpolated equal predicted latency, decode speed and downstream tasks; a sub-model exported,
reloaded with plain transformers and timed. Writes ``results.json`` (the report reads it): a
re-evaluation updates the rows it measures and keeps the others (:func:`merge_results`).
"""

from __future__ import annotations

import json
import logging
import math
import platform
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch

from flextron.config import RunConfig
from flextron.cost.table import CostTable
from flextron.cost.timing import paired_ratio, prefill_fn, time_models
from flextron.data.inputs import make_inputs
from flextron.errors import ConfigError
from flextron.eval.deploy import LoadedRun, finished_stages, load_run, save_target, set_threads
from flextron.eval.perplexity import decode_tokens_per_s, perplexity_of
from flextron.eval.stats import bootstrap_ci, paired_comparison
from flextron.files import atomic_write_json
from flextron.model.elastic import ElasticModel
from flextron.model.export import export_subnetwork, load_elastic, load_original
from flextron.model.space import ArchConfig
from flextron.version import __version__

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- evaluation


def _homogeneous_rivals(fx: ElasticModel, table: CostTable, predicted: float) -> list[ArchConfig]:
    """For every head count, the homogeneous configuration whose predicted latency is nearest to
    ``predicted`` (seconds): the baselines a routed configuration is compared with."""
    sp = fx.space
    return [
        min((sp.homogeneous(m, a) for m in sp.mlp_choices), key=lambda c: abs(table.predict(c) - predicted))
        for a in sp.head_choices
    ]


def _homogeneous_baseline(
    fx: ElasticModel, table: CostTable, predicted: float, ppl_of: Callable[[ArchConfig], float]
) -> dict:
    """The homogeneous baseline of a routed configuration of predicted latency ``predicted`` (s).

    ``nearest``: for every head count the homogeneous configuration of nearest predicted latency
    is measured (``ppl_of``) and the best is kept. ``interpolated``: along that head count's
    homogeneous widths, the perplexity at exactly ``predicted``, by linear interpolation of
    log-perplexity in predicted latency between the two widths that bracket it (the other one
    is measured too); equal to ``nearest`` when ``predicted`` lies outside their range.
    """
    sp = fx.space
    rivals = [
        {"config": h.to_dict(), "predicted_latency_s": table.predict(h), "perplexity": ppl_of(h)}
        for h in _homogeneous_rivals(fx, table, predicted)
    ]
    best = min(rivals, key=lambda r: r["perplexity"])
    heads = best["config"]["heads"][0]
    line = sorted(
        ((table.predict(sp.homogeneous(m, heads)), sp.homogeneous(m, heads)) for m in sp.mlp_choices),
        key=lambda x: x[0],
    )
    lo = max((x for x in line if x[0] <= predicted), default=None, key=lambda x: x[0])
    hi = min((x for x in line if x[0] >= predicted), default=None, key=lambda x: x[0])
    interp = {"perplexity": best["perplexity"], "between": [best["config"]]}
    if lo is not None and hi is not None and hi[0] > lo[0]:
        known = {ArchConfig.from_dict(r["config"]): r["perplexity"] for r in rivals}
        p_lo, p_hi = (known[c] if c in known else ppl_of(c) for c in (lo[1], hi[1]))
        w = (predicted - lo[0]) / (hi[0] - lo[0])
        interp = {
            "perplexity": math.exp((1 - w) * math.log(p_lo) + w * math.log(p_hi)),
            "between": [lo[1].to_dict(), hi[1].to_dict()],
            "between_perplexity": [p_lo, p_hi],
            "between_predicted_latency_s": [lo[0], hi[0]],
        }
    return {**best, "candidates": rivals, "interpolated": interp}


def evaluate_targets(
    run_dir: str | Path,
    targets: list[float] | None = None,
    *,
    tasks: list[str] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    progress: bool = True,
    merge: bool = True,
) -> dict:
    """Evaluate every target: routed configuration, parameters, timed vs predicted latency,
    held-out and out-of-domain perplexity after and before training, the homogeneous
    configuration of nearest predicted latency, decode speed, and downstream tasks. Writes
    ``results.json`` atomically and returns what it holds: with ``merge``, these rows merged into
    the rows already there (:func:`merge_results`); without, these rows alone (the run's evaluate
    stage, whose model is new).

    Downstream tasks (:mod:`flextron.eval.tasks`, scored with lm-eval): ``tasks`` at every target, or,
    when ``tasks`` is ``None``, the config's ``eval.tasks`` at ``eval.task_targets``. ``limit``:
    items per task (a fixed seeded subset; default ``eval.task_limit``, 0 = all); ``num_fewshot``
    (default ``eval.task_num_fewshot``; ``None``/-1 = each task's protocol). Each scored row gets
    ``tasks`` = {task: {metric: value, "n": items}} and ``tasks_wall_s``.

    Raises:
        TargetError: a target outside (0, 1] or below the smallest sub-network.
        ConfigError: an unknown task, ``limit < 1``; TaskFileError: a bad task data file.
    """
    run = load_run(run_dir)
    cfg, fx, table = run.cfg, run.fx, run.table
    targets = list(targets or cfg.eval.targets)
    for t in targets:
        fx.router.check_target(t)
    task_plan = _task_plan(cfg, targets, tasks, limit, num_fewshot)
    set_threads(cfg)
    t0 = time.time()
    original, tok = load_original(cfg)
    inp = make_inputs(cfg, tok)
    orig_ppl = perplexity_of(original, inp.heldout, cfg)["perplexity"]
    orig_ood = perplexity_of(original, inp.ood, cfg)["perplexity"]
    del original
    untrained = load_elastic(run.run_dir / "ranked")
    full_export = export_subnetwork(fx, fx.space.full())
    ids = torch.randint(
        0,
        fx.config.vocab_size,
        (cfg.latency.batch_size, cfg.latency.seq_len),
        generator=torch.Generator().manual_seed(0),
    )
    full_decode = decode_tokens_per_s(full_export)
    rows = []
    for t in targets:
        arch = fx.set_target(t)
        sub = export_subnetwork(fx, arch)
        timing = time_models(
            {"sub": prefill_fn(sub, ids), "full": prefill_fn(full_export, ids)},
            repeats=cfg.eval.latency_repeats,
            warmup=2,
        )
        ppl = perplexity_of(fx, inp.heldout, cfg)
        ood = perplexity_of(fx, inp.ood, cfg)["perplexity"]
        untrained.set_arch(arch)
        u_held = perplexity_of(untrained, inp.heldout, cfg)
        u_ppl = u_held["perplexity"]
        u_ood = perplexity_of(untrained, inp.ood, cfg)["perplexity"]
        homo = None
        if t < 1.0:
            homo = _homogeneous_baseline(
                fx, table, table.predict(arch), lambda h: perplexity_of(fx.set_arch(h), inp.heldout, cfg)["perplexity"]
            )
        row = {
            "target": t,
            "mode": "static",
            "config": arch.to_dict(),
            "params": fx.space.num_parameters(arch),
            "full_params": fx.space.total_params,
            "predicted_latency_s": table.predict(arch),
            "latency_s": timing["sub"]["median_s"],
            "full_latency_s": timing["full"]["median_s"],
            "latency_ratio": paired_ratio(timing, "sub", "full"),
            "latency_ratio_of_medians": timing["sub"]["median_s"] / timing["full"]["median_s"],
            "perplexity": ppl["perplexity"],
            "perplexity_ci": list(bootstrap_ci(ppl["nll_per_block"], transform=math.exp)),
            "untrained_perplexity": u_ppl,
            # trained vs the same configuration cut before training, paired over held-out blocks
            "vs_untrained": paired_comparison(ppl["nll_per_block"], u_held["nll_per_block"]),
            "ood_perplexity": ood,
            "untrained_ood_perplexity": u_ood,
            "homogeneous": homo,
            "decode_tokens_per_s": decode_tokens_per_s(sub),
            "full_decode_tokens_per_s": full_decode,
        }
        if task_plan is not None and t in task_plan["targets"]:
            row.update(_downstream(run, arch, t, task_plan))
        rows.append(row)
        log.info(
            "target %.2f: latency %.1f ms (%.2f of full), ppl %.2f (untrained %.2f)",
            t,
            row["latency_s"] * 1e3,
            row["latency_ratio"],
            row["perplexity"],
            u_ppl,
        )
        fx.set_arch(None)
    results = _results(run, rows, orig_ppl, orig_ood, time.time() - t0)
    results["bos"] = inp.bos.to_dict()  # the BOS policy of every evaluated block and prompt
    old = read_results(run.run_dir / "results.json") if merge else None
    kept = (old or {}).get("exported_check")
    if not isinstance(kept, dict) or not isinstance(kept.get("target"), (int, float)) or min(targets) <= kept["target"]:
        results["exported_check"] = _exported_check(run, min(targets), ids)  # of the lowest target evaluated
    results = merge_results(old, results)
    atomic_write_json(run.run_dir / "results.json", results)
    return results


def read_results(path: Path) -> dict | None:
    """The results in ``path`` (``results.json``), or None when there are none or they are
    unreadable (a warning says so: they are then replaced)."""
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        old = e
    if not isinstance(old, dict) or not isinstance(old.get("rows", []), list):
        log.warning("%s is unreadable (%s); it is replaced by this evaluation's results", path, type(old).__name__)
        return None
    return old


def _row_key(row: dict) -> tuple:
    return (row.get("mode", "static"), row.get("target"))


def merge_results(old: dict | None, new: dict) -> dict:
    """``new`` (one evaluation's results) merged into ``old`` (``results.json`` so far; None: none).

    Rows are keyed by (``mode``, ``target``). A row of ``new`` replaces ``old``'s row of its key,
    but keeps that row's downstream task scores of tasks it did not score again (``tasks``, with
    the protocol of each score in ``tasks_protocols``); rows of other keys (other targets, dynamic
    rows) are kept. Rows are ordered static first, then by target. The other fields come from
    ``new``, except ``exported_check`` when ``new`` has none."""
    if not old:
        rows = [_with_task_protocols(r) for r in new.get("rows", [])]
        return {**new, "rows": rows}
    merged = {_row_key(r): _with_task_protocols(r) for r in old.get("rows", []) if isinstance(r, dict)}
    for row in new.get("rows", []):
        row = _with_task_protocols(row)
        prev = merged.get(_row_key(row))
        if isinstance(prev, dict) and isinstance(prev.get("tasks"), dict) and prev["tasks"]:
            row = {
                **row,
                "tasks": {**prev["tasks"], **(row.get("tasks") or {})},
                "tasks_protocols": {**prev.get("tasks_protocols", {}), **row.get("tasks_protocols", {})},
            }
            row.setdefault("tasks_protocol", prev.get("tasks_protocol"))
        merged[_row_key(row)] = row
    order = sorted(merged, key=lambda k: (k[0] != "static", str(k[0]), k[1] if isinstance(k[1], (int, float)) else 0))
    out = {**old, **new, "rows": [merged[k] for k in order]}
    if "exported_check" not in new and "exported_check" in old:
        out["exported_check"] = old["exported_check"]
    return out


def _with_task_protocols(row: dict) -> dict:
    """``row`` with ``tasks_protocols`` ({task: protocol}) filled from ``tasks_protocol`` for the
    tasks that lack one."""
    tasks = row.get("tasks")
    if not isinstance(tasks, dict) or not tasks:
        return row
    given = row.get("tasks_protocols") if isinstance(row.get("tasks_protocols"), dict) else {}
    proto = row.get("tasks_protocol")
    return {**row, "tasks_protocols": {**{t: proto for t in tasks if proto is not None}, **given}}


def _task_plan(cfg: RunConfig, targets: list[float], tasks, limit, num_fewshot) -> dict | None:
    """What downstream evaluation to run (``None``: none); validates names and numbers early."""
    from flextron.eval.tasks import check_task_names

    ev = cfg.eval
    if tasks is None:
        if not ev.tasks:
            return None
        tasks, on = list(ev.tasks), [t for t in targets if not ev.task_targets or t in ev.task_targets]
    else:
        on = list(targets)
    limit = (ev.task_limit or None) if limit is None else limit
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1 items per task, got {limit}")
    if num_fewshot is None and ev.task_num_fewshot >= 0:
        num_fewshot = ev.task_num_fewshot
    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"num_fewshot must be >= 0, got {num_fewshot}")
    return {"tasks": check_task_names(tasks), "targets": on, "limit": limit, "num_fewshot": num_fewshot}


def _downstream(run: LoadedRun, arch: ArchConfig, target: float, plan: dict) -> dict:
    """Score the sub-model of ``arch`` on the planned tasks (lm-eval, batched)."""
    from flextron.eval.lm_eval_model import FlextronLM, evaluate_tasks

    t0 = time.time()
    lm = FlextronLM(
        fx=run.fx,
        tokenizer=run.tokenizer,
        arch=arch,
        target=target,
        device=next(run.fx.parameters()).device,
        batch_size=run.cfg.eval.task_batch_size,
    )
    summary, _ = evaluate_tasks(
        lm, plan["tasks"], limit=plan["limit"], seed=run.cfg.seed, num_fewshot=plan["num_fewshot"]
    )
    del lm
    return {
        "tasks": {name: res for name, res in summary.items() if not name.startswith("_")},
        "tasks_wall_s": round(time.time() - t0, 1),
        "tasks_protocol": {"limit": plan["limit"], "num_fewshot": plan["num_fewshot"], "seed": run.cfg.seed},
    }


def _exported_check(run: LoadedRun, target: float, ids: torch.Tensor) -> dict:
    """Save the lowest target's sub-model to disk, reload it with plain transformers and time it
    against the full model (the speed-up users get from the checkpoint)."""
    from transformers import AutoModelForCausalLM

    out = run.run_dir / "exported" / f"target_{target:g}"
    save_target(run, target, out, overwrite=True, dtype="float32")  # timed as the model is evaluated
    sub = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    full = export_subnetwork(run.fx, run.fx.space.full())
    timing = time_models(
        {"sub": prefill_fn(sub, ids), "full": prefill_fn(full, ids)}, repeats=run.cfg.eval.latency_repeats, warmup=2
    )
    return {
        "target": target,
        "path": str(out),
        "params": sum(p.numel() for p in sub.parameters()),
        "latency_s": timing["sub"]["median_s"],
        "full_latency_s": timing["full"]["median_s"],
        "speedup": 1 / paired_ratio(timing, "sub", "full"),
        "speedup_of_medians": timing["full"]["median_s"] / timing["sub"]["median_s"],
    }


def git_commit() -> str:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _results(run: LoadedRun, rows: list, orig_ppl: float, orig_ood: float, eval_wall: float) -> dict:
    import accelerate
    import transformers

    st = finished_stages(run.run_dir)
    sp = run.fx.space
    val = run.table.validation or {}
    stages = {k: {"wall_s": v["wall_s"], "tokens": v["tokens"]} for k, v in st.items()}
    stages["evaluate"] = {"wall_s": round(eval_wall, 2), "tokens": 0}
    return {
        "run": run.cfg.name,
        "model_source": run.cfg.model.source,
        "original_perplexity": orig_ppl,
        "original_ood_perplexity": orig_ood,
        "rows": rows,
        "ablation": st.get("rank", {}).get("summary", {}).get("ablation"),
        "latency_table": {
            # fraction (not per cent): error of the predicted fraction of full latency, timed on exported sub-models
            "mape": None if val.get("mape_fraction") is None else val["mape_fraction"] / 100,
            "validated_configs": val.get("n"),
            "full_s": run.table.full,
            "unit": run.table.unit,
            "device": run.table.device,
            "workload": run.table.workload,
        },
        "search_space": {
            "mlp_choices": list(sp.mlp_choices),
            "head_choices": list(sp.head_choices),
            "intermediate_size": sp.intermediate_size,
            "heads_per_group": sp.heads_per_group,
            "head_axis": sp.head_axis,
            "head_units": sp.head_choices[-1],
            "num_layers": sp.num_layers,
        },
        "training": {k: st[k]["summary"] for k in ("elastic", "routers", "joint") if k in st},
        "provenance": {
            "commit": git_commit(),
            "versions": {
                "flextron": __version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "accelerate": accelerate.__version__,
                "python": platform.python_version(),
            },
            "seed": run.cfg.seed,
            "threads": torch.get_num_threads(),
            "stages": stages,
            "total_wall_s": round(sum(v["wall_s"] for v in stages.values()), 1),
        },
    }
