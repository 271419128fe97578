"""Training of dynamic routers (METHOD §6–§8 for input-adaptive routing).

Inputs: a trained :class:`~flextron.elastic.ElasticModel` with its deployed static router
(:class:`~flextron.routers.TargetRouter`), the cost table, and token blocks ``(N, T)`` drawn from
several domains. Output: a trained, price-calibrated :class:`~flextron.dynamic.DynamicRouter`
saved as safetensors + ``dynamic.json`` (:func:`save_dynamic`), and per-step metrics (JSON lines).

Stages (project choices):
1. **warm start**: :meth:`DynamicRouter.from_static` — anchors at the static router's
   budget-fitted configurations, Δ = 0, price 0: the dynamic router starts as the static one.
2. **surrogate training** (LLM frozen, METHOD §7): each step draws one target and a batch of
   inputs; the router picks a configuration per input (straight-through Gumbel), the LLM
   measures each input's loss at its configuration, the surrogate (reading the choices *and* the
   input's full-model loss) is fitted on ``ℓ − ℓ_full`` per input; once it passes its held-out
   gate the router is updated on ``SM + λ · latency_loss(mean over the batch)``. The latency
   price β (a dual variable) rises while the batch average is over the target and falls while
   under. ``surrogate=False``: the direct ablation, LM loss through soft masks.
   **Fallback** (project choice): when the surrogate never passes its gate, the router has had
   no loss gradient at all (only the latency term), so it is reset to its warm start and
   ``fallback_steps`` direct LM-loss steps train it instead, logged as stage ``dynamic_direct``
   and recorded as ``summary["fallback"]``. On SmolLM2 the gate stayed closed (held-out Spearman
   0.34 over 24 steps): per-input loss differences between nearby configurations are small next
   to the noise between texts. Kept, the latency-only steps cost quality: surrogate path + 10
   direct steps reached perplexity 182 at target 0.6, 10 direct steps from the warm start 115.
3. **joint fine-tuning** (optional, METHOD §8): model and router on LM loss + λ · latency, through
   soft masks (single process: the router runs inside hooks, outside DDP).
4. **calibration**: :func:`~flextron.dynamic.calibrate_price` fits β so the *average* predicted
   latency over calibration blocks meets each target (≤ target, within a few per cent). Then, on
   this device, :func:`~flextron.dynamic.measure_overhead` times the routed prefill of one
   calibration block at each target against the full model; the ratio timed / predicted (router
   overhead plus the table's error on the configurations this router picks; SmolLM2 on 2 CPU
   cores: 3–8 % above the table) scales each budget, and β is fitted again, so that the *timed*
   latency meets the target (project choice; METHOD §9: a deployed target must meet its latency).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from tqdm.auto import tqdm

from .checkpoint import MetricsLog, atomic_write_dir, file_hashes, verify_hashes
from .config import _check
from .dynamic import DynamicRouter, DynamicRouting, calibrate_price, choice_statistics, measure_overhead
from .elastic import ElasticModel
from .errors import ConfigError, DataError, ModelError
from .evaluate import perplexity
from .losses import lm_kd_loss
from .routers import TargetRouter, latency_loss
from .surrogate import Surrogate, SurrogateFit

log = logging.getLogger(__name__)

__all__ = ["DynamicConfig", "train_dynamic", "timed_budgets", "save_dynamic", "load_dynamic"]

ROUTER_FILE = "dynamic_router.safetensors"
SURROGATE_FILE = "dynamic_surrogate.safetensors"
MANIFEST = "dynamic.json"
MODEL_DIR = "model"  # joint fine-tuning's weights (absent without joint fine-tuning)


@dataclass(frozen=True)
class DynamicConfig:
    """Dynamic-router training. ``targets``: the targets it serves (the price is calibrated at
    each; 1.0 is the full model). ``batch_size``: inputs per step, whose *average* latency is
    constrained. ``latency_weight`` λ, ``latency_tol`` as in METHOD §7; ``dual_lr``: step of the
    latency price per unit of relative latency error. ``surrogate=False``: direct LM-loss
    ablation. ``fallback_steps``: direct steps when the surrogate's gate never opened (0 = none).
    ``joint_steps``: joint fine-tuning steps after router training (0 = none).
    ``per_token``: per-token MLP routing. ``calibrate_blocks``: blocks used to fit the price.
    ``route_every``: layers that share one read of the hidden state (:class:`DynamicRouter`; at most
    the model's layer count).
    ``timing_repeats``: timed rounds per target of the timed calibration (0 = calibrate on the
    predicted latency only; per-token routing is calibrated on the predicted latency only)."""

    targets: tuple[float, ...] = (0.6, 0.7, 0.85, 1.0)
    hidden: int = 64
    anchor_scale: float = 3.0
    route_every: int = 3
    steps: int = 30
    batch_size: int = 8
    router_lr: float = 1e-2
    surrogate_hidden: int = 256
    surrogate_lr: float = 1e-3
    surrogate_updates: int = 20
    heldout_steps: int = 2
    warmup_steps: int = 4
    tau_start: float = 1.0
    tau_end: float = 0.1
    latency_weight: float = 10.0
    latency_tol: float = 0.02
    dual_lr: float = 2.0
    gate_spearman: float = 0.8
    gate_error: float = 0.5
    surrogate: bool = True
    fallback_steps: int = 20
    per_token: bool = False
    joint_steps: int = 0
    model_lr: float = 1e-4
    calibrate_blocks: int = 16
    calibrate_iters: int = 8
    timing_repeats: int = 5

    def __post_init__(self) -> None:
        _check(len(self.targets) >= 1 and all(0 < t <= 1 for t in self.targets), "dynamic.targets", self.targets,
               "fractions in (0, 1]")
        _check(any(t < 1 for t in self.targets), "dynamic.targets", self.targets, "at least one target below 1.0")
        for k in ("hidden", "route_every", "batch_size", "surrogate_hidden", "surrogate_updates", "heldout_steps", "calibrate_blocks",
                  "calibrate_iters"):
            _check(getattr(self, k) >= 1, f"dynamic.{k}", getattr(self, k), "must be >= 1")
        for k in ("steps", "warmup_steps", "joint_steps", "fallback_steps", "timing_repeats"):
            _check(getattr(self, k) >= 0, f"dynamic.{k}", getattr(self, k), "must be >= 0")
        _check(self.batch_size >= 2, "dynamic.batch_size", self.batch_size, "must be >= 2 (the constraint is on a batch average)")
        _check(self.tau_start >= self.tau_end > 0, "dynamic.tau_end", self.tau_end, "need tau_start >= tau_end > 0")
        for k in ("router_lr", "surrogate_lr", "model_lr"):
            _check(getattr(self, k) > 0, f"dynamic.{k}", getattr(self, k), "must be > 0")
        for k in ("latency_weight", "dual_lr", "anchor_scale"):
            _check(getattr(self, k) >= 0, f"dynamic.{k}", getattr(self, k), "must be >= 0")
        _check(0 <= self.latency_tol < 1, "dynamic.latency_tol", self.latency_tol, "must lie in [0, 1)")
        _check(not (self.per_token and (not self.surrogate or self.joint_steps)), "dynamic.per_token", self.per_token,
               "per-token routing trains through the surrogate only (no masked form): set surrogate=true, joint_steps=0")


def _tau(cfg: DynamicConfig, step: int, steps: int) -> float:
    return cfg.tau_start * (cfg.tau_end / cfg.tau_start) ** (step / max(1, steps - 1))


def _draw(cfg: DynamicConfig, router: DynamicRouter, pool: torch.Tensor, gen: torch.Generator) -> tuple[int, float, torch.Tensor]:
    """One step's target (index into the router's targets, value; never 1.0) and batch indices ``(B,)``."""
    cands = [j for j, t in enumerate(router.trained_targets) if t < 1.0]
    j = cands[int(torch.randint(len(cands), (1,), generator=gen))]
    idx = torch.randint(pool.shape[0], (cfg.batch_size,), generator=gen)
    return j, router.trained_targets[j], idx


def _dual_step(router: DynamicRouter, j: int, mean_frac: float, t: float, lr: float) -> None:
    """Dual ascent on the latency price of target ``j``: up while the batch average is over ``t``."""
    router.price[j] += lr * (mean_frac / t - 1)


def _record(metrics: MetricsLog, stage: str, step: int, t: float, frac: torch.Tensor, r: DynamicRouting, router: DynamicRouter,
            **extra) -> dict:
    m, h = r.stacked()  # (B, L, K) one-hot (per token: shares)
    stats = choice_statistics(m.detach(), h.detach(), router.n_mlp, router.n_heads)
    mean = float(frac.detach().mean())
    rec = {"stage": stage, "step": step, "target": t, "mean_fraction": mean, "latency_error": mean / t - 1,
           "choice_entropy_nats": stats["entropy_nats"], "input_independent_layers": stats["input_independent_layers"], **extra}
    metrics.write(**rec)
    return rec


def _full_nll(fx: ElasticModel, pool: torch.Tensor, batch_size: int) -> torch.Tensor:
    fx.set_arch(None)
    return torch.tensor(perplexity(fx, pool, batch_size=batch_size, progress=False)["nll_per_block"])  # (N,)


def train_through_surrogate(fx: ElasticModel, router: DynamicRouter, surrogate: Surrogate, table, pool: torch.Tensor,
                            cfg: DynamicConfig, metrics: MetricsLog, *, seed: int = 0, progress: bool = True) -> dict:
    """Stage 2 with the LLM frozen (see the module docstring); ``pool``: token blocks ``(N, T)``
    from every domain. Returns a summary (steps with a surrogate gradient, the surrogate's held-out
    MAE/Spearman, LLM evaluations, wall time)."""
    sp, device = fx.space, next(fx.parameters()).device
    fx.eval()
    for p in fx.parameters():
        p.requires_grad_(False)
    full = _full_nll(fx, pool, cfg.batch_size)
    fit = SurrogateFit(surrogate, lr=cfg.surrogate_lr)
    opt = torch.optim.Adam([p for p in router.parameters() if p.requires_grad], lr=cfg.router_lr)
    held: list[tuple] = []
    total = cfg.heldout_steps + cfg.warmup_steps + cfg.steps
    grad_steps, evals, ev, t0 = 0, 0, {}, time.time()
    bar = tqdm(range(total), desc="dynamic: routers (surrogate)", disable=not progress)
    for step in bar:
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        j, t, idx = _draw(cfg, router, pool, gen)
        batch = pool[idx].to(device)
        tau = _tau(cfg, step, total)
        with DynamicRouting(fx, router, t, tau=tau, generator=gen, per_token=cfg.per_token, grad=True) as r:
            nll = torch.tensor(perplexity(fx, batch, batch_size=batch.shape[0], progress=False)["nll_per_block"])
            mlp_c, head_c = r.stacked()  # (B, L, K), straight-through, with grad to the router
        evals += batch.shape[0]
        delta, feats = nll - full[idx], full[idx][:, None]
        frac = table.expected(mlp_c, head_c, sp.mlp_choices, sp.head_choices) / table.full  # (B,)
        if step < cfg.heldout_steps:  # the surrogate's held-out set: inputs and configurations it never trains on
            held.append((mlp_c.detach(), head_c.detach(), delta, feats))
            if step + 1 == cfg.heldout_steps:
                fit.set_heldout(*(torch.cat([h[i] for h in held]) for i in range(4)))
            _record(metrics, "dynamic_routers", step, t, frac, r, router, phase="heldout")
            continue
        for b in range(batch.shape[0]):
            fit.add(mlp_c[b], head_c[b], float(delta[b]), feats[b])
        fit.fit(cfg.surrogate_updates, gen=gen)
        ev = fit.evaluate()
        gate = ev["heldout_spearman"] >= cfg.gate_spearman and ev["heldout_relative_error"] <= cfg.gate_error
        mean = frac.mean()
        loss = cfg.latency_weight * latency_loss(mean[None], torch.tensor([t], dtype=mean.dtype), cfg.latency_tol).sum()
        sm_term = torch.zeros(())
        if gate and step >= cfg.heldout_steps + cfg.warmup_steps:
            surrogate.eval()
            sm_term = surrogate(mlp_c, head_c, feats.to(mlp_c.dtype)).mean()
            loss = loss + sm_term
            grad_steps += 1
        opt.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            opt.step()
        _dual_step(router, j, float(mean.detach()), t, cfg.dual_lr)
        rec = _record(metrics, "dynamic_routers", step, t, frac, r, router, phase="train", tau=tau, router_loss=float(loss.detach()),
                      surrogate_term=float(sm_term.detach()), lm_delta=float(delta.mean()), price=float(router.price[j]),
                      surrogate_spearman=ev["heldout_spearman"], surrogate_relative_error=ev["heldout_relative_error"],
                      surrogate_gate_open=gate, router_steps_with_surrogate_grad=grad_steps)
        bar.set_postfix(lat_err=f"{rec['latency_error']:+.3f}", rho=f"{ev['heldout_spearman']:.2f}")
    return {"steps": cfg.steps, "warmup_steps": cfg.warmup_steps, "heldout_steps": cfg.heldout_steps,
            "router_steps_with_surrogate_grad": grad_steps, "llm_evaluations": evals,
            "surrogate_heldout_mae": ev.get("heldout_mae"), "surrogate_spearman": ev.get("heldout_spearman"),
            "surrogate_relative_error": ev.get("heldout_relative_error"), "wall_s": round(time.time() - t0, 1)}


def train_through_masks(fx: ElasticModel, router: DynamicRouter, table, pool: torch.Tensor, cfg: DynamicConfig,
                        metrics: MetricsLog, *, steps: int, train_model: bool, seed: int = 0, progress: bool = True) -> dict:
    """Router (and, with ``train_model``, model) training on the LM loss through soft masks
    (METHOD §3 masked form): the direct-gradient ablation of §7 (``train_model=False``) or joint
    fine-tuning of §8 (``train_model=True``, router lr ``cfg.router_lr``, model lr ``cfg.model_lr``),
    with λ · latency loss on the batch average and the dual price update. Returns a summary."""
    sp, device = fx.space, next(fx.parameters()).device
    stage = "dynamic_joint" if train_model else "dynamic_direct"
    for p in fx.parameters():
        p.requires_grad_(train_model)
    groups = [{"params": [p for p in router.parameters() if p.requires_grad], "lr": cfg.router_lr}]
    if train_model:
        groups.append({"params": list(fx.parameters()), "lr": cfg.model_lr})
        fx.train()
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    t0 = time.time()
    for step in tqdm(range(steps), desc=f"dynamic: {stage}", disable=not progress):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 500_000 + step)
        j, t, idx = _draw(cfg, router, pool, gen)
        batch = pool[idx].to(device)
        tau = _tau(cfg, step, steps) if not train_model else cfg.tau_end
        with DynamicRouting(fx, router, t, tau=tau, generator=gen, masked=True, grad=True) as r:
            logits = fx(input_ids=batch, use_cache=False).logits  # (B, T, V)
            mlp_c, head_c = r.stacked()
        lm = lm_kd_loss(logits, batch, None, 0.0)[0]
        frac = table.expected(mlp_c, head_c, sp.mlp_choices, sp.head_choices) / table.full  # (B,)
        mean = frac.mean()
        lat = latency_loss(mean[None], torch.tensor([t], dtype=mean.dtype), cfg.latency_tol).sum()
        loss = lm + cfg.latency_weight * lat
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train_model:
            torch.nn.utils.clip_grad_norm_(fx.parameters(), 1.0)
        opt.step()
        _dual_step(router, j, float(mean.detach()), t, cfg.dual_lr)
        _record(metrics, stage, step, t, frac, r, router, tau=tau, router_loss=float(loss.detach()), lm_loss=float(lm.detach()),
                price=float(router.price[j]))
        del logits
    fx.eval()
    for p in fx.parameters():
        p.requires_grad_(False)
    return {"steps": steps, "wall_s": round(time.time() - t0, 1)}


def train_dynamic(fx: ElasticModel, static: TargetRouter, table, pool: torch.Tensor, cfg: DynamicConfig, out_dir: str | Path, *,
                  calibration: torch.Tensor | None = None, seed: int = 0, tokenizer=None, progress: bool = True) -> tuple[DynamicRouter, dict]:
    """The whole dynamic-router stage (module docstring): warm start from ``static``, training
    (surrogate or direct), optional joint fine-tuning, price calibration on ``calibration``
    blocks (default: the first ``cfg.calibrate_blocks`` of ``pool``), then :func:`save_dynamic`
    to ``out_dir``. ``pool``: training blocks ``(N, T)``. Metrics go to ``out_dir/metrics.jsonl``.
    With joint fine-tuning ``fx`` changes in place and is saved (with ``tokenizer``) to
    ``out_dir/model``, which :func:`flextron.dynamic_eval.load_dynamic_run` then loads.

    Returns the router and the summary written to ``dynamic.json``.

    Raises:
        DataError: fewer than ``cfg.batch_size`` blocks; TargetError: a target below the model's floor.
    """
    if pool.dim() != 2 or pool.shape[0] < cfg.batch_size:
        raise DataError(f"dynamic router training needs token blocks (N >= batch_size={cfg.batch_size}, T), got {tuple(pool.shape)}")
    for t in cfg.targets:
        static.check_target(t)
    out_dir = Path(out_dir)
    metrics = MetricsLog(out_dir / "metrics.jsonl")
    for stage in ("dynamic_routers", "dynamic_direct", "dynamic_joint"):
        metrics.truncate(stage, -1)
    torch.manual_seed(seed)
    dtype = next(fx.parameters()).dtype
    every = min(cfg.route_every, fx.space.num_layers)  # a model with fewer layers: one read for all of them
    router = DynamicRouter.from_static(static, cfg.targets, cfg.hidden, cfg.anchor_scale, every).to(dtype)
    sp = fx.space
    surrogate = Surrogate(sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), cfg.surrogate_hidden, n_features=1)
    t0 = time.time()
    summary: dict = {"config": asdict(cfg), "seed": seed, "blocks": list(pool.shape)}
    if cfg.surrogate:
        warm = {k: v.clone() for k, v in router.state_dict().items()}
        summary["routers"] = train_through_surrogate(fx, router, surrogate, table, pool, cfg, metrics, seed=seed, progress=progress)
        if summary["routers"]["router_steps_with_surrogate_grad"] == 0 and cfg.fallback_steps and not cfg.per_token:
            log.warning("dynamic routers: the surrogate never passed its gate (held-out Spearman %s); the router restarts from "
                        "its warm start with %d direct LM-loss steps", summary["routers"]["surrogate_spearman"], cfg.fallback_steps)
            router.load_state_dict(warm)  # the latency-only steps are discarded
            summary["fallback"] = train_through_masks(fx, router, table, pool, cfg, metrics, steps=cfg.fallback_steps,
                                                      train_model=False, seed=seed, progress=progress)
        elif summary["routers"]["router_steps_with_surrogate_grad"] == 0:
            log.warning("dynamic routers: the surrogate never passed its gate, so the router learned from the latency term only%s",
                        " (per-token routing has no direct fallback)" if cfg.per_token else "")
    else:
        summary["routers"] = train_through_masks(fx, router, table, pool, cfg, metrics, steps=cfg.steps, train_model=False,
                                                 seed=seed, progress=progress)
    if cfg.joint_steps:
        summary["joint"] = train_through_masks(fx, router, table, pool, cfg, metrics, steps=cfg.joint_steps, train_model=True,
                                               seed=seed, progress=progress)
        from .export import save_elastic  # the fine-tuned weights belong to this router

        save_elastic(fx, out_dir / MODEL_DIR, tokenizer=tokenizer, overwrite=True)
        summary["model"] = MODEL_DIR
    cal = pool[: cfg.calibrate_blocks] if calibration is None else calibration
    summary["price_before_calibration"] = router.price.tolist()
    summary["calibration"] = calibrate_price(fx, router, table, cal, batch_size=cfg.batch_size, iters=cfg.calibrate_iters,
                                             per_token=cfg.per_token, progress=progress)
    if cfg.timing_repeats and not cfg.per_token:
        summary["timing"], budgets = timed_budgets(fx, router, table, cal[:1].to(next(fx.parameters()).device), cfg.timing_repeats,
                                                   progress=progress)
        summary["calibration"] = calibrate_price(fx, router, table, cal, batch_size=cfg.batch_size, iters=cfg.calibrate_iters,
                                                 budgets=budgets, progress=progress)
    summary["wall_s"] = round(time.time() - t0, 1)
    save_dynamic(out_dir, router, surrogate, summary)
    log.info("dynamic routers: calibrated average latency %s", {k: round(v["mean_fraction"], 4) for k, v in summary["calibration"].items()})
    return router, summary


def timed_budgets(fx: ElasticModel, router: DynamicRouter, table, ids: torch.Tensor, repeats: int, *, max_change: float = 0.15,
                  progress: bool = False) -> tuple[dict, dict[float, float]]:
    """Budgets of the predicted latency under which the *timed* latency meets each target: for
    every trained target ``t`` < 1, :func:`~flextron.dynamic.measure_overhead` on ``ids`` ``(1, T)``
    gives the timed fraction ``τ`` and the table's prediction ``p`` of the routed sub-network; the
    budget is ``t · p / τ``, kept within ``±max_change`` of ``t`` (a noisy reading cannot move it
    further). Returns the measurements per target (JSON-ready) and ``{t: budget}``."""
    timing, budgets = {}, {}
    for t in [t for t in router.trained_targets if t < 1.0]:
        m = measure_overhead(fx, router, t, ids, repeats=repeats, table=table, progress=progress, desc=f"dynamic: timing {t:g}")
        ratio = m["timed_fraction"] / m["predicted_fraction"]
        budgets[t] = min(max(t / ratio, t * (1 - max_change)), min(1.0, t * (1 + max_change)))
        timing[f"{t:g}"] = {**m, "config": m["config"].to_dict(), "timed_over_predicted": ratio, "budget": budgets[t]}
        log.info("dynamic routers at %g: timed %.3f vs predicted %.3f of full (router overhead %+.2f%%); budget %.3f", t,
                 m["timed_fraction"], m["predicted_fraction"], 100 * m["overhead_fraction"], budgets[t])
        if abs(ratio - 1) > max_change:
            log.warning("dynamic routers at %g: timed latency is %.2f× the table's prediction on this machine, beyond the ±%.0f%% "
                        "the budget may move; the timed latency will miss this target. Train the routers on the machine the run's "
                        "lookup table was measured on, or use the static router where the router overhead (%+.1f%% of the "
                        "sub-network's prefill) is this large (very small models)", t, ratio, 100 * max_change,
                        100 * m["overhead_fraction"])
    return timing, budgets


def save_dynamic(out_dir: str | Path, router: DynamicRouter, surrogate: Surrogate, summary: dict) -> Path:
    """Write the router and surrogate (safetensors) and ``dynamic.json`` (shapes, summary,
    sha256 of both files) into ``out_dir`` atomically (other files there are kept)."""
    out_dir = Path(out_dir)
    meta = {"targets": router.trained_targets, "num_layers": router.num_layers, "n_mlp": router.n_mlp, "n_heads": router.n_heads,
            "hidden_size": router.hidden_size, "hidden": router.b1.shape[1], "anchor_scale": router.anchor_scale,
            "route_every": router.route_every, "surrogate_hidden": surrogate.net[0].out_features, "per_token": bool(summary.get("config", {}).get("per_token", False)),
            "summary": summary}

    def write(tmp: Path) -> None:
        save_model(router, str(tmp / ROUTER_FILE))
        save_model(surrogate, str(tmp / SURROGATE_FILE))
        (tmp / MANIFEST).write_text(json.dumps({**meta, "sha256": file_hashes(tmp, [ROUTER_FILE, SURROGATE_FILE])}, indent=2))

    sub = out_dir / "router"
    atomic_write_dir(sub, write)
    return sub


def load_dynamic(path: str | Path, fx: ElasticModel) -> tuple[DynamicRouter, dict]:
    """The router saved by :func:`save_dynamic` under ``path`` (the directory given to it), checked
    against its sha256 and ``fx``'s geometry. Returns ``(router (eval mode, fx's dtype), manifest)``.

    Raises:
        ModelError: missing/malformed manifest, altered files, or a router built for another model.
    """
    sub = Path(path) / "router"
    fix = f"train it again with `flextron dynamic RUN --out {path}`"
    try:
        meta = json.loads((sub / MANIFEST).read_text())
        hashes = meta["sha256"]
        router = DynamicRouter(meta["targets"], meta["num_layers"], meta["hidden_size"], meta["n_mlp"], meta["n_heads"],
                               meta["hidden"], meta["anchor_scale"], meta.get("route_every", 1))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"no readable dynamic router in {sub} ({type(e).__name__}: {e}); {fix}") from None
    verify_hashes(sub, hashes, fix)
    sp = fx.space
    if (meta["num_layers"], meta["n_mlp"], meta["n_heads"], meta["hidden_size"]) != (
            sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), sp.hidden_size):
        raise ModelError(f"the dynamic router in {sub} was trained for another model geometry; {fix}")
    try:
        load_model(router, str(sub / ROUTER_FILE))
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelError(f"dynamic router weights in {sub} are unreadable ({e}); {fix}") from None
    return router.to(next(fx.parameters()).dtype).eval(), meta


def config_from_overrides(**overrides) -> DynamicConfig:
    """A :class:`DynamicConfig` from keyword overrides (``None`` values ignored).

    Raises:
        ConfigError: unknown field or invalid value (naming it)."""
    from .config import from_dict

    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return from_dict(DynamicConfig, given, "dynamic")
    except TypeError as e:
        raise ConfigError(f"dynamic: {e}") from None
