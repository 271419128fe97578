"""The one training loop of the weight-training stages (METHOD §4, §8): AdamW with a cosine schedule,
gradient accumulation, distributed data, atomic checkpoints and resume, metrics; plus the step-seeded
randomness and the budget sampler of elastic training.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from flextron.errors import ConfigError
from flextron.model.space import ArchConfig, SearchSpace
from flextron.train.checkpoint import MetricsLog, StageCheckpoints, deferred_interrupt
from flextron.train.distributed import any_rank

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


def homogeneous_for_target(space: SearchSpace, table, target: float, tol: float = 0.02) -> ArchConfig:
    """The homogeneous configuration of largest predicted cost within ``target · (1 + tol)`` of the
    full cost (the smallest one when none fits): the MatFormer-style deployment rule.
    ``target`` and ``tol`` are fractions of full latency; ``table`` is a
    :class:`~flextron.cost.measure.CostTable`."""
    fits = [a for a in space.homogeneous_configs() if table.fraction(a) <= target * (1 + tol)]
    return max(fits, key=table.predict) if fits else space.smallest()


@dataclass
class BudgetSampler:
    """Budget-first sampling of sub-networks (METHOD §4).

    With probability ``p_full`` the full model (budget ``None``); else a target drawn uniformly
    over ``[floor, 1]`` of the full cost — ``floor`` is the larger of the smallest
    configuration's cost and ``min_fraction`` (the lowest target that will be deployed, so no
    step is spent on sub-networks no router picks) — then a configuration meeting it: ``budget``
    mode starts from uniform per-layer choices and moves random layers one candidate down while
    over budget and up while an upgrade fits.

    ``homogeneous`` mode (the MatFormer-style baseline) draws instead, outside the full-model
    steps, one homogeneous sub-network uniformly from :meth:`homogeneous_pool`: each one that
    :func:`homogeneous_for_target` deploys at some target in ``[floor, 1]``, and the larger ones.
    So every deployable width is trained (a budget-first draw of "the largest homogeneous one that
    fits" never trains a configuration whose next larger one costs almost the same). The second
    value returned is then that configuration's fraction of full cost.
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
        if self.mode == "homogeneous":
            pool = self.homogeneous_pool()
            arch = pool[int(torch.randint(len(pool), (1,), generator=gen))]
            return arch, self.table.fraction(arch)
        frac = self.floor + (1 - self.floor) * torch.rand((), generator=gen).item()
        return self.for_budget(frac, gen), frac

    def homogeneous_pool(self) -> list[ArchConfig]:
        """The homogeneous sub-networks ``homogeneous`` mode draws from, sorted by cost: those at
        least as costly as the one deployed at the floor, the full model excluded (it has its own
        share ``p_full``) unless it is the only one."""
        lowest = self.table.predict(homogeneous_for_target(self.space, self.table, self.floor))
        pool = [
            a for a in self.space.homogeneous_configs() if self.table.predict(a) >= lowest and a != self.space.full()
        ]
        return sorted(pool, key=self.table.predict) or [self.space.full()]

    def for_budget(self, frac: float, gen: torch.Generator) -> ArchConfig:
        """A per-layer configuration of predicted cost within ``frac`` of the full cost (``budget``
        mode's search; the smallest configuration when none fits)."""
        sp, budget = self.space, frac * self.table.full
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


def batch_for_step(
    blocks: torch.Tensor, step: int, global_batch: int, seed: int, rank: int, world: int
) -> torch.Tensor:
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


def data_sha256(blocks: torch.Tensor) -> str:
    return hashlib.sha256(blocks.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def run_steps(
    *,
    stage: str,
    start: int,
    steps: int,
    step_fn: Callable[[int], dict],
    save: Callable[[int], None],
    checkpoint_every: int,
    interrupt,
    accelerator,
    metrics,
    progress: bool,
    where: str = "",
    postfix: Callable[[dict], dict] = lambda rec: {},
) -> None:
    """Steps ``start … steps − 1`` of a training stage, the same for every stage that trains:
    ``step_fn(step)`` runs one step and returns its metrics, which go to ``metrics`` (and, through
    ``postfix``, to the progress bar); a checkpoint (``save(step + 1)``) every ``checkpoint_every``
    steps, at the last step and when SIGINT/SIGTERM was received (``interrupt.requested`` on any
    process), after which :class:`KeyboardInterrupt` is raised (its message names ``where``, the
    checkpoint folder)."""
    bar = tqdm(
        range(start, steps),
        desc=stage,
        disable=not (progress and accelerator.is_main_process),
        initial=start,
        total=steps,
    )
    for step in bar:
        rec = step_fn(step)
        metrics.write(stage=stage, step=step, **rec)
        if progress:
            bar.set_postfix(**postfix(rec))
        stop = any_rank(accelerator, interrupt.requested)
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps or stop:
            save(step + 1)
        if stop:
            raise KeyboardInterrupt(f"{stage} interrupted; checkpoint of step {step + 1} saved {where}".rstrip())


def lm_loop(
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
    guard=None,
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
    optimizer state stay float32; the loss is computed in float32). ``guard``: a
    :class:`~flextron.train.guard.TrainingGuard` measured at the start and when due (its state goes
    into the checkpoints; the step's metrics get ``guard_loss``); when it fires it stops the stage
    (``stop``: raises), warns, or restores the best weights and ends the stage early (``rollback``).
    The returned summary then has ``guard`` and ``steps_skipped``.

    Raises:
        TrainingError: the guard fired with ``action: stop``.
        ConfigError: the accelerator's gradient accumulation differs from ``grad_accum``.
        ModelError: the checkpoint to resume is corrupt or was written with other settings.
        KeyboardInterrupt: after SIGINT/SIGTERM, once the current step is checkpointed.
    """
    if accelerator.gradient_accumulation_steps != grad_accum:
        raise ConfigError(
            f"{stage}: the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches, "
            f"the config grad_accum={grad_accum}; build it with make_accelerator({grad_accum}, ...)"
        )
    opt = torch.optim.AdamW(param_groups, betas=(0.9, 0.95))
    base_lrs = [g["lr"] for g in param_groups]
    world, rank = accelerator.num_processes, accelerator.process_index
    n_rows = micro_batch * world * grad_accum
    settings = {
        "steps": steps,
        "global_batch": n_rows,
        "lrs": base_lrs,
        "warmup": warmup,
        "min_lr_ratio": min_lr_ratio,
        "max_grad_norm": max_grad_norm,
        "seed": seed,
        "data_sha256": data_sha256(blocks),
        "mixed_precision": mixed_precision,
    }
    ckpt = StageCheckpoints(run_dir / "checkpoints" / stage, accelerator, modules, opt, settings)
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    state = ckpt.resume()
    start = state["step"] if state else 0
    if guard is not None:
        guard.load((state or {}).get("guard"))
        guard.begin(start)
    metrics.truncate(stage, start - 1)
    wrapped = {
        k: accelerator.prepare(m) if any(p.requires_grad for p in m.parameters()) else m for k, m in modules.items()
    }
    opt = accelerator.prepare(opt)
    cuda = [accelerator.device.index or 0] if accelerator.device.type == "cuda" else []
    steps_run = tokens = 0
    t0 = time.time()

    def one_step(step: int) -> dict:
        nonlocal steps_run, tokens
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
                    loss, rec = step_fn(
                        step, batch, step_generator(seed, step), wrapped, slice(first, first + micro_batch), n_rows
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients and max_grad_norm > 0:
                    accelerator.clip_grad_norm_([p for g in param_groups for p in g["params"]], max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            tokens += batch.numel() * world
        steps_run += 1
        rec = {"lr": opt.param_groups[0]["lr"], **rec}
        if guard is not None and guard.due(step + 1, steps):
            rec["guard_loss"] = loss = guard.measure(step + 1)
            if any_rank(accelerator, guard.exceeded(loss)) and guard.act(step + 1, loss):
                metrics.write(stage=stage, step=step, **rec)  # run_steps would have written it
                raise _EndStage(step + 1)
        return rec

    ended = None
    with deferred_interrupt() as interrupt:
        try:
            run_steps(
                stage=stage,
                start=start,
                steps=steps,
                step_fn=one_step,
                save=lambda s: ckpt.save(s, extra={"guard": guard.state()} if guard is not None else None),
                checkpoint_every=checkpoint_every,
                interrupt=interrupt,
                accelerator=accelerator,
                metrics=metrics,
                progress=progress,
                where=f"in {ckpt.root}",
                postfix=lambda rec: {"loss": f"{rec.get('lm_loss', float('nan')):.3f}"},
            )
        except _EndStage as end:  # the guard rolled back: the stage ends with the best weights
            ended = end.step
    summary = {
        "steps": steps,
        "steps_run_now": steps_run,
        "resumed_from": start,
        "tokens": tokens,
        "processes": world,
        "wall_s": time.time() - t0,
    }
    if guard is not None:
        summary["guard"] = guard.summary()
        summary["steps_skipped"] = steps - ended if ended is not None else 0
    return summary


class _EndStage(Exception):
    """The guard ended the stage after ``step`` steps (rolled back to the best weights)."""

    def __init__(self, step: int) -> None:
        self.step = step


def teacher_logits(teacher: torch.nn.Module | None, batch: torch.Tensor, alpha: float) -> torch.Tensor | None:
    if teacher is None or alpha == 0:
        return None
    with torch.no_grad():
        return teacher.to(batch.device)(input_ids=batch, use_cache=False).logits
