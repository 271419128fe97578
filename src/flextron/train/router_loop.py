"""The one router-training loop (METHOD §7), shared by static and dynamic routers.

A router of either kind is trained with the LLM frozen. Each step *draws* from the router
(:class:`RouterDraw`: straight-through Gumbel choices ``(B, L, K)`` for a batch of targets and, for
a dynamic router, of inputs) and *updates* it (:func:`router_update`): the measured Δloss of the
drawn configurations joins the surrogate's buffer, the surrogate is refitted, its held-out gate is
checked, and the router's loss is ``λ · latency_loss`` plus the surrogate's prediction once the
gate is open (the surrogate path) or plus the LM loss through soft masks (the direct-gradient
ablation). The steps run through :func:`~flextron.train.loop.run_steps` with metrics, checkpoints
and SIGINT/SIGTERM deferral, like every stage that trains. What differs between the kinds is only
how a step draws: a static router scores one fixed text batch per configuration
(:mod:`flextron.train.routers`), a dynamic router routes each input by its hidden state
(:mod:`flextron.train.dynamic`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flextron.model.space import SearchSpace
from flextron.routing.router import latency_loss
from flextron.routing.surrogate import Surrogate, SurrogateFit


@dataclass
class RouterDraw:
    """One step's sample from a router: ``targets`` ``(B,)`` (the target of each row), ``mlp``
    ``(B, L, K_mlp)`` and ``heads`` ``(B, L, K_heads)`` straight-through choices (gradient to the
    router); ``delta`` ``(B,)`` the measured Δloss in nats of each row's configuration (surrogate
    path; ``None`` when not measured), ``features`` ``(B, F)`` the surrogate's input features (a
    dynamic router's input: the full model's loss on it), ``lm`` the LM loss through soft masks
    with gradient to the router (direct path), ``record``: further metrics of the step."""

    targets: torch.Tensor
    mlp: torch.Tensor
    heads: torch.Tensor
    delta: torch.Tensor | None = None
    features: torch.Tensor | None = None
    lm: torch.Tensor | None = None
    record: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RouterObjective:
    """The router's loss (METHOD §7): ``latency_weight`` λ and ``latency_tol`` of the latency
    loss; the surrogate's gate (held-out Spearman ≥ ``gate_spearman`` and error relative to a
    constant predictor ≤ ``gate_error``); ``surrogate_updates`` refits per step; ``surrogate``:
    the surrogate path (``False``: direct LM loss, the ablation); ``average_latency``: the latency
    loss is taken on the batch's average expected latency (a dynamic router: inputs of one target
    share a budget) instead of per row (a static router: each row is its own target)."""

    latency_weight: float
    latency_tol: float
    gate_spearman: float
    gate_error: float
    surrogate_updates: int
    surrogate: bool = True
    average_latency: bool = False


def tau_at(step: int, steps: int, tau_start: float, tau_end: float) -> float:
    """Gumbel-softmax temperature of ``step`` of ``steps``: exponential from ``tau_start`` to ``tau_end``."""
    return tau_start * (tau_end / tau_start) ** (step / max(1, steps - 1))


def add_measurements(fit: SurrogateFit, draw: RouterDraw) -> None:
    """Record the draw's measured Δloss (one per row) in the surrogate's buffer."""
    for b in range(draw.mlp.shape[0]):
        feats = None if draw.features is None else draw.features[b]
        fit.add(draw.mlp[b], draw.heads[b], float(draw.delta[b]), feats)


def router_update(
    draw: RouterDraw,
    *,
    opt: torch.optim.Optimizer,
    fit: SurrogateFit,
    surrogate: Surrogate,
    table,
    space: SearchSpace,
    objective: RouterObjective,
    gen: torch.Generator,
    mine: slice = slice(None),
    surrogate_grad: bool = True,
) -> dict:
    """One update of a router from ``draw`` (module docstring); ``mine``: this process's rows of
    the batch (DDP averages the routers' gradients over processes); ``surrogate_grad``: whether the
    surrogate may give the router a gradient at this step (``False`` during a warm-up). Returns the
    step's metrics: latency loss and error, the surrogate's held-out accuracy and gate, and
    ``surrogate_grad`` (whether the surrogate's prediction was in the loss)."""
    if draw.delta is not None:
        add_measurements(fit, draw)
        fit.fit(objective.surrogate_updates, gen=gen)
    ev = fit.evaluate()
    gate = ev["heldout_spearman"] >= objective.gate_spearman and ev["heldout_relative_error"] <= objective.gate_error
    t = draw.targets.to(draw.mlp.device)
    frac = table.expected(draw.mlp, draw.heads, space.mlp_choices, space.head_choices) / table.full  # (B,)
    if objective.average_latency:
        mean = frac[mine].mean()
        lat = latency_loss(mean[None], t[:1].to(mean.dtype), objective.latency_tol)  # (1,)
        lat_err = float((mean.detach() / t[0] - 1).abs())
    else:
        lat = latency_loss(frac, t, objective.latency_tol)  # (B,)
        lat_err = float((frac.detach() / t - 1).abs().mean())
        lat = lat[mine]
    loss = objective.latency_weight * lat.mean()
    sm_grad = False
    if draw.lm is not None:
        loss = loss + draw.lm
    elif objective.surrogate and gate and surrogate_grad:
        surrogate.eval()
        feats = None if draw.features is None else draw.features[mine]
        loss = loss + surrogate(draw.mlp[mine], draw.heads[mine], feats).mean()
        sm_grad = True
    opt.zero_grad(set_to_none=True)
    if loss.requires_grad:
        loss.backward()
        opt.step()
    return {
        "router_loss": float(loss.detach()),
        "latency_loss": float(lat.detach().mean()),
        "latency_error": lat_err,
        "mean_fraction": float(frac.detach().mean()),
        "surrogate_heldout_mae": ev["heldout_mae"],
        "surrogate_spearman": ev["heldout_spearman"],
        "surrogate_relative_error": ev["heldout_relative_error"],
        "surrogate_gate_open": gate,
        "surrogate_grad": sm_grad,
    }


def router_postfix(rec: dict) -> dict:
    """The progress bar of a router stage: latency error and the surrogate's held-out Spearman."""
    return {
        "lat_err": f"{rec.get('latency_error', float('nan')):.3f}",
        "rho": f"{rec.get('surrogate_spearman', float('nan')):.2f}",
    }
