"""Applying a dynamic routing to a forward (METHOD §6, §9): :class:`DynamicRouting` installs forward
pre-hooks on the decoder layers so every input picks its sub-network from its hidden state.

The choice of a sequence is made at prefill and kept for its decode steps (the KV cache stays
valid). Sequences of a batch that chose different widths run grouped (MLP: rows grouped by width;
heads: hard masks, or slicing when all rows agree). With ``per_token=True`` every token picks its MLP
width from its own hidden state, executed by grouping tokens by width (real compute savings).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from flextron.errors import ConfigError
from flextron.model.elastic import ElasticModel
from flextron.model.space import nested_mask
from flextron.routing.dynamic_router import DynamicRouter
from flextron.routing.router import gumbel_choice


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

    def __init__(
        self,
        fx: ElasticModel,
        router: DynamicRouter,
        target: float,
        *,
        tau: float | None = None,
        generator: torch.Generator | None = None,
        masked: bool = False,
        per_token: bool = False,
        grad: bool = False,
    ) -> None:
        sp = fx.space
        if (router.num_layers, router.n_mlp, router.n_heads) != (
            sp.num_layers,
            len(sp.mlp_choices),
            len(sp.head_choices),
        ):
            raise ConfigError(
                f"the dynamic router was built for {router.num_layers} layers and {router.n_mlp}/{router.n_heads} "
                f"candidates; the model has {sp.num_layers} and {len(sp.mlp_choices)}/{len(sp.head_choices)}"
            )
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
        """The distinct candidate indices in ``idx`` (a Python set for a handful of rows: cheaper
        than ``torch.unique``)."""
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
        m = self.pad_mask[:, -h.shape[1] :, None].to(h.dtype)
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
                    idx = self.router.group_argmax(
                        l // self.router.route_every, self._pool(h), self._prep
                    )  # (k_g, B, 2)
                self._pairs.extend(idx.unbind(0))
                self._distincts.extend(
                    (sorted({r[0] for r in rows}), sorted({r[1] for r in rows})) for rows in idx.tolist()
                )
            for i in range(l, min(l + self.router.route_every, self.sp.num_layers)):  # the group's layers
                mi, hi = self._distincts[i]
                self._set_layer(i, mi, hi, *self._fast_indices(i) if len(mi) > 1 or len(hi) > 1 else (None, None), T)
            return None
        with torch.enable_grad() if self.grad else torch.no_grad():
            if self._prep is None:
                self._prep = self.router.prepare(self.target)
            hd = h.detach()
            if (
                prefill
            ):  # mean over the prompt's non-padding tokens (at the group's first layer); the router normalises it
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
            attn.mask = sp.head_mask(head_c)  # (B, H)
            return
        mi, hi = self._index(mlp_c), self._index(head_c)  # (B,) or (B, T); (B,)
        self._set_layer(l, self._distinct(mi), self._distinct(hi), mi, hi, T)

    def _set_layer(
        self,
        l: int,
        mlp_distinct: list[int],
        head_distinct: list[int],
        mi: torch.Tensor | None,
        hi: torch.Tensor | None,
        T: int,
    ) -> None:
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
            attn.mask = sp.head_mask(F.one_hot(hi, len(sp.head_choices)).to(self._dtype))  # (B, H)

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
                w = (
                    torch.ones(c.shape[:2], dtype=c.dtype, device=c.device)
                    if self.pad_mask is None
                    else self.pad_mask[:, -c.shape[1] :].to(c.dtype)
                )
                c = (c * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
            mlp.append(c)
        return torch.stack(mlp, 1), torch.stack([one_hot(c, len(self.sp.head_choices)) for c in head_c], 1)

    def indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen candidate indices of the last prefill: MLP ``(B, L)`` (per token: ``(B, L, T)``)
        and heads ``(B, L)``."""
        mlp_c, head_c = self._layer_choices()
        return torch.stack([self._index(c) for c in mlp_c], 1), torch.stack([self._index(c) for c in head_c], 1)


@torch.no_grad()
def routed_fractions(
    fx: ElasticModel,
    router: DynamicRouter,
    target: float,
    blocks: torch.Tensor,
    table,
    *,
    batch_size: int = 8,
    per_token: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
