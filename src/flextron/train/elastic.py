"""Stage 3: elastic continued training (METHOD §4): each step trains a sampled sub-network or the
full model, distilled from the original model, through :func:`~flextron.train.loop.lm_loop`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import Accelerator

from flextron.config import TrainConfig
from flextron.model.elastic import ElasticModel
from flextron.train.distributed import make_accelerator
from flextron.train.loop import BudgetSampler, lm_loop, teacher_logits
from flextron.train.losses import lm_kd_loss

log = logging.getLogger(__name__)


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
    guard=None,
) -> dict:
    """Elastic continued training (METHOD §4): each step trains one sampled sub-network, sliced
    (full speed), on ``(1 − α)·CE + α·KL(teacher ‖ student)``. Logs the sampled budget.
    ``min_fraction``: lowest budget sampled (fraction of full cost; see :class:`BudgetSampler`).
    ``sampler``: any object with ``sample(gen) -> (ArchConfig, budget fraction or None)`` used
    instead of the :class:`BudgetSampler` built from ``cfg`` (e.g. one fixed configuration, to
    fine-tune a single pruned sub-network with the same loop).
    ``accelerator``: default ``make_accelerator(cfg.grad_accum)``. ``guard``: a
    :class:`~flextron.train.guard.TrainingGuard` of the full model (see
    :func:`~flextron.train.loop.lm_loop`; raises TrainingError when it stops the stage).

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
        loss, ce, kd = lm_kd_loss(out.logits, batch, teacher_logits(teacher, batch, cfg.kd_alpha), cfg.kd_alpha)
        budgets[step] = frac
        return loss, {
            "lm_loss": float(ce),
            "kd_loss": float(kd),
            "budget": frac,
            "predicted_fraction": table.predict(arch) / table.full,
        }

    summary = lm_loop(
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
        guard=guard,
    )
    fx.set_arch(None)
    fx.eval()
    summary["full_model_steps"] = sum(b is None for b in budgets.values())
    return summary
