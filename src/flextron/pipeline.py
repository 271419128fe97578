"""Stage orchestration with resume: config → data → rank → latency table → elastic training →
routers → joint fine-tuning → evaluation → report.

Input: a :class:`~flextron.config.RunConfig`. Output: ``run_dir = out_dir/name`` holding
``config.yaml``, ``stages.json`` (finished stages with wall time, tokens and summaries), the
ranked/trained elastic weights (safetensors), ``latency_table.json``, routers and surrogate,
``metrics.jsonl``, ``results.json`` and ``report.md`` with PNG plots. A finished stage is skipped
on rerun; an interrupted training stage resumes from its last checkpoint. Under ``accelerate
launch`` the training stages run on every process and the others on the main one
(:mod:`flextron.distributed`).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_model, save_model

from . import __version__
from .checkpoint import atomic_write_dir, atomic_write_json, atomic_write_text, check_shapes, file_hashes, verify_hashes
from .config import RunConfig, dump_config, load_config
from .data import Corpora, build_corpora, load_text_files, tokenize_blocks
from .distributed import make_accelerator, on_main, process_state
from .elastic import ArchConfig, ElasticModel, convert
from .errors import ConfigError, FlextronError, ModelError, OutputExistsError
from .evaluate import bootstrap_ci, decode_tokens_per_s, perplexity
from .export import export_subnetwork, load_elastic, load_hf_model, save_elastic, save_subnetwork
from .latency import CostTable, measure_latency_table, paired_ratio, prefill_fn, time_models, validate_latency_table
from .ranking import apply_permutation, compute_importance, make_permutation
from .routers import StaticRouter, TargetRouter
from .surrogate import Surrogate
from .router_training import train_routers
from .training import train_elastic, train_joint

log = logging.getLogger(__name__)

STAGES = ("rank", "latency", "elastic", "routers", "joint", "evaluate")


# --------------------------------------------------------------------------- run directory state


def _stages(run_dir: Path) -> dict:
    p = run_dir / "stages.json"
    return json.loads(p.read_text()) if p.exists() else {}


def _finish_stage(run_dir: Path, name: str, summary: dict, wall_s: float) -> None:
    st = _stages(run_dir)
    st[name] = {"wall_s": round(wall_s, 2), "tokens": int(summary.get("tokens", 0)), "summary": summary}
    atomic_write_json(run_dir / "stages.json", st)
    log.info("stage %s done in %.1f s (%d tokens)", name, wall_s, st[name]["tokens"])
    print(f"[flextron] stage {name}: {wall_s:.1f} s, {st[name]['tokens']} tokens", flush=True)


def _same_config(saved: Path, cfg: RunConfig) -> bool:
    """Whether ``saved`` describes ``cfg`` (a config written before a field was added reads with
    that field's default)."""
    try:
        return load_config(saved) == cfg
    except FlextronError:
        return False


def _prepare_run_dir(cfg: RunConfig, overwrite: bool) -> Path:
    """Create or reuse ``run_dir``. A run directory written by a different config is refused
    (nothing overwritten) unless ``overwrite``."""
    run_dir = cfg.run_dir
    text = dump_config(cfg)
    saved = run_dir / "config.yaml"
    if run_dir.exists() and any(run_dir.iterdir()):
        if saved.exists() and (saved.read_text() == text or _same_config(saved, cfg)):
            log.info("resuming run in %s", run_dir)
            return run_dir
        if not overwrite:
            raise OutputExistsError(
                f"run directory {run_dir} exists and holds a different run; pass --overwrite or choose another name/out_dir"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, text)
    return run_dir


# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """Tokenizer and token blocks of a run (rebuilt deterministically on every invocation)."""

    tokenizer: object
    calibration: torch.Tensor  # (N_cal, T_cal)
    train: torch.Tensor  # (N_train, T)
    router: torch.Tensor  # (N_r, T_r)
    heldout: torch.Tensor  # (N_eval, T_eval)
    ood: torch.Tensor  # (N_ood, T_eval)


def _model_source(cfg: RunConfig) -> Path:
    if cfg.model.source == "smollm2":
        from .assets import smollm2_model_dir

        return smollm2_model_dir()
    return Path(cfg.model.source).expanduser()


def _load_original(cfg: RunConfig):
    return load_hf_model(_model_source(cfg))


def _inputs(cfg: RunConfig, tokenizer, processes: int = 1) -> Inputs:
    """The token blocks of a run; ``processes``: how many train it (each takes ``train.batch_size``
    sequences per micro-batch, so the training blocks cover the global batch of every step)."""
    ood_files = list(cfg.data.ood_text_files)
    corp: Corpora = build_corpora(
        heldout_articles=cfg.data.heldout_articles,
        ood_plays=0 if ood_files else cfg.data.ood_plays,
        seed=cfg.seed,
        text_files=list(cfg.data.text_files) or None,
    )
    if ood_files:
        corp = Corpora(train=corp.train, heldout=corp.heldout, ood_heldout=load_text_files(ood_files))
    t = cfg.train
    n_train = t.steps * t.batch_size * processes * t.grad_accum
    return Inputs(
        tokenizer=tokenizer,
        calibration=tokenize_blocks(tokenizer, corp.train, cfg.calibration.seq_len, cfg.calibration.num_sequences, seed=cfg.seed + 1),
        train=tokenize_blocks(tokenizer, corp.train, t.seq_len, min(n_train, 4096), seed=cfg.seed + 2),
        router=tokenize_blocks(tokenizer, corp.train, cfg.routers.seq_len, 4 * cfg.routers.batch_size, seed=cfg.seed + 3),
        heldout=tokenize_blocks(tokenizer, corp.heldout, cfg.eval.seq_len, cfg.eval.heldout_blocks),
        ood=tokenize_blocks(tokenizer, corp.ood_heldout, cfg.eval.seq_len, cfg.eval.ood_blocks),
    )


def _set_threads(cfg: RunConfig) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)


def _ppl(model, blocks, cfg: RunConfig) -> dict:
    return perplexity(model, blocks, batch_size=cfg.eval.batch_size, progress=False)


# --------------------------------------------------------------------------- stages


def _stage_rank(cfg: RunConfig, run_dir: Path, inp: Inputs) -> dict:
    model, _ = _load_original(cfg)
    fx = convert(model, cfg.elastic)
    calib = list(inp.calibration.split(cfg.calibration.batch_size))
    imp = compute_importance(fx.model, fx.adapter, calib)
    # One-shot ablation (METHOD §2): the same cut under each ordering, no training.
    frac = cfg.eval.ablation_mlp_fraction
    width = min(fx.space.mlp_choices, key=lambda m: abs(m - frac * fx.space.intermediate_size))
    cut = fx.space.homogeneous(width, fx.space.head_choices[-1])
    ablation = {}
    original = copy.deepcopy(fx.model.state_dict())
    for ordering in ("none", "random", "importance"):  # importance last: it is the one kept
        fx.model.load_state_dict(original)
        apply_permutation(fx.model, fx.adapter, make_permutation(imp, fx.adapter, ordering, cfg.seed))
        fx.set_arch(cut)
        ablation[ordering] = _ppl(fx, inp.heldout, cfg)["perplexity"]
        log.info("one-shot perplexity at MLP width %d (%s ordering): %.2f", width, ordering, ablation[ordering])
    fx.set_arch(None)
    fx.ranking = {"ordering": cfg.elastic.ordering, "applied": True, "seed": cfg.seed}
    if cfg.elastic.ordering != "importance":
        fx.model.load_state_dict(original)
        apply_permutation(fx.model, fx.adapter, make_permutation(imp, fx.adapter, cfg.elastic.ordering, cfg.seed))
    save_elastic(fx, run_dir / "ranked", tokenizer=inp.tokenizer, overwrite=True)
    return {
        "tokens": inp.calibration.numel(),
        "calibration_sequences": inp.calibration.shape[0],
        "ablation": {"mlp_width": width, "mlp_fraction": width / fx.space.intermediate_size, "perplexity": ablation},
    }


def _stage_latency(cfg: RunConfig, run_dir: Path) -> dict:
    fx = load_elastic(run_dir / "ranked")
    if cfg.latency.budget == "params":
        table = CostTable.from_parameters(fx.space)
    else:
        table = measure_latency_table(fx, cfg.latency)
        if cfg.latency.validate_configs:
            table.validation = validate_latency_table(fx, table, cfg.latency, cfg.latency.validate_configs, cfg.seed)
    table.save(run_dir / "latency_table.json")
    val = table.validation or {}
    return {"unit": table.unit, "full_s": table.full, "mape_fraction_pct": val.get("mape_fraction"), "adjusted": len(table.adjusted)}


def _teacher(run_dir: Path, alpha: float):
    if alpha == 0:
        return None
    teacher = load_elastic(run_dir / "ranked").model
    teacher.eval().requires_grad_(False)
    return teacher


def _stage_elastic(cfg: RunConfig, run_dir: Path, inp: Inputs) -> dict:
    fx = load_elastic(run_dir / "ranked")
    table = CostTable.load(run_dir / "latency_table.json")
    acc = make_accelerator(cfg.train.grad_accum)
    summary = train_elastic(
        fx, _teacher(run_dir, cfg.train.kd_alpha), inp.train, cfg.train, table, run_dir,
        seed=cfg.seed, accelerator=acc, min_fraction=min(cfg.routers.targets),
    )
    if acc.is_main_process:
        save_elastic(fx, run_dir / "elastic", tokenizer=inp.tokenizer, overwrite=True)
    return summary


def _new_router(cfg: RunConfig, fx: ElasticModel) -> tuple[StaticRouter, Surrogate]:
    sp = fx.space
    torch.manual_seed(cfg.seed)
    router = StaticRouter(cfg.routers.targets, sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), cfg.routers.hidden)
    sm = Surrogate(sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), cfg.routers.surrogate_hidden)
    return router, sm


ROUTER_FILES = {"router": "router.safetensors", "surrogate": "surrogate.safetensors"}
ROUTER_MANIFEST = "routers.json"


def _save_routers(path: Path, router: StaticRouter, sm: Surrogate) -> None:
    """Router and surrogate (safetensors) plus ``routers.json`` with their sha256, written atomically."""

    def write(tmp: Path) -> None:
        save_model(router, str(tmp / ROUTER_FILES["router"]))
        save_model(sm, str(tmp / ROUTER_FILES["surrogate"]))
        (tmp / ROUTER_MANIFEST).write_text(json.dumps({"sha256": file_hashes(tmp, list(ROUTER_FILES.values()))}, indent=2))

    atomic_write_dir(path, write)


def _load_routers(path: Path, cfg: RunConfig, fx: ElasticModel) -> tuple[StaticRouter, Surrogate]:
    """Routers written by :func:`_save_routers`, checked against their sha256 and the config's shapes.

    Raises:
        ModelError: missing or malformed manifest, altered file, or shapes that differ from ``cfg``.
    """
    router, sm = _new_router(cfg, fx)
    fix = "rerun the router stage (delete the directory and the 'routers'/'joint' entries of stages.json)"
    try:
        manifest = json.loads((path / ROUTER_MANIFEST).read_text())
        hashes = manifest["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path / ROUTER_MANIFEST} is missing or malformed ({type(e).__name__}: {e}); {fix}") from None
    verify_hashes(path, hashes, fix)
    for name, mod in (("router", router), ("surrogate", sm)):
        check_shapes(mod, path / ROUTER_FILES[name], fix)
    try:
        load_model(router, str(path / ROUTER_FILES["router"]))
        load_model(sm, str(path / ROUTER_FILES["surrogate"]))
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelError(f"routers in {path} are unreadable or do not match the config ({e}); {fix}") from None
    return router.eval(), sm.eval()


def _stage_routers(cfg: RunConfig, run_dir: Path, inp: Inputs) -> dict:
    fx = load_elastic(run_dir / "elastic")
    table = CostTable.load(run_dir / "latency_table.json")
    router, sm = _new_router(cfg, fx)
    acc = make_accelerator()
    summary = train_routers(fx, router, sm, table, inp.router, cfg.routers, run_dir, seed=cfg.seed, accelerator=acc)
    if acc.is_main_process:
        _save_routers(run_dir / "routers", router, sm)
    return summary


def _stage_joint(cfg: RunConfig, run_dir: Path, inp: Inputs) -> dict:
    fx = load_elastic(run_dir / "elastic")
    table = CostTable.load(run_dir / "latency_table.json")
    router, sm = _load_routers(run_dir / "routers", cfg, fx)
    acc = make_accelerator(cfg.joint.grad_accum)
    summary = train_joint(
        fx, _teacher(run_dir, cfg.joint.kd_alpha), router, table, inp.train, cfg.joint, cfg.routers, run_dir, seed=cfg.seed, accelerator=acc
    )
    if acc.is_main_process:
        save_elastic(fx, run_dir / "final", tokenizer=inp.tokenizer, overwrite=True)
        _save_routers(run_dir / "final_routers", router, sm)
    return summary


def _stage_evaluate(run_dir: Path) -> dict:
    evaluate_run(run_dir)  # writes results.json and the report
    return {"tokens": 0}


# --------------------------------------------------------------------------- loading a finished run


@dataclass
class LoadedRun:
    """A finished run: the trained elastic model with its deployment router attached."""

    cfg: RunConfig
    run_dir: Path
    fx: ElasticModel
    table: CostTable
    tokenizer: object


def load_run(run_dir: str | Path) -> LoadedRun:
    """Load the final elastic model, cost table and routers of a run directory.

    Raises:
        ModelError: the run is missing or has not finished its training stages.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ModelError(f"{run_dir} is not a flextron run directory (no config.yaml); run `flextron run CONFIG` first")
    cfg = load_config(run_dir / "config.yaml")
    if "joint" not in _stages(run_dir):
        raise ModelError(f"run {run_dir} has not finished training (stage 'joint' missing); rerun `flextron run` to resume it")
    fx = load_elastic(run_dir / "final")
    table = CostTable.load(run_dir / "latency_table.json")
    router, sm = _load_routers(run_dir / "final_routers", cfg, fx)
    fx.router = TargetRouter(router, table, fx.space, sm)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    return LoadedRun(cfg, run_dir, fx, table, tok)


# --------------------------------------------------------------------------- evaluation


def _homogeneous_rivals(fx: ElasticModel, table: CostTable, predicted: float) -> list[ArchConfig]:
    """For every head count, the homogeneous configuration whose predicted latency is nearest to
    ``predicted`` (seconds): the baselines a routed configuration is compared with."""
    sp = fx.space
    return [min((sp.homogeneous(m, a) for m in sp.mlp_choices), key=lambda c: abs(table.predict(c) - predicted)) for a in sp.head_choices]


def _homogeneous_baseline(fx: ElasticModel, table: CostTable, predicted: float, ppl_of: Callable[[ArchConfig], float]) -> dict:
    """The homogeneous baseline of a routed configuration of predicted latency ``predicted`` (s).

    ``nearest``: for every head count the homogeneous configuration of nearest predicted latency
    is measured (``ppl_of``) and the best is kept. ``interpolated``: along that head count's
    homogeneous widths, the perplexity at exactly ``predicted``, by linear interpolation of
    log-perplexity in predicted latency between the two widths that bracket it (the other one
    is measured too); equal to ``nearest`` when ``predicted`` lies outside their range.
    """
    sp = fx.space
    rivals = [{"config": h.to_dict(), "predicted_latency_s": table.predict(h), "perplexity": ppl_of(h)}
              for h in _homogeneous_rivals(fx, table, predicted)]
    best = min(rivals, key=lambda r: r["perplexity"])
    heads = best["config"]["heads"][0]
    line = sorted(((table.predict(sp.homogeneous(m, heads)), sp.homogeneous(m, heads)) for m in sp.mlp_choices), key=lambda x: x[0])
    lo = max((x for x in line if x[0] <= predicted), default=None, key=lambda x: x[0])
    hi = min((x for x in line if x[0] >= predicted), default=None, key=lambda x: x[0])
    interp = {"perplexity": best["perplexity"], "between": [best["config"]]}
    if lo is not None and hi is not None and hi[0] > lo[0]:
        known = {ArchConfig.from_dict(r["config"]): r["perplexity"] for r in rivals}
        p_lo, p_hi = (known[c] if c in known else ppl_of(c) for c in (lo[1], hi[1]))
        w = (predicted - lo[0]) / (hi[0] - lo[0])
        interp = {"perplexity": math.exp((1 - w) * math.log(p_lo) + w * math.log(p_hi)),
                  "between": [lo[1].to_dict(), hi[1].to_dict()], "between_perplexity": [p_lo, p_hi],
                  "between_predicted_latency_s": [lo[0], hi[0]]}
    return {**best, "candidates": rivals, "interpolated": interp}


def evaluate_run(
    run_dir: str | Path,
    targets: list[float] | None = None,
    *,
    tasks: list[str] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    progress: bool = True,
) -> dict:
    """Evaluate every target: routed configuration, parameters, timed vs predicted latency,
    held-out and out-of-domain perplexity after and before training, the homogeneous
    configuration of nearest predicted latency, decode speed, and downstream tasks. Writes
    ``results.json`` and the report atomically and returns the results.

    Downstream tasks (:mod:`flextron.tasks`, scored with lm-eval): ``tasks`` at every target, or,
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
    _set_threads(cfg)
    t0 = time.time()
    original, tok = _load_original(cfg)
    inp = _inputs(cfg, tok)
    orig_ppl = _ppl(original, inp.heldout, cfg)["perplexity"]
    orig_ood = _ppl(original, inp.ood, cfg)["perplexity"]
    del original
    untrained = load_elastic(run.run_dir / "ranked")
    full_export = export_subnetwork(fx, fx.space.full())
    ids = torch.randint(0, fx.config.vocab_size, (cfg.latency.batch_size, cfg.latency.seq_len), generator=torch.Generator().manual_seed(0))
    full_decode = decode_tokens_per_s(full_export)
    rows = []
    for t in targets:
        arch = fx.set_target(t)
        sub = export_subnetwork(fx, arch)
        timing = time_models(
            {"sub": prefill_fn(sub, ids), "full": prefill_fn(full_export, ids)}, repeats=cfg.eval.latency_repeats, warmup=2
        )
        ppl = _ppl(fx, inp.heldout, cfg)
        ood = _ppl(fx, inp.ood, cfg)["perplexity"]
        untrained.set_arch(arch)
        u_ppl = _ppl(untrained, inp.heldout, cfg)["perplexity"]
        u_ood = _ppl(untrained, inp.ood, cfg)["perplexity"]
        homo = None
        if t < 1.0:
            homo = _homogeneous_baseline(fx, table, table.predict(arch), lambda h: _ppl(fx.set_arch(h), inp.heldout, cfg)["perplexity"])
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
            "ood_perplexity": ood,
            "untrained_ood_perplexity": u_ood,
            "homogeneous": homo,
            "decode_tokens_per_s": decode_tokens_per_s(sub),
            "full_decode_tokens_per_s": full_decode,
        }
        if task_plan is not None and t in task_plan["targets"]:
            row.update(_downstream(run, arch, t, task_plan))
        rows.append(row)
        log.info("target %.2f: latency %.1f ms (%.2f of full), ppl %.2f (untrained %.2f)", t, row["latency_s"] * 1e3, row["latency_ratio"], row["perplexity"], u_ppl)
        fx.set_arch(None)
    results = _results(run, rows, orig_ppl, orig_ood, time.time() - t0)
    results["exported_check"] = _exported_check(run, min(targets), ids)
    atomic_write_json(run.run_dir / "results.json", results)
    from .report import write_report

    write_report(run.run_dir, results)
    return results


def _task_plan(cfg: RunConfig, targets: list[float], tasks, limit, num_fewshot) -> dict | None:
    """What downstream evaluation to run (``None``: none); validates names and numbers early."""
    from .tasks import check_task_names

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
    from .lm_eval_model import FlextronLM, evaluate_tasks

    t0 = time.time()
    lm = FlextronLM(fx=run.fx, tokenizer=run.tokenizer, arch=arch, target=target,
                    device=next(run.fx.parameters()).device, batch_size=run.cfg.eval.task_batch_size)
    summary, _ = evaluate_tasks(lm, plan["tasks"], limit=plan["limit"], seed=run.cfg.seed, num_fewshot=plan["num_fewshot"])
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
    export_target(run.run_dir, target, out, overwrite=True, _run=run)
    sub = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    full = export_subnetwork(run.fx, run.fx.space.full())
    timing = time_models({"sub": prefill_fn(sub, ids), "full": prefill_fn(full, ids)}, repeats=run.cfg.eval.latency_repeats, warmup=2)
    return {
        "target": target,
        "path": str(out),
        "params": sum(p.numel() for p in sub.parameters()),
        "latency_s": timing["sub"]["median_s"],
        "full_latency_s": timing["full"]["median_s"],
        "speedup": 1 / paired_ratio(timing, "sub", "full"),
        "speedup_of_medians": timing["full"]["median_s"] / timing["sub"]["median_s"],
    }


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _results(run: LoadedRun, rows: list, orig_ppl: float, orig_ood: float, eval_wall: float) -> dict:
    import accelerate
    import transformers

    st = _stages(run.run_dir)
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
            "validated_configs": val.get("n"), "full_s": run.table.full, "device": run.table.device,
            "workload": run.table.workload,
        },
        "search_space": {
            "mlp_choices": list(sp.mlp_choices), "head_choices": list(sp.head_choices), "intermediate_size": sp.intermediate_size,
            "heads_per_group": sp.heads_per_group, "num_layers": sp.num_layers,
        },
        "training": {k: st[k]["summary"] for k in ("elastic", "routers", "joint") if k in st},
        "provenance": {
            "commit": _git_commit(),
            "versions": {"flextron": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                         "accelerate": accelerate.__version__, "python": platform.python_version()},
            "seed": run.cfg.seed,
            "threads": torch.get_num_threads(),
            "stages": stages,
            "total_wall_s": round(sum(v["wall_s"] for v in stages.values()), 1),
        },
    }


# --------------------------------------------------------------------------- public entry points


def run(cfg: RunConfig, *, overwrite: bool = False) -> Path:
    """Run every stage of the conversion (resumable); returns the run directory.

    Under ``accelerate launch`` (several processes; :mod:`flextron.distributed`) the training
    stages (elastic, routers, joint) run on every process, each on its share of the global batch;
    ranking, the latency table and evaluation run on the main process while the others wait.
    Whether a stage is finished is decided by the main process and sent to the others.

    Raises:
        FlextronError subclasses for bad input (config, model path, data, existing output).
    """
    state = process_state()
    main = state.is_main_process
    run_dir = Path(on_main(state, lambda: str(_prepare_run_dir(cfg, overwrite))))
    _set_threads(cfg)
    if on_main(state, lambda: all(s in _stages(run_dir) for s in STAGES)):
        if main:
            print(f"[flextron] run {run_dir} is complete; nothing to do", flush=True)
        return run_dir
    t0 = time.time()
    model, tok = _load_original(cfg)  # fails early on a bad model path or unsupported family
    del model
    inp = _inputs(cfg, tok, state.num_processes)
    log.info("inputs: calibration %s, train %s, held-out %s, ood %s (%.1f s)", tuple(inp.calibration.shape),
             tuple(inp.train.shape), tuple(inp.heldout.shape), tuple(inp.ood.shape), time.time() - t0)
    steps = {  # name: (stage, runs on every process)
        "rank": (lambda: _stage_rank(cfg, run_dir, inp), False),
        "latency": (lambda: _stage_latency(cfg, run_dir), False),
        "elastic": (lambda: _stage_elastic(cfg, run_dir, inp), True),
        "routers": (lambda: _stage_routers(cfg, run_dir, inp), True),
        "joint": (lambda: _stage_joint(cfg, run_dir, inp), True),
        "evaluate": (lambda: _stage_evaluate(run_dir), False),
    }
    for name, (fn, everywhere) in steps.items():
        if on_main(state, lambda: name in _stages(run_dir)):
            log.info("stage %s already finished; skipped", name)
            continue
        if main:
            print(f"[flextron] stage {name} ...", flush=True)
        s0 = time.time()
        summary = fn() if everywhere else on_main(state, fn)
        if main:
            _finish_stage(run_dir, name, summary, time.time() - s0)
        state.wait_for_everyone()  # the next stage reads what this one wrote
    return run_dir


def export_target(run_dir: str | Path, target: float, out_dir: str | Path, *, overwrite: bool = False, _run: LoadedRun | None = None) -> Path:
    """Export the sub-model for ``target`` as a checkpoint ``AutoModelForCausalLM`` loads
    (homogeneous: a plain config; per-layer: with ``trust_remote_code=True``).

    Raises:
        TargetError: target out of range; OutputExistsError: ``out_dir`` is not empty.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"output directory {out_dir} exists and is not empty; pass --overwrite or choose another path")
    run = _run or load_run(run_dir)
    arch = run.fx.set_target(target)
    sub = export_subnetwork(run.fx, arch)
    meta = {"target": target, "config": arch.to_dict(), "params": run.fx.space.num_parameters(arch),
            "predicted_latency_s": run.table.predict(arch), "predicted_fraction": run.table.fraction(arch)}
    run.fx.set_arch(None)
    return save_subnetwork(sub, out_dir, tokenizer=run.tokenizer, metadata=meta, overwrite=overwrite)


def generate_text(run_dir: str | Path, target: float, prompt: str, *, max_new_tokens: int = 64) -> str:
    """Greedy generation with the routed sub-network for ``target``; returns the new text."""
    run = load_run(run_dir)
    run.fx.set_target(target)
    enc = run.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    if enc["input_ids"].shape[1] == 0:
        raise ConfigError("the prompt is empty; give some text to continue")
    out = run.fx.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return run.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


__all__ = ["run", "evaluate_run", "export_target", "generate_text", "load_run", "STAGES", "FlextronError"]
