"""Surrogate model: predicts the LM loss of a sub-network from router outputs (METHOD §7).

Input: per-layer one-hot (or straight-through) choices over MLP widths ``(B, L, K_mlp)`` and head
counts ``(B, L, K_heads)``. Output: the predicted loss increase over the full model
``ℓ(c) − ℓ_full`` on the same text, shape ``(B,)``. The routers are trained through it because
back-propagating the LM loss through the whole LLM gives vanishing, noisy gradients (paper §3.3).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from flextron.model.space import ArchConfig, SearchSpace


def encode_arch(space: SearchSpace, arch: ArchConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One-hot encoding of a configuration: ``(L, K_mlp)`` and ``(L, K_heads)`` float32."""
    mi, hi = space.indices(arch)
    return (
        F.one_hot(torch.tensor(mi), len(space.mlp_choices)).float(),
        F.one_hot(torch.tensor(hi), len(space.head_choices)).float(),
    )


class Surrogate(nn.Module):
    """Two-layer MLP (hidden ``P``) over the concatenated per-layer choices (paper §3.3, Eq. 9).

    ``n_features > 0`` (dynamic routers, :mod:`flextron.train.dynamic`): the input also holds
    per-input features (e.g. the full model's loss on that input), so the predicted Δloss can
    depend on the input as well as on the configuration."""

    def __init__(self, num_layers: int, n_mlp: int, n_heads: int, hidden: int = 256, n_features: int = 0) -> None:
        super().__init__()
        self.n_features = n_features
        self._args = {
            "num_layers": num_layers,
            "n_mlp": n_mlp,
            "n_heads": n_heads,
            "hidden": hidden,
            "n_features": n_features,
        }
        self.net = nn.Sequential(
            nn.Linear(num_layers * (n_mlp + n_heads) + n_features, hidden), nn.LeakyReLU(), nn.Linear(hidden, 1)
        )

    def init_args(self) -> dict:
        """The constructor's keyword arguments (JSON-ready), for the router files."""
        return dict(self._args)

    def forward(self, mlp: torch.Tensor, heads: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """``mlp`` (B, L, K_mlp), ``heads`` (B, L, K_heads), ``features`` (B, n_features) → predicted Δloss (B,)."""
        parts = [mlp.flatten(1), heads.flatten(1)] + ([features.to(mlp.dtype)] if self.n_features else [])
        x = torch.cat(parts, dim=1)  # (B, L·(K_mlp+K_heads) + n_features)
        return self.net(x.to(self.net[0].weight.dtype)).squeeze(-1)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (no tie correction)."""
    if a.numel() < 2:
        return float("nan")
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / den) if den > 0 else 0.0


@dataclass
class SurrogateFit:
    """Online fit of the surrogate: a replay buffer of measured (configuration, Δloss) pairs and
    a fixed held-out set of configurations for the accuracy gate."""

    model: Surrogate
    lr: float = 1e-3
    mlp: list[torch.Tensor] = field(default_factory=list)
    heads: list[torch.Tensor] = field(default_factory=list)
    delta: list[float] = field(default_factory=list)
    features: list[torch.Tensor] = field(default_factory=list)
    heldout: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    heldout_features: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=1e-4)

    def add(self, mlp: torch.Tensor, heads: torch.Tensor, delta: float, features: torch.Tensor | None = None) -> None:
        """Record one measurement: one-hot ``mlp`` (L, K_mlp), ``heads`` (L, K_heads), Δloss, and the
        input's ``features`` (n_features,) when the surrogate reads them."""
        self.mlp.append(mlp.detach().float().cpu())
        self.heads.append(heads.detach().float().cpu())
        self.delta.append(float(delta))
        if features is not None:
            self.features.append(features.detach().float().cpu())

    def set_heldout(
        self, mlp: torch.Tensor, heads: torch.Tensor, delta: torch.Tensor, features: torch.Tensor | None = None
    ) -> None:
        """Held-out configurations ``(N, L, K)`` with their measured Δloss ``(N,)`` (and input
        features ``(N, n_features)``)."""
        self.heldout = (mlp.float(), heads.float(), delta.float())
        self.heldout_features = None if features is None else features.float()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The buffer and held-out set as tensors, for a checkpoint: ``buffer_mlp`` (N, L, K_mlp),
        ``buffer_heads`` (N, L, K_heads), ``buffer_delta`` (N,) float64 (the recorded floats
        exactly), and ``heldout_mlp``/``heldout_heads``/``heldout_delta`` when set, and the input features
        ``buffer_features`` (N, n_features) / ``heldout_features`` when the surrogate reads them. The optimizer
        is saved separately (``self.opt``)."""
        out = {
            "buffer_mlp": torch.stack(self.mlp) if self.mlp else torch.zeros(0),
            "buffer_heads": torch.stack(self.heads) if self.heads else torch.zeros(0),
            "buffer_delta": torch.tensor(self.delta, dtype=torch.float64),
        }
        if self.features:
            out["buffer_features"] = torch.stack(self.features)
        if self.heldout is not None:
            out.update(zip(("heldout_mlp", "heldout_heads", "heldout_delta"), self.heldout))
        if self.heldout_features is not None:
            out["heldout_features"] = self.heldout_features
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_tensors` returned (replaces the buffer and held-out set).

        Raises:
            KeyError: a buffer tensor is missing; ValueError: their lengths differ.
        """
        mlp, heads, delta = tensors["buffer_mlp"], tensors["buffer_heads"], tensors["buffer_delta"]
        if not (len(mlp) == len(heads) == len(delta)):
            raise ValueError(f"surrogate buffer lengths differ: {len(mlp)}, {len(heads)}, {len(delta)}")
        feats = tensors.get("buffer_features")
        if feats is not None and len(feats) != len(delta):
            raise ValueError(f"surrogate buffer holds {len(delta)} measurements but {len(feats)} feature rows")
        self.mlp, self.heads, self.delta = list(mlp), list(heads), delta.tolist()
        self.features = [] if feats is None else list(feats)
        if "heldout_delta" in tensors:
            self.heldout = (tensors["heldout_mlp"], tensors["heldout_heads"], tensors["heldout_delta"])
        self.heldout_features = tensors.get("heldout_features")

    def fit(self, updates: int, batch_size: int = 64, gen: torch.Generator | None = None) -> float:
        """``updates`` AdamW steps of MSE on random minibatches of the buffer; returns the last loss."""
        if not self.delta:
            return float("nan")
        m, h = torch.stack(self.mlp), torch.stack(self.heads)
        f = torch.stack(self.features) if self.features else None
        y = torch.tensor(self.delta, dtype=self.model.net[0].weight.dtype)
        loss = torch.tensor(float("nan"))
        self.model.train()
        for _ in range(updates):
            idx = torch.randint(len(y), (min(batch_size, len(y)),), generator=gen)
            loss = F.mse_loss(self.model(m[idx], h[idx], None if f is None else f[idx]), y[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out accuracy: mean absolute error (nats), the same relative to a constant
        predictor's (the mean absolute deviation of the held-out Δloss; 1.0 = no better than a
        constant), and Spearman rank correlation."""
        assert self.heldout is not None, "call set_heldout first"
        m, h, y = self.heldout
        pred = self.model(m, h, self.heldout_features)
        mae = float((pred - y).abs().mean())
        spread = float((y - y.mean()).abs().mean())
        return {
            "heldout_mae": mae,
            "heldout_relative_error": mae / spread if spread > 0 else float("inf"),
            "heldout_spearman": spearman(pred, y),
        }
