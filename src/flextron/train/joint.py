"""Stage 5 (end): joint fine-tuning of the model and the static routers (METHOD §8) through
:func:`~flextron.train.loop.lm_loop`; one step in ``p_full`` trains the full model alone.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import Accelerator

from flextron.config import DynamicConfig, JointConfig, RouterConfig
from flextron.model.elastic import ElasticModel
from flextron.routing.router import Router, choices_to_masks, gumbel_choice, latency_loss
from flextron.routing.runtime import DynamicRouting
from flextron.train.distributed import make_accelerator
from flextron.train.loop import lm_loop, teacher_logits
from flextron.train.losses import lm_kd_loss

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- joint fine-tuning


def train_joint(
    fx: ElasticModel,
    teacher: torch.nn.Module | None,
    router: Router,
    table,
    blocks: torch.Tensor,
    cfg: JointConfig,
    router_cfg: RouterConfig | DynamicConfig,
    run_dir: Path,
    *,
    seed: int = 0,
    accelerator: Accelerator | None = None,
    progress: bool = True,
    stage: str = "joint",
    guard=None,
) -> dict:
    """Joint fine-tuning of model and router (METHOD §8): each sequence of a step's batch gets a
    target from the trained set (drawn for the whole step, then sliced, so the split over
    processes and micro-batches does not matter); the router's straight-through choices become
    soft masks (masked forward, differentiable), and the loss is LM + KD + λ · latency loss. The
    router's learning rate is higher than the model's. A share ``cfg.p_full`` of the steps (drawn
    per step, the same on every rank) trains the full model alone on LM + KD, as elastic
    training does, so the full model is not left to drift. ``accelerator``: default
    ``make_accelerator(cfg.grad_accum)``.

    The router may be of either kind: a static one maps each sequence's target to its choices; a
    dynamic one (:class:`~flextron.routing.runtime.DynamicRouting`, masked) routes every sequence
    of the step at one target drawn from its trained targets below 1, and the latency loss is on
    the batch's average (its inputs share a budget). ``router_cfg`` gives ``targets``, ``tau_end``,
    ``latency_weight`` and ``latency_tol``; ``stage`` names the metrics and the checkpoint folder
    (``run_dir/checkpoints/<stage>``). ``guard``: a :class:`~flextron.train.guard.TrainingGuard`
    of the full model (see :func:`~flextron.train.loop.lm_loop`)."""
    accelerator = accelerator or make_accelerator(cfg.grad_accum)
    sp = fx.space
    for p in fx.parameters():
        p.requires_grad_(True)
    fx.train()
    router.train()
    fx.set_arch(None)
    targets = torch.tensor(router_cfg.targets)

    full_steps: set[int] = set()

    below = targets[targets < 1]  # a dynamic router's step targets (1.0 is the full model)

    def step_fn(step: int, batch: torch.Tensor, gen: torch.Generator, wrapped: dict, rows: slice, n_rows: int):
        full = torch.rand((), generator=gen).item() < cfg.p_full  # the full model alone; the router is not run
        routing = None
        if full:
            full_steps.add(step)
        elif router.reads_input:  # one target for the step; every sequence routed by its hidden state
            t = below[torch.randint(len(below), (1,), generator=gen)].expand(batch.shape[0]).to(batch.device)
            routing = DynamicRouting(
                fx, router, float(t[0]), tau=router_cfg.tau_end, generator=gen, masked=True, grad=True
            )
        else:
            t = targets[torch.randint(len(targets), (n_rows,), generator=gen)].to(batch.device)  # the step's targets
            mlp_logits, head_logits = wrapped["router"](t)
            mlp_c = gumbel_choice(mlp_logits, router_cfg.tau_end, gen)[rows]
            head_c = gumbel_choice(head_logits, router_cfg.tau_end, gen)[rows]
            t = t[rows]
            fx.set_masks(*choices_to_masks(sp, mlp_c, head_c))
        with routing or nullcontext():
            out = wrapped["model"](input_ids=batch, use_cache=False)
            if routing is not None:
                mlp_c, head_c = routing.stacked()
        fx.set_masks(None, None)
        loss, ce, kd = lm_kd_loss(out.logits, batch, teacher_logits(teacher, batch, cfg.kd_alpha), cfg.kd_alpha)
        rec = {"lm_loss": float(ce), "kd_loss": float(kd), "full_model": full}
        if full:
            return loss, rec
        frac = table.expected(mlp_c, head_c, sp.mlp_choices, sp.head_choices) / table.full
        if routing is not None:
            frac, t = frac.mean()[None], t[:1]
        lat = latency_loss(frac, t, router_cfg.latency_tol).mean()
        return loss + router_cfg.latency_weight * lat, {
            **rec,
            "latency_loss": float(lat.detach()),
            "latency_error": float((frac.detach() / t - 1).abs().mean()),
            "mean_fraction": float(frac.detach().mean()),
        }

    summary = lm_loop(
        stage=stage,
        modules={"model": fx, "router": router},
        param_groups=[
            {"params": list(fx.parameters()), "lr": cfg.model_lr, "weight_decay": 0.0},
            {"params": [p for p in router.parameters() if p.requires_grad], "lr": cfg.router_lr, "weight_decay": 0.0},
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
        guard=guard,
    )
    fx.eval()
    router.eval()
    summary["full_model_steps"] = len(full_steps)
    return summary
