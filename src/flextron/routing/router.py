"""Static routers: map a latency target to per-layer logits (METHOD §6), and the machinery every
router shares: target encoding, straight-through Gumbel-softmax choices, choices → configurations
or nested masks (METHOD §3), and the latency loss (METHOD §7).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from flextron.model.space import ArchConfig, SearchSpace, nested_mask


def encode_targets(ts: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Targets ``t`` (B,) → one-hot over the sorted trained targets ``ts`` (n_targets,), linearly
    interpolated between neighbours and clamped to the trained range: ``(B, n_targets)`` (METHOD §6)."""
    t = t.to(ts).clamp(ts[0], ts[-1])
    if len(ts) == 1:
        return torch.ones(t.shape[0], 1, dtype=ts.dtype, device=t.device)
    hi = torch.searchsorted(ts, t).clamp(1, len(ts) - 1)  # (B,)
    lo = hi - 1
    w = ((t - ts[lo]) / (ts[hi] - ts[lo])).clamp(0, 1)
    enc = torch.zeros(t.shape[0], len(ts), dtype=ts.dtype, device=t.device)
    enc.scatter_(1, lo[:, None], (1 - w)[:, None])
    enc.scatter_add_(1, hi[:, None], w[:, None])
    return enc


class Router(nn.Module):
    """What every router is (METHOD §6): latency targets (and, for a dynamic router, the input's
    hidden state) → per-layer logits over the MLP widths ``(…, L, K_mlp)`` and head counts
    ``(…, L, K_heads)`` of the search space.

    A static router is the case without hidden-state input (``reads_input = False``): its logits
    for a batch of targets ``t`` (B,) come from ``forward(t)``. A dynamic router
    (:class:`~flextron.routing.dynamic_router.DynamicRouter`, ``reads_input = True``) is applied
    layer by layer inside the forward (:class:`~flextron.routing.runtime.DynamicRouting`).
    Both carry the sorted trained ``targets`` buffer ``(n_t,)`` and the sizes ``num_layers``,
    ``n_mlp``, ``n_heads``; :meth:`init_args` gives the constructor's arguments, which the
    router files record so that :func:`~flextron.routing.store.load_router` rebuilds either kind.
    """

    kind: str = ""
    reads_input: bool = False

    @property
    def trained_targets(self) -> list[float]:
        """The trained targets as Python floats (rounded to 6 digits: the buffer is float32)."""
        return [round(x, 6) for x in self.targets.tolist()]

    def init_args(self) -> dict:
        """The constructor's keyword arguments (JSON-ready)."""
        raise NotImplementedError


class StaticRouter(Router):
    """Target → per-layer logits (paper §3.2, static router).

    The target is encoded as a one-hot over the trained ``targets``, linearly interpolated between
    neighbours for untrained values (METHOD §6 choice). Linear → LeakyReLU → Linear.
    """

    kind = "static"
    reads_input = False

    def __init__(
        self, targets: tuple[float, ...], num_layers: int, n_mlp: int, n_heads: int, hidden: int = 128
    ) -> None:
        super().__init__()
        self.register_buffer("targets", torch.tensor(sorted(targets), dtype=torch.float32))
        self.num_layers, self.n_mlp, self.n_heads, self.hidden = num_layers, n_mlp, n_heads, hidden
        self.net = nn.Sequential(
            nn.Linear(len(targets), hidden), nn.LeakyReLU(), nn.Linear(hidden, num_layers * (n_mlp + n_heads))
        )

    def init_args(self) -> dict:
        return {
            "targets": self.trained_targets,
            "num_layers": self.num_layers,
            "n_mlp": self.n_mlp,
            "n_heads": self.n_heads,
            "hidden": self.hidden,
        }

    def encode(self, t: torch.Tensor) -> torch.Tensor:
        """Targets ``(B,)`` → interpolated one-hot ``(B, n_targets)`` (clamped to the trained range)."""
        return encode_targets(self.targets, t)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``t`` (B,) → MLP logits ``(B, L, K_mlp)`` and head logits ``(B, L, K_heads)``."""
        out = self.net(self.encode(t)).view(t.shape[0], self.num_layers, self.n_mlp + self.n_heads)
        return out[..., : self.n_mlp], out[..., self.n_mlp :]


def gumbel_choice(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Straight-through Gumbel-softmax: hard one-hot forward, soft gradient (same shape as
    ``logits``). Uses an explicit generator so every process draws the same noise."""
    u = torch.rand(logits.shape, generator=generator, device="cpu").to(logits.device).clamp(1e-9, 1 - 1e-9)
    soft = F.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)
    hard = F.one_hot(soft.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard + soft - soft.detach()


def choices_to_archs(space: SearchSpace, mlp: torch.Tensor, heads: torch.Tensor) -> list[ArchConfig]:
    """(B, L, K) one-hot (or probabilities: argmax) → one :class:`ArchConfig` per row."""
    mi, hi = mlp.argmax(-1).tolist(), heads.argmax(-1).tolist()
    return [space.from_indices(a, b) for a, b in zip(mi, hi)]


def choices_to_masks(
    space: SearchSpace, mlp: torch.Tensor, heads: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(B, L, K) choice probabilities → per-layer masks for :meth:`ElasticModel.set_masks`:
    ``(B, intermediate_size)`` and ``(B, num_attention_heads)`` (METHOD §3)."""
    mlp_masks = [nested_mask(mlp[:, l], space.mlp_choices, space.intermediate_size) for l in range(space.num_layers)]
    head_masks = [space.head_mask(heads[:, l]) for l in range(space.num_layers)]
    return mlp_masks, head_masks


def latency_loss(expected_fraction: torch.Tensor, target: torch.Tensor, tol: float) -> torch.Tensor:
    """``max(0, |E[latency] / (t · latency_full) − 1| − tol)`` per row (METHOD §7), shape (B,).
    ``expected_fraction`` is already divided by the full latency."""
    return F.relu((expected_fraction / target - 1).abs() - tol)
