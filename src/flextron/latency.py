"""Stage 4 input: the latency lookup table (METHOD §5) and the exact parameter table.

A :class:`CostTable` prices one configuration as ``const + Σ_l (mlp[m_l] + attn[a_l])``: ``mlp[m]``
is one layer's MLP at intermediate width ``m``, ``attn[a]`` one layer's attention at ``a`` query
heads per KV group, ``const`` everything that does not shrink (embeddings, norms, residual adds, the
final norm and the LM head at the workload). The same sum weighted by router probabilities is the
differentiable expected cost (:meth:`CostTable.expected`).

:func:`measure_latency_table` times the candidates of one layer at a stated workload (a prefill of
``batch_size × seq_len`` tokens with ``logits_to_keep=1``, what generation's prefill computes) and
the full model, all interleaved round-robin so that drifting CPU speed hits every candidate alike;
:func:`validate_latency_table` reports the table's error on random whole configurations.
:func:`time_models` is the one timing primitive used everywhere.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .checkpoint import atomic_write_json
from .config import LatencyConfig
from .elastic import ArchConfig, ElasticModel, SearchSpace, sample_arch
from .errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "CostTable",
    "measure_latency_table",
    "validate_latency_table",
    "time_models",
    "prefill_fn",
    "trimmed_mean",
]


# --------------------------------------------------------------------------- timing primitive


def trimmed_mean(values: Sequence[float], trim: float) -> float:
    """Mean after dropping ``floor(trim · n)`` values at each end (``0 <= trim < 0.5``)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("trimmed_mean of no values")
    k = int(math.floor(trim * len(xs)))
    kept = xs[k : len(xs) - k] or xs
    return sum(kept) / len(kept)


def _median(values: Sequence[float]) -> float:
    xs = sorted(values)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _cuda_sync_needed() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def time_models(
    fns: dict[str, Callable[[], object]],
    *,
    repeats: int,
    warmup: int = 2,
    trim: float = 0.2,
    progress: bool = False,
    desc: str = "timing",
) -> dict[str, dict]:
    """Interleaved wall-clock timing of several callables.

    Every round calls each function once (round-robin, the starting point rotating by one each
    round so no candidate always runs right after the same neighbour); ``warmup`` untimed rounds
    come first. CUDA is synchronised around each call when it is in use.

    Returns:
        per name ``{"median_s", "trimmed_mean_s", "times_s"}`` (``times_s``: the ``repeats`` raw
        times in call order; ``trimmed_mean_s`` with trim fraction ``trim``).
    """
    if repeats < 1:
        raise ConfigError(f"time_models needs repeats >= 1, got {repeats}")
    if warmup < 0:
        raise ConfigError(f"time_models needs warmup >= 0, got {warmup}")
    names = list(fns)
    sync = torch.cuda.synchronize if _cuda_sync_needed() else (lambda: None)
    times: dict[str, list[float]] = {n: [] for n in names}
    total = warmup + repeats
    for r in tqdm(range(total), desc=desc, disable=not progress, leave=False):
        k = r % max(1, len(names))
        for name in names[k:] + names[:k]:
            fn = fns[name]
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
    return {
        n: {"median_s": _median(ts), "trimmed_mean_s": trimmed_mean(ts, trim), "times_s": ts} for n, ts in times.items()
    }


def paired_ratio(res: dict[str, dict], num: str, den: str) -> float:
    """Median over rounds of ``num``'s time divided by ``den``'s time in the same round (from
    :func:`time_models`). Pairing cancels slow phases of a shared machine that hit both calls of
    a round, so the ratio is steadier than a ratio of medians."""
    return _median([a / b for a, b in zip(res[num]["times_s"], res[den]["times_s"])])


def prefill_fn(model: torch.nn.Module, input_ids: torch.Tensor) -> Callable[[], object]:
    """A callable running the prefill workload: a no-grad forward of ``input_ids (B, T)`` with
    ``use_cache=False, logits_to_keep=1`` (the LM head runs on the last token only). Works for plain
    HF causal LMs and :class:`~flextron.elastic.ElasticModel` alike."""

    def run():
        with torch.inference_mode():
            return model(input_ids=input_ids, use_cache=False, logits_to_keep=1)

    return run


# --------------------------------------------------------------------------- the table


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _finite(x, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x):
        raise ConfigError(f"{where}={x!r} is invalid: expected a finite number")
    return float(x)


@dataclass
class CostTable:
    """Cost of a configuration: ``const + Σ_l (mlp[m_l] + attn[a_l])`` (METHOD §5).

    ``unit``: ``"s"`` (measured latency) or ``"params"`` (exact parameter count). ``mlp``: width →
    cost of one layer's MLP; ``attn``: query heads per KV group → cost of one layer's attention;
    ``full``: cost of the full model. Provenance: ``device``, ``dtype``, ``torch_version``,
    ``workload`` (``batch_size``, ``seq_len``, ``kind``, ``logits_to_keep``), ``measured_at`` (ISO
    time), ``validation`` (see :func:`validate_latency_table`) and ``adjusted`` (entries raised to
    keep the table monotone in width, with their measured values).
    """

    unit: str
    mlp: dict[int, float]
    attn: dict[int, float]
    const: float
    num_layers: int
    full: float
    device: str = "n/a"
    dtype: str = "n/a"
    torch_version: str = torch.__version__
    workload: dict = field(default_factory=dict)
    measured_at: str = field(default_factory=_now)
    validation: dict | None = None
    adjusted: list = field(default_factory=list)

    # -- costs ----------------------------------------------------------------------------------
    def predict(self, arch: ArchConfig) -> float:
        """``const + Σ_l (mlp[m_l] + attn[a_l])``.

        Raises:
            ConfigError: wrong number of layers, or a width/head count the table does not price.
        """
        if len(arch.mlp) != self.num_layers or len(arch.heads) != self.num_layers:
            raise ConfigError(
                f"the cost table prices {self.num_layers} layers, the architecture has {len(arch.mlp)}/{len(arch.heads)}"
            )
        total = self.const
        for m, a in zip(arch.mlp, arch.heads):
            if m not in self.mlp:
                raise ConfigError(f"MLP width {m} is not in the cost table; priced widths: {sorted(self.mlp)}")
            if a not in self.attn:
                raise ConfigError(f"{a} heads per group is not in the cost table; priced: {sorted(self.attn)}")
            total += self.mlp[m] + self.attn[a]
        return total

    def fraction(self, arch: ArchConfig) -> float:
        """Cost of ``arch`` as a fraction of the full model's."""
        return self.predict(arch) / self.full

    def cost_vectors(
        self, mlp_choices: Sequence[int], head_choices: Sequence[int], *, dtype=torch.float32, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-candidate costs ``(K_mlp,)`` and ``(K_heads,)`` in the order of the choices."""
        for m in mlp_choices:
            if m not in self.mlp:
                raise ConfigError(f"MLP width {m} is not in the cost table; priced widths: {sorted(self.mlp)}")
        for a in head_choices:
            if a not in self.attn:
                raise ConfigError(f"{a} heads per group is not in the cost table; priced: {sorted(self.attn)}")
        cm = torch.tensor([self.mlp[int(m)] for m in mlp_choices], dtype=dtype, device=device)
        ca = torch.tensor([self.attn[int(a)] for a in head_choices], dtype=dtype, device=device)
        return cm, ca

    def expected(
        self,
        mlp_probs: torch.Tensor,
        head_probs: torch.Tensor,
        mlp_choices: Sequence[int],
        head_choices: Sequence[int],
    ) -> torch.Tensor:
        """Differentiable expected cost under router probabilities.

        Args:
            mlp_probs: ``(L, K_mlp)`` or ``(B, L, K_mlp)`` over ``mlp_choices``.
            head_probs: ``(L, K_heads)`` or ``(B, L, K_heads)`` over ``head_choices``.
        Returns:
            a scalar, or ``(B,)``: ``const + Σ_l Σ_k π_lk · cost_k``.
        """
        if mlp_probs.shape[-2] != self.num_layers or head_probs.shape[-2] != self.num_layers:
            raise ConfigError(
                f"router probabilities cover {mlp_probs.shape[-2]}/{head_probs.shape[-2]} layers, the table {self.num_layers}"
            )
        if mlp_probs.shape[-1] != len(mlp_choices) or head_probs.shape[-1] != len(head_choices):
            raise ConfigError(
                f"probabilities over {mlp_probs.shape[-1]}/{head_probs.shape[-1]} candidates, "
                f"but {len(mlp_choices)}/{len(head_choices)} choices given"
            )
        cm, ca = self.cost_vectors(mlp_choices, head_choices, dtype=mlp_probs.dtype, device=mlp_probs.device)
        return self.const + (mlp_probs * cm).sum((-1, -2)) + (head_probs * ca.to(head_probs.dtype)).sum((-1, -2))

    def is_monotone(self) -> bool:
        """Costs non-decreasing in width, for the MLP and the attention."""
        for d in (self.mlp, self.attn):
            vals = [d[k] for k in sorted(d)]
            if any(b < a for a, b in zip(vals, vals[1:])):
                return False
        return True

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_parameters(cls, space: SearchSpace) -> "CostTable":
        """Exact parameter costs (unit ``"params"``): ``predict(arch) == space.num_parameters(arch)``."""
        d, hd, G = space.hidden_size, space.head_dim, space.num_key_value_heads
        per_neuron = 3 * d + (2 if space.mlp_bias else 0)
        per_head = hd * (2 * d + (1 if space.q_bias else 0))
        mlp = {int(m): float(m * per_neuron) for m in space.mlp_choices}
        attn = {int(a): float(G * a * per_head) for a in space.head_choices}
        D, R, L = space.mlp_choices[-1], space.head_choices[-1], space.num_layers
        const = float(space.total_params) - L * (mlp[D] + attn[R])
        return cls(
            unit="params", mlp=mlp, attn=attn, const=const, num_layers=L, full=float(space.total_params),
            workload={"kind": "params"},
        )

    # -- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        d = asdict(self)
        d["mlp"] = {str(k): v for k, v in sorted(self.mlp.items())}
        d["attn"] = {str(k): v for k, v in sorted(self.attn.items())}
        return d

    @classmethod
    def from_json(cls, d, source: str = "cost table") -> "CostTable":
        """Build from :meth:`to_json` output.

        Raises:
            ConfigError: missing/unknown fields or invalid values, naming ``source`` and the field.
        """
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(d).__name__}")
        required = ("unit", "mlp", "attn", "const", "num_layers", "full")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
        allowed = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ConfigError(f"{source}: unknown field {unknown[0]}; allowed: {', '.join(sorted(allowed))}")
        if d["unit"] not in ("s", "params"):
            raise ConfigError(f"{source}: unit={d['unit']!r} is invalid: expected 's' or 'params'")

        def table(name: str) -> dict[int, float]:
            raw = d[name]
            if not isinstance(raw, dict) or not raw:
                raise ConfigError(f"{source}: {name} must be a non-empty object width -> cost")
            out = {}
            for k, v in raw.items():
                try:
                    ik = int(k)
                except (TypeError, ValueError):
                    raise ConfigError(f"{source}: {name} key {k!r} is not an integer width") from None
                if ik < 1:
                    raise ConfigError(f"{source}: {name} key {k!r} must be >= 1")
                out[ik] = _finite(v, f"{source}: {name}[{k}]")
            return out

        nl = d["num_layers"]
        if isinstance(nl, bool) or not isinstance(nl, int) or nl < 1:
            raise ConfigError(f"{source}: num_layers={nl!r} is invalid: expected an integer >= 1")
        full = _finite(d["full"], f"{source}: full")
        if full <= 0:
            raise ConfigError(f"{source}: full={full} is invalid: must be > 0")
        for k in ("device", "dtype", "torch_version", "measured_at"):
            if k in d and not isinstance(d[k], str):
                raise ConfigError(f"{source}: {k}={d[k]!r} is invalid: expected a string")
        for k in ("workload",):
            if k in d and not isinstance(d[k], dict):
                raise ConfigError(f"{source}: {k} must be an object")
        if d.get("validation") is not None and not isinstance(d["validation"], dict):
            raise ConfigError(f"{source}: validation must be an object or null")
        if "adjusted" in d and not isinstance(d["adjusted"], list):
            raise ConfigError(f"{source}: adjusted must be a list")
        kw = {k: v for k, v in d.items() if k not in required}
        return cls(
            unit=d["unit"], mlp=table("mlp"), attn=table("attn"), const=_finite(d["const"], f"{source}: const"),
            num_layers=nl, full=full, **kw,
        )

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (temporary file in the same folder, then ``os.replace``)."""
        return atomic_write_json(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> "CostTable":
        """Read a table written by :meth:`save`.

        Raises:
            ConfigError: the file is missing, not JSON, or a field is invalid (the message names the file).
        """
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"cost table {p} does not exist; measure it with measure_latency_table() first")
        try:
            data = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"cost table {p} is not valid JSON: {e}") from None
        return cls.from_json(data, source=f"cost table {p}")


# --------------------------------------------------------------------------- measurement


def _enforce_monotone(costs: dict[int, float], name: str, adjusted: list) -> dict[int, float]:
    """Cumulative max over increasing widths; records each raised entry in ``adjusted``."""
    out, best = {}, -math.inf
    for k in sorted(costs):
        v = costs[k]
        if v < best:
            adjusted.append({"table": name, "width": k, "measured": v, "used": best})
            logger.warning("latency table: %s[%d]=%.3gs below a narrower width's %.3gs (noise); raised", name, k, v, best)
            v = best
        best = v
        out[k] = v
    return out


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


def timed_fractions(fx: ElasticModel, archs: Sequence[ArchConfig], cfg: LatencyConfig, *, progress: bool = True) -> list[dict]:
    """Time each configuration as it is deployed — an exported, contiguous sub-model — against
    the exported full model, interleaved per configuration (``cfg.warmup`` + ``cfg.repeats``
    rounds, medians), so machine-speed drift between configurations cancels in the ratio.

    Returns per configuration ``{"arch", "sub_s", "full_s", "fraction"}``: median seconds, and the
    fraction of full latency as :func:`paired_ratio`.
    """
    from .export import export_subnetwork  # the sub-model users deploy is what gets timed

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
            out.append({"arch": arch.to_dict(), "sub_s": s_, "full_s": f_, "fraction": paired_ratio(res, "sub", "full")})
    return out


def _calibration_archs(space: SearchSpace, n_random: int, seed: int) -> list[ArchConfig]:
    """Every homogeneous configuration except the full one, plus ``n_random`` per-layer random ones."""
    gen = torch.Generator().manual_seed(seed)
    homo = [a for a in space.homogeneous_configs() if a != space.full()]
    return homo + [sample_arch(space, gen) for _ in range(n_random)]


def measure_latency_table(fx: ElasticModel, cfg: LatencyConfig, *, progress: bool = True) -> CostTable:
    """Measure the latency lookup table of ``fx`` on its current device and dtype (METHOD §5).

    Workload: prefill of ``batch_size × seq_len`` tokens (``use_cache=False, logits_to_keep=1``).
    ``const`` (embedding, final norm, LM head, overheads) is the full latency minus the layers'
    full-width costs.

    Every MLP width and head count is timed as an isolated block of one layer (interleaved,
    ``cfg.block_repeats`` rounds, trimmed mean): ``mlp_block[m]``, ``attn_block[a]``.

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
    B, T, d = cfg.batch_size, cfg.seq_len, space.hidden_size
    D, R, L = space.mlp_choices[-1], space.head_choices[-1], space.num_layers
    logger.info(
        "latency table (%s): %d MLP widths, %d head counts, prefill %dx%d on %s (%s), warmup %d, repeats %d",
        cfg.method, len(space.mlp_choices), len(space.head_choices), B, T, device, dtype, cfg.warmup, cfg.repeats,
    )
    with _ElasticState(fx), torch.inference_mode():
        fx.set_arch(None)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(B, T, d, generator=gen).to(device=device, dtype=dtype)
        position_ids = torch.arange(T, device=device)[None].expand(B, T)
        cos, sin = fx.model.model.rotary_emb(x, position_ids)
        mlp_mod, attn_mod = fx.mlps[0], fx.attns[0]

        def mlp_at(m: int):
            def run():
                mlp_mod.width = m
                return mlp_mod(x)

            return run

        def attn_at(a: int):
            def run():
                attn_mod.heads_per_group = a
                return attn_mod(x, position_embeddings=(cos, sin), attention_mask=None)

            return run

        fns: dict[str, Callable[[], object]] = {f"mlp:{m}": mlp_at(m) for m in space.mlp_choices}
        fns.update({f"attn:{a}": attn_at(a) for a in space.head_choices})
        res = time_models(fns, repeats=cfg.block_repeats, warmup=cfg.warmup, trim=cfg.trim, progress=progress, desc="latency blocks")
        fx.set_arch(None)  # the module closures above changed layer 0's widths
        est = {k: v["trimmed_mean_s"] for k, v in res.items()}
        if cfg.method == "block":
            full = time_models({"full": prefill_fn(fx, _workload_ids(fx, cfg, device))}, repeats=cfg.repeats,
                               warmup=cfg.warmup, trim=cfg.trim)["full"]["trimmed_mean_s"]
    fit_info = None
    if cfg.method == "fit":
        rows = timed_fractions(fx, _calibration_archs(space, cfg.fit_configs, seed=1), cfg, progress=progress)
        full = _median([r["full_s"] for r in rows])
        X = torch.tensor([[sum(est[f"mlp:{m}"] - est[f"mlp:{D}"] for m in r["arch"]["mlp"]) / full,
                           sum(est[f"attn:{a}"] - est[f"attn:{R}"] for a in r["arch"]["heads"]) / full] for r in rows],
                         dtype=torch.float64)  # (n_configs, 2)
        y = torch.tensor([r["fraction"] - 1 for r in rows], dtype=torch.float64)
        scale = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
        if (scale <= 0).any():
            logger.warning("latency table fit: non-positive scale %s (timings too noisy); using the isolated block timings", scale.tolist())
            scale = torch.ones(2, dtype=torch.float64)
        resid = (X @ scale - y).abs()
        for k in est:
            est[k] *= float(scale[0] if k.startswith("mlp:") else scale[1])
        fit_info = {"configs": len(rows), "scale": {"mlp": float(scale[0]), "attn": float(scale[1])},
                    "mean_abs_residual_fraction": float(resid.mean()), "max_abs_residual_fraction": float(resid.max())}
        logger.info("latency table fit over %d sub-models: scale mlp %.2f attn %.2f, mean |residual| %.3f of full latency",
                    len(rows), scale[0], scale[1], fit_info["mean_abs_residual_fraction"])
    # Only the split between const and the per-layer costs is arbitrary: if the fitted savings
    # exceed the isolated full-width block time, move the split so no cost is negative (every
    # prediction stays the same).
    for kind, widths in (("mlp", space.mlp_choices), ("attn", space.head_choices)):
        low = min(est[f"{kind}:{w}"] for w in widths)
        if low < 0:
            for w in widths:
                est[f"{kind}:{w}"] -= low
    adjusted: list = []
    mlp = _enforce_monotone({m: est[f"mlp:{m}"] for m in space.mlp_choices}, "mlp", adjusted)
    attn = _enforce_monotone({a: est[f"attn:{a}"] for a in space.head_choices}, "attn", adjusted)
    const = full - L * (mlp[D] + attn[R])
    if const < 0:
        logger.warning(
            "latency table: the layers' sum exceeds the full model's time (const=%.3gs); timings are noisy", const
        )
    table = CostTable(
        unit="s", mlp=mlp, attn=attn, const=const, num_layers=L, full=full,
        device=_device_name(device), dtype=str(dtype).replace("torch.", ""), torch_version=torch.__version__,
        workload={"batch_size": B, "seq_len": T, "kind": "prefill", "logits_to_keep": 1,
                  "warmup": cfg.warmup, "repeats": cfg.repeats, "block_repeats": cfg.block_repeats, "trim": cfg.trim, "method": cfg.method,
                  "threads": torch.get_num_threads(), "fit": fit_info},
        adjusted=adjusted,
    )
    logger.info(
        "latency table: full %.4gs, const %.4gs, smallest config %.1f%% of full",
        full, const, 100 * table.fraction(space.smallest()),
    )
    return table


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    import platform

    return f"{device.type}:{platform.processor() or platform.machine()}"


def validate_latency_table(
    fx: ElasticModel, table: CostTable, cfg: LatencyConfig, n: int, seed: int = 0, *, progress: bool = True
) -> dict:
    """Time ``n`` random configurations not used to build the table (every other one
    homogeneous, the rest per-layer random) as exported sub-models against the full model
    (:func:`timed_fractions`) and compare with the table's predicted fraction of full latency —
    the unit targets are stated in, and insensitive to the machine being uniformly slower or
    faster than when the table was measured.

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
    archs = [sample_arch(fx.space, gen, homogeneous=(i % 2 == 0)) for i in range(n)]
    rows = timed_fractions(fx, archs, cfg, progress=progress)
    configs, errs, ferrs = [], [], []
    for arch, r in zip(archs, rows):
        pred = table.predict(arch)
        pf = pred / table.full
        configs.append({"arch": arch.to_dict(), "predicted_fraction": pf, "measured_fraction": r["fraction"],
                        "predicted_s": pred, "measured_s": r["sub_s"]})
        errs.append(abs(pred - r["sub_s"]) / r["sub_s"])
        ferrs.append(abs(pf - r["fraction"]) / r["fraction"])
    mape, mape_fraction = 100.0 * sum(errs) / n, 100.0 * sum(ferrs) / n
    logger.info("latency table validation: MAPE of fractions %.2f%% (absolute %.2f%%) over %d configurations", mape_fraction, mape, n)
    return {"mape": mape, "mape_fraction": mape_fraction, "n": n, "seed": seed, "configs": configs}
