"""Input-adaptive (dynamic) routers: each input picks its own sub-network (METHOD §6, §9).

Input: an :class:`~flextron.elastic.ElasticModel`, a latency target ``t`` (fraction of the full
model's latency) and token ids. Output: the same forward (logits, KV cache, generation), where
every layer's MLP width and head count were chosen from that layer's input hidden state.

Design (project choice). A :class:`DynamicRouter` scores, for layer ``l`` and input ``x``,

    logits_l(x, t) = A · anchor_l(t) + Δ_l([LN(h̄_l(x)); enc(t)]) − β(t) · L · cost_l

* ``anchor_l(t)``: one-hot of the *static* router's budget-fitted choice at ``t`` (the deployment
  configuration of :class:`~flextron.routers.TargetRouter`), so the static solution is the start
  and the reference;
* ``Δ_l``: a per-layer 2-layer MLP (Linear → LeakyReLU → Linear) of the layer's input hidden state
  ``h̄_l`` (mean over the prompt's non-padding tokens, then layer-normalised) and the target encoding;
  its output layer starts at zero, so the untrained dynamic router *is* the static one. With
  ``route_every`` = k > 1 the layers of a group of k read the hidden state at the group's input
  (fewer reads, less router overhead; each layer keeps its own Δ_l);
* ``β(t)``: a per-target price of latency (a dual variable; ``cost_l`` is each candidate's LUT cost
  as a fraction of the full model's), fitted so that the *average* predicted latency over a batch
  of inputs meets the target (:func:`calibrate_price`). Δ redistributes width between inputs and
  layers; β keeps the average on budget.

:class:`DynamicRouting` runs it through forward pre-hooks on the decoder layers: the choice of a
sequence is made at prefill and kept for its decode steps (the KV cache stays valid). Sequences of
a batch that chose different widths run grouped (MLP: rows grouped by width; heads: hard masks, or
slicing when all rows agree). With ``per_token=True`` every token picks its MLP width from its own
hidden state, executed by grouping tokens by width (real compute savings, not masking).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .elastic import ElasticModel, nested_mask
from .errors import ConfigError, TargetError
from .latency import paired_ratio, prefill_fn, time_models
from .routers import TargetRouter, encode_targets, gumbel_choice

__all__ = ["DynamicRouter", "DynamicRouting", "routed_fractions", "measure_overhead", "calibrate_price", "choice_statistics"]


class DynamicRouter(nn.Module):
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

    def __init__(
        self, targets: Sequence[float], num_layers: int, hidden_size: int, n_mlp: int, n_heads: int,
        hidden: int = 64, anchor_scale: float = 3.0, route_every: int = 1,
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
    def from_static(cls, static: TargetRouter, targets: Sequence[float], hidden: int = 64, anchor_scale: float = 3.0,
                    route_every: int = 1) -> "DynamicRouter":
        """Warm start from a deployed static router: anchors = its budget-fitted configuration at
        every target, costs from its lookup table, price 0 and Δ = 0 (so the dynamic router starts
        as the static one).

        Raises:
            TargetError: a target below the smallest sub-network (from ``static.route``).
        """
        sp, table = static.space, static.table
        r = cls(targets, sp.num_layers, sp.hidden_size, len(sp.mlp_choices), len(sp.head_choices), hidden, anchor_scale, route_every)
        cm, ch = table.cost_vectors(sp.mlp_choices, sp.head_choices)
        r.cost_mlp.copy_(cm / table.full)
        r.cost_heads.copy_(ch / table.full)
        for j, t in enumerate(r.targets.tolist()):
            mi, hi = sp.indices(static.route(t))
            r.anchor_mlp[j] = torch.tensor(mi)
            r.anchor_heads[j] = torch.tensor(hi)
        return r

    @property
    def trained_targets(self) -> list[float]:
        """The trained targets as Python floats (rounded to 6 digits: the buffer is float32)."""
        return [round(x, 6) for x in self.targets.tolist()]

    def check_target(self, target: float) -> None:
        """Raises TargetError unless ``target`` lies in the trained range ``[min(targets), 1]``
        (the price β is calibrated only there)."""
        lo = float(self.targets[0])
        if not (isinstance(target, (int, float)) and math.isfinite(target) and lo - 1e-6 <= target <= 1):
            raise TargetError(f"dynamic routing target {target!r} is outside the trained range [{lo:g}, 1]; "
                              f"choose one of the trained targets {self.trained_targets}")

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
        enc = encode_targets(self.targets, torch.tensor([float(t)], device=self.targets.device))[0].to(self.w1.dtype)  # (n_t,)
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
            prep |= {"g_w1": self.w1[:, :d].split(k), "g_c1": c1[:, None].split(k), "g_w2p": w2p.view(L, H, 2 * kx).split(k),
                     "g_b2p": b2p.view(L, 1, 2 * kx).split(k)}
        return prep

    def prepared(self, t: float) -> dict[str, tuple[torch.Tensor, ...]]:
        """:meth:`prepare` ``(t, fused=True)`` without gradient, cached until a parameter or buffer
        changes (their version counters are the key): deployment routing prepares a target once,
        not once per prefill."""
        state = tuple((x.data_ptr(), x._version) for x in (*self.parameters(), *self.buffers()))  # moved or changed in place
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

    def layer_logits(self, layer: int, h: torch.Tensor, prep: dict[str, tuple[torch.Tensor, ...]], heads: bool = True
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


class DynamicRouting:
    """Context manager: route every forward of ``fx`` through ``router`` at ``target``.

    ``tau=None``: argmax choices (deployment; straight-through softmax gradient with ``grad``); a
    float: straight-through Gumbel-softmax at that
    temperature with ``generator`` (training). ``masked=True``: the choices become soft masks of
    the full-width forward (differentiable; direct-gradient ablation and joint fine-tuning);
    otherwise layers run sliced/grouped. ``per_token``: per-token MLP widths (not with
    ``masked``). ``grad=True``: router logits keep their graph even under ``torch.no_grad`` (the
    LLM stays gradient-free: surrogate training).

    After each prefill, :meth:`stacked` returns every layer's choice as ``(B, L, K)`` one-hots
    (straight-through, with grad when computed so; per-token MLP choices averaged over non-padding
    tokens) and :meth:`indices` the candidate indices. The choice of a sequence is kept for its
    decode steps. Plain argmax routing (no ``tau``, ``grad``, ``masked`` or ``per_token``) takes a
    fast path: hooks on the first layer of each group only, one :meth:`DynamicRouter.group_argmax`
    per group, the target part cached (:meth:`DynamicRouter.prepared`), module attributes set only
    on change. It runs between the layers' kernels, where each small tensor op costs tens of µs on
    a CPU, so it keeps their number low (router overhead < 2 %).

    Raises:
        ConfigError: ``per_token`` with ``masked``, or a router that does not match ``fx``.
        TargetError: ``target`` outside the router's trained range.
    """

    def __init__(self, fx: ElasticModel, router: DynamicRouter, target: float, *, tau: float | None = None,
                 generator: torch.Generator | None = None, masked: bool = False, per_token: bool = False, grad: bool = False) -> None:
        sp = fx.space
        if (router.num_layers, router.n_mlp, router.n_heads) != (sp.num_layers, len(sp.mlp_choices), len(sp.head_choices)):
            raise ConfigError(f"the dynamic router was built for {router.num_layers} layers and {router.n_mlp}/{router.n_heads} "
                              f"candidates; the model has {sp.num_layers} and {len(sp.mlp_choices)}/{len(sp.head_choices)}")
        if per_token and masked:
            raise ConfigError("per-token MLP routing runs grouped by width; it has no masked (differentiable) form")
        router.check_target(target)
        self.fx, self.router, self.target, self.sp = fx, router, float(target), sp
        self.tau, self.generator, self.masked, self.per_token, self.grad = tau, generator, masked, per_token, grad
        self.choices: dict[str, list] = {"mlp": [], "heads": []}
        self.pad_mask: torch.Tensor | None = None
        self._handles: list = []
        self._saved = None
        self._prep: dict | None = None  # the router's target part, computed at each prefill's first layer
        self._widths = torch.tensor(sp.mlp_choices)
        self._heads = torch.tensor(sp.head_choices)
        self._dtype = router.w1.dtype
        self._fast = tau is None and not grad and not masked and not per_token
        # fast path, per layer: (B, 2) MLP and head indices, and their distinct values
        self._pairs: list[torch.Tensor] = []
        self._pooled: torch.Tensor | None = None  # the current group's pooled hidden state (B, d)
        self._distincts: list[tuple[list[int], list[int]]] = []

    # -- context -------------------------------------------------------------------------------
    def __enter__(self) -> "DynamicRouting":
        self._saved = self.fx.arch
        decoder = self.fx.model.get_decoder()
        self._handles.append(decoder.register_forward_pre_hook(self._on_model, with_kwargs=True))
        k = self.router.route_every
        for l, layer in enumerate(self.fx.adapter.layers(self.fx.model)):
            if not self._fast or l % k == 0:  # the fast path sets a whole group of layers at its first layer
                self._handles.append(layer.register_forward_pre_hook(partial(self._on_layer, l), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for m in self.fx.mlps:
            if m.token_widths is not None:
                m.token_widths = None
        if self.masked or any(a.mask is not None for a in self.fx.attns):
            self.fx.set_masks(None, None)
        if self.fx.arch != self._saved:
            self.fx.set_arch(self._saved)

    # -- hooks ---------------------------------------------------------------------------------
    def _on_model(self, module, args, kwargs):
        pkv = kwargs.get("past_key_values")
        if pkv is None or pkv.get_seq_length() == 0:  # prefill: new inputs, new choices
            self.choices = {"mlp": [], "heads": []}
            self._distincts, self._pairs = [], []
            self._prep = None  # recomputed from the router's current parameters
            am = kwargs.get("attention_mask")
            self.pad_mask = am if am is not None and am.dim() == 2 else None
        return None

    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        """A layer's choice: candidate indices ``(...)`` (long) for argmax routing that needs neither
        a gradient nor a mask (no one-hot is built), else a straight-through one-hot ``(..., K)``."""
        if self.tau is None:  # argmax; with ``grad`` straight-through with the softmax's gradient
            if not self.grad and not self.masked:
                return logits.argmax(-1)
            soft = F.softmax(logits, -1)
            return F.one_hot(logits.argmax(-1), logits.shape[-1]).to(logits.dtype) + soft - soft.detach()
        return gumbel_choice(logits, self.tau, self.generator)

    @staticmethod
    def _index(c: torch.Tensor) -> torch.Tensor:
        """Candidate indices of a stored choice (indices or one-hot)."""
        return c if c.dtype == torch.long else c.detach().argmax(-1)

    @staticmethod
    def _distinct(idx: torch.Tensor) -> list[int]:
        """The distinct candidate indices in ``idx`` (a Python set for a handful of rows: cheaper than ``torch.unique``)."""
        return sorted(set(idx.tolist())) if idx.dim() == 1 else torch.unique(idx).tolist()

    def _fast_indices(self, l: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast path: layer ``l``'s MLP and head indices ``(B,)`` each, from the stored ``(B, 2)``."""
        idx = self._pairs[l]
        return idx[:, 0], idx[:, 1]

    def _layer_choices(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, the stored MLP and head choices (indices or one-hot) of the last prefill."""
        if self._fast:
            pairs = [self._fast_indices(l) for l in range(len(self._pairs))]
            return [p[0] for p in pairs], [p[1] for p in pairs]
        return self.choices["mlp"], self.choices["heads"]

    def _pool(self, h: torch.Tensor) -> torch.Tensor:
        """Mean of ``h`` ``(B, T, d)`` over the prompt's non-padding tokens: ``(B, d)``."""
        if self.pad_mask is None:
            return h.mean(1)
        m = self.pad_mask[:, -h.shape[1]:, None].to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1)

    def _on_layer(self, l: int, module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]  # (B, T, d)
        B, T, _ = h.shape
        prefill = len(self._pairs if self._fast else self.choices["heads"]) <= l
        if self._fast:  # deployment: argmax per sequence, no graph; few kernel launches per layer
            if prefill:  # a group's first layer: every tensor op here costs tens of µs between large kernels
                if self._prep is None:
                    self._prep = self.router.prepared(self.target)
                with torch.no_grad():
                    idx = self.router.group_argmax(l // self.router.route_every, self._pool(h), self._prep)  # (k_g, B, 2)
                self._pairs.extend(idx.unbind(0))
                self._distincts.extend((sorted({r[0] for r in rows}), sorted({r[1] for r in rows})) for rows in idx.tolist())
            for i in range(l, min(l + self.router.route_every, self.sp.num_layers)):  # the group's layers
                mi, hi = self._distincts[i]
                self._set_layer(i, mi, hi, *self._fast_indices(i) if len(mi) > 1 or len(hi) > 1 else (None, None), T)
            return None
        with torch.enable_grad() if self.grad else torch.no_grad():
            if self._prep is None:
                self._prep = self.router.prepare(self.target)
            hd = h.detach()
            if prefill:  # mean over the prompt's non-padding tokens (at the group's first layer); the router normalises it
                if l % self.router.route_every == 0:
                    self._pooled = self._pool(hd)  # (B, d)
                mlp_logits, head_logits = self.router.layer_logits(l, self._pooled, self._prep)  # (B, K)
                self.choices["heads"].append(self._choose(head_logits))
                if not self.per_token:
                    self.choices["mlp"].append(self._choose(mlp_logits))
            if self.per_token:
                tok_logits, _ = self.router.layer_logits(l, hd, self._prep, heads=False)  # (B, T, K_mlp)
                step = self._choose(tok_logits)
                if prefill:
                    self.choices["mlp"].append(step)
        self._apply(l, step if self.per_token else self.choices["mlp"][l], self.choices["heads"][l], T)
        return None

    def _apply(self, l: int, mlp_c: torch.Tensor, head_c: torch.Tensor, T: int) -> None:
        sp, mlp, attn = self.sp, self.fx.mlps[l], self.fx.attns[l]
        if self.masked:
            mlp.width, attn.heads_per_group, mlp.token_widths = sp.mlp_choices[-1], sp.head_choices[-1], None
            mlp.mask = nested_mask(mlp_c, sp.mlp_choices, sp.intermediate_size)  # (B, D)
            attn.mask = nested_mask(head_c, sp.head_choices, sp.heads_per_group, sp.num_key_value_heads)  # (B, H)
            return
        mi, hi = self._index(mlp_c), self._index(head_c)  # (B,) or (B, T); (B,)
        self._set_layer(l, self._distinct(mi), self._distinct(hi), mi, hi, T)

    def _set_layer(self, l: int, mlp_distinct: list[int], head_distinct: list[int], mi: torch.Tensor | None,
                   hi: torch.Tensor | None, T: int) -> None:
        """Run layer ``l`` sliced (all rows agree) or grouped/masked (rows differ) at candidate indices
        ``mi`` (B,) or (B, T) and ``hi`` (B,), whose distinct values are given (the indices are
        read only where rows differ)."""
        sp, mlp, attn = self.sp, self.fx.mlps[l], self.fx.attns[l]
        # Module attributes are set only when they change: nn.Module.__setattr__ costs microseconds
        # per call, which adds up to a measurable share of a small model's prefill (router overhead).
        if mlp.mask is not None:
            mlp.mask = None
        distinct = mlp_distinct
        if len(distinct) == 1:
            if mlp.token_widths is not None:
                mlp.token_widths = None
            if mlp.width != sp.mlp_choices[distinct[0]]:
                mlp.width = sp.mlp_choices[distinct[0]]
        else:
            widths = self._widths.to(mi.device)[mi]
            mlp.token_widths = widths[:, None].expand(-1, T) if widths.dim() == 1 else widths  # (B, T)
        distinct = head_distinct
        if len(distinct) == 1:
            if attn.mask is not None:
                attn.mask = None
            if attn.heads_per_group != sp.head_choices[distinct[0]]:
                attn.heads_per_group = sp.head_choices[distinct[0]]
        else:  # rows disagree: hard masks give each row exactly its sliced output
            attn.heads_per_group = sp.head_choices[-1]
            attn.mask = nested_mask(F.one_hot(hi, len(sp.head_choices)).to(self._dtype), sp.head_choices, sp.heads_per_group,
                                    sp.num_key_value_heads)

    # -- results -------------------------------------------------------------------------------
    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The last prefill's choices as ``(B, L, K_mlp)`` and ``(B, L, K_heads)``; per-token MLP
        choices are averaged over the prompt's non-padding tokens (the share of each width)."""
        mlp_c, head_c = self._layer_choices()
        if len(head_c) != self.sp.num_layers:
            raise ConfigError("no routed forward has run inside this DynamicRouting context yet")

        def one_hot(c: torch.Tensor, k: int) -> torch.Tensor:
            return F.one_hot(c, k).to(self._dtype) if c.dtype == torch.long else c

        mlp = []
        for c in mlp_c:
            c = one_hot(c, len(self.sp.mlp_choices))
            if c.dim() == 3:
                w = torch.ones(c.shape[:2], dtype=c.dtype, device=c.device) if self.pad_mask is None else self.pad_mask[:, -c.shape[1]:].to(c.dtype)
                c = (c * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
            mlp.append(c)
        return torch.stack(mlp, 1), torch.stack([one_hot(c, len(self.sp.head_choices)) for c in head_c], 1)

    def indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen candidate indices of the last prefill: MLP ``(B, L)`` (per token: ``(B, L, T)``)
        and heads ``(B, L)``."""
        mlp_c, head_c = self._layer_choices()
        return torch.stack([self._index(c) for c in mlp_c], 1), torch.stack([self._index(c) for c in head_c], 1)


@torch.no_grad()
def routed_fractions(fx: ElasticModel, router: DynamicRouter, target: float, blocks: torch.Tensor, table, *,
                     batch_size: int = 8, per_token: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Argmax routing of every block ``(N, T)`` at ``target`` (decoder only, no LM head).

    Returns the predicted latency fraction per block ``(N,)`` and the chosen candidate indices,
    MLP ``(N, L)`` (per token: the per-block share of each width, ``(N, L, K_mlp)``) and heads ``(N, L)``.
    """
    decoder = fx.model.get_decoder()
    sp = fx.space
    fr, mi, hi = [], [], []
    with DynamicRouting(fx, router, target, per_token=per_token) as r:
        for s in range(0, blocks.shape[0], batch_size):
            ids = blocks[s : s + batch_size].to(router.targets.device)
            decoder(input_ids=ids, use_cache=False)
            m, h = r.stacked()
            fr.append(table.expected(m, h, sp.mlp_choices, sp.head_choices) / table.full)
            mi.append(m if per_token else m.argmax(-1))
            hi.append(h.argmax(-1))
    return torch.cat(fr), torch.cat(mi), torch.cat(hi)


def measure_overhead(fx: ElasticModel, router: DynamicRouter, target: float, ids: torch.Tensor, *, repeats: int = 5, warmup: int = 1,
                     table=None, progress: bool = False, desc: str = "router overhead") -> dict:
    """Router overhead (router forward + dispatch) and timed latency on this device, measured side
    by side: the per-sequence routed prefill of ``ids`` ``(1, T)`` at ``target``, the same
    sub-network sliced without hooks, and the full model, interleaved in one
    :func:`~flextron.latency.time_models` session.

    Returns ``config`` (the routed :class:`~flextron.elastic.ArchConfig`), ``routed_s``,
    ``sliced_s``, ``full_s`` (medians, seconds), ``overhead_fraction`` (median over rounds of
    routed / sliced − 1: the share of the sub-network's prefill), ``timed_fraction`` (median over
    rounds of routed / full: the unit of latency targets) and, with the lookup ``table``,
    ``predicted_fraction`` of the routed configuration. Raises ConfigError for ``ids`` that are
    not one sequence.
    """
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ConfigError(f"measure the router overhead on one sequence (1, T), got {tuple(ids.shape)}")
    saved = fx.arch
    with DynamicRouting(fx, router, target) as r:
        prefill_fn(fx, ids)()
        mi, hi = r.indices()
    arch = fx.space.from_indices(mi[0].tolist(), hi[0].tolist())
    run = prefill_fn(fx, ids)

    def sliced():
        fx.set_arch(arch)
        run()

    def routed():
        fx.set_arch(None)
        with DynamicRouting(fx, router, target):
            run()

    def full():
        fx.set_arch(None)
        run()

    res = time_models({"routed": routed, "sliced": sliced, "full": full}, repeats=repeats, warmup=warmup, progress=progress, desc=desc)
    fx.set_arch(saved)
    out = {"config": arch, "routed_s": res["routed"]["median_s"], "sliced_s": res["sliced"]["median_s"], "full_s": res["full"]["median_s"],
           "overhead_fraction": paired_ratio(res, "routed", "sliced") - 1, "timed_fraction": paired_ratio(res, "routed", "full"),
           "repeats": repeats}
    if table is not None:
        out["predicted_fraction"] = table.fraction(arch)
    return out


def calibrate_price(fx: ElasticModel, router: DynamicRouter, table, blocks: torch.Tensor, *, batch_size: int = 8,
                    iters: int = 8, per_token: bool = False, span: float = 1.0, budgets: dict[float, float] | None = None,
                    progress: bool = False) -> dict[str, dict]:
    """Fit the latency price β of every trained target < 1 so that the *average* predicted latency
    of argmax routing over ``blocks`` ``(N, T)`` meets the target (METHOD §7's budget, on the average).
    ``budgets``: ``{target: budget}``, the predicted latency allowed at a target where it differs
    from the target itself (e.g. lowered by the router's measured overhead, so that the *timed*
    latency meets the target; :func:`flextron.dynamic_train.train_dynamic`).

    A higher price lowers the latency. The bracket starts at ``β ± span`` around the current
    (trained) price and widens, doubling its step, until its low end is over budget and its high
    end within it; ``iters`` bisection steps then find the smallest β within budget. Each probe is
    one routed forward (decoder only) over ``blocks``. Returns per target ``{"price",
    "mean_fraction", "budget", "error", "probes"}`` (``error``: mean fraction / budget − 1, ≤ 0
    unless even the highest price probed is over budget).

    Raises:
        ConfigError: a budget outside (0, 1].
    """
    budgets = budgets or {}
    for t, b in budgets.items():
        if not (isinstance(b, (int, float)) and math.isfinite(b) and 0 < b <= 1):
            raise ConfigError(f"the latency budget {b!r} for target {t:g} must be a fraction of the full model's latency in (0, 1]")
    out = {}
    targets = [t for t in router.trained_targets if t < 1.0]
    for target in tqdm(targets, desc="dynamic: calibrate price", disable=not progress, leave=False):
        j = router.trained_targets.index(target)
        t = float(budgets.get(target, target))  # the budget of the average predicted latency
        probes = 0

        def mean_at(beta: float) -> float:
            nonlocal probes
            probes += 1
            router.price[j] = beta
            return float(routed_fractions(fx, router, target, blocks, table, batch_size=batch_size, per_token=per_token)[0].mean())

        c = float(router.price[j])
        lo, hi, step = c - span, c + span, span
        f_lo, f_hi = mean_at(lo), mean_at(hi)
        while f_lo <= t and step < 1e3:  # within budget even at this low price: look lower
            lo, hi, f_hi, step = lo - 2 * step, lo, f_lo, 2 * step
            f_lo = mean_at(lo)
        while f_hi > t and step < 1e3:  # over budget even at this price: look higher
            lo, hi, step = hi, hi + 2 * step, 2 * step
            f_hi = mean_at(hi)
        if f_lo <= t:  # within budget at every price probed: the lowest (largest sub-networks)
            best, f_best = lo, f_lo
        else:
            best, f_best = hi, f_hi
            for _ in range(iters if f_hi <= t else 0):
                mid = 0.5 * (lo + hi)
                f = mean_at(mid)
                if f <= t:
                    hi, best, f_best = mid, mid, f
                else:
                    lo = mid
        router.price[j] = best
        out[f"{target:g}"] = {"price": best, "mean_fraction": f_best, "budget": t, "error": f_best / t - 1, "probes": probes}
    return out


def choice_statistics(mlp_idx: torch.Tensor, head_idx: torch.Tensor, n_mlp: int, n_heads: int) -> dict:
    """Collapse diagnostics of argmax choices over ``N`` inputs: MLP ``(N, L)`` and heads ``(N, L)``
    indices (or per-token shares ``(N, L, K)``).

    Returns ``entropy_nats`` (mean over layers of the entropy of the choice distribution over
    inputs, MLP and heads averaged), ``input_independent_layers`` (share of layers where every input
    chose the same MLP width and head count) and ``collapsed`` (True when that share is 1: the
    router ignores its input) plus the per-layer share of every candidate (``mlp_share`` (L, K_mlp),
    ``head_share`` (L, K_heads)).
    """
    def shares(idx: torch.Tensor, k: int) -> torch.Tensor:
        if idx.dim() == 3:  # per-token shares already
            return idx.float().mean(0)
        return F.one_hot(idx, k).float().mean(0)  # (L, K)

    sm, sh = shares(mlp_idx, n_mlp), shares(head_idx, n_heads)

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.clamp_min(1e-12).log()).sum(-1)  # (L,)

    ent = 0.5 * (entropy(sm) + entropy(sh))
    fixed = ((sm.max(-1).values > 1 - 1e-6) & (sh.max(-1).values > 1 - 1e-6)).float()
    return {
        "entropy_nats": float(ent.mean()),
        "input_independent_layers": float(fixed.mean()),
        "collapsed": bool(fixed.mean() == 1.0),
        "mlp_share": sm.tolist(),
        "head_share": sh.tolist(),
    }
