"""Training of dynamic routers (METHOD §6–§8 for input-adaptive routing): through the surrogate
first, a direct LM-loss fallback when its gate never opens, optional joint fine-tuning, and the
price calibration of :mod:`flextron.routing.calibrate`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flextron.config import DynamicConfig
from flextron.errors import DataError
from flextron.model.elastic import ElasticModel
from flextron.model.scoring import block_nll
from flextron.routing.calibrate import calibrate_price, choice_statistics, timed_budgets
from flextron.routing.deploy import TargetRouter
from flextron.routing.dynamic_router import DynamicRouter
from flextron.routing.router import latency_loss
from flextron.routing.runtime import DynamicRouting
from flextron.routing.store import MODEL_DIR, save_dynamic
from flextron.routing.surrogate import Surrogate, SurrogateFit
from flextron.train.checkpoint import MetricsLog
from flextron.train.losses import lm_kd_loss

log = logging.getLogger(__name__)


def _tau(cfg: DynamicConfig, step: int, steps: int) -> float:
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, steps - 1))


def _draw(
    cfg: DynamicConfig, router: DynamicRouter, pool: torch.Tensor, gen: torch.Generator
) -> tuple[int, float, torch.Tensor]:
    """One step's target (index into the router's targets, value; never 1.0) and batch indices ``(B,)``."""
    cands = [j for j, t in enumerate(router.trained_targets) if t < 1.0]
    j = cands[int(torch.randint(len(cands), (1,), generator=gen))]
    idx = torch.randint(pool.shape[0], (cfg.batch_size,), generator=gen)
    return j, router.trained_targets[j], idx


def _dual_step(router: DynamicRouter, j: int, mean_frac: float, t: float, lr: float) -> None:
    """Dual ascent on the latency price of target ``j``: up while the batch average is over ``t``."""
    router.price[j] += lr * (mean_frac / t - 1)


def _record(
    metrics: MetricsLog,
    stage: str,
    step: int,
    t: float,
    frac: torch.Tensor,
    r: DynamicRouting,
    router: DynamicRouter,
    **extra,
) -> dict:
    m, h = r.stacked()  # (B, L, K) one-hot (per token: shares)
    stats = choice_statistics(m.detach(), h.detach(), router.n_mlp, router.n_heads)
    mean = float(frac.detach().mean())
    rec = {
        "stage": stage,
        "step": step,
        "target": t,
        "mean_fraction": mean,
        "latency_error": mean / t - 1,
        "choice_entropy_nats": stats["entropy_nats"],
        "input_independent_layers": stats["input_independent_layers"],
        **extra,
    }
    metrics.write(**rec)
    return rec


def _full_nll(fx: ElasticModel, pool: torch.Tensor, batch_size: int) -> torch.Tensor:
    fx.set_arch(None)
    return torch.tensor(block_nll(fx, pool, batch_size=batch_size, progress=False)["nll_per_block"])  # (N,)


def train_through_surrogate(
    fx: ElasticModel,
    router: DynamicRouter,
    surrogate: Surrogate,
    table,
    pool: torch.Tensor,
    cfg: DynamicConfig,
    metrics: MetricsLog,
    *,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Stage 2 with the LLM frozen (see the module docstring); ``pool``: token blocks ``(N, T)``
    from every domain. Returns a summary (steps with a surrogate gradient, the surrogate's held-out
    MAE/Spearman, LLM evaluations, wall time)."""
    sp, device = fx.space, next(fx.parameters()).device
    fx.eval()
    for p in fx.parameters():
        p.requires_grad_(False)
    full = _full_nll(fx, pool, cfg.batch_size)
    fit = SurrogateFit(surrogate, lr=cfg.surrogate_lr)
    opt = torch.optim.Adam([p for p in router.parameters() if p.requires_grad], lr=cfg.router_lr)
    held: list[tuple] = []
    total = cfg.heldout_steps + cfg.warmup_steps + cfg.steps
    grad_steps, evals, ev, t0 = 0, 0, {}, time.time()
    bar = tqdm(range(total), desc="dynamic: routers (surrogate)", disable=not progress)
    for step in bar:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        j, t, idx = _draw(cfg, router, pool, gen)
        batch = pool[idx].to(device)
        tau = _tau(cfg, step, total)
        with DynamicRouting(fx, router, t, tau=tau, generator=gen, per_token=cfg.per_token, grad=True) as r:
            nll = torch.tensor(block_nll(fx, batch, batch_size=batch.shape[0], progress=False)["nll_per_block"])
            mlp_c, head_c = r.stacked()  # (B, L, K), straight-through, with grad to the router
        evals += batch.shape[0]
        delta, feats = nll - full[idx], full[idx][:, None]
        frac = table.expected(mlp_c, head_c, sp.mlp_choices, sp.head_choices) / table.full  # (B,)
        if step < cfg.heldout_steps:  # the surrogate's held-out set: inputs and configurations it never trains on
            held.append((mlp_c.detach(), head_c.detach(), delta, feats))
            if step + 1 == cfg.heldout_steps:
                fit.set_heldout(*(torch.cat([h[i] for h in held]) for i in range(4)))
            _record(metrics, "dynamic_routers", step, t, frac, r, router, phase="heldout")
            continue
        for b in range(batch.shape[0]):
            fit.add(mlp_c[b], head_c[b], float(delta[b]), feats[b])
        fit.fit(cfg.surrogate_updates, gen=gen)
        ev = fit.evaluate()
        gate = ev["heldout_spearman"] >= cfg.gate_spearman and ev["heldout_relative_error"] <= cfg.gate_error
        mean = frac.mean()
        loss = cfg.latency_weight * latency_loss(mean[None], torch.tensor([t], dtype=mean.dtype), cfg.latency_tol).sum()
        sm_term = torch.zeros(())
        if gate and step >= cfg.heldout_steps + cfg.warmup_steps:
            surrogate.eval()
            sm_term = surrogate(mlp_c, head_c, feats.to(mlp_c.dtype)).mean()
            loss = loss + sm_term
            grad_steps += 1
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            opt.step()
        _dual_step(router, j, float(mean.detach()), t, cfg.dual_lr)
        rec = _record(
            metrics,
            "dynamic_routers",
            step,
            t,
            frac,
            r,
            router,
            phase="train",
            tau=tau,
            router_loss=float(loss.detach()),
            surrogate_term=float(sm_term.detach()),
            lm_delta=float(delta.mean()),
            price=float(router.price[j]),
            surrogate_spearman=ev["heldout_spearman"],
            surrogate_relative_error=ev["heldout_relative_error"],
            surrogate_gate_open=gate,
            router_steps_with_surrogate_grad=grad_steps,
        )
        bar.set_postfix(lat_err=f"{rec['latency_error']:+.3f}", rho=f"{ev['heldout_spearman']:.2f}")
    return {
        "steps": cfg.steps,
        "warmup_steps": cfg.warmup_steps,
        "heldout_steps": cfg.heldout_steps,
        "router_steps_with_surrogate_grad": grad_steps,
        "llm_evaluations": evals,
        "surrogate_heldout_mae": ev.get("heldout_mae"),
        "surrogate_spearman": ev.get("heldout_spearman"),
        "surrogate_relative_error": ev.get("heldout_relative_error"),
        "wall_s": round(time.time() - t0, 1),
    }


def train_through_masks(
    fx: ElasticModel,
    router: DynamicRouter,
    table,
    pool: torch.Tensor,
    cfg: DynamicConfig,
    metrics: MetricsLog,
    *,
    steps: int,
    train_model: bool,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Router (and, with ``train_model``, model) training on the LM loss through soft masks
    (METHOD §3 masked form): the direct-gradient ablation of §7 (``train_model=False``) or joint
    fine-tuning of §8 (``train_model=True``, router lr ``cfg.router_lr``, model lr ``cfg.model_lr``),
    with λ · latency loss on the batch average and the dual price update. Returns a summary."""
    sp, device = fx.space, next(fx.parameters()).device
    stage = "dynamic_joint" if train_model else "dynamic_direct"
    for p in fx.parameters():
        p.requires_grad_(train_model)
    groups = [{"params": [p for p in router.parameters() if p.requires_grad], "lr": cfg.router_lr}]
    if train_model:
        groups.append({"params": list(fx.parameters()), "lr": cfg.model_lr})
        fx.train()
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    t0 = time.time()
    for step in tqdm(range(steps), desc=f"dynamic: {stage}", disable=not progress):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 500_000 + step)
        j, t, idx = _draw(cfg, router, pool, gen)
        batch = pool[idx].to(device)
        tau = _tau(cfg, step, steps) if not train_model else cfg.tau_end
        with DynamicRouting(fx, router, t, tau=tau, generator=gen, masked=True, grad=True) as r:
            logits = fx(input_ids=batch, use_cache=False).logits  # (B, T, V)
            mlp_c, head_c = r.stacked()
        lm = lm_kd_loss(logits, batch, None, 0.0)[0]
        frac = table.expected(mlp_c, head_c, sp.mlp_choices, sp.head_choices) / table.full  # (B,)
        mean = frac.mean()
        lat = latency_loss(mean[None], torch.tensor([t], dtype=mean.dtype), cfg.latency_tol).sum()
        loss = lm + cfg.latency_weight * lat
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train_model:
            torch.nn.utils.clip_grad_norm_(fx.parameters(), 1.0)
        opt.step()
        _dual_step(router, j, float(mean.detach()), t, cfg.dual_lr)
        _record(
            metrics,
            stage,
            step,
            t,
            frac,
            r,
            router,
            tau=tau,
            router_loss=float(loss.detach()),
            lm_loss=float(lm.detach()),
            price=float(router.price[j]),
        )
        del logits
    fx.eval()
    for p in fx.parameters():
        p.requires_grad_(False)
    return {"steps": steps, "wall_s": round(time.time() - t0, 1)}


def train_dynamic(
    fx: ElasticModel,
    static: TargetRouter,
    table,
    pool: torch.Tensor,
    cfg: DynamicConfig,
    out_dir: str | Path,
    *,
    calibration: torch.Tensor | None = None,
    seed: int = 0,
    tokenizer=None,
    progress: bool = True,
) -> tuple[DynamicRouter, dict]:
    """The whole dynamic-router stage (module docstring): warm start from ``static``, training
    (surrogate or direct), optional joint fine-tuning, price calibration on ``calibration``
    blocks (default: the first ``cfg.calibrate_blocks`` of ``pool``), then :func:`save_dynamic`
    to ``out_dir``. ``pool``: training blocks ``(N, T)``. Metrics go to ``out_dir/metrics.jsonl``.
    With joint fine-tuning ``fx`` changes in place and is saved (with ``tokenizer``) to
    ``out_dir/model``, which :func:`flextron.eval.dynamic.load_dynamic_run` then loads.

    Returns the router and the summary written to ``dynamic.json``.

    Raises:
        DataError: fewer than ``cfg.batch_size`` blocks; TargetError: a target below the model's floor.
    """
    if pool.dim() != 2 or pool.shape[0] < cfg.batch_size:
        raise DataError(
            f"dynamic router training needs token blocks (N >= batch_size={cfg.batch_size}, T), got {tuple(pool.shape)}"
        )
    for t in cfg.targets:
        static.check_target(t)
    out_dir = Path(out_dir)
    metrics = MetricsLog(out_dir / "metrics.jsonl")
    for stage in ("dynamic_routers", "dynamic_direct", "dynamic_joint"):
        metrics.truncate(stage, -1)
    torch.manual_seed(seed)
    dtype = next(fx.parameters()).dtype
    every = min(cfg.route_every, fx.space.num_layers)  # a model with fewer layers: one read for all of them
    router = DynamicRouter.from_static(static, cfg.targets, cfg.hidden, cfg.anchor_scale, every).to(dtype)
    sp = fx.space
    surrogate = Surrogate(sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), cfg.surrogate_hidden, n_features=1)
    t0 = time.time()
    summary: dict = {"config": asdict(cfg), "seed": seed, "blocks": list(pool.shape)}
    if cfg.surrogate:
        warm = {k: v.clone() for k, v in router.state_dict().items()}
        summary["routers"] = train_through_surrogate(
            fx, router, surrogate, table, pool, cfg, metrics, seed=seed, progress=progress
        )
        if summary["routers"]["router_steps_with_surrogate_grad"] == 0 and cfg.fallback_steps and not cfg.per_token:
            log.warning(
                "dynamic routers: the surrogate never passed its gate (held-out Spearman %s); the router restarts from "
                "its warm start with %d direct LM-loss steps",
                summary["routers"]["surrogate_spearman"],
                cfg.fallback_steps,
            )
            router.load_state_dict(warm)  # the latency-only steps are discarded
            summary["fallback"] = train_through_masks(
                fx,
                router,
                table,
                pool,
                cfg,
                metrics,
                steps=cfg.fallback_steps,
                train_model=False,
                seed=seed,
                progress=progress,
            )
        elif summary["routers"]["router_steps_with_surrogate_grad"] == 0:
            log.warning(
                "dynamic routers: the surrogate never passed its gate, so the router learned from the latency term only%s",
                " (per-token routing has no direct fallback)" if cfg.per_token else "",
            )
    else:
        summary["routers"] = train_through_masks(
            fx, router, table, pool, cfg, metrics, steps=cfg.steps, train_model=False, seed=seed, progress=progress
        )
    if cfg.joint_steps:
        summary["joint"] = train_through_masks(
            fx, router, table, pool, cfg, metrics, steps=cfg.joint_steps, train_model=True, seed=seed, progress=progress
        )
        from flextron.model.export import save_elastic

        save_elastic(fx, out_dir / MODEL_DIR, tokenizer=tokenizer, overwrite=True)
        summary["model"] = MODEL_DIR
    cal = pool[: cfg.calibrate_blocks] if calibration is None else calibration
    summary["price_before_calibration"] = router.price.tolist()
    summary["calibration"] = calibrate_price(
        fx,
        router,
        table,
        cal,
        batch_size=cfg.batch_size,
        iters=cfg.calibrate_iters,
        per_token=cfg.per_token,
        progress=progress,
    )
    if cfg.timing_repeats and not cfg.per_token:
        summary["timing"], budgets = timed_budgets(
            fx, router, table, cal[:1].to(next(fx.parameters()).device), cfg.timing_repeats, progress=progress
        )
        summary["calibration"] = calibrate_price(
            fx,
            router,
            table,
            cal,
            batch_size=cfg.batch_size,
            iters=cfg.calibrate_iters,
            budgets=budgets,
            progress=progress,
        )
    summary["wall_s"] = round(time.time() - t0, 1)
    save_dynamic(out_dir, router, surrogate, summary)
    log.info(
        "dynamic routers: calibrated average latency %s",
        {k: round(v["mean_fraction"], 4) for k, v in summary["calibration"].items()},
    )
    return router, summary
