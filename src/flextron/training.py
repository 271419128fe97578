"""Stages 3, 5: elastic continued training, router training, joint fine-tuning (METHOD §4, §7, §8).

Inputs: an :class:`~flextron.elastic.ElasticModel`, a frozen teacher (the original model, for
distillation), training blocks ``(N, T)`` of token ids, the cost table. Outputs: trained weights
(in place), checkpoints under ``run_dir/checkpoints/<stage>/`` (safetensors + JSON, atomic), and
metrics as JSON lines in ``run_dir/metrics.jsonl``.

The same code runs on one process or under ``accelerate launch`` (DDP): every rank samples the
same sub-network and target each step (seeded by step, not by rank) and takes its own slice of
the global batch.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm.auto import tqdm

from .config import JointConfig, RouterConfig, TrainConfig
from .elastic import ArchConfig, ElasticModel, SearchSpace
from .errors import ModelError
from .routers import StaticRouter, TargetRouter, choices_to_archs, choices_to_masks, fit_to_budget, gumbel_choice, latency_loss
from .surrogate import Surrogate, SurrogateFit, encode_arch

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- losses


def lm_kd_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, teacher_logits: torch.Tensor | None, alpha: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy and forward KL to the teacher (METHOD §4).

    ``logits``/``teacher_logits``: (B, T, V); ``input_ids``: (B, T). Returns
    ``((1 - α)·CE + α·KL, CE, KL)``, each averaged over the B·(T−1) predicted tokens (nats).
    """
    s = logits[:, :-1].flatten(0, 1).float()  # (N, V)
    y = input_ids[:, 1:].flatten()  # (N,)
    ce = F.cross_entropy(s, y)
    if teacher_logits is None or alpha == 0:
        return ce, ce.detach(), torch.zeros((), device=ce.device)
    t = teacher_logits[:, :-1].flatten(0, 1).float()
    kd = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return (1 - alpha) * ce + alpha * kd, ce.detach(), kd.detach()


def cosine_lr(step: int, total: int, warmup: int, base: float, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_ratio · base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """The generator of one step: identical on every rank, independent of resume history."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1))


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


# --------------------------------------------------------------------------- checkpoints & metrics


class MetricsLog:
    """Append-only JSON lines (``metrics.jsonl``), one record per step, tagged with the stage."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate(self, stage: str, after_step: int) -> None:
        """Drop records of ``stage`` beyond ``after_step`` (a resumed stage rewrites them)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        for line in self.path.read_text().splitlines():
            rec = json.loads(line)
            if not (rec.get("stage") == stage and rec.get("step", -1) > after_step):
                keep.append(line)
        _atomic_write(self.path, "".join(k + "\n" for k in keep))

    def write(self, **rec) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(ckpt_root: Path, step: int, modules: dict[str, torch.nn.Module], optimizer, extra: dict) -> Path:
    """Atomically write ``ckpt_root/step_{step:06d}``: module weights and optimizer tensors as
    safetensors, optimizer hyper-parameters and ``extra`` as JSON. Older checkpoints are removed
    only after the new one is complete."""
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".tmp_step_{step:06d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, mod in modules.items():
        save_model(mod, str(tmp / f"{name}.safetensors"))  # handles tied (shared) tensors
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    save_file(tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(
        json.dumps({"step": step, "param_groups": sd["param_groups"], "optimizer_scalars": scalars, **extra})
    )
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in ckpt_root.glob("step_*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories are ignored)."""
    done = sorted(p for p in Path(ckpt_root).glob("step_*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizer) -> dict:
    """Restore modules and optimizer from :func:`save_checkpoint`; returns the JSON state.

    Raises:
        ModelError: a file is missing or corrupt, or shapes differ from the model.
    """
    try:
        state = json.loads((path / "state.json").read_text())
        for name, mod in modules.items():
            missing, unexpected = load_model(mod, str(path / f"{name}.safetensors"), strict=False)
            if missing or unexpected:
                raise ValueError(f"{name}: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        tensors = load_file(path / "optimizer.safetensors")
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise ModelError(f"checkpoint {path} is unreadable ({e}); delete it to restart this stage") from None
    opt_state: dict = {}
    for key, v in list(tensors.items()) + list(state["optimizer_scalars"].items()):
        pid, k = key.split(".", 1)
        opt_state.setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return state


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


def make_accelerator(grad_accum: int = 1) -> Accelerator:
    """One ``Accelerator`` for every training stage; unused-parameter detection is on because a
    sub-network may leave parameters out of the graph."""
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


# --------------------------------------------------------------------------- the LM training loop


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
    step_fn: Callable[[int, torch.Tensor, torch.Generator, dict], tuple[torch.Tensor, dict]],
    accelerator: Accelerator,
    progress: bool,
) -> dict:
    """Shared loop of elastic training and joint fine-tuning: AdamW, cosine schedule, gradient
    accumulation, atomic checkpoints and resume, metrics. ``step_fn(step, batch, gen, wrapped)``
    returns ``(loss, metrics)`` for one micro-batch; it must call the modules through ``wrapped``
    (the accelerate-prepared ones) so that DDP synchronises gradients."""
    opt = torch.optim.AdamW(param_groups, betas=(0.9, 0.95))
    base_lrs = [g["lr"] for g in param_groups]
    ckpt_root = run_dir / "checkpoints" / stage
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    start = 0
    last = latest_checkpoint(ckpt_root)
    if last is not None:
        st = load_checkpoint(last, modules, opt)
        start = st["step"]
        log.info("%s: resuming from %s (step %d of %d)", stage, last, start, steps)
    metrics.truncate(stage, start - 1)
    wrapped = {k: accelerator.prepare(m) if any(p.requires_grad for p in m.parameters()) else m for k, m in modules.items()}
    opt = accelerator.prepare(opt)
    world, rank = accelerator.num_processes, accelerator.process_index
    global_batch = micro_batch * world
    resumed_steps = 0
    tokens = 0
    t0 = time.time()
    bar = tqdm(range(start, steps), desc=stage, disable=not (progress and accelerator.is_main_process), initial=start, total=steps)
    for step in bar:
        for g, base in zip(opt.param_groups, base_lrs):
            g["lr"] = cosine_lr(step, steps, warmup, base, min_lr_ratio)
        rec: dict = {}
        for micro in range(grad_accum):
            batch = batch_for_step(blocks, step * grad_accum + micro, global_batch, seed, rank, world)
            batch = batch.to(accelerator.device)
            with accelerator.accumulate(*wrapped.values()):
                loss, rec = step_fn(step, batch, step_generator(seed, step * grad_accum + micro), wrapped)
                accelerator.backward(loss)
                if accelerator.sync_gradients and max_grad_norm > 0:
                    accelerator.clip_grad_norm_([p for g in param_groups for p in g["params"]], max_grad_norm)
                opt.step()
                opt.zero_grad(set_to_none=True)
            tokens += batch.numel() * world
        resumed_steps += 1
        metrics.write(stage=stage, step=step, lr=opt.param_groups[0]["lr"], **rec)
        if progress:
            bar.set_postfix(loss=f"{rec.get('lm_loss', float('nan')):.3f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(ckpt_root, step + 1, modules, opt.optimizer if hasattr(opt, "optimizer") else opt, {"stage": stage})
            accelerator.wait_for_everyone()
    return {"steps": steps, "steps_run_now": resumed_steps, "resumed_from": start, "tokens": tokens, "wall_s": time.time() - t0}


def _teacher_logits(teacher: torch.nn.Module | None, batch: torch.Tensor, alpha: float) -> torch.Tensor | None:
    if teacher is None or alpha == 0:
        return None
    with torch.no_grad():
        return teacher(input_ids=batch, use_cache=False).logits


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

    ``blocks``: training token ids (N, T). Returns a summary dict (steps, tokens, wall time,
    histogram counts of sampled budgets).
    """
    accelerator = accelerator or make_accelerator(cfg.grad_accum)
    sampler = sampler or BudgetSampler(fx.space, table, cfg.p_full, cfg.sampling, min_fraction)
    for p in fx.parameters():
        p.requires_grad_(True)
    fx.train()
    budgets: list[float | None] = []

    def step_fn(step: int, batch: torch.Tensor, gen: torch.Generator, wrapped: dict):
        arch, frac = sampler.sample(gen)
        fx.set_arch(arch)
        out = wrapped["model"](input_ids=batch, use_cache=False)
        loss, ce, kd = lm_kd_loss(out.logits, batch, _teacher_logits(teacher, batch, cfg.kd_alpha), cfg.kd_alpha)
        budgets.append(frac)
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
    )
    fx.set_arch(None)
    fx.eval()
    summary["full_model_steps"] = sum(b is None for b in budgets)
    return summary


# --------------------------------------------------------------------------- router training (surrogate)


@torch.no_grad()
def lm_loss_at(fx: ElasticModel, arch: ArchConfig | None, batch: torch.Tensor) -> float:
    """Mean next-token CE (nats) of ``arch`` (sliced, no grad) on ``batch`` (B, T)."""
    fx.set_arch(arch)
    logits = fx(input_ids=batch, use_cache=False).logits
    return float(lm_kd_loss(logits, batch, None, 0.0)[1])


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
    progress: bool = True,
) -> dict:
    """Router training with the LLM frozen (METHOD §7).

    The LM loss of a configuration is measured on one fixed batch (``blocks[:batch_size]``,
    METHOD §7 "or use a fixed batch"), as ``ℓ − ℓ_full`` on that batch, so configurations are
    compared on the same text. Each step: sample targets from :func:`target_grid` → router
    logits → straight-through Gumbel choices → run the LLM (sliced, no grad) at each choice →
    update the surrogate; once the surrogate passes its held-out gate (relative error and
    Spearman), update the router on ``SM(π) + λ · latency_loss``. With ``cfg.surrogate = False``
    (ablation) the router gets the LM loss directly through the soft masks instead.

    With ``cfg.warm_start`` (project choice) the router starts from the best measured
    homogeneous configuration of every grid target, and at the end each grid target's routed
    configuration is kept only if its LM loss on all router blocks (``blocks``, up to four
    batches) is lower than the warm-start configuration's, both fitted to the budget; otherwise
    the router is refitted to the warm start there. The verdicts are in the returned summary.
    """
    fx.eval()
    for p in fx.parameters():
        p.requires_grad_(False)
    sp = fx.space
    metrics = MetricsLog(run_dir / "metrics.jsonl")
    metrics.truncate("routers", -1)
    pool = blocks[: max(1, min(len(blocks) // cfg.batch_size, 4)) * cfg.batch_size].view(-1, cfg.batch_size, blocks.shape[1])
    full_loss = lm_loss_at(fx, None, pool[0])
    sampler = BudgetSampler(sp, table, p_full=0.0, min_fraction=min(cfg.targets))
    fit = SurrogateFit(surrogate, lr=cfg.surrogate_lr)
    gen = torch.Generator().manual_seed(seed + 17)
    t0 = time.time()
    evals = 0

    def measure(arch: ArchConfig) -> float:
        nonlocal evals
        evals += 1
        return lm_loss_at(fx, arch, pool[0]) - full_loss

    # held-out configurations spanning the budget range, and the warm-up buffer
    held = [sampler.sample(gen)[0] for _ in range(cfg.heldout_configs)]
    enc = [encode_arch(sp, a) for a in held]
    held_delta = torch.tensor([measure(a) for a in tqdm(held, desc="routers: held-out configs", disable=not progress, leave=False)])
    fit.set_heldout(torch.stack([e[0] for e in enc]), torch.stack([e[1] for e in enc]), held_delta)
    for _ in tqdm(range(cfg.warmup_samples), desc="routers: surrogate warm-up", disable=not progress, leave=False):
        a = sampler.sample(gen)[0]
        fit.add(*encode_arch(sp, a), measure(a))
    opt = torch.optim.Adam(router.parameters(), lr=cfg.router_lr)
    grid = torch.tensor(target_grid(cfg.targets))
    warm = _warm_start_router(router, opt, fit, measure, sp, table, grid, cfg, progress) if cfg.warm_start else None
    fit.fit(cfg.surrogate_updates * 10, gen=gen)
    ev = fit.evaluate()
    log.info("surrogate after warm-up: held-out MAE %.4f nats (%.2f of a constant predictor's), Spearman %.3f",
             ev["heldout_mae"], ev["heldout_relative_error"], ev["heldout_spearman"])

    grad_steps = 0
    router.train()
    bar = tqdm(range(cfg.steps), desc="routers", disable=not progress)
    for step in bar:
        tau = cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, cfg.steps - 1))
        g = step_generator(seed, step, salt=1)
        t = grid[torch.randint(len(grid), (cfg.batch_size,), generator=g)]
        mlp_logits, head_logits = router(t)
        mlp_c, head_c = gumbel_choice(mlp_logits, tau, g), gumbel_choice(head_logits, tau, g)
        archs = choices_to_archs(sp, mlp_c, head_c)
        deltas = [measure(a) for a in archs]
        for j in range(len(archs)):
            fit.add(mlp_c[j], head_c[j], deltas[j])
        fit.fit(cfg.surrogate_updates, gen=gen)
        ev = fit.evaluate()
        gate = ev["heldout_spearman"] >= cfg.surrogate_gate_spearman and ev["heldout_relative_error"] <= cfg.surrogate_gate_error
        frac = table.expected(mlp_c, head_c, sp.mlp_choices, sp.head_choices) / table.full  # (B,)
        lat = latency_loss(frac, t, cfg.latency_tol).mean()
        loss = cfg.latency_weight * lat
        if cfg.surrogate:
            if gate:
                surrogate.eval()
                loss = loss + surrogate(mlp_c, head_c).mean()
                grad_steps += 1
        else:
            mlp_m, head_m = choices_to_masks(sp, mlp_c, head_c)
            fx.set_arch(None)
            fx.set_masks(mlp_m, head_m)
            with torch.enable_grad():
                lm = lm_kd_loss(fx(input_ids=pool[0], use_cache=False).logits, pool[0], None, 0.0)[0]
            fx.set_masks(None, None)
            loss = loss + lm
            grad_steps += 1
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            opt.step()
        lat_err = float((frac.detach() / t - 1).abs().mean())
        metrics.write(
            stage="routers", step=step, tau=tau, lm_delta=sum(deltas) / len(deltas), latency_loss=float(lat.detach()),
            latency_error=lat_err, surrogate_heldout_mae=ev["heldout_mae"], surrogate_spearman=ev["heldout_spearman"],
            surrogate_relative_error=ev["heldout_relative_error"],
            surrogate_gate_open=gate, router_steps_with_surrogate_grad=grad_steps,
        )
        bar.set_postfix(lat_err=f"{lat_err:.3f}", rho=f"{ev['heldout_spearman']:.2f}")
    router.eval()
    validation = None
    if warm is not None:
        validation = _keep_better_than_warm_start(router, opt, fx, surrogate, table, pool, grid, warm, progress)
        evals += validation.pop("llm_evaluations")
    fx.set_arch(None)
    return {
        "steps": cfg.steps,
        "llm_evaluations": evals,
        "tokens": evals * pool.shape[1] * pool.shape[2],
        "surrogate_heldout_mae": ev["heldout_mae"],
        "surrogate_relative_error": ev["heldout_relative_error"],
        "surrogate_spearman": ev["heldout_spearman"],
        "router_steps_with_surrogate_grad": grad_steps,
        "warm_start": {f"{t:g}": [a.mlp[0], a.heads[0]] for t, a in warm.items()} if warm else None,
        "validation": validation,
        "wall_s": time.time() - t0,
    }


def _fit_router(router: StaticRouter, opt, sp: SearchSpace, targets: list[float], archs: list[ArchConfig], steps: int = 200) -> None:
    """Supervised fit of the router's argmax to ``archs`` at ``targets`` (cross-entropy)."""
    idx = [sp.indices(a) for a in archs]
    mlp_idx = torch.tensor([i[0] for i in idx])  # (n_targets, L)
    head_idx = torch.tensor([i[1] for i in idx])
    t = torch.tensor(targets, dtype=torch.float32)
    router.train()
    for _ in range(steps):
        mlp_logits, head_logits = router(t)
        loss = F.cross_entropy(mlp_logits.flatten(0, 1), mlp_idx.flatten()) + F.cross_entropy(head_logits.flatten(0, 1), head_idx.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    router.eval()


def _warm_start_router(router, opt, fit: SurrogateFit, measure, sp: SearchSpace, table, targets: torch.Tensor, cfg: RouterConfig, progress: bool) -> dict[float, ArchConfig]:
    """Project choice: measure every homogeneous configuration (the measurements also train the
    surrogate), then fit the router to output, for each target, the best homogeneous
    configuration that meets it; surrogate training then departs from that baseline only where
    it predicts a gain. Returns ``{target: configuration}`` of the starting configurations."""
    homo = sp.homogeneous_configs()
    deltas = []
    for a in tqdm(homo, desc="routers: homogeneous configs", disable=not progress, leave=False):
        deltas.append(measure(a))
        fit.add(*encode_arch(sp, a), deltas[-1])
    start = {}
    for t in targets.tolist():
        fits = [(d, a) for d, a in zip(deltas, homo) if table.fraction(a) <= t + cfg.latency_tol]
        start[t] = min(fits, key=lambda x: x[0])[1] if fits else sp.smallest()
    _fit_router(router, opt, sp, list(start), list(start.values()))
    log.info("router warm start (best homogeneous per target): %s", {f"{t:g}": (a.mlp[0], a.heads[0]) for t, a in start.items()})
    return start


@torch.no_grad()
def _keep_better_than_warm_start(router, opt, fx: ElasticModel, surrogate: Surrogate, table, pool: torch.Tensor,
                                 grid: torch.Tensor, warm: dict[float, ArchConfig], progress: bool) -> dict:
    """Validate the surrogate's refinement with the LLM itself: for every grid target, the routed
    configuration (argmax, fitted to the budget) against the warm-start configuration fitted to
    the same budget, by mean LM loss over ``pool`` ``(n_batches, B, T)``; where the routed one is
    not better the router is refitted to the warm start. Returns per target the two losses
    (nats) and which was kept, plus the number of LLM evaluations."""
    sp = fx.space
    tr = TargetRouter(router, table, sp, surrogate)
    score = tr.scorer()
    cache: dict[ArchConfig, float] = {}

    def pooled(arch: ArchConfig) -> float:
        if arch not in cache:
            cache[arch] = sum(lm_loss_at(fx, arch, b) for b in pool) / len(pool)
        return cache[arch]

    verdicts, keep = {}, {}
    for t in tqdm(grid.tolist(), desc="routers: validate against warm start", disable=not progress, leave=False):
        if t >= 1.0 or t < tr.floor:
            keep[t] = sp.full() if t >= 1.0 else warm[t]
            continue
        routed = tr.route(t)
        start = fit_to_budget(sp, table, warm[t], t * table.full, score)
        lr_, lw = pooled(routed), pooled(start)
        kept = "router" if lr_ < lw else "warm start"
        keep[t] = routed if lr_ < lw else start
        verdicts[f"{t:g}"] = {"routed_loss": lr_, "warm_start_loss": lw, "kept": kept}
    with torch.enable_grad():
        _fit_router(router, opt, sp, list(keep), list(keep.values()))
    mismatched = [f"{t:g}" for t, a in keep.items() if t < 1.0 and t >= tr.floor and tr.route(t) != a]
    if mismatched:
        log.warning("router refit does not reproduce the kept configuration at targets %s", mismatched)
    log.info("router validation against the warm start: %s", {t: v["kept"] for t, v in verdicts.items()})
    return {"targets": verdicts, "refit_mismatched_targets": mismatched, "llm_evaluations": len(cache) * len(pool)}


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
    """Joint fine-tuning of model and router (METHOD §8): each sequence of a batch gets a target
    from the trained set; the router's straight-through choices become soft masks (masked
    forward, differentiable), and the loss is LM + KD + λ · latency loss. The router's learning
    rate is higher than the model's."""
    accelerator = accelerator or make_accelerator(1)
    sp = fx.space
    for p in fx.parameters():
        p.requires_grad_(True)
    fx.train()
    router.train()
    fx.set_arch(None)
    targets = torch.tensor(router_cfg.targets)

    def step_fn(step: int, batch: torch.Tensor, gen: torch.Generator, wrapped: dict):
        t = targets[torch.randint(len(targets), (batch.shape[0],), generator=gen)].to(batch.device)
        mlp_logits, head_logits = wrapped["router"](t)
        mlp_c = gumbel_choice(mlp_logits, router_cfg.tau_end, gen)
        head_c = gumbel_choice(head_logits, router_cfg.tau_end, gen)
        fx.set_masks(*choices_to_masks(sp, mlp_c, head_c))
        out = wrapped["model"](input_ids=batch, use_cache=False)
        fx.set_masks(None, None)
        loss, ce, kd = lm_kd_loss(out.logits, batch, _teacher_logits(teacher, batch, cfg.kd_alpha), cfg.kd_alpha)
        frac = table.expected(mlp_c, head_c, sp.mlp_choices, sp.head_choices) / table.full
        lat = latency_loss(frac, t, router_cfg.latency_tol).mean()
        return loss + router_cfg.latency_weight * lat, {
            "lm_loss": float(ce), "kd_loss": float(kd), "latency_loss": float(lat.detach()),
            "latency_error": float((frac.detach() / t - 1).abs().mean()),
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
        grad_accum=1,
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
    )
    fx.eval()
    router.eval()
    return summary
