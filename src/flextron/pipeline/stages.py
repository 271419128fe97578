"""The stages of a run, one function each: what each reads from and writes to the run directory
(rank → ``ranked/``, latency → ``latency_table.json``, elastic → ``elastic/``, routers →
``routers/``, joint → ``final/`` and ``final_routers/``). Orchestrated by :mod:`flextron.pipeline.runner`.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

from flextron.config import RunConfig
from flextron.cost.measure import measure_latency_table, validate_latency_table
from flextron.cost.table import CostTable, check_targets
from flextron.data.inputs import Inputs
from flextron.eval.perplexity import perplexity_of
from flextron.model.elastic import convert
from flextron.model.export import load_elastic, load_original, save_elastic
from flextron.model.ranking import apply_permutation, compute_importance, make_permutation
from flextron.routing.store import load_routers, new_router, save_routers
from flextron.train.distributed import make_accelerator
from flextron.train.elastic import train_elastic
from flextron.train.guard import TrainingGuard
from flextron.train.joint import train_joint
from flextron.train.routers import train_routers

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- stages


def stage_rank(cfg: RunConfig, run_dir: Path, inp: Inputs) -> dict:
    model, _ = load_original(cfg)
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
        ablation[ordering] = perplexity_of(fx, inp.heldout, cfg)["perplexity"]
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
        "bos": inp.bos.to_dict(),  # the BOS policy every token block of the run was built under
        "ablation": {"mlp_width": width, "mlp_fraction": width / fx.space.intermediate_size, "perplexity": ablation},
    }


def configured_targets(cfg: RunConfig) -> dict[str, tuple[float, ...]]:
    """Every latency target of the config, by field: routers, evaluation and dynamic targets."""
    out = {"routers.targets": cfg.routers.targets, "eval.targets": cfg.eval.targets}
    if cfg.dynamic is not None:
        out["dynamic.targets"] = cfg.dynamic.targets
    return out


def stage_latency(cfg: RunConfig, run_dir: Path) -> dict:
    """The lookup table (``latency_table.json``), then every configured target checked against its
    floor (:func:`~flextron.cost.table.check_targets`; on failure the table stays for inspection
    and the stage is not recorded as finished, so a rerun measures again).

    Raises:
        TargetError: a configured target below the smallest sub-network's predicted latency.
        MeasurementError: the machine was busy while measuring (``latency.allow_busy`` accepts it).
    """
    fx = load_elastic(run_dir / "ranked")
    if cfg.latency.budget == "params":
        table = CostTable.from_parameters(fx.space)
    else:
        table = measure_latency_table(fx, cfg.latency)
        if cfg.latency.validate_configs:
            table.validation = validate_latency_table(fx, table, cfg.latency, cfg.latency.validate_configs, cfg.seed)
    table.save(run_dir / "latency_table.json")
    check_targets(table, fx.space, configured_targets(cfg), f"table {run_dir / 'latency_table.json'}")
    val = table.validation or {}
    return {
        "unit": table.unit,
        "full_s": table.full,
        "mape_fraction_pct": val.get("mape_fraction"),
        "adjusted": len(table.adjusted),
    }


def _teacher(run_dir: Path, alpha: float):
    if alpha == 0:
        return None
    teacher = load_elastic(run_dir / "ranked").model
    teacher.eval().requires_grad_(False)
    return teacher


def stage_elastic(cfg: RunConfig, run_dir: Path, inp: Inputs) -> dict:
    fx = load_elastic(run_dir / "ranked")
    table = CostTable.load(run_dir / "latency_table.json")
    acc = make_accelerator(cfg.train.grad_accum)
    summary = train_elastic(
        fx,
        _teacher(run_dir, cfg.train.kd_alpha),
        inp.train,
        cfg.train,
        table,
        run_dir,
        seed=cfg.seed,
        accelerator=acc,
        min_fraction=min(cfg.routers.targets),
        guard=TrainingGuard(
            fx,
            inp.guard,
            cfg.guard,
            "elastic",
            f"lower train.lr (now {cfg.train.lr:g}) or raise train.warmup_steps, train.batch_size or train.grad_accum",
        ),
    )
    if acc.is_main_process:
        save_elastic(fx, run_dir / "elastic", tokenizer=inp.tokenizer, overwrite=True)
    return summary


def stage_routers(cfg: RunConfig, run_dir: Path, inp: Inputs) -> dict:
    fx = load_elastic(run_dir / "elastic")
    table = CostTable.load(run_dir / "latency_table.json")
    router, sm = new_router(cfg, fx)
    acc = make_accelerator()
    summary = train_routers(fx, router, sm, table, inp.router, cfg.routers, run_dir, seed=cfg.seed, accelerator=acc)
    if acc.is_main_process:
        save_routers(run_dir / "routers", router, sm)
    return summary


def stage_joint(cfg: RunConfig, run_dir: Path, inp: Inputs) -> dict:
    fx = load_elastic(run_dir / "elastic")
    table = CostTable.load(run_dir / "latency_table.json")
    router, sm = load_routers(run_dir / "routers", cfg, fx)
    acc = make_accelerator(cfg.joint.grad_accum)
    summary = train_joint(
        fx,
        _teacher(run_dir, cfg.joint.kd_alpha),
        router,
        table,
        inp.train,
        cfg.joint,
        cfg.routers,
        run_dir,
        seed=cfg.seed,
        accelerator=acc,
        guard=TrainingGuard(
            fx,
            inp.guard,
            cfg.guard,
            "joint",
            f"lower joint.model_lr (now {cfg.joint.model_lr:g}) or raise joint.batch_size or joint.grad_accum",
            also={"router": router},
        ),
    )
    if acc.is_main_process:
        save_elastic(fx, run_dir / "final", tokenizer=inp.tokenizer, overwrite=True)
        save_routers(run_dir / "final_routers", router, sm)
    return summary
