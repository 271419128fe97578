"""The latency lookup table (METHOD §5) and the exact parameter table (:class:`CostTable`).

A :class:`CostTable` prices one configuration as ``const + Σ_l (mlp[m_l] + attn[a_l])``: ``mlp[m]``
is one layer's MLP at intermediate width ``m``, ``attn[a]`` one layer's attention at ``a`` query
heads per KV group, ``const`` everything that does not shrink (embeddings, norms, residual adds, the
final norm and the LM head at the workload). The same sum weighted by router probabilities is the
differentiable expected cost (:meth:`CostTable.expected`). Saved and loaded as JSON.

Models whose layers differ (Gemma 3's sliding-window layers against its global ones) price the
attention per layer type: ``layer_types[l]`` names layer ``l``'s type and ``attn_by_type[type][a]``
its cost; ``attn`` is then layer 0's type's entry.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from flextron.errors import ConfigError, TargetError
from flextron.files import atomic_write_json
from flextron.model.space import ArchConfig, SearchSpace

logger = logging.getLogger(__name__)


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
    layer_types: list[str] | None = None
    attn_by_type: dict[str, dict[int, float]] | None = None

    def attn_of(self, layer: int) -> dict[int, float]:
        """Attention cost per unit count of layer ``layer`` (its type's entry, or ``attn``)."""
        if self.layer_types is None or self.attn_by_type is None:
            return self.attn
        return self.attn_by_type[self.layer_types[layer]]

    # -- costs ----------------------------------------------------------------------------------
    def predict(self, arch: ArchConfig) -> float:
        """``const + Σ_l (mlp[m_l] + attn[a_l])``.

        Raises:
            ConfigError: wrong number of layers, or a width/head count the table does not price.
        """
        if len(arch.mlp) != self.num_layers or len(arch.heads) != self.num_layers:
            raise ConfigError(
                f"the cost table prices {self.num_layers} layers, "
                f"the architecture has {len(arch.mlp)}/{len(arch.heads)}"
            )
        total = self.const
        for layer, (m, a) in enumerate(zip(arch.mlp, arch.heads)):
            attn = self.attn_of(layer)
            if m not in self.mlp:
                raise ConfigError(f"MLP width {m} is not in the cost table; priced widths: {sorted(self.mlp)}")
            if a not in attn:
                raise ConfigError(f"{a} attention units are not in the cost table; priced: {sorted(attn)}")
            total += self.mlp[m] + attn[a]
        return total

    def fraction(self, arch: ArchConfig) -> float:
        """Cost of ``arch`` as a fraction of the full model's."""
        return self.predict(arch) / self.full

    def cost_vectors(
        self, mlp_choices: Sequence[int], head_choices: Sequence[int], *, dtype=torch.float32, device=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-candidate costs in the order of the choices: ``(K_mlp,)``, and ``(K_heads,)`` — or
        ``(L, K_heads)``, one row per layer, when the table prices layer types apart."""
        for m in mlp_choices:
            if m not in self.mlp:
                raise ConfigError(f"MLP width {m} is not in the cost table; priced widths: {sorted(self.mlp)}")
        tables = [self.attn] if self.layer_types is None else [self.attn_of(l) for l in range(self.num_layers)]
        for attn in tables:
            for a in head_choices:
                if a not in attn:
                    raise ConfigError(f"{a} attention units are not in the cost table; priced: {sorted(attn)}")
        cm = torch.tensor([self.mlp[int(m)] for m in mlp_choices], dtype=dtype, device=device)
        ca = torch.tensor([[t[int(a)] for a in head_choices] for t in tables], dtype=dtype, device=device)
        return cm, (ca[0] if self.layer_types is None else ca)

    def expected(
        self, mlp_probs: torch.Tensor, head_probs: torch.Tensor, mlp_choices: Sequence[int], head_choices: Sequence[int]
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
                f"router probabilities cover {mlp_probs.shape[-2]}/{head_probs.shape[-2]} layers, "
                f"the table {self.num_layers}"
            )
        if mlp_probs.shape[-1] != len(mlp_choices) or head_probs.shape[-1] != len(head_choices):
            raise ConfigError(
                f"probabilities over {mlp_probs.shape[-1]}/{head_probs.shape[-1]} candidates, "
                f"but {len(mlp_choices)}/{len(head_choices)} choices given"
            )
        cm, ca = self.cost_vectors(mlp_choices, head_choices, dtype=mlp_probs.dtype, device=mlp_probs.device)
        return self.const + (mlp_probs * cm).sum((-1, -2)) + (head_probs * ca.to(head_probs.dtype)).sum((-1, -2))

    def is_monotone(self) -> bool:
        """Costs non-decreasing in width, for the MLP and the attention (every layer type)."""
        for d in (self.mlp, self.attn, *(self.attn_by_type or {}).values()):
            vals = [d[k] for k in sorted(d)]
            if any(b < a for a, b in zip(vals, vals[1:])):
                return False
        return True

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def from_parameters(cls, space: SearchSpace) -> "CostTable":
        """Exact parameter costs (unit ``"params"``): ``predict(arch) == space.num_parameters(arch)``."""
        per_neuron = 3 * space.hidden_size + (2 if space.mlp_bias else 0)
        per_unit = space.params_per_head_unit()
        mlp = {int(m): float(m * per_neuron) for m in space.mlp_choices}
        attn = {int(a): float(a * per_unit) for a in space.head_choices}
        D, R, L = space.mlp_choices[-1], space.head_choices[-1], space.num_layers
        const = float(space.total_params) - L * (mlp[D] + attn[R])
        return cls(
            unit="params",
            mlp=mlp,
            attn=attn,
            const=const,
            num_layers=L,
            full=float(space.total_params),
            workload={"kind": "params"},
        )

    # -- JSON -----------------------------------------------------------------------------------
    def to_json(self) -> dict:
        d = asdict(self)
        d["mlp"] = {str(k): v for k, v in sorted(self.mlp.items())}
        d["attn"] = {str(k): v for k, v in sorted(self.attn.items())}
        if self.attn_by_type is not None:
            d["attn_by_type"] = {t: {str(k): v for k, v in sorted(c.items())} for t, c in self.attn_by_type.items()}
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

        def table(name: str, raw) -> dict[int, float]:
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
        by_type, types = d.get("attn_by_type"), d.get("layer_types")
        if (by_type is None) != (types is None):
            raise ConfigError(f"{source}: layer_types and attn_by_type go together; give both or neither")
        if by_type is not None:
            if not isinstance(by_type, dict) or not by_type:
                raise ConfigError(f"{source}: attn_by_type must be a non-empty object type -> table")
            kw["attn_by_type"] = {str(t): table(f"attn_by_type.{t}", c) for t, c in by_type.items()}
            if (
                not isinstance(types, list)
                or len(types) != nl
                or any(not isinstance(t, str) or t not in kw["attn_by_type"] for t in types)
            ):
                raise ConfigError(
                    f"{source}: layer_types must list one of {sorted(kw['attn_by_type'])} for each of {nl} layers"
                )
        return cls(
            unit=d["unit"],
            mlp=table("mlp", d["mlp"]),
            attn=table("attn", d["attn"]),
            const=_finite(d["const"], f"{source}: const"),
            num_layers=nl,
            full=full,
            **kw,
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


def check_targets(table: CostTable, space: SearchSpace, targets: dict[str, Sequence[float]], where: str) -> None:
    """Refuse targets no sub-network can meet: each of ``targets`` (config field name → latency
    targets as fractions of the full model) must be at least the smallest configuration's
    predicted fraction of ``table`` (the floor). ``where`` names the table in the message.

    Raises:
        TargetError: the first target below the floor, naming the field, the floor and the fix.
    """
    floor = table.fraction(space.smallest())
    for name, values in targets.items():
        low = [t for t in values if t < floor - 1e-9]
        if low:
            busy = "; a latency table measured on a busy machine can also raise it" if table.unit == "s" else ""
            raise TargetError(
                f"{name} {low[0]:g} is below the smallest sub-network's predicted latency ({floor:.3f} of the "
                f"full model, {where}): no sub-network can meet it; use targets >= "
                f"{math.ceil(floor * 1000) / 1000:.3f} or offer narrower widths (elastic.mlp_fractions, "
                f"elastic.{'kv_groups' if space.groups_axis else 'heads_per_group'}){busy}"
            )


# --------------------------------------------------------------------------- measurement


def enforce_monotone(costs: dict[int, float], name: str, adjusted: list) -> dict[int, float]:
    """Cumulative max over increasing widths; records each raised entry in ``adjusted``."""
    out, best = {}, -math.inf
    for k in sorted(costs):
        v = costs[k]
        if v < best:
            adjusted.append({"table": name, "width": k, "measured": v, "used": best})
            logger.warning(
                "latency table: %s[%d]=%.3gs below a narrower width's %.3gs (noise); raised", name, k, v, best
            )
            v = best
        best = v
        out[k] = v
    return out
