"""The input-adaptive (dynamic) router: per-layer logits from the layer's input hidden state and
the latency target (METHOD §6, dynamic router; a project design around it, below).

For layer ``l`` and input ``x``::

    logits_l(x, t) = A · anchor_l(t) + Δ_l([LN(h̄_l(x)); enc(t)]) − β(t) · L · cost_l

* ``anchor_l(t)``: one-hot of the *static* router's budget-fitted choice at ``t`` (the deployment
  configuration of :class:`~flextron.routing.deploy.TargetRouter`), so the static solution is the
  start and the reference;
* ``Δ_l``: a per-layer 2-layer MLP of the layer's pooled, layer-normalised input hidden state and
  the target encoding; its output layer starts at zero, so the untrained dynamic router *is* the
  static one;
* ``β(t)``: a per-target price of latency (a dual variable; ``cost_l`` is each candidate's LUT cost
  as a fraction of the full model's), fitted so that the *average* predicted latency meets the
  target (:func:`~flextron.routing.calibrate.calibrate_price`).

:class:`~flextron.routing.runtime.DynamicRouting` applies it to a forward.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flextron.errors import ConfigError, TargetError
from flextron.routing.deploy import TargetRouter
from flextron.routing.router import Router, encode_targets


class DynamicRouter(Router):
    """Per-layer router reading the layer's input hidden state (METHOD §6, dynamic router).

    Buffers: ``targets`` (n_t,) sorted trained targets; ``anchor_mlp``/``anchor_heads`` (n_t, L)
    candidate indices of the static budget-fitted configuration at each target; ``price`` (n_t,)
    the latency price β; ``cost_mlp`` (K_mlp,), ``cost_heads`` (K_heads,) the per-layer cost of
    each candidate as a fraction of the full model's latency. Parameters: ``w1`` (L, d + n_t, H),
    ``b1`` (L, H), ``w2`` (L, H, K_mlp + K_heads) (zero at start), ``b2`` (L, K_mlp + K_heads).

    ``route_every`` = k (project choice): the layers ``g·k … g·k + k − 1`` read the hidden state
    at the input of layer ``g·k``; every layer keeps its own router weights and choice. k = 1 is
    METHOD §6 exactly. A larger k reads the hidden state k times less often: on a CPU each read
    and router evaluation costs ~0.2–0.3 ms between the layers' large kernels (router overhead).

    Raises:
        ConfigError: targets outside (0, 1], ``hidden`` < 1, ``anchor_scale`` < 0 or ``route_every``
        outside [1, num_layers].
    """

    kind = "dynamic"
    reads_input = True

    def __init__(
        self,
        targets: Sequence[float],
        num_layers: int,
        hidden_size: int,
        n_mlp: int,
        n_heads: int,
        hidden: int = 64,
        anchor_scale: float = 3.0,
        route_every: int = 1,
    ) -> None:
        super().__init__()
        ts = sorted(float(t) for t in targets)
        if not ts or any(not (0 < t <= 1) for t in ts):
            raise ConfigError(f"dynamic router targets must be fractions in (0, 1], got {list(targets)}")
        if hidden < 1 or anchor_scale < 0:
            raise ConfigError(f"dynamic router needs hidden >= 1 and anchor_scale >= 0, got {hidden}, {anchor_scale}")
        if not (isinstance(route_every, int) and 1 <= route_every <= num_layers):
            raise ConfigError(f"route_every={route_every!r} must be a whole number of layers in [1, {num_layers}]")
        self.route_every = route_every
        self._prepared: dict[float, tuple] = {}  # target → (parameter state, prepare(t, fused=True)); see prepared()
        L, n_t, K = num_layers, len(ts), n_mlp + n_heads
        self.num_layers, self.n_mlp, self.n_heads, self.anchor_scale = L, n_mlp, n_heads, float(anchor_scale)
        self.register_buffer("targets", torch.tensor(ts, dtype=torch.float32))
        self.register_buffer("anchor_mlp", torch.full((n_t, L), n_mlp - 1, dtype=torch.long))
        self.register_buffer("anchor_heads", torch.full((n_t, L), n_heads - 1, dtype=torch.long))
        self.register_buffer("price", torch.zeros(n_t))
        self.register_buffer("cost_mlp", torch.zeros(n_mlp))
        self.register_buffer("cost_heads", torch.zeros(n_heads))
        self.hidden_size = hidden_size
        self.w1 = nn.Parameter(torch.randn(L, hidden_size + n_t, hidden) / math.sqrt(hidden_size + n_t))
        self.b1 = nn.Parameter(torch.zeros(L, hidden))
        self.w2 = nn.Parameter(torch.zeros(L, hidden, K))
        self.b2 = nn.Parameter(torch.zeros(L, K))

    @classmethod
    def from_static(
        cls,
        static: TargetRouter,
        targets: Sequence[float],
        hidden: int = 64,
        anchor_scale: float = 3.0,
        route_every: int = 1,
    ) -> "DynamicRouter":
        """Warm start from a deployed static router: anchors = its budget-fitted configuration at
        every target, costs from its lookup table, price 0 and Δ = 0 (so the dynamic router starts
        as the static one).

        Raises:
            TargetError: a target below the smallest sub-network (from ``static.route``).
        """
        sp, table = static.space, static.table
        r = cls(
            targets,
            sp.num_layers,
            sp.hidden_size,
            len(sp.mlp_choices),
            len(sp.head_choices),
            hidden,
            anchor_scale,
            route_every,
        )
        cm, ch = table.cost_vectors(sp.mlp_choices, sp.head_choices)
        r.cost_mlp.copy_(cm / table.full)
        # a table priced per layer type gives (L, K_heads); the price term of the logits uses the
        # layers' mean (the latency loss and the calibration use the per-layer costs)
        r.cost_heads.copy_((ch.mean(0) if ch.dim() == 2 else ch) / table.full)
        r.anchor_to(static)
        return r

    @torch.no_grad()
    def anchor_to(self, static: TargetRouter, budgets: dict[float, float] | None = None) -> None:
        """Set the anchors to ``static``'s budget-fitted configuration at every trained target, or
        at ``budgets[target]`` (a fraction of full latency) where given: the timed calibration
        lowers or raises a target's budget, and the anchor follows, so that the price only
        fine-tunes around a configuration that fits. (With the same anchor bonus and the same
        per-layer costs in every layer, the price alone moves all layers at the same threshold: a
        router without an input-dependent part would jump between far-apart latencies.)

        Raises:
            TargetError: a budget below the smallest sub-network (from ``static.route``).
        """
        sp = static.space
        for j, t in enumerate(self.trained_targets):
            b = (budgets or {}).get(t, t)
            mi, hi = sp.indices(static.route(min(1.0, b)))
            self.anchor_mlp[j] = torch.tensor(mi, device=self.anchor_mlp.device)
            self.anchor_heads[j] = torch.tensor(hi, device=self.anchor_heads.device)

    def init_args(self) -> dict:
        return {
            "targets": self.trained_targets,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "n_mlp": self.n_mlp,
            "n_heads": self.n_heads,
            "hidden": self.b1.shape[1],
            "anchor_scale": self.anchor_scale,
            "route_every": self.route_every,
        }

    def check_target(self, target: float) -> None:
        """Raises TargetError unless ``target`` lies in the trained range ``[min(targets), 1]``
        (the price β is calibrated only there)."""
        lo = float(self.targets[0])
        if not (isinstance(target, (int, float)) and math.isfinite(target) and lo - 1e-6 <= target <= 1):
            raise TargetError(
                f"dynamic routing target {target!r} is outside the trained range [{lo:g}, 1]; "
                f"choose one of the trained targets {self.trained_targets}"
            )

    def prepare(self, t: float, fused: bool = False) -> dict[str, tuple[torch.Tensor, ...]]:
        """Everything of the logits that depends on the target only, for all layers at once, as
        per-layer views (one ``unbind`` each, so a layer's routing indexes no tensor): ``w1`` L ×
        (d, H) the hidden-state part of the first layer, ``c1`` L × (H,) the target's share of it,
        ``w2`` L × (H, K_mlp + K_heads) and ``b2`` L × (K_mlp + K_heads,) the anchor minus the price
        term plus the output bias. Computed once per routed pass, so a layer's routing costs two
        small matmuls (router overhead, issue 4). ``fused``: also, per group of ``route_every``
        layers (k_g of them), ``g_w1`` (k_g, d, H), ``g_c1`` (k_g, 1, H), and the output layer with
        both candidate sets padded to ``K_max`` (bias −inf): ``g_w2p`` (k_g, H, 2·K_max), ``g_b2p``
        (k_g, 1, 2·K_max), for :meth:`group_argmax`."""
        enc = encode_targets(self.targets, torch.tensor([float(t)], device=self.targets.device))[0].to(
            self.w1.dtype
        )  # (n_t,)
        d = self.w1.shape[1] - enc.shape[0]
        c1 = torch.einsum("n,lnh->lh", enc, self.w1[:, d:]) + self.b1  # (L, H)
        beta = (enc * self.price.to(enc.dtype)).sum() * self.num_layers
        am = F.one_hot(self.anchor_mlp, self.n_mlp).to(enc.dtype)  # (n_t, L, K_mlp)
        ah = F.one_hot(self.anchor_heads, self.n_heads).to(enc.dtype)
        anchor = self.anchor_scale * torch.einsum("n,nlk->lk", enc, torch.cat([am, ah], -1))  # (L, K)
        b2 = anchor - beta * torch.cat([self.cost_mlp, self.cost_heads]).to(enc.dtype) + self.b2  # (L, K)
        prep = {"w1": self.w1[:, :d].unbind(0), "c1": c1.unbind(0), "w2": self.w2.unbind(0), "b2": b2.unbind(0)}
        if fused:  # both heads of the output side by side, padded to one length (bias -inf), for one argmax
            L, H, km, kh = self.num_layers, self.w2.shape[1], self.n_mlp, self.n_heads
            kx = max(km, kh)
            w2p = self.w2.new_zeros(L, H, 2, kx)
            w2p[:, :, 0, :km], w2p[:, :, 1, :kh] = self.w2[:, :, :km], self.w2[:, :, km:]
            b2p = b2.new_full((L, 2, kx), float("-inf"))
            b2p[:, 0, :km], b2p[:, 1, :kh] = b2[:, :km], b2[:, km:]
            k = self.route_every
            prep |= {
                "g_w1": self.w1[:, :d].split(k),
                "g_c1": c1[:, None].split(k),
                "g_w2p": w2p.view(L, H, 2 * kx).split(k),
                "g_b2p": b2p.view(L, 1, 2 * kx).split(k),
            }
        return prep

    def prepared(self, t: float) -> dict[str, tuple[torch.Tensor, ...]]:
        """:meth:`prepare` ``(t, fused=True)`` without gradient, cached until a parameter or buffer
        changes (their version counters are the key): deployment routing prepares a target once,
        not once per prefill."""
        state = tuple(
            (x.data_ptr(), x._version) for x in (*self.parameters(), *self.buffers())
        )  # moved or changed in place
        hit = self._prepared.get(float(t))
        if hit is None or hit[0] != state:
            with torch.no_grad():
                hit = self._prepared[float(t)] = (state, self.prepare(t, fused=True))
        return hit[1]

    def group_argmax(self, group: int, h: torch.Tensor, prep: dict[str, tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """Deployment routing of the ``group``-th group of ``route_every`` layers: the argmax MLP and
        head candidates ``(k_g, B, 2)`` (long) of each of its layers for the pooled features ``h``
        ``(B, d)`` read at the group's first layer, from :meth:`prepare` ``(t, fused=True)``. Equals
        the argmax of :meth:`layer_logits` for each layer (up to float rounding in exact ties) in
        a fixed number of tensor ops per group (batched matmuls, one argmax): the router runs
        between the layers' kernels of a prefill, where each small op costs tens of µs on a CPU
        (router overhead, issue 4)."""
        hn = F.layer_norm(h if h.dtype == self.w1.dtype else h.to(self.w1.dtype), h.shape[-1:])
        w1 = prep["g_w1"][group]  # (k_g, d, H)
        z = F.leaky_relu(torch.baddbmm(prep["g_c1"][group], hn.expand(w1.shape[0], -1, -1), w1))  # (k_g, B, H)
        out = torch.baddbmm(prep["g_b2p"][group], z, prep["g_w2p"][group])  # (k_g, B, 2·K_max)
        return out.view(out.shape[0], out.shape[1], 2, -1).argmax(-1)

    def layer_logits(
        self, layer: int, h: torch.Tensor, prep: dict[str, tuple[torch.Tensor, ...]], heads: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Layer ``layer``'s logits from features ``h`` ``(..., d)`` (pooled ``(B, d)`` or per token
        ``(B, T, d)``) and :meth:`prepare`'s output: MLP ``(..., K_mlp)`` and heads ``(..., K_heads)``
        (``None`` unless ``heads``)."""
        hn = F.layer_norm(h.to(self.w1.dtype), h.shape[-1:])  # no affine parameters
        w1, c1, w2, b2 = prep["w1"][layer], prep["c1"][layer], prep["w2"][layer], prep["b2"][layer]
        z = F.leaky_relu(torch.addmm(c1, hn, w1) if hn.dim() == 2 else hn @ w1 + c1)  # (..., H)
        if not heads:
            return z @ w2[:, : self.n_mlp] + b2[: self.n_mlp], None
        out = torch.addmm(b2, z, w2) if z.dim() == 2 else z @ w2 + b2  # (..., K)
        return out[..., : self.n_mlp], out[..., self.n_mlp :]

    def logits(self, layer: int, h: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`layer_logits` at target ``t`` (prepares the target part on every call)."""
        return self.layer_logits(layer, h, self.prepare(t))
