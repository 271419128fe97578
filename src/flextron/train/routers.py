"""Stage 5: static router training through the surrogate model (METHOD §6, §7).

Inputs: the trained :class:`~flextron.model.elastic.ElasticModel` (frozen here), a
:class:`~flextron.routing.router.StaticRouter`, a :class:`~flextron.routing.surrogate.Surrogate`, the cost table
and router blocks ``(N, T)`` of token ids. Outputs: the trained router and surrogate (in place),
checkpoints under ``run_dir/checkpoints/routers/`` and metrics in ``run_dir/metrics.jsonl``.

The warm start (project choice) measures every homogeneous configuration and the one-layer
sensitivities, and allocates each target's budget over the layers by an exact knapsack
(:func:`~flextron.routing.deploy.allocate_by_sensitivity`); the surrogate-trained router is validated
against that start at the end. Joint fine-tuning (METHOD §8) is in :mod:`flextron.train.loop`.
Under several processes the LLM measurements are split over the ranks (see
:func:`train_routers`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from flextron.config import RouterConfig
from flextron.errors import ConfigError, ModelError
from flextron.model.elastic import ElasticModel
from flextron.model.scoring import block_nll
from flextron.model.space import ArchConfig, SearchSpace, archs_from_json, archs_to_json
from flextron.routing.deploy import TargetRouter, allocate_by_sensitivity, fit_to_budget
from flextron.routing.router import StaticRouter, choices_to_archs, choices_to_masks, gumbel_choice
from flextron.routing.surrogate import Surrogate, SurrogateFit, encode_arch
from flextron.train.checkpoint import MetricsLog, StageCheckpoints, deferred_interrupt
from flextron.train.distributed import any_rank, make_accelerator, split_over_ranks
from flextron.train.loop import BudgetSampler, data_sha256, run_steps, step_generator
from flextron.train.losses import lm_kd_loss
from flextron.train.router_loop import RouterDraw, RouterObjective, router_postfix, router_update, tau_at

log = logging.getLogger(__name__)


@torch.no_grad()
def lm_loss_at(fx: ElasticModel, arch: ArchConfig | None, batch: torch.Tensor) -> float:
    """Mean next-token CE (nats) of ``arch`` (sliced, no grad) on ``batch`` (B, T); the LM head
    runs in chunks (:func:`flextron.model.scoring.block_nll`), so the (B, T, V) logits never exist."""
    fx.set_arch(arch)
    return block_nll(fx, batch, batch_size=batch.shape[0], progress=False)["nll"]


def target_grid(targets: tuple[float, ...] | list[float]) -> list[float]:
    """The trained targets plus the midpoint of every neighbouring pair (sorted): where the router
    is warm-started, trained and validated, so interpolated targets are trained too."""
    ts = sorted(float(t) for t in targets)
    return sorted(set(ts) | {round((a + b) / 2, 6) for a, b in zip(ts, ts[1:])})


def train_routers(
    fx: ElasticModel,
    router: StaticRouter,
    surrogate: Surrogate,
    table,
    blocks: torch.Tensor,
    cfg: RouterConfig,
    run_dir: Path,
    *,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> dict:
    """Router training with the LLM frozen (METHOD §7).

    The LM loss of a configuration is measured on one fixed batch (``blocks[:batch_size]``,
    METHOD §7 "or use a fixed batch"), as ``ℓ − ℓ_full`` on that batch, so configurations are
    compared on the same text; targets are drawn from :func:`target_grid`.

    With ``cfg.warm_start`` (project choice) the router starts, at every grid target, from the
    better of the best measured homogeneous configuration and the sensitivity-based per-layer
    allocation (:func:`_warm_start_router`, ``cfg.sensitivity_mlp_levels``), and at the end each grid target's routed
    configuration is kept only if its LM loss on all router blocks (``blocks``, up to four
    batches) is lower than the warm-start configuration's, both fitted to the budget; otherwise
    the router is refitted to the warm start there. The verdicts are in the returned summary.

    Each step: sample targets → router logits → straight-through Gumbel choices → run the LLM
    (sliced, no grad) at each chosen configuration on a fixed text batch → ``ℓ − ℓ_full`` →
    update the surrogate; once the surrogate passes its held-out gate (MAE and Spearman), update
    the router on ``SM(π) + λ · latency_loss``. With ``cfg.surrogate = False`` (ablation) the
    router gets the LM loss directly through the soft masks instead.

    Under several processes every rank draws the same targets and choices (seeded by step), the
    LLM measurements are split over the ranks and shared, so every rank fits the same surrogate;
    each rank takes the router loss of its share of the ``cfg.batch_size`` targets and DDP
    averages the router's gradients, as for the model in the other stages.

    Checkpoints (``run_dir/checkpoints/routers/``) are written after the warm-up, every
    ``cfg.checkpoint_every`` steps and at the last step: router, surrogate, both optimizers, the
    surrogate's buffer and held-out set, the sampling generator, the warm start and the counters.
    A rerun resumes from the newest one and ends as the uninterrupted run would (the per-step
    draws are seeded by the step). SIGINT/SIGTERM finish the current step (or the warm-up), save
    a checkpoint and raise :class:`KeyboardInterrupt`.

    Raises:
        ConfigError: ``cfg.batch_size`` is not a multiple of the number of processes.
        ModelError: the checkpoint to resume is corrupt, incomplete or was written with other settings.
    """
    accelerator = accelerator or make_accelerator()
    world, rank = accelerator.num_processes, accelerator.process_index
    if cfg.batch_size % world:
        raise ConfigError(
            f"routers.batch_size={cfg.batch_size} must be a multiple of the number of processes ({world})"
        )
    mine = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    device = accelerator.device
    fx.eval().to(device)
    for p in fx.parameters():
        p.requires_grad_(False)
    sp = fx.space
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    pool = blocks[: max(1, min(len(blocks) // cfg.batch_size, 4)) * cfg.batch_size].view(
        -1, cfg.batch_size, blocks.shape[1]
    )
    pool = pool.to(device)
    sampler = BudgetSampler(sp, table, p_full=0.0, min_fraction=min(cfg.targets))
    fit = SurrogateFit(surrogate, lr=cfg.surrogate_lr)
    gen = torch.Generator().manual_seed(seed + 17)
    t0 = time.time()
    wrapped = accelerator.prepare(router)
    opt = torch.optim.Adam(router.parameters(), lr=cfg.router_lr)
    grid = torch.tensor(target_grid(cfg.targets))
    # what the stage carries from step to step (encoded by archs_to_json), saved in its checkpoints
    run = {"full_loss": 0.0, "evals": 0, "grad_steps": 0, "warm": None, "warm_summary": None}
    ckpt = StageCheckpoints(
        run_dir / "checkpoints" / "routers",
        accelerator,
        {"router": router, "surrogate": surrogate},
        {"router_optimizer": opt, "surrogate_optimizer": fit.opt},
        {
            **{k: v for k, v in asdict(cfg).items() if k != "checkpoint_every"},
            "seed": seed,
            "data_sha256": data_sha256(blocks),
        },
    )

    def save(step: int) -> None:
        ckpt.save(step, {"run": archs_to_json(run)}, {**fit.state_tensors(), "generator": gen.get_state()})

    def measure(archs: list[ArchConfig], desc: str = "") -> list[float]:
        """Δloss of each configuration on the fixed batch (split over the ranks)."""
        run["evals"] += len(archs)
        fn = lambda i: lm_loss_at(fx, archs[i], pool[0]) - run["full_loss"]  # noqa: E731
        return split_over_ranks(accelerator, len(archs), fn, desc, progress and bool(desc))

    def warm_up() -> None:
        """Held-out configurations spanning the budget range, the surrogate's warm-up buffer, the
        router's warm start and the surrogate's first fit."""
        run["full_loss"] = lm_loss_at(fx, None, pool[0])
        held = [sampler.sample(gen)[0] for _ in range(cfg.heldout_configs)]
        enc = [encode_arch(sp, a) for a in held]
        held_delta = torch.tensor(measure(held, "routers: held-out configs"))
        fit.set_heldout(torch.stack([e[0] for e in enc]), torch.stack([e[1] for e in enc]), held_delta)
        warmup = [sampler.sample(gen)[0] for _ in range(cfg.warmup_samples)]
        for a, d in zip(warmup, measure(warmup, "routers: surrogate warm-up")):
            fit.add(*encode_arch(sp, a), d)
        run["warm"], run["warm_summary"] = (
            _warm_start_router(wrapped, opt, fit, measure, sp, table, grid, cfg.sensitivity_mlp_levels)
            if cfg.warm_start
            else (None, None)
        )
        fit.fit(cfg.surrogate_updates * 10, gen=gen)

    with deferred_interrupt() as interrupt:
        state = ckpt.resume()
        if state is None:
            warm_up()
            save(0)
            if any_rank(accelerator, interrupt.requested):
                raise KeyboardInterrupt(
                    f"router training interrupted after its warm-up; checkpoint saved in {ckpt.root}"
                )
        else:
            try:
                saved = archs_from_json(state["run"])
                if set(saved) != set(run):
                    raise KeyError(f"run state holds {sorted(saved)}, expected {sorted(run)}")
                run.update(saved)
                fit.load_state_tensors(state["tensors"])
                gen.set_state(state["tensors"]["generator"])
            except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:
                raise ModelError(
                    f"checkpoint {ckpt.root} lacks the router stage's state ({type(e).__name__}: {e}); "
                    f"delete {ckpt.root} to restart this stage"
                ) from None
        start = state["step"] if state else 0
        metrics.truncate("routers", start - 1)
        ev = fit.evaluate()
        if start == 0:
            log.info(
                "surrogate after warm-up: held-out MAE %.4f nats (%.2f of a constant predictor's), Spearman %.3f",
                ev["heldout_mae"],
                ev["heldout_relative_error"],
                ev["heldout_spearman"],
            )
        router.train()
        objective = RouterObjective(
            cfg.latency_weight,
            cfg.latency_tol,
            cfg.surrogate_gate_spearman,
            cfg.surrogate_gate_error,
            cfg.surrogate_updates,
            surrogate=cfg.surrogate,
        )

        def draw(step: int, tau: float) -> RouterDraw:
            """Targets from the grid, choices from the router, Δloss of each on the fixed batch."""
            g = step_generator(seed, step, salt=1)
            t = grid[torch.randint(len(grid), (cfg.batch_size,), generator=g)]
            mlp_logits, head_logits = wrapped(t)
            mlp_c, head_c = (
                gumbel_choice(mlp_logits, tau, g),
                gumbel_choice(head_logits, tau, g),
            )  # (B, L, K), same on every rank
            deltas = measure(choices_to_archs(sp, mlp_c, head_c))
            lm = None
            if not cfg.surrogate:  # the direct-gradient ablation: LM loss through the soft masks
                mlp_m, head_m = choices_to_masks(sp, mlp_c[mine], head_c[mine])
                fx.set_arch(None)
                fx.set_masks(mlp_m, head_m)
                batch = pool[step % len(pool)][mine]
                with torch.enable_grad():
                    lm = lm_kd_loss(fx(input_ids=batch, use_cache=False).logits, batch, None, 0.0)[0]
                fx.set_masks(None, None)
            return RouterDraw(
                t,
                mlp_c,
                head_c,
                delta=torch.tensor(deltas, dtype=torch.float64),
                lm=lm,
                record={"tau": tau, "lm_delta": sum(deltas) / len(deltas)},
            )

        def step_fn(step: int) -> dict:
            nonlocal ev
            d = draw(step, tau_at(step, cfg.steps, cfg.tau_start, cfg.tau_end))
            rec = router_update(
                d, opt=opt, fit=fit, surrogate=surrogate, table=table, space=sp, objective=objective, gen=gen, mine=mine
            )
            run["grad_steps"] += int(rec["surrogate_grad"] or d.lm is not None)
            ev = {
                "heldout_mae": rec["surrogate_heldout_mae"],
                "heldout_spearman": rec["surrogate_spearman"],
                "heldout_relative_error": rec["surrogate_relative_error"],
            }
            return {**d.record, **rec, "router_steps_with_surrogate_grad": run["grad_steps"]}

        run_steps(
            stage="routers",
            start=start,
            steps=cfg.steps,
            step_fn=step_fn,
            save=save,
            checkpoint_every=cfg.checkpoint_every,
            interrupt=interrupt,
            accelerator=accelerator,
            metrics=metrics,
            progress=progress,
            where=f"in {ckpt.root}",
            postfix=router_postfix,
        )
    router.eval()
    warm, evals = run["warm"], run["evals"]
    validation = None
    if warm is not None:
        validation = _keep_better_than_warm_start(
            wrapped, router, opt, fx, surrogate, table, pool, grid, warm, accelerator, progress
        )
        evals += validation.pop("llm_evaluations")
    fx.set_arch(None)
    return {
        "steps": cfg.steps,
        "resumed_from": start,
        "steps_run_now": cfg.steps - start,
        "processes": world,
        "llm_evaluations": evals,
        "tokens": evals * pool.shape[1] * pool.shape[2],
        "surrogate_heldout_mae": ev["heldout_mae"],
        "surrogate_relative_error": ev["heldout_relative_error"],
        "surrogate_spearman": ev["heldout_spearman"],
        "router_steps_with_surrogate_grad": run["grad_steps"],
        "warm_start": run["warm_summary"],
        "validation": validation,
        "wall_s": time.time() - t0,
    }


def _fit_router(router, opt, sp: SearchSpace, targets: list[float], archs: list[ArchConfig], steps: int = 200) -> None:
    """Supervised fit of the router's argmax to ``archs`` at ``targets`` (cross-entropy).
    ``router`` may be DDP-wrapped: every rank fits all targets, so the averaged gradient equals
    each rank's."""
    idx = [sp.indices(a) for a in archs]
    device = next(router.parameters()).device
    t = torch.tensor(targets, dtype=torch.float32)
    mlp_idx = torch.tensor([i[0] for i in idx], device=device)  # (n_targets, L)
    head_idx = torch.tensor([i[1] for i in idx], device=device)
    for _ in range(steps):
        mlp_logits, head_logits = router(t)
        loss = F.cross_entropy(mlp_logits.flatten(0, 1), mlp_idx.flatten()) + F.cross_entropy(
            head_logits.flatten(0, 1), head_idx.flatten()
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def layer_sensitivity(
    measure, space: SearchSpace, mlp_levels: int
) -> tuple[np.ndarray, np.ndarray, list[ArchConfig], list[float]]:
    """Loss increase of reducing one layer at a time, all others full (project choice, for the
    routers' warm start; the paper's routers learn this only through the surrogate).

    Per layer, ``mlp_levels`` MLP widths spread over the reduced candidates (smallest included)
    and every reduced head count are measured; the other MLP widths are interpolated linearly in
    width between the measured ones and the full width (Δ = 0).

    Args:
        measure: ``measure(archs, desc) -> list[float]``, Δloss (nats) of each configuration.
        mlp_levels: measured MLP widths per layer (``>= 1``; capped at the reduced candidates).
    Returns:
        ``mlp_sens`` ``(L, K_mlp)`` and ``head_sens`` ``(L, K_heads)`` in nats (0 at full size),
        and the measured configurations with their Δloss (these also train the surrogate).
    """
    L, mlp_c, head_c = space.num_layers, space.mlp_choices, space.head_choices
    full_m, full_h = space.indices(space.full())
    reduced = range(len(mlp_c) - 1)
    levels = (
        sorted({int(round(x)) for x in np.linspace(0, len(reduced) - 1, min(mlp_levels, len(reduced)))})
        if reduced
        else []
    )
    jobs = [("mlp", l, i) for l in range(L) for i in levels] + [
        ("heads", l, j) for l in range(L) for j in range(len(head_c) - 1)
    ]
    archs = []
    for axis, l, i in jobs:
        mi, hi = list(full_m), list(full_h)
        (mi if axis == "mlp" else hi)[l] = i
        archs.append(space.from_indices(mi, hi))
    deltas = measure(archs, "routers: one-layer sensitivities")
    mlp_sens, head_sens = np.zeros((L, len(mlp_c))), np.zeros((L, len(head_c)))
    measured: dict[int, dict[int, float]] = {l: {} for l in range(L)}
    for (axis, l, i), d in zip(jobs, deltas):
        if axis == "mlp":
            measured[l][mlp_c[i]] = d
        else:
            head_sens[l, i] = d
    for l in range(L):
        xs = sorted(measured[l]) + [mlp_c[-1]]
        mlp_sens[l] = np.interp(mlp_c, xs, [measured[l][x] for x in xs[:-1]] + [0.0])
    return mlp_sens, head_sens, archs, deltas


def _warm_start_router(
    router, opt, fit: SurrogateFit, measure, sp: SearchSpace, table, targets: torch.Tensor, mlp_levels: int
) -> tuple[dict[float, ArchConfig], dict]:
    """Project choice: the router starts, at every target of ``targets``, from the better (lower
    Δloss on the fixed batch) of two measured configurations whose predicted latency is within the
    target (no tolerance, so the budget fit at deployment only grows them): the best homogeneous
    one, and — with ``mlp_levels > 0`` — the per-layer allocation of :func:`allocate_by_sensitivity`
    on the one-layer sensitivities of :func:`layer_sensitivity`. Every measurement also trains the
    surrogate; surrogate training then departs from the start only where it predicts a gain.

    Returns ``{target: configuration}`` and a summary per target (``homogeneous``: ``[mlp, heads]``
    and its Δloss; ``allocated``: its predicted fraction and Δloss, or ``None``; ``chosen``)."""
    homo = sp.homogeneous_configs()
    deltas = measure(homo, "routers: homogeneous configs")
    for a, d in zip(homo, deltas):
        fit.add(*encode_arch(sp, a), d)
    homo_best = {}
    for t in targets.tolist():
        fits = [(d, a) for d, a in zip(deltas, homo) if table.fraction(a) <= t + 1e-9]
        homo_best[t] = min(fits, key=lambda x: x[0]) if fits else (deltas[homo.index(sp.smallest())], sp.smallest())
    alloc: dict[float, ArchConfig | None] = {t: None for t in homo_best}
    alloc_delta: dict[ArchConfig, float] = {}
    if mlp_levels > 0:
        mlp_sens, head_sens, archs, sens_deltas = layer_sensitivity(measure, sp, mlp_levels)
        for a, d in zip(archs, sens_deltas):
            fit.add(*encode_arch(sp, a), d)
        alloc = {t: allocate_by_sensitivity(sp, table, mlp_sens, head_sens, t * table.full) for t in homo_best}
        new = sorted(
            {a for t, a in alloc.items() if a is not None and a != homo_best[t][1]}, key=lambda a: (a.mlp, a.heads)
        )
        for a, d in zip(new, measure(new, "routers: allocated configs")):
            fit.add(*encode_arch(sp, a), d)
            alloc_delta[a] = d
    start, summary = {}, {}
    for t, (hd, ha) in homo_best.items():
        a = alloc[t]
        ad = None if a is None else alloc_delta.get(a, hd)
        use_alloc = ad is not None and ad < hd
        start[t] = a if use_alloc else ha
        summary[f"{t:g}"] = {
            "homogeneous": [ha.mlp[0], ha.heads[0]],
            "homogeneous_delta": hd,
            "allocated_fraction": None if a is None else table.fraction(a),
            "allocated_delta": ad,
            "chosen": "allocated" if use_alloc else "homogeneous",
            "config": start[t].to_dict(),
        }
    _fit_router(router, opt, sp, list(start), list(start.values()))
    log.info("router warm start per target: %s", {t: v["chosen"] for t, v in summary.items()})
    return start, summary


def _keep_better_than_warm_start(
    wrapped,
    router: StaticRouter,
    opt,
    fx: ElasticModel,
    surrogate: Surrogate,
    table,
    pool: torch.Tensor,
    grid: torch.Tensor,
    warm: dict[float, ArchConfig],
    accelerator: Accelerator,
    progress: bool,
) -> dict:
    """Validate the surrogate's refinement with the LLM itself: for every grid target, the routed
    configuration (argmax, fitted to the budget as at deployment) against the warm-start
    configuration fitted to the same budget, by mean LM loss over ``pool`` ``(n_batches, B, T)``
    (measurements split over the ranks); where the routed one is not better the router is
    refitted to the warm start. Returns per target the two losses (nats) and which was kept,
    the targets where the refit does not reproduce the kept configuration, and the number of
    LLM evaluations (batches)."""
    sp = fx.space
    tr = TargetRouter(router, table, sp, surrogate)
    score = tr.scorer()
    pairs, keep = {}, {}
    with torch.no_grad():
        for t in grid.tolist():
            if t >= 1.0 or t < tr.floor:
                keep[t] = sp.full() if t >= 1.0 else warm[t]
            else:
                pairs[t] = (tr.route(t), fit_to_budget(sp, table, warm[t], t * table.full, score))
        archs = sorted({a for p in pairs.values() for a in p}, key=lambda a: (a.mlp, a.heads))
        jobs = [(a, b) for a in archs for b in range(len(pool))]
        losses = split_over_ranks(
            accelerator,
            len(jobs),
            lambda i: lm_loss_at(fx, jobs[i][0], pool[jobs[i][1]]),
            "routers: validate against warm start",
            progress,
        )
    mean = {a: sum(losses[i * len(pool) : (i + 1) * len(pool)]) / len(pool) for i, a in enumerate(archs)}
    verdicts = {}
    for t, (routed, start) in pairs.items():
        better = mean[routed] < mean[start]
        keep[t] = routed if better else start
        verdicts[f"{t:g}"] = {
            "routed_loss": mean[routed],
            "warm_start_loss": mean[start],
            "kept": "router" if better else "warm start",
        }
    router.train()
    _fit_router(wrapped, opt, sp, list(keep), list(keep.values()))
    router.eval()
    with torch.no_grad():
        mismatched = [f"{t:g}" for t in pairs if tr.route(t) != keep[t]]
    if mismatched:
        log.warning("router refit does not reproduce the kept configuration at targets %s", mismatched)
    log.info("router validation against the warm start: %s", {t: v["kept"] for t, v in verdicts.items()})
    return {"targets": verdicts, "refit_mismatched_targets": mismatched, "llm_evaluations": len(jobs)}
