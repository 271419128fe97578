"""Deployment of static routers (METHOD §9): target → configuration.

:class:`TargetRouter` takes the router's argmax configuration and fits it to the lookup table's
budget (shrunk greedily when over, grown when well under), scored by the surrogate.
:func:`allocate_by_sensitivity` spreads a budget over the layers by measured per-layer
sensitivity (the routers' warm start, a project choice).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from flextron.errors import ConfigError, TargetError
from flextron.model.space import ArchConfig, SearchSpace
from flextron.routing.router import StaticRouter, choices_to_archs
from flextron.routing.surrogate import Surrogate, encode_arch


class TargetRouter:
    """Deployment: target → configuration (METHOD §9).

    ``route(t)``: ``t == 1`` is the full model; otherwise the router's argmax configuration is
    fitted to the budget ``t · full`` of the cost table: while the prediction is over budget, the
    layer choice with the least predicted loss increase per saved second is shrunk; then, while
    an upgrade still fits, the one with the largest predicted loss decrease per added second is
    taken. Scores come from the surrogate (or, without one, from the cost alone).
    """

    def __init__(self, router: StaticRouter, table, space: SearchSpace, surrogate: Surrogate | None = None) -> None:
        self.router, self.table, self.space, self.surrogate = router, table, space, surrogate

    @property
    def floor(self) -> float:
        """Smallest reachable target: the smallest configuration's predicted fraction."""
        return self.table.predict(self.space.smallest()) / self.table.full

    def scorer(self) -> Callable[[list[ArchConfig]], list[float]]:
        """``score(archs) -> list[float]``: the surrogate's predicted Δloss (nats) of each
        configuration, or zeros without a surrogate (then only the cost decides)."""
        if self.surrogate is None:
            return lambda archs: [0.0] * len(archs)

        @torch.no_grad()
        def score(archs: list[ArchConfig]) -> list[float]:
            enc = [encode_arch(self.space, a) for a in archs]
            m = torch.stack([e[0] for e in enc])
            h = torch.stack([e[1] for e in enc])
            return self.surrogate(m, h).tolist()

        return score

    def check_target(self, target: float) -> None:
        """Raises TargetError if ``target`` is outside (0, 1] or below :attr:`floor`."""
        if not (isinstance(target, (int, float)) and math.isfinite(target) and 0 < target <= 1):
            raise TargetError(f"target {target!r} is outside (0, 1]; give a fraction of the full model's latency")
        if target < self.floor - 1e-9:
            raise TargetError(
                f"target {target:g} is below the smallest sub-network's latency ({self.floor:.3f} of the full model); "
                f"choose a target >= {math.ceil(self.floor * 1000) / 1000:.3f}"
            )

    @torch.no_grad()
    def route(self, target: float) -> ArchConfig:
        """The configuration for ``target`` (fraction of full latency). Raises TargetError."""
        self.check_target(target)
        if target >= 1.0:
            return self.space.full()
        self.router.eval()
        mlp_logits, head_logits = self.router(torch.tensor([float(target)]))
        arch = choices_to_archs(self.space, mlp_logits, head_logits)[0]
        return fit_to_budget(self.space, self.table, arch, target * self.table.full, self.scorer())


def _neighbours(space: SearchSpace, arch: ArchConfig, step: int) -> list[ArchConfig]:
    """Configurations that move one layer's MLP or head choice one candidate up (+1) or down (-1)."""
    mi, hi = space.indices(arch)
    out = []
    for l in range(space.num_layers):
        for idx, n in ((mi, len(space.mlp_choices)), (hi, len(space.head_choices))):
            if 0 <= idx[l] + step < n:
                idx[l] += step
                out.append(space.from_indices(mi, hi))
                idx[l] -= step
    return out


def fit_to_budget(space: SearchSpace, table, arch: ArchConfig, budget: float, score) -> ArchConfig:
    """Greedy fit of ``arch`` to ``budget`` (same unit as ``table``) — see :class:`TargetRouter`.
    ``score(archs) -> list[float]`` predicts the loss of each configuration (lower is better)."""
    cost = table.predict(arch)
    base = score([arch])[0]
    while cost > budget:
        cands = _neighbours(space, arch, -1)
        if not cands:
            break
        scores = score(cands)
        costs = [table.predict(c) for c in cands]
        best = min(range(len(cands)), key=lambda i: (scores[i] - base) / max(cost - costs[i], 1e-12))
        arch, cost, base = cands[best], costs[best], scores[best]
    while True:
        cands = [c for c in _neighbours(space, arch, +1) if table.predict(c) <= budget]
        if not cands:
            return arch
        scores = score(cands)
        costs = [table.predict(c) for c in cands]
        best = min(range(len(cands)), key=lambda i: (scores[i] - base) / max(costs[i] - cost, 1e-12))
        arch, cost, base = cands[best], costs[best], scores[best]


def allocate_by_sensitivity(
    space: SearchSpace, table, mlp_sens: np.ndarray, head_sens: np.ndarray, budget: float, resolution: int = 4000
) -> ArchConfig | None:
    """The per-layer configuration of least summed sensitivity whose predicted cost is within
    ``budget`` (project choice, the routers' warm start; not in the paper).

    A multiple-choice knapsack solved exactly by dynamic programming: every layer picks one
    (MLP width, head count) pair, whose cost is ``table.mlp[m] + table.attn_of(l)[a]`` and whose value is
    ``mlp_sens[l, i] + head_sens[l, j]`` — the loss increase (nats) of reducing layer ``l`` alone
    to that width / head count, all other layers full; the sum assumes the layers' effects add.
    Costs are rounded *up* to ``(budget − table.const) / resolution``, so the configuration found
    always fits the budget; the rounding leaves at most ``num_layers`` grid steps unused.

    Args:
        mlp_sens: ``(L, K_mlp)`` loss increase per layer and MLP candidate (0 for the full width).
        head_sens: ``(L, K_heads)`` loss increase per layer and head candidate (0 for all heads).
        budget: the cost limit, in the table's unit (seconds or parameters).
    Returns:
        the configuration, or ``None`` when even the smallest one exceeds the budget.
    Raises:
        ConfigError: the sensitivity arrays do not match the search space.
    """
    L, nm, nh = space.num_layers, len(space.mlp_choices), len(space.head_choices)
    mlp_sens, head_sens = np.asarray(mlp_sens, dtype=np.float64), np.asarray(head_sens, dtype=np.float64)
    if mlp_sens.shape != (L, nm) or head_sens.shape != (L, nh):
        raise ConfigError(
            f"sensitivities of shape {mlp_sens.shape}/{head_sens.shape} do not match the search space "
            f"({L} layers, {nm} MLP and {nh} head candidates)"
        )
    free = budget - table.const
    if free <= 0:
        return None
    cm, ca = (v.double().numpy() for v in table.cost_vectors(space.mlp_choices, space.head_choices))
    ca = np.broadcast_to(ca, (L, nh))  # per layer: layer types may price attention apart
    pair = (cm[None, :, None] + ca[:, None, :]).reshape(L, -1)  # (L, K), K = nm·nh
    cost = np.ceil(pair / (free / resolution)).astype(np.int64)
    value = (mlp_sens[:, :, None] + head_sens[:, None, :]).reshape(L, -1)  # (L, K)
    best = np.zeros(resolution + 1)  # least value of the layers so far within each cost
    pick = np.zeros((L, resolution + 1), dtype=np.int64)
    for l in range(L):
        cand = np.full((cost.shape[1], resolution + 1), np.inf)
        for k, c in enumerate(cost[l]):
            if c <= resolution:
                cand[k, c:] = best[: resolution + 1 - c] + value[l, k]
        pick[l] = cand.argmin(0)
        best = cand[pick[l], np.arange(resolution + 1)]
    full_value = float(mlp_sens[:, -1].sum() + head_sens[:, -1].sum())
    if table.predict(space.full()) <= budget and not best[resolution] < full_value:
        return space.full()  # the rounding can price the full configuration just out of the budget
    if not np.isfinite(best[resolution]):
        return None
    choice, c = [0] * L, resolution
    for l in reversed(range(L)):
        choice[l] = int(pick[l, c])
        c -= int(cost[l, choice[l]])
    return space.from_indices([k // nh for k in choice], [k % nh for k in choice])
