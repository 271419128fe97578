"""Training of dynamic (input-adaptive) routers (METHOD §6–§8), resumable, through the one
router-training loop of :mod:`flextron.train.router_loop`.

Input: the trained elastic model (frozen here), its deployed static router (the warm start:
:meth:`~flextron.routing.dynamic_router.DynamicRouter.from_static`), the lookup table and token
blocks ``(N, T)`` of several domains. Output: the dynamic router and its surrogate
(:func:`~flextron.routing.store.save_dynamic`), metrics in ``out_dir/metrics.jsonl``, checkpoints
in ``ckpt_dir``.

Phases, as in static router training (its behaviour is the reference where they differed):

1. **Warm-up**: the full model's loss on every block (the surrogate's input feature), a held-out
   set of ``heldout_steps`` routed batches and a warm-up buffer of ``warmup_steps`` batches, all
   at the warm start; the surrogate's first fit.
2. **Steps** (``steps``): a target and ``batch_size`` inputs per step, straight-through Gumbel
   choices at a temperature falling from ``tau_start`` to ``tau_end``; through the surrogate once
   its gate opens, or (``surrogate=False``, the ablation) through the LM loss with soft masks. The
   latency loss is on the batch's average expected latency: inputs share a budget.
3. **Validation** against the warm start (the static loop's keep-better check): both are
   calibrated (the price β fitted by bisection so that the average predicted latency meets every
   target) and the one of lower routed LM loss on the calibration blocks is kept.
4. Optional **joint fine-tuning** of the router and the model (``joint_steps``, METHOD §8).
5. **Calibration** on this device: the price again, then, with ``timing_repeats``, on budgets
   scaled by timed / predicted latency so that the *timed* latency meets the target.

A checkpoint is written after the warm-up, every ``checkpoint_every`` steps, after validation,
after joint fine-tuning and after the timing; a rerun resumes from the newest one and ends with
the same router as an uninterrupted run (the timed budgets, once measured, are reused).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from flextron.config import DynamicConfig, JointConfig
from flextron.errors import DataError, ModelError
from flextron.model.elastic import ElasticModel
from flextron.model.export import load_elastic, save_elastic
from flextron.model.scoring import block_nll
from flextron.routing.calibrate import calibrate_price, choice_statistics, timed_budgets
from flextron.routing.deploy import TargetRouter
from flextron.routing.dynamic_router import DynamicRouter
from flextron.routing.runtime import DynamicRouting
from flextron.routing.store import MODEL_DIR, save_dynamic
from flextron.routing.surrogate import Surrogate, SurrogateFit
from flextron.train.checkpoint import MetricsLog, StageCheckpoints, deferred_interrupt
from flextron.train.distributed import make_accelerator
from flextron.train.joint import train_joint
from flextron.train.loop import data_sha256, run_steps
from flextron.train.losses import lm_kd_loss
from flextron.train.router_loop import (
    RouterDraw,
    RouterObjective,
    add_measurements,
    router_postfix,
    router_update,
    tau_at,
)

log = logging.getLogger(__name__)

STAGES = ("dynamic_routers", "dynamic_joint")  # metrics stages of this module


def _draw_inputs(cfg: DynamicConfig, router: DynamicRouter, pool: torch.Tensor, gen: torch.Generator):
    """One step's target (one of the router's trained targets, never 1.0) and batch indices ``(B,)``."""
    cands = [t for t in router.trained_targets if t < 1.0]
    t = cands[int(torch.randint(len(cands), (1,), generator=gen))]
    return t, torch.randint(pool.shape[0], (cfg.batch_size,), generator=gen)


def _step_gen(seed: int, step: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + salt + step)


def draw_dynamic(
    fx: ElasticModel,
    router: DynamicRouter,
    pool: torch.Tensor,
    full: torch.Tensor,
    cfg: DynamicConfig,
    gen: torch.Generator,
    tau: float,
    *,
    direct: bool = False,
) -> RouterDraw:
    """Route ``cfg.batch_size`` inputs of ``pool`` (N, T) at one drawn target with straight-through
    Gumbel choices: ``delta`` = each input's NLL at its routed sub-network − its full-model NLL
    (``full`` (N,)), ``features`` = the full-model NLL ``(B, 1)``; ``direct``: the LM loss through
    soft masks instead (gradient to the router), no measurement."""
    t, idx = _draw_inputs(cfg, router, pool, gen)
    batch = pool[idx].to(next(fx.parameters()).device)
    targets = torch.full((batch.shape[0],), t)
    if direct:
        with DynamicRouting(fx, router, t, tau=tau, generator=gen, masked=True, grad=True) as r:
            lm = lm_kd_loss(fx(input_ids=batch, use_cache=False).logits, batch, None, 0.0)[0]
            mlp_c, head_c = r.stacked()
        rec = {"lm_loss": float(lm.detach())}
        out = RouterDraw(targets, mlp_c, head_c, lm=lm)
    else:
        with DynamicRouting(fx, router, t, tau=tau, generator=gen, per_token=cfg.per_token, grad=True) as r:
            nll = torch.tensor(block_nll(fx, batch, batch_size=batch.shape[0], progress=False)["nll_per_block"])
            mlp_c, head_c = r.stacked()  # (B, L, K), straight-through, with grad to the router
        delta = nll - full[idx]
        rec = {"lm_delta": float(delta.mean())}
        out = RouterDraw(targets, mlp_c, head_c, delta=delta, features=full[idx][:, None])
    stats = choice_statistics(mlp_c.detach(), head_c.detach(), router.n_mlp, router.n_heads)
    out.record = {
        **rec,
        "target": t,
        "tau": tau,
        "choice_entropy_nats": stats["entropy_nats"],
        "input_independent_layers": stats["input_independent_layers"],
    }
    return out


@torch.no_grad()
def routed_nll(
    fx: ElasticModel, router: DynamicRouter, blocks: torch.Tensor, batch_size: int, per_token: bool
) -> float:
    """Mean over the router's targets < 1 of the token-mean NLL (nats) of argmax routing on ``blocks``."""
    ts = [t for t in router.trained_targets if t < 1.0]
    out = []
    for t in ts:
        with DynamicRouting(fx, router, t, per_token=per_token):
            out.append(block_nll(fx, blocks, batch_size=batch_size, progress=False)["nll"])
    return sum(out) / len(out)


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
    ckpt_dir: str | Path | None = None,
    progress: bool = True,
) -> tuple[DynamicRouter, dict]:
    """The whole dynamic-router stage (module docstring): warm start from ``static``, the steps,
    validation against the warm start, optional joint fine-tuning, calibration on ``calibration``
    blocks (default: the first ``cfg.calibrate_blocks`` of ``pool``), then
    :func:`~flextron.routing.store.save_dynamic` to ``out_dir``. Checkpoints go to ``ckpt_dir``
    (default ``out_dir/checkpoints/dynamic_routers``; joint fine-tuning's to
    ``out_dir/checkpoints/dynamic_joint``); a rerun resumes from the newest. With joint fine-tuning
    ``fx`` changes in place and is saved (with ``tokenizer``) to ``out_dir/model``.

    Returns the router and the summary written to its manifest.

    Raises:
        DataError: fewer than ``cfg.batch_size`` blocks; TargetError: a target below the model's floor;
        ModelError: a checkpoint to resume that is corrupt or was written with other settings.
    """
    if pool.dim() != 2 or pool.shape[0] < cfg.batch_size:
        raise DataError(
            f"dynamic router training needs token blocks (N >= batch_size={cfg.batch_size}, T), got {tuple(pool.shape)}"
        )
    for t in cfg.targets:
        static.check_target(t)
    out_dir = Path(out_dir)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else out_dir / "checkpoints" / "dynamic_routers"
    sp, device = fx.space, next(fx.parameters()).device
    fx.eval()
    for p in fx.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)
    every = min(cfg.route_every, sp.num_layers)  # a model with fewer layers: one read for all of them
    router = DynamicRouter.from_static(static, cfg.targets, cfg.hidden, cfg.anchor_scale, every).to(
        next(fx.parameters()).dtype
    )
    warm = {k: v.clone() for k, v in router.state_dict().items()}
    surrogate = Surrogate(sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), cfg.surrogate_hidden, n_features=1)
    fit = SurrogateFit(surrogate, lr=cfg.surrogate_lr)
    opt = torch.optim.Adam([p for p in router.parameters() if p.requires_grad], lr=cfg.router_lr)
    gen = torch.Generator().manual_seed(seed + 17)  # the surrogate's minibatches
    cal = (pool[: cfg.calibrate_blocks] if calibration is None else calibration).to(device)
    acc = make_accelerator()
    metrics = MetricsLog(out_dir / "metrics.jsonl")
    settings = {
        **{k: v for k, v in asdict(cfg).items() if k != "checkpoint_every"},
        "seed": seed,
        "data_sha256": data_sha256(pool),
        "calibration_sha256": data_sha256(cal.cpu()),
    }
    ckpt = StageCheckpoints(
        ckpt_dir,
        acc,
        {"router": router, "surrogate": surrogate},
        {"router_optimizer": opt, "surrogate_optimizer": fit.opt},
        settings,
    )
    # what the stage carries from phase to phase (JSON), saved in its checkpoints
    run: dict = {
        "phase": "steps",
        "evals": 0,
        "grad_steps": 0,
        "summary": {"config": asdict(cfg), "seed": seed, "blocks": list(pool.shape)},
    }
    full = torch.zeros(0)
    budgets: dict | None = None
    objective = RouterObjective(
        cfg.latency_weight,
        cfg.latency_tol,
        cfg.gate_spearman,
        cfg.gate_error,
        cfg.surrogate_updates,
        surrogate=cfg.surrogate,
        average_latency=True,
    )

    def save(step: int) -> None:
        tensors = {**fit.state_tensors(), "generator": gen.get_state(), "full_nll": full}
        if budgets is not None:
            tensors["budget_targets"] = torch.tensor(list(budgets), dtype=torch.float64)
            tensors["budget_values"] = torch.tensor(list(budgets.values()), dtype=torch.float64)
        ckpt.save(step, {"run": run}, tensors)

    def calibrate(budgets: dict | None = None, show: bool = False) -> dict:
        """The price of every target fitted on ``cal`` (on ``budgets`` of predicted latency, if given)."""
        return calibrate_price(
            fx,
            router,
            table,
            cal,
            batch_size=cfg.batch_size,
            iters=cfg.calibrate_iters,
            per_token=cfg.per_token,
            budgets=budgets,
            progress=show and progress,
        )

    t0 = time.time()
    with deferred_interrupt() as interrupt:
        state = ckpt.resume()
        if state is None:
            for stage in STAGES:
                metrics.truncate(stage, -1)
            shutil.rmtree(out_dir / "checkpoints" / "dynamic_joint", ignore_errors=True)  # of an earlier start
            fx.set_arch(None)
            full = torch.tensor(
                block_nll(fx, pool.to(device), batch_size=cfg.batch_size, progress=False)["nll_per_block"]
            )
            heldout = [
                draw_dynamic(fx, router, pool, full, cfg, _step_gen(seed, i, 900_000), cfg.tau_start)
                for i in tqdm(range(cfg.heldout_steps), desc="dynamic: held-out", disable=not progress)
            ]
            fit.set_heldout(
                *(torch.cat([getattr(d, k).detach() for d in heldout]) for k in ("mlp", "heads", "delta")),
                torch.cat([d.features for d in heldout]),
            )
            for i in tqdm(range(cfg.warmup_steps), desc="dynamic: warm-up", disable=not progress):
                add_measurements(
                    fit, draw_dynamic(fx, router, pool, full, cfg, _step_gen(seed, i, 800_000), cfg.tau_start)
                )
            fit.fit(cfg.surrogate_updates * 10, gen=gen)
            run["evals"] = (cfg.heldout_steps + cfg.warmup_steps) * cfg.batch_size + len(pool)
            save(0)
            if interrupt.requested:
                raise KeyboardInterrupt(
                    f"dynamic routers interrupted after the warm-up; checkpoint saved in {ckpt.root}"
                )
        else:
            try:
                run.update(state["run"])
                fit.load_state_tensors(state["tensors"])
                gen.set_state(state["tensors"]["generator"])
                full = state["tensors"]["full_nll"]
                if "budget_targets" in state["tensors"]:
                    budgets = dict(
                        zip(state["tensors"]["budget_targets"].tolist(), state["tensors"]["budget_values"].tolist())
                    )
            except (KeyError, ValueError, TypeError, RuntimeError) as e:
                raise ModelError(
                    f"checkpoint {ckpt.root} lacks the dynamic stage's state ({type(e).__name__}: {e}); "
                    f"delete {ckpt.root} to restart this stage"
                ) from None
        start = state["step"] if state else 0
        summary = run["summary"]
        if state is not None:
            summary.setdefault("resumed", []).append({"phase": run["phase"], "step": start})
        if run["phase"] == "steps":
            metrics.truncate("dynamic_routers", start - 1)
            router.train()

            def step_fn(step: int) -> dict:
                d = draw_dynamic(
                    fx,
                    router,
                    pool,
                    full,
                    cfg,
                    _step_gen(seed, step, 0),
                    tau_at(step, cfg.steps, cfg.tau_start, cfg.tau_end),
                    direct=not cfg.surrogate,
                )
                rec = router_update(
                    d, opt=opt, fit=fit, surrogate=surrogate, table=table, space=sp, objective=objective, gen=gen
                )
                run["evals"] += 0 if d.delta is None else len(d.delta)
                run["grad_steps"] += int(rec["surrogate_grad"])
                return {**d.record, **rec, "router_steps_with_surrogate_grad": run["grad_steps"]}

            run_steps(
                stage="dynamic_routers",
                start=start,
                steps=cfg.steps,
                step_fn=step_fn,
                save=save,
                checkpoint_every=cfg.checkpoint_every,
                interrupt=interrupt,
                accelerator=acc,
                metrics=metrics,
                progress=progress,
                where=f"in {ckpt.root}",
                postfix=router_postfix,
            )
            router.eval()
            ev = fit.evaluate()
            summary["routers"] = {
                "steps": cfg.steps,
                "warmup_steps": cfg.warmup_steps,
                "heldout_steps": cfg.heldout_steps,
                "router_steps_with_surrogate_grad": run["grad_steps"],
                "llm_evaluations": run["evals"],
                "surrogate_heldout_mae": ev["heldout_mae"],
                "surrogate_spearman": ev["heldout_spearman"],
                "surrogate_relative_error": ev["heldout_relative_error"],
            }
            if cfg.surrogate and run["grad_steps"] == 0:
                log.warning(
                    "dynamic routers: the surrogate never passed its gate (held-out Spearman %.3f); the router "
                    "learned from the latency term only",
                    ev["heldout_spearman"],
                )
            # 3) validation against the warm start, both calibrated on the predicted latency
            trained = {k: v.clone() for k, v in router.state_dict().items()}
            scores = {}
            for name, sd in (("warm_start", warm), ("trained", trained)):
                router.load_state_dict(sd)
                calibrate()
                scores[name] = routed_nll(fx, router, cal, cfg.batch_size, cfg.per_token)
            kept = "trained" if scores["trained"] < scores["warm_start"] else "warm_start"
            router.load_state_dict(trained if kept == "trained" else warm)
            summary["validation"] = {"nll": scores, "kept": kept, "blocks": len(cal)}
            log.info(
                "dynamic routers: routed NLL %.4f (trained) vs %.4f (warm start) on %d blocks; kept %s",
                scores["trained"],
                scores["warm_start"],
                len(cal),
                kept,
            )
            run["phase"] = "joint" if cfg.joint_steps else "calibrate"
            save(cfg.steps + 1)
        if run["phase"] == "joint":
            joint = JointConfig(
                steps=cfg.joint_steps,
                batch_size=cfg.batch_size,
                seq_len=pool.shape[1],
                model_lr=cfg.model_lr,
                router_lr=cfg.router_lr,
                kd_alpha=0.0,
                checkpoint_every=cfg.checkpoint_every,
            )
            summary["joint"] = train_joint(
                fx,
                None,
                router,
                table,
                pool,
                joint,
                cfg,
                out_dir,
                seed=seed,
                accelerator=acc,
                progress=progress,
                stage="dynamic_joint",
            )
            fx.set_arch(None)
            save_elastic(fx, out_dir / MODEL_DIR, tokenizer=tokenizer, overwrite=True)
            summary["model"] = MODEL_DIR
            run["phase"] = "calibrate"
            save(cfg.steps + 2)
        elif cfg.joint_steps:  # resumed after joint fine-tuning: its weights
            fx.load_state_dict(load_elastic(out_dir / MODEL_DIR).state_dict())
        # 5) calibration on this device
        summary["calibration"] = calibrate(show=True)
        if cfg.timing_repeats and not cfg.per_token:
            if budgets is None:
                summary["timing"], budgets = timed_budgets(
                    fx, router, table, cal[:1], cfg.timing_repeats, progress=progress
                )
                save(cfg.steps + 3)
            router.anchor_to(static, budgets)  # the anchors follow the budgets; the price fine-tunes
            summary["calibration"] = calibrate(budgets, show=True)
    summary["wall_s"] = round(time.time() - t0, 1)
    save_dynamic(out_dir, router, surrogate, summary)
    log.info(
        "dynamic routers: calibrated average latency %s",
        {k: round(v["mean_fraction"], 4) for k, v in summary["calibration"].items()},
    )
    return router, summary
