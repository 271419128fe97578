"""Stages 3, 5: elastic continued training, router training, joint fine-tuning (METHOD §4, §7, §8).

Inputs: an :class:`~flextron.elastic.ElasticModel`, a frozen teacher (the original model, for
distillation), training blocks ``(N, T)`` of token ids, the cost table. Outputs: trained weights
(in place), checkpoints under ``run_dir/checkpoints/<stage>/`` (safetensors + JSON, atomic), and
metrics as JSON lines in ``run_dir/metrics.jsonl``.

The same code runs on one process or under ``accelerate launch`` (DDP): every rank samples the
same sub-network and targets each step (seeded by step, not by rank) and takes its own slice of
the global batch; router training splits its LLM measurements over the ranks. Gradient
accumulation and mixed precision (bf16) come from the stage configs. Randomness is a function of
(seed, step, rank), so a resumed run draws what the uninterrupted one drew; SIGINT/SIGTERM finish
the current step and save a checkpoint before :class:`KeyboardInterrupt` is raised.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpoint import MetricsLog, StageCheckpoints, deferred_interrupt
from .config import JointConfig, RouterConfig, TrainConfig
from .distributed import any_rank, make_accelerator, split_over_ranks
from .elastic import ArchConfig, ElasticModel, SearchSpace, archs_from_json, archs_to_json
from .errors import ConfigError, ModelError
from .evaluate import perplexity
from .losses import lm_kd_loss
from .routers import StaticRouter, TargetRouter, allocate_by_sensitivity, choices_to_archs, choices_to_masks, fit_to_budget, gumbel_choice, latency_loss
from .surrogate import Surrogate, SurrogateFit, encode_arch

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- losses


def cosine_lr(step: int, total: int, warmup: int, base: float, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_ratio · base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def step_seed(seed: int, step: int, salt: int = 0) -> int:
    """The seed of one step (and ``salt``): a pure function, so it is the same after a resume."""
    return (seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1)


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """The generator of one step: identical on every rank, independent of resume history."""
    return torch.Generator().manual_seed(step_seed(seed, step, salt))


# --------------------------------------------------------------------------- sub-network sampling


@dataclass
class BudgetSampler:
    """Budget-first sampling of sub-networks (METHOD §4).

    With probability ``p_full`` the full model (budget ``None``); else a target drawn uniformly
    over ``[floor, 1]`` of the full cost — ``floor`` is the larger of the smallest
    configuration's cost and ``min_fraction`` (the lowest target that will be deployed, so no
    step is spent on sub-networks no router picks) — then a configuration meeting it: ``budget`` mode starts
    from uniform per-layer choices and moves random layers one candidate down while over budget
    and up while an upgrade fits; ``homogeneous`` mode takes the largest homogeneous
    configuration that fits.
    """

    space: SearchSpace
    table: object  # CostTable
    p_full: float = 0.33
    mode: str = "budget"
    min_fraction: float = 0.0

    @property
    def floor(self) -> float:
        return max(self.min_fraction, self.table.predict(self.space.smallest()) / self.table.full)

    def sample(self, gen: torch.Generator) -> tuple[ArchConfig, float | None]:
        """``(configuration, budget as a fraction of full cost or None for the full model)``."""
        if torch.rand((), generator=gen).item() < self.p_full:
            return self.space.full(), None
        frac = self.floor + (1 - self.floor) * torch.rand((), generator=gen).item()
        return self.for_budget(frac, gen), frac

    def for_budget(self, frac: float, gen: torch.Generator) -> ArchConfig:
        sp, budget = self.space, frac * self.table.full
        if self.mode == "homogeneous":
            fits = [a for a in sp.homogeneous_configs() if self.table.predict(a) <= budget]
            return max(fits, key=self.table.predict) if fits else sp.smallest()
        L, nm, nh = sp.num_layers, len(sp.mlp_choices), len(sp.head_choices)
        mi = torch.randint(nm, (L,), generator=gen).tolist()
        hi = torch.randint(nh, (L,), generator=gen).tolist()
        cost = lambda: self.table.predict(sp.from_indices(mi, hi))  # noqa: E731

        def move(step: int) -> bool:
            opts = [(l, ax) for l in range(L) for ax, idx, n in ((0, mi, nm), (1, hi, nh)) if 0 <= idx[l] + step < n]
            if not opts:
                return False
            l, ax = opts[int(torch.randint(len(opts), (1,), generator=gen))]
            (mi if ax == 0 else hi)[l] += step
            return True

        while cost() > budget and move(-1):
            pass
        for _ in range(4 * L):  # grow while an upgrade fits
            prev = (list(mi), list(hi))
            if not move(+1):
                break
            if cost() > budget:
                mi[:], hi[:] = prev
        return sp.from_indices(mi, hi)


# --------------------------------------------------------------------------- data slicing


def batch_for_step(blocks: torch.Tensor, step: int, global_batch: int, seed: int, rank: int, world: int) -> torch.Tensor:
    """This rank's share ``(global_batch / world, T)`` of the global batch of ``step``: blocks are
    visited in a seeded random order per epoch, so the data order survives a resume."""
    n = blocks.shape[0]
    start = step * global_batch
    idx = []
    for pos in range(start, start + global_batch):
        epoch, off = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7 * epoch))
        idx.append(int(perm[off]))
    per = global_batch // world
    return blocks[idx[rank * per : (rank + 1) * per]]


# --------------------------------------------------------------------------- the LM training loop


StepFn = Callable[[int, torch.Tensor, torch.Generator, dict, slice, int], tuple[torch.Tensor, dict]]


def _data_sha256(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def _lm_loop(
    *,
    stage: str,
    modules: dict[str, torch.nn.Module],
    param_groups: list[dict],
    steps: int,
    micro_batch: int,
    grad_accum: int,
    warmup: int,
    min_lr_ratio: float,
    max_grad_norm: float,
    checkpoint_every: int,
    blocks: torch.Tensor,
    seed: int,
    run_dir: Path,
    step_fn: StepFn,
    accelerator: Accelerator,
    progress: bool,
    mixed_precision: str = "no",
) -> dict:
    """Shared loop of elastic training and joint fine-tuning: AdamW, cosine schedule, gradient
    accumulation, atomic checkpoints and resume, metrics.

    A step's effective batch is ``micro_batch · world · grad_accum`` sequences; every micro-batch
    of a step gets the same step generator. ``step_fn(step, batch, gen, wrapped, rows, n_rows)``
    returns ``(loss, metrics)`` for one micro-batch: ``rows`` is the slice of ``batch`` within the
    step's ``n_rows`` sequences, so per-sequence draws are made for the whole step and sliced and
    the result does not depend on how the batch is split over processes and micro-batches. It
    must call the modules through ``wrapped`` (the accelerate-prepared ones) so that DDP
    synchronises gradients and autocast applies. The loss is a mean over the micro-batch; DDP
    averages over ranks and accelerate divides by ``grad_accum``: the mean over the step.
    ``mixed_precision="bf16"``: ``step_fn`` runs under bf16 autocast (weights, gradients and
    optimizer state stay float32; the loss is computed in float32).

    Raises:
        ConfigError: the accelerator's gradient accumulation differs from ``grad_accum``.
        ModelError: the checkpoint to resume is corrupt or was written with other settings.
        KeyboardInterrupt: after SIGINT/SIGTERM, once the current step is checkpointed.
    """
    if accelerator.gradient_accumulation_steps != grad_accum:
        raise ConfigError(f"{stage}: the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches, "
                          f"the config grad_accum={grad_accum}; build it with make_accelerator({grad_accum}, ...)")
    opt = torch.optim.AdamW(param_groups, betas=(0.9, 0.95))
    base_lrs = [g["lr"] for g in param_groups]
    world, rank = accelerator.num_processes, accelerator.process_index
    n_rows = micro_batch * world * grad_accum
    settings = {"steps": steps, "global_batch": n_rows, "lrs": base_lrs, "warmup": warmup, "min_lr_ratio": min_lr_ratio,
                "max_grad_norm": max_grad_norm, "seed": seed, "data_sha256": _data_sha256(blocks),
                "mixed_precision": mixed_precision}
    ckpt = StageCheckpoints(run_dir / "checkpoints" / stage, accelerator, modules, opt, settings)
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    state = ckpt.resume()
    start = state["step"] if state else 0
    metrics.truncate(stage, start - 1)
    wrapped = {k: accelerator.prepare(m) if any(p.requires_grad for p in m.parameters()) else m for k, m in modules.items()}
    opt = accelerator.prepare(opt)
    cuda = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []
    steps_run = tokens = 0
    t0 = time.time()
    bar = tqdm(range(start, steps), desc=stage, disable=not (progress and accelerator.is_main_process), initial=start, total=steps)
    with deferred_interrupt() as interrupt:
        for step in bar:
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = cosine_lr(step, steps, warmup, base, min_lr_ratio)
            rec: dict = {}
            for micro in range(grad_accum):
                batch = batch_for_step(blocks, step * grad_accum + micro, micro_batch * world, seed, rank, world)
                batch = batch.to(accelerator.device)
                first = (micro * world + rank) * micro_batch
                # the global RNG (dropout) is a function of (seed, step, rank, micro) too
                with accelerator.accumulate(*wrapped.values()), torch.random.fork_rng(devices=cuda):
                    torch.manual_seed(step_seed(seed, step, salt=1 + rank * grad_accum + micro))
                    with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=mixed_precision == "bf16"):
                        loss, rec = step_fn(step, batch, step_generator(seed, step), wrapped, slice(first, first + micro_batch), n_rows)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and max_grad_norm > 0:
                        accelerator.clip_grad_norm_([p for g in param_groups for p in g["params"]], max_grad_norm)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                tokens += batch.numel() * world
            steps_run += 1
            metrics.write(stage=stage, step=step, lr=opt.param_groups[0]["lr"], **rec)
            if progress:
                bar.set_postfix(loss=f"{rec.get('lm_loss', float('nan')):.3f}")
            stop = any_rank(accelerator, interrupt.requested)
            if (step + 1) % checkpoint_every == 0 or step + 1 == steps or stop:
                ckpt.save(step + 1)
            if stop:
                raise KeyboardInterrupt(f"{stage} interrupted; checkpoint of step {step + 1} saved in {ckpt.root}")
    return {"steps": steps, "steps_run_now": steps_run, "resumed_from": start, "tokens": tokens, "processes": world,
            "wall_s": time.time() - t0}


def _teacher_logits(teacher: torch.nn.Module | None, batch: torch.Tensor, alpha: float) -> torch.Tensor | None:
    if teacher is None or alpha == 0:
        return None
    with torch.no_grad():
        return teacher.to(batch.device)(input_ids=batch, use_cache=False).logits


def train_elastic(
    fx: ElasticModel,
    teacher: torch.nn.Module | None,
    blocks: torch.Tensor,
    cfg: TrainConfig,
    table,
    run_dir: Path,
    *,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    min_fraction: float = 0.0,
    progress: bool = True,
    sampler=None,
) -> dict:
    """Elastic continued training (METHOD §4): each step trains one sampled sub-network, sliced
    (full speed), on ``(1 − α)·CE + α·KL(teacher ‖ student)``. Logs the sampled budget.
    ``min_fraction``: lowest budget sampled (fraction of full cost; see :class:`BudgetSampler`).
    ``sampler``: any object with ``sample(gen) -> (ArchConfig, budget fraction or None)`` used
    instead of the :class:`BudgetSampler` built from ``cfg`` (e.g. one fixed configuration, to
    fine-tune a single pruned sub-network with the same loop).
    ``accelerator``: default ``make_accelerator(cfg.grad_accum)``.

    ``blocks``: training token ids (N, T). Returns a summary dict (steps, tokens, wall time,
    number of full-model steps among those run now).
    """
    accelerator = accelerator or make_accelerator(cfg.grad_accum)
    sampler = sampler or BudgetSampler(fx.space, table, cfg.p_full, cfg.sampling, min_fraction)
    for p in fx.parameters():
        p.requires_grad_(True)
    fx.train()
    budgets: dict[int, float | None] = {}

    def step_fn(step: int, batch: torch.Tensor, gen: torch.Generator, wrapped: dict, rows: slice, n_rows: int):
        arch, frac = sampler.sample(gen)
        fx.set_arch(arch)
        out = wrapped["model"](input_ids=batch, use_cache=False)
        loss, ce, kd = lm_kd_loss(out.logits, batch, _teacher_logits(teacher, batch, cfg.kd_alpha), cfg.kd_alpha)
        budgets[step] = frac
        return loss, {
            "lm_loss": float(ce),
            "kd_loss": float(kd),
            "budget": frac,
            "predicted_fraction": table.predict(arch) / table.full,
        }

    summary = _lm_loop(
        stage="elastic",
        modules={"model": fx},
        param_groups=[{"params": [p for p in fx.parameters()], "lr": cfg.lr, "weight_decay": cfg.weight_decay}],
        steps=cfg.steps,
        micro_batch=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        warmup=cfg.warmup_steps,
        min_lr_ratio=cfg.min_lr_ratio,
        max_grad_norm=cfg.max_grad_norm,
        checkpoint_every=cfg.checkpoint_every,
        blocks=blocks,
        seed=seed,
        run_dir=run_dir,
        step_fn=step_fn,
        accelerator=accelerator,
        progress=progress,
        mixed_precision=cfg.mixed_precision,
    )
    fx.set_arch(None)
    fx.eval()
    summary["full_model_steps"] = sum(b is None for b in budgets.values())
    return summary


# --------------------------------------------------------------------------- router training (surrogate)


@torch.no_grad()
def lm_loss_at(fx: ElasticModel, arch: ArchConfig | None, batch: torch.Tensor) -> float:
    """Mean next-token CE (nats) of ``arch`` (sliced, no grad) on ``batch`` (B, T); the LM head
    runs in chunks (:func:`flextron.evaluate.perplexity`), so the (B, T, V) logits never exist."""
    fx.set_arch(arch)
    return perplexity(fx, batch, batch_size=batch.shape[0], progress=False)["nll"]


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
        raise ConfigError(f"routers.batch_size={cfg.batch_size} must be a multiple of the number of processes ({world})")
    mine = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    device = accelerator.device
    fx.eval().to(device)
    for p in fx.parameters():
        p.requires_grad_(False)
    sp = fx.space
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    pool = blocks[: max(1, min(len(blocks) // cfg.batch_size, 4)) * cfg.batch_size].view(-1, cfg.batch_size, blocks.shape[1])
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
    ckpt = StageCheckpoints(run_dir / "checkpoints" / "routers", accelerator, {"router": router, "surrogate": surrogate},
                            {"router_optimizer": opt, "surrogate_optimizer": fit.opt},
                            {**{k: v for k, v in asdict(cfg).items() if k != "checkpoint_every"}, "seed": seed, "data_sha256": _data_sha256(blocks)})

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
        run["warm"], run["warm_summary"] = (_warm_start_router(wrapped, opt, fit, measure, sp, table, grid, cfg.sensitivity_mlp_levels)
                                            if cfg.warm_start else (None, None))
        fit.fit(cfg.surrogate_updates * 10, gen=gen)

    with deferred_interrupt() as interrupt:
        state = ckpt.resume()
        if state is None:
            warm_up()
            save(0)
            if any_rank(accelerator, interrupt.requested):
                raise KeyboardInterrupt(f"router training interrupted after its warm-up; checkpoint saved in {ckpt.root}")
        else:
            try:
                saved = archs_from_json(state["run"])
                if set(saved) != set(run):
                    raise KeyError(f"run state holds {sorted(saved)}, expected {sorted(run)}")
                run.update(saved)
                fit.load_state_tensors(state["tensors"])
                gen.set_state(state["tensors"]["generator"])
            except (KeyError, ValueError, TypeError, RuntimeError, AttributeError) as e:
                raise ModelError(f"checkpoint {ckpt.root} lacks the router stage's state ({type(e).__name__}: {e}); "
                                 f"delete {ckpt.root} to restart this stage") from None
        start = state["step"] if state else 0
        metrics.truncate("routers", start - 1)
        ev = fit.evaluate()
        if start == 0:
            log.info("surrogate after warm-up: held-out MAE %.4f nats (%.2f of a constant predictor's), Spearman %.3f",
                     ev["heldout_mae"], ev["heldout_relative_error"], ev["heldout_spearman"])
        router.train()
        bar = tqdm(range(start, cfg.steps), desc="routers", disable=not (progress and accelerator.is_main_process),
                   initial=start, total=cfg.steps)
        for step in bar:
            tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, cfg.steps - 1))
            g = step_generator(seed, step, salt=1)
            t = grid[torch.randint(len(grid), (cfg.batch_size,), generator=g)]
            mlp_logits, head_logits = wrapped(t)
            mlp_c, head_c = gumbel_choice(mlp_logits, tau, g), gumbel_choice(head_logits, tau, g)  # (B, L, K), same on every rank
            deltas = measure(choices_to_archs(sp, mlp_c, head_c))
            for j, d in enumerate(deltas):
                fit.add(mlp_c[j], head_c[j], d)
            fit.fit(cfg.surrogate_updates, gen=gen)
            ev = fit.evaluate()
            gate = ev["heldout_spearman"] >= cfg.surrogate_gate_spearman and ev["heldout_relative_error"] <= cfg.surrogate_gate_error
            t_dev = t.to(mlp_c.device)
            frac = table.expected(mlp_c, head_c, sp.mlp_choices, sp.head_choices) / table.full  # (B,)
            lat = latency_loss(frac, t_dev, cfg.latency_tol)  # (B,)
            loss = cfg.latency_weight * lat[mine].mean()  # this rank's share; DDP averages the shares
            if cfg.surrogate:
                if gate:
                    surrogate.eval()
                    loss = loss + surrogate(mlp_c[mine], head_c[mine]).mean()
                    run["grad_steps"] += 1
            else:
                mlp_m, head_m = choices_to_masks(sp, mlp_c[mine], head_c[mine])
                fx.set_arch(None)
                fx.set_masks(mlp_m, head_m)
                batch = pool[step % len(pool)][mine]
                with torch.enable_grad():
                    lm = lm_kd_loss(fx(input_ids=batch, use_cache=False).logits, batch, None, 0.0)[0]
                fx.set_masks(None, None)
                loss = loss + lm
                run["grad_steps"] += 1
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            lat_err = float((frac.detach() / t_dev - 1).abs().mean())
            metrics.write(
                stage="routers", step=step, tau=tau, lm_delta=sum(deltas) / len(deltas), latency_loss=float(lat.detach().mean()),
                latency_error=lat_err, surrogate_heldout_mae=ev["heldout_mae"], surrogate_spearman=ev["heldout_spearman"],
                surrogate_relative_error=ev["heldout_relative_error"],
                surrogate_gate_open=gate, router_steps_with_surrogate_grad=run["grad_steps"],
            )
            bar.set_postfix(lat_err=f"{lat_err:.3f}", rho=f"{ev['heldout_spearman']:.2f}")
            stop = any_rank(accelerator, interrupt.requested)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps or stop:
                save(step + 1)
            if stop:
                raise KeyboardInterrupt(f"router training interrupted; checkpoint of step {step + 1} saved in {ckpt.root}")
    router.eval()
    warm, evals = run["warm"], run["evals"]
    validation = None
    if warm is not None:
        validation = _keep_better_than_warm_start(wrapped, router, opt, fx, surrogate, table, pool, grid, warm, accelerator, progress)
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
        loss = F.cross_entropy(mlp_logits.flatten(0, 1), mlp_idx.flatten()) + F.cross_entropy(head_logits.flatten(0, 1), head_idx.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def layer_sensitivity(measure, space: SearchSpace, mlp_levels: int) -> tuple[np.ndarray, np.ndarray, list[ArchConfig], list[float]]:
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
    levels = sorted({int(round(x)) for x in np.linspace(0, len(reduced) - 1, min(mlp_levels, len(reduced)))}) if reduced else []
    jobs = [("mlp", l, i) for l in range(L) for i in levels] + [("heads", l, j) for l in range(L) for j in range(len(head_c) - 1)]
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


def _warm_start_router(router, opt, fit: SurrogateFit, measure, sp: SearchSpace, table, targets: torch.Tensor,
                       mlp_levels: int) -> tuple[dict[float, ArchConfig], dict]:
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
        new = sorted({a for t, a in alloc.items() if a is not None and a != homo_best[t][1]}, key=lambda a: (a.mlp, a.heads))
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
            "homogeneous": [ha.mlp[0], ha.heads[0]], "homogeneous_delta": hd,
            "allocated_fraction": None if a is None else table.fraction(a), "allocated_delta": ad,
            "chosen": "allocated" if use_alloc else "homogeneous", "config": start[t].to_dict(),
        }
    _fit_router(router, opt, sp, list(start), list(start.values()))
    log.info("router warm start per target: %s", {t: v["chosen"] for t, v in summary.items()})
    return start, summary


def _keep_better_than_warm_start(wrapped, router: StaticRouter, opt, fx: ElasticModel, surrogate: Surrogate, table, pool: torch.Tensor,
                                 grid: torch.Tensor, warm: dict[float, ArchConfig], accelerator: Accelerator, progress: bool) -> dict:
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
        losses = split_over_ranks(accelerator, len(jobs), lambda i: lm_loss_at(fx, jobs[i][0], pool[jobs[i][1]]),
                                   "routers: validate against warm start", progress)
    mean = {a: sum(losses[i * len(pool):(i + 1) * len(pool)]) / len(pool) for i, a in enumerate(archs)}
    verdicts = {}
    for t, (routed, start) in pairs.items():
        better = mean[routed] < mean[start]
        keep[t] = routed if better else start
        verdicts[f"{t:g}"] = {"routed_loss": mean[routed], "warm_start_loss": mean[start], "kept": "router" if better else "warm start"}
    router.train()
    _fit_router(wrapped, opt, sp, list(keep), list(keep.values()))
    router.eval()
    with torch.no_grad():
        mismatched = [f"{t:g}" for t in pairs if tr.route(t) != keep[t]]
    if mismatched:
        log.warning("router refit does not reproduce the kept configuration at targets %s", mismatched)
    log.info("router validation against the warm start: %s", {t: v["kept"] for t, v in verdicts.items()})
    return {"targets": verdicts, "refit_mismatched_targets": mismatched, "llm_evaluations": len(jobs)}


# --------------------------------------------------------------------------- joint fine-tuning


def train_joint(
    fx: ElasticModel,
    teacher: torch.nn.Module | None,
    router: StaticRouter,
    table,
    blocks: torch.Tensor,
    cfg: JointConfig,
    router_cfg: RouterConfig,
    run_dir: Path,
    *,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    progress: bool = True,
) -> dict:
    """Joint fine-tuning of model and router (METHOD §8): each sequence of a step's batch gets a
    target from the trained set (drawn for the whole step, then sliced, so the split over
    processes and micro-batches does not matter); the router's straight-through choices become
    soft masks (masked forward, differentiable), and the loss is LM + KD + λ · latency loss. The
    router's learning rate is higher than the model's. A share ``cfg.p_full`` of the steps (drawn
    per step, the same on every rank) trains the full model alone on LM + KD, as elastic
    training does, so the full model is not left to drift. ``accelerator``: default
    ``make_accelerator(cfg.grad_accum)``."""
    accelerator = accelerator or make_accelerator(cfg.grad_accum)
    sp = fx.space
    for p in fx.parameters():
        p.requires_grad_(True)
    fx.train()
    router.train()
    fx.set_arch(None)
    targets = torch.tensor(router_cfg.targets)

    full_steps: set[int] = set()

    def step_fn(step: int, batch: torch.Tensor, gen: torch.Generator, wrapped: dict, rows: slice, n_rows: int):
        if torch.rand((), generator=gen).item() < cfg.p_full:  # the full model alone; the router is not run
            full_steps.add(step)
            fx.set_masks(None, None)
            out = wrapped["model"](input_ids=batch, use_cache=False)
            loss, ce, kd = lm_kd_loss(out.logits, batch, _teacher_logits(teacher, batch, cfg.kd_alpha), cfg.kd_alpha)
            return loss, {"lm_loss": float(ce), "kd_loss": float(kd), "full_model": True}
        t = targets[torch.randint(len(targets), (n_rows,), generator=gen)].to(batch.device)  # the whole step's targets
        mlp_logits, head_logits = wrapped["router"](t)
        mlp_c = gumbel_choice(mlp_logits, router_cfg.tau_end, gen)[rows]
        head_c = gumbel_choice(head_logits, router_cfg.tau_end, gen)[rows]
        t = t[rows]
        fx.set_masks(*choices_to_masks(sp, mlp_c, head_c))
        out = wrapped["model"](input_ids=batch, use_cache=False)
        fx.set_masks(None, None)
        loss, ce, kd = lm_kd_loss(out.logits, batch, _teacher_logits(teacher, batch, cfg.kd_alpha), cfg.kd_alpha)
        frac = table.expected(mlp_c, head_c, sp.mlp_choices, sp.head_choices) / table.full
        lat = latency_loss(frac, t, router_cfg.latency_tol).mean()
        return loss + router_cfg.latency_weight * lat, {
            "lm_loss": float(ce), "kd_loss": float(kd), "latency_loss": float(lat.detach()),
            "latency_error": float((frac.detach() / t - 1).abs().mean()), "full_model": False,
        }

    summary = _lm_loop(
        stage="joint",
        modules={"model": fx, "router": router},
        param_groups=[
            {"params": list(fx.parameters()), "lr": cfg.model_lr, "weight_decay": 0.0},
            {"params": list(router.parameters()), "lr": cfg.router_lr, "weight_decay": 0.0},
        ],
        steps=cfg.steps,
        micro_batch=cfg.batch_size,
        grad_accum=cfg.grad_accum,
        warmup=0,
        min_lr_ratio=0.1,
        max_grad_norm=1.0,
        checkpoint_every=cfg.checkpoint_every,
        blocks=blocks,
        seed=seed + 1,
        run_dir=run_dir,
        step_fn=step_fn,
        accelerator=accelerator,
        progress=progress,
        mixed_precision=cfg.mixed_precision,
    )
    fx.eval()
    router.eval()
    summary["full_model_steps"] = len(full_steps)
    return summary
