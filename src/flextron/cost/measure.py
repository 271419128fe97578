"""Measuring the latency lookup table on this machine (METHOD §5).

:func:`measure_latency_table` times the candidates of one layer at a stated workload (a prefill of
``batch_size × seq_len`` tokens with ``logits_to_keep=1``, what generation's prefill computes) and
the full model, all interleaved round-robin so that drifting CPU speed hits every candidate alike,
then fits scale factors on exported sub-models (``latency.method: fit``);
:func:`validate_latency_table` reports the table's error on random whole configurations.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from tqdm.auto import tqdm

from flextron.config import LatencyConfig
from flextron.cost.blocks import layer_types, time_blocks
from flextron.cost.table import CostTable, enforce_monotone
from flextron.cost.timing import median, paired_ratio, prefill_fn, time_models
from flextron.errors import ConfigError, MeasurementError
from flextron.model.elastic import ElasticModel
from flextron.model.space import ArchConfig, SearchSpace, sample_arch

logger = logging.getLogger(__name__)


class _ElasticState:
    """Save and restore an elastic model's configuration, masks and train flag."""

    def __init__(self, fx: ElasticModel) -> None:
        self.fx = fx

    def __enter__(self):
        fx = self.fx
        self.arch = fx.arch
        self.mlp_masks = [m.mask for m in fx.mlps]
        self.head_masks = [a.mask for a in fx.attns]
        self.training = fx.training
        fx.set_masks(None, None)
        fx.eval()
        return self

    def __exit__(self, *exc):
        fx = self.fx
        fx.set_arch(self.arch)
        for m, mk in zip(fx.mlps, self.mlp_masks):
            m.mask = mk
        for a, mk in zip(fx.attns, self.head_masks):
            a.mask = mk
        fx.train(self.training)
        return False


def _workload_ids(fx: ElasticModel, cfg: LatencyConfig, device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, fx.config.vocab_size, (cfg.batch_size, cfg.seq_len), generator=gen)
    return ids.to(device)


def timed_fractions(
    fx: ElasticModel, archs: Sequence[ArchConfig], cfg: LatencyConfig, *, progress: bool = True
) -> list[dict]:
    """Time each configuration as it is deployed — an exported, contiguous sub-model — against
    the exported full model, interleaved per configuration (``cfg.warmup`` + ``cfg.repeats``
    rounds, medians), so machine-speed drift between configurations cancels in the ratio.

    Returns per configuration ``{"arch", "sub_s", "full_s", "fraction"}``: median seconds, and the
    fraction of full latency as :func:`paired_ratio`.
    """
    from flextron.model.export import export_subnetwork

    ids = _workload_ids(fx, cfg, next(fx.parameters()).device)
    with _ElasticState(fx):
        full = export_subnetwork(fx, fx.space.full())
        full_run = prefill_fn(full, ids)
        out = []
        for arch in tqdm(archs, desc="latency: configurations", disable=not progress, leave=False):
            sub = export_subnetwork(fx, arch)
            res = time_models({"sub": prefill_fn(sub, ids), "full": full_run}, repeats=cfg.repeats, warmup=cfg.warmup)
            del sub
            s_, f_ = res["sub"]["median_s"], res["full"]["median_s"]
            out.append(
                {"arch": arch.to_dict(), "sub_s": s_, "full_s": f_, "fraction": paired_ratio(res, "sub", "full")}
            )
    return out


def _calibration_archs(space: SearchSpace, n_random: int, seed: int) -> list[ArchConfig]:
    """Every homogeneous configuration except the full one, plus ``n_random`` per-layer random ones."""
    gen = torch.Generator().manual_seed(seed)
    homo = [a for a in space.homogeneous_configs() if a != space.full()]
    return homo + [sample_arch(space, gen) for _ in range(n_random)]


def busy_figures(start_s: Sequence[float], end_s: Sequence[float], full_s: Sequence[float], fit: dict | None) -> dict:
    """How steady the machine was while a lookup table was measured, as fractions of the full
    model's latency: ``drift`` = |median(end_s) / median(start_s) − 1| (the full model timed before
    and after the measurement), ``spread`` = (max − min) / median of the full model's medians
    ``full_s`` taken throughout it (one per timed sub-model, interleaved with it), and
    ``max_residual`` = the largest fit residual (``fit["max_abs_residual_fraction"]``; None for
    ``method: block``)."""
    start, end = median(start_s), median(end_s)
    return {
        "drift": abs(end / start - 1),
        "spread": (max(full_s) - min(full_s)) / median(full_s),
        "max_residual": None if fit is None else fit["max_abs_residual_fraction"],
        "full_start_s": start,
        "full_end_s": end,
    }


def busy_reasons(figures: dict, tolerance: float) -> list[str]:
    """Why :func:`busy_figures` say the machine was busy (empty: steady): the drift or the fit's
    largest residual above ``tolerance``, the spread above twice it (it spans many rounds)."""
    out = []
    if figures["drift"] > tolerance:
        out.append(f"the full model's time drifted by {100 * figures['drift']:.0f}% between start and end")
    if figures["spread"] > 2 * tolerance:
        out.append(f"its timings spread over {100 * figures['spread']:.0f}%")
    if figures["max_residual"] is not None and figures["max_residual"] > tolerance:
        out.append(f"the fit's residuals reach {100 * figures['max_residual']:.0f}% of the full latency")
    return out


def _time_full(fx: ElasticModel, cfg: LatencyConfig) -> list[float]:
    """``cfg.repeats`` timings (seconds) of the full model's prefill workload."""
    with _ElasticState(fx):
        fx.set_arch(None)
        run = prefill_fn(fx, _workload_ids(fx, cfg, next(fx.parameters()).device))
        return time_models({"full": run}, repeats=cfg.repeats, warmup=cfg.warmup)["full"]["times_s"]


def measure_latency_table(fx: ElasticModel, cfg: LatencyConfig, *, progress: bool = True) -> CostTable:
    """Measure the latency lookup table of ``fx`` (:func:`measure_once`) and check that the machine
    was steady meanwhile: the full model is timed before and after, and :func:`busy_figures` of
    the measurement are compared with ``cfg.busy_tolerance`` (:func:`busy_reasons`). A busy
    measurement is repeated, up to ``cfg.busy_retries`` times. The figures of every attempt go
    to ``table.workload["busy_check"]``.

    Raises:
        MeasurementError: still busy after the retries, unless ``cfg.allow_busy`` (then the last
            table is returned, marked ``accepted_busy``).
        ValueError: a timing is not finite.
    """
    attempts = []
    for attempt in range(cfg.busy_retries + 1):
        start = _time_full(fx, cfg)
        table, full_s = measure_once(fx, cfg, progress=progress)
        figures = busy_figures(start, _time_full(fx, cfg), full_s, table.workload.get("fit"))
        reasons = busy_reasons(figures, cfg.busy_tolerance)
        attempts.append({**figures, "busy": reasons})
        if not reasons:
            break
        logger.warning(
            "latency table, attempt %d of %d: the machine looks busy (%s)",
            attempt + 1,
            cfg.busy_retries + 1,
            "; ".join(reasons),
        )
    table.workload["busy_check"] = {
        "tolerance": cfg.busy_tolerance,
        "attempts": attempts,
        "accepted_busy": bool(reasons),
    }
    if reasons and not cfg.allow_busy:
        raise MeasurementError(
            f"the machine was busy while the latency table was measured ({'; '.join(reasons)}; "
            f"{len(attempts)} attempt(s), latency.busy_tolerance {cfg.busy_tolerance:g}): the table would "
            "mispredict latencies; stop other jobs and rerun (the run resumes at the latency stage), or set "
            "latency.allow_busy: true (a config change: pass --overwrite) to accept a busy machine's table"
        )
    if reasons:
        logger.warning("latency table measured on a busy machine, accepted (latency.allow_busy)")
    return table


def measure_once(fx: ElasticModel, cfg: LatencyConfig, *, progress: bool = True) -> tuple[CostTable, list[float]]:
    """Measure the latency lookup table of ``fx`` on its current device and dtype (METHOD §5),
    once; returns it with the full model's median times taken throughout (seconds; one per timed
    sub-model for ``method: fit``, the full model's timings for ``block``).

    Workload: prefill of ``batch_size × seq_len`` tokens (``use_cache=False, logits_to_keep=1``).
    ``const`` (embedding, final norm, LM head, overheads) is the full latency minus the layers'
    full-width costs.

    Every MLP width and head count is timed as an isolated block of one layer (interleaved,
    ``cfg.block_repeats`` rounds, trimmed mean; :func:`~flextron.cost.blocks.time_blocks`):
    ``mlp_block[m]``, ``attn_block[a]`` — per layer type when the layers differ (Gemma 3's local
    and global layers; ``table.attn_by_type``), each type on its first layer with the inputs the
    model gives it.

    ``cfg.method == "fit"`` (default): isolated CPU blocks of a few milliseconds mispredict whole
    sub-models (by 5–8 % of the full latency here: caches, threading and the rest of the layer
    differ in context), so the block timings give only the *shape* of the table and its *scale*
    comes from whole sub-models. Every homogeneous configuration and ``cfg.fit_configs``
    per-layer random ones are exported and timed against the full model
    (:func:`timed_fractions`); two scale factors solve the least-squares problem
    ``fraction(c) − 1 = (α Σ_l (mlp_block[m_l] − mlp_block[D]) + β Σ_l (attn_block[a_l] −
    attn_block[R])) / full``, and ``mlp[m] = α · mlp_block[m]``, ``attn[a] = β · attn_block[a]``.
    Two parameters from many sub-models keep timing noise out of the per-width differences
    (a free least-squares entry per width let noise reorder the widths' costs).
    ``cfg.method == "block"``: the isolated block timings as they are (METHOD §5 literally).
    Entries that noise left below a narrower width's are raised to it and listed in
    ``table.adjusted``. The model's configuration is restored.

    Raises:
        ValueError: a timing is not finite.
    """
    p = next(fx.parameters())
    device, dtype = p.device, p.dtype
    space = fx.space
    B, T = cfg.batch_size, cfg.seq_len
    D, R, L = space.mlp_choices[-1], space.head_choices[-1], space.num_layers
    logger.info(
        "latency table (%s): %d MLP widths, %d head counts, prefill %dx%d on %s (%s), warmup %d, repeats %d",
        cfg.method,
        len(space.mlp_choices),
        len(space.head_choices),
        B,
        T,
        device,
        dtype,
        cfg.warmup,
        cfg.repeats,
    )
    types = layer_types(fx)

    def attn_key(layer: int, a: int) -> str:  # the block timed for layer's type at a units
        return f"attn:{a}" if types is None else f"attn:{types[layer]}:{a}"

    with _ElasticState(fx), torch.inference_mode():
        fx.set_arch(None)
        est = time_blocks(fx, cfg, _workload_ids(fx, cfg, device), progress=progress)
        fx.set_arch(None)  # the timed blocks changed their layers' widths
        if cfg.method == "block":
            timed = time_models(
                {"full": prefill_fn(fx, _workload_ids(fx, cfg, device))},
                repeats=cfg.repeats,
                warmup=cfg.warmup,
                trim=cfg.trim,
            )["full"]
            times = sorted(timed["times_s"])  # trimmed like the mean: one outlier is not a busy machine
            cut = int(len(times) * cfg.trim)
            full, full_s = timed["trimmed_mean_s"], times[cut : len(times) - cut] or times
    fit_info = None
    if cfg.method == "fit":
        rows = timed_fractions(fx, _calibration_archs(space, cfg.fit_configs, seed=1), cfg, progress=progress)
        full_s = [r["full_s"] for r in rows]
        full = median(full_s)
        X = torch.tensor(
            [
                [
                    sum(est[f"mlp:{m}"] - est[f"mlp:{D}"] for m in r["arch"]["mlp"]) / full,
                    sum(est[attn_key(l, a)] - est[attn_key(l, R)] for l, a in enumerate(r["arch"]["heads"])) / full,
                ]
                for r in rows
            ],
            dtype=torch.float64,
        )  # (n_configs, 2)
        y = torch.tensor([r["fraction"] - 1 for r in rows], dtype=torch.float64)
        scale = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
        if (scale <= 0).any():
            logger.warning(
                "latency table fit: non-positive scale %s (timings too noisy); using the isolated block timings",
                scale.tolist(),
            )
            scale = torch.ones(2, dtype=torch.float64)
        resid = (X @ scale - y).abs()
        for k in est:
            est[k] *= float(scale[0] if k.startswith("mlp:") else scale[1])
        fit_info = {
            "configs": len(rows),
            "scale": {"mlp": float(scale[0]), "attn": float(scale[1])},
            "mean_abs_residual_fraction": float(resid.mean()),
            "max_abs_residual_fraction": float(resid.max()),
        }
        logger.info(
            "latency table fit over %d sub-models: scale mlp %.2f attn %.2f, mean |residual| %.3f of full latency",
            len(rows),
            scale[0],
            scale[1],
            fit_info["mean_abs_residual_fraction"],
        )
    # Only the split between const and the per-layer costs is arbitrary: if the fitted savings
    # exceed the isolated full-width block time, move the split so no cost is negative (every
    # prediction stays the same).
    prefixes = ["attn:"] if types is None else [f"attn:{t}:" for t in dict.fromkeys(types)]
    for prefix, widths in (("mlp:", space.mlp_choices), *((p, space.head_choices) for p in prefixes)):
        low = min(est[f"{prefix}{w}"] for w in widths)
        if low < 0:
            for w in widths:
                est[f"{prefix}{w}"] -= low
    adjusted: list = []
    mlp = enforce_monotone({m: est[f"mlp:{m}"] for m in space.mlp_choices}, "mlp", adjusted)
    by_type = None
    if types is not None:
        by_type = {
            t: enforce_monotone({a: est[f"attn:{t}:{a}"] for a in space.head_choices}, f"attn:{t}", adjusted)
            for t in dict.fromkeys(types)
        }
    attn = (
        by_type[types[0]]
        if by_type
        else enforce_monotone({a: est[f"attn:{a}"] for a in space.head_choices}, "attn", adjusted)
    )
    const = full - L * mlp[D] - sum((by_type[t] if by_type else attn)[R] for t in (types or [None] * L))
    if const < 0:
        logger.warning(
            "latency table: the layers' sum exceeds the full model's time (const=%.3gs); timings are noisy", const
        )
    table = CostTable(
        unit="s",
        mlp=mlp,
        attn=attn,
        const=const,
        num_layers=L,
        full=full,
        device=_device_name(device),
        dtype=str(dtype).replace("torch.", ""),
        torch_version=torch.__version__,
        workload={
            "batch_size": B,
            "seq_len": T,
            "kind": "prefill",
            "logits_to_keep": 1,
            "warmup": cfg.warmup,
            "repeats": cfg.repeats,
            "block_repeats": cfg.block_repeats,
            "trim": cfg.trim,
            "method": cfg.method,
            "threads": torch.get_num_threads(),
            "fit": fit_info,
        },
        adjusted=adjusted,
        layer_types=types,
        attn_by_type=by_type,
    )
    logger.info(
        "latency table: full %.4gs, const %.4gs, smallest config %.1f%% of full",
        full,
        const,
        100 * table.fraction(space.smallest()),
    )
    return table, full_s


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    import platform

    return f"{device.type}:{platform.processor() or platform.machine()}"


def validate_latency_table(
    fx: ElasticModel, table: CostTable, cfg: LatencyConfig, n: int, seed: int = 0, *, progress: bool = True
) -> dict:
    """Time ``n`` per-layer random configurations *not used to build the table* (no homogeneous
    one: the fit uses them all; none of the fit's random ones) as exported sub-models against the
    full model (:func:`timed_fractions`) and compare with the table's predicted fraction of full
    latency — the unit targets are stated in, and insensitive to the machine being uniformly
    slower or faster than when the table was measured. A space too small to hold ``n`` such
    configurations is validated on those it has.

    Returns:
        ``{"mape_fraction": mean absolute percentage error of the fraction, "mape": the same of
        absolute seconds against the table's ``full``, "n", "seed", "configs": [{"arch",
        "predicted_fraction", "measured_fraction", "predicted_s", "measured_s"}, ...]}``. Does not
        modify ``table``.
    """
    if table.unit != "s":
        raise ConfigError(f"only a latency table (unit 's') can be validated by timing, got unit {table.unit!r}")
    if n < 1:
        raise ConfigError(f"validate_latency_table needs n >= 1, got {n}")
    gen = torch.Generator().manual_seed(seed + 1000)
    used = set(_calibration_archs(fx.space, cfg.fit_configs, seed=1)) | {fx.space.full()}
    archs: list[ArchConfig] = []
    for _ in range(50 * n):  # held out: neither homogeneous nor drawn by the fit
        arch = sample_arch(fx.space, gen)
        if not arch.is_homogeneous and arch not in used and arch not in archs:
            archs.append(arch)
            if len(archs) == n:
                break
    if not archs:
        raise ConfigError("the search space has no configuration outside the fit's to validate the table on")
    n = len(archs)
    rows = timed_fractions(fx, archs, cfg, progress=progress)
    configs, errs, ferrs = [], [], []
    for arch, r in zip(archs, rows):
        pred = table.predict(arch)
        pf = pred / table.full
        configs.append(
            {
                "arch": arch.to_dict(),
                "predicted_fraction": pf,
                "measured_fraction": r["fraction"],
                "predicted_s": pred,
                "measured_s": r["sub_s"],
            }
        )
        errs.append(abs(pred - r["sub_s"]) / r["sub_s"])
        ferrs.append(abs(pf - r["fraction"]) / r["fraction"])
    mape, mape_fraction = 100.0 * sum(errs) / n, 100.0 * sum(ferrs) / n
    logger.info(
        "latency table validation: MAPE of fractions %.2f%% (absolute %.2f%%) over %d configurations",
        mape_fraction,
        mape,
        n,
    )
    return {"mape": mape, "mape_fraction": mape_fraction, "n": n, "seed": seed, "configs": configs}
