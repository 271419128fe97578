"""The search space and its configurations (METHOD §1): value objects, no nn code.

:class:`ArchConfig` is one sub-network (per-layer MLP width and query heads per KV group);
:class:`SearchSpace` holds the sorted candidates of every layer (the full size included), counts
parameters and converts configurations to and from candidate indices and JSON.
:func:`nested_mask` turns choice probabilities into the nested unit masks of METHOD §3.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from flextron.config import ElasticConfig
from flextron.errors import ConfigError
from flextron.model.families import Geometry


@dataclass(frozen=True)
class ArchConfig:
    """A sub-network: per layer, ``mlp[l]`` intermediate neurons kept and ``heads[l]`` query heads
    kept per KV group. Homogeneous when all layers agree."""

    mlp: tuple[int, ...]
    heads: tuple[int, ...]

    @property
    def is_homogeneous(self) -> bool:
        return len(set(self.mlp)) == 1 and len(set(self.heads)) == 1

    def to_dict(self) -> dict:
        return {"mlp": list(self.mlp), "heads": list(self.heads)}

    @classmethod
    def from_dict(cls, d: dict) -> "ArchConfig":
        try:
            return cls(mlp=tuple(int(x) for x in d["mlp"]), heads=tuple(int(x) for x in d["heads"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"an architecture must be {{'mlp': [ints], 'heads': [ints]}}, got {d!r} ({e})") from None


def archs_to_json(obj):
    """A JSON-ready, exactly invertible form of ``obj``: nested dicts (any hashable keys, e.g.
    float targets), lists and tuples of :class:`ArchConfig`, numbers, strings and ``None``; arrays
    and tensors (anything with ``tolist``) become lists. Inverse: :func:`archs_from_json`. Used to
    checkpoint a stage's results without knowing their layout."""
    if isinstance(obj, ArchConfig):
        return {"arch": obj.to_dict()}
    if isinstance(obj, dict):
        return {"dict": [[archs_to_json(k), archs_to_json(v)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__: [archs_to_json(v) for v in obj]}
    return obj.tolist() if hasattr(obj, "tolist") else obj


def archs_from_json(obj):
    """Inverse of :func:`archs_to_json`.

    Raises:
        ConfigError: ``obj`` is not something :func:`archs_to_json` wrote.
    """
    if not isinstance(obj, dict):
        return obj
    if len(obj) != 1 or next(iter(obj)) not in ("arch", "dict", "list", "tuple"):
        raise ConfigError(f"not an encoded value: {str(obj)[:80]}")
    ((kind, val),) = obj.items()
    if kind == "arch":
        return ArchConfig.from_dict(val)
    try:
        if kind == "dict":
            return {archs_from_json(k): archs_from_json(v) for k, v in val}
        return (tuple if kind == "tuple" else list)(archs_from_json(v) for v in val)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"malformed encoded {kind}: {str(val)[:80]} ({e})") from None


@dataclass(frozen=True)
class SearchSpace:
    """Choices offered to every layer and the exact parameter accounting.

    ``mlp_choices``: sorted intermediate sizes (full size last); ``head_choices``: sorted counts of
    attention units (full last) along ``head_axis``: query heads per KV group
    (``heads_per_group``; K/V kept) or whole KV groups (``kv_groups``: a group's query heads and its
    K/V rows). :class:`ArchConfig` ``heads`` entries count those units.
    """

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    mlp_choices: tuple[int, ...]
    head_choices: tuple[int, ...]
    total_params: int
    q_bias: bool
    mlp_bias: bool
    head_axis: str = "heads_per_group"

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def groups_axis(self) -> bool:
        """True when the attention units are whole KV groups."""
        return self.head_axis == "kv_groups"

    def query_heads(self, units: int) -> int:
        """Query heads kept at ``units`` attention units."""
        return units * self.heads_per_group if self.groups_axis else self.num_key_value_heads * units

    def kv_heads(self, units: int) -> int:
        """KV heads (groups) kept at ``units`` attention units."""
        return units if self.groups_axis else self.num_key_value_heads

    def head_mask(self, probs: torch.Tensor) -> torch.Tensor:
        """Query-head mask ``(B, num_attention_heads)`` from probabilities ``(B, K_heads)`` over
        ``head_choices`` (METHOD §3): nested over the units, then tiled over the KV groups
        (``heads_per_group`` axis) or spread over each group's query heads (``kv_groups`` axis)."""
        if self.groups_axis:
            units = nested_mask(probs, self.head_choices, self.num_key_value_heads)  # (B, G)
            return units.repeat_interleave(self.heads_per_group, dim=1)
        return nested_mask(probs, self.head_choices, self.heads_per_group, self.num_key_value_heads)

    @classmethod
    def build(cls, geo: Geometry, cfg: ElasticConfig, total_params: int) -> "SearchSpace":
        """Candidates from fractions, rounded to ``mlp_divisor`` (METHOD §1).

        Raises:
            ConfigError: a fraction rounds to zero neurons, or more heads per group than exist.
        """
        D, div, R = geo.intermediate_size, cfg.mlp_divisor, geo.heads_per_group
        if D % div:
            raise ConfigError(
                f"elastic.mlp_divisor={div} does not divide intermediate_size={D}; choose a divisor of {D}"
            )
        mlp = set()
        for f in cfg.mlp_fractions:
            m = int(round(f * D / div)) * div
            if m < div:
                raise ConfigError(
                    f"elastic.mlp_fractions={f} keeps {f * D:.1f} of {D} neurons, below mlp_divisor={div}; "
                    "raise the fraction"
                )
            mlp.add(min(m, D))
        mlp.add(D)
        G = geo.num_key_value_heads
        axis = cfg.head_axis
        if axis == "auto":
            axis = "kv_groups" if R == 1 and G > 1 else "heads_per_group"
        unused = "heads_per_group" if axis == "kv_groups" else "kv_groups"
        if getattr(cfg, unused) is not None:
            raise ConfigError(
                f"elastic.{unused} is set, but the attention axis is {axis} (elastic.head_axis={cfg.head_axis}; "
                f"the model has {R} query heads per KV group and {G} groups): remove it, or set "
                f"elastic.head_axis: {unused} to use it"
            )
        if axis == "kv_groups":
            heads = set(cfg.kv_groups) if cfg.kv_groups is not None else set(range(1, G + 1))
            if max(heads) > G:
                raise ConfigError(
                    f"elastic.kv_groups={sorted(heads)} asks for {max(heads)} KV groups, but the model has "
                    f"num_key_value_heads={G}"
                )
            heads.add(G)
        else:
            heads = set(cfg.heads_per_group) if cfg.heads_per_group is not None else set(range(1, R + 1))
            if max(heads) > R:
                raise ConfigError(
                    f"elastic.heads_per_group={sorted(heads)} asks for {max(heads)} query heads per KV group, "
                    f"but the model has {R} (num_attention_heads={geo.num_attention_heads}, "
                    f"num_key_value_heads={geo.num_key_value_heads})"
                )
            heads.add(R)
        return cls(
            num_layers=geo.num_hidden_layers,
            hidden_size=geo.hidden_size,
            intermediate_size=D,
            num_attention_heads=geo.num_attention_heads,
            num_key_value_heads=geo.num_key_value_heads,
            head_dim=geo.head_dim,
            mlp_choices=tuple(sorted(mlp)),
            head_choices=tuple(sorted(heads)),
            total_params=total_params,
            q_bias=geo.attention_bias,
            mlp_bias=geo.mlp_bias,
            head_axis=axis,
        )

    def full(self) -> ArchConfig:
        return self.homogeneous(self.mlp_choices[-1], self.head_choices[-1])

    def smallest(self) -> ArchConfig:
        return self.homogeneous(self.mlp_choices[0], self.head_choices[0])

    def homogeneous(self, mlp: int, heads: int) -> ArchConfig:
        return ArchConfig(mlp=(mlp,) * self.num_layers, heads=(heads,) * self.num_layers)

    def homogeneous_configs(self) -> list[ArchConfig]:
        """Every homogeneous configuration of the space."""
        return [self.homogeneous(m, a) for m in self.mlp_choices for a in self.head_choices]

    def from_indices(self, mlp_idx: Sequence[int], head_idx: Sequence[int]) -> ArchConfig:
        return ArchConfig(
            mlp=tuple(self.mlp_choices[int(i)] for i in mlp_idx),
            heads=tuple(self.head_choices[int(i)] for i in head_idx),
        )

    def indices(self, arch: ArchConfig) -> tuple[list[int], list[int]]:
        return [self.mlp_choices.index(m) for m in arch.mlp], [self.head_choices.index(a) for a in arch.heads]

    def validate(self, arch: ArchConfig) -> ArchConfig:
        """Raises ConfigError unless ``arch`` has one choice from this space per layer."""
        if len(arch.mlp) != self.num_layers or len(arch.heads) != self.num_layers:
            raise ConfigError(f"an architecture needs {self.num_layers} layers, got {len(arch.mlp)}/{len(arch.heads)}")
        for m in arch.mlp:
            if m not in self.mlp_choices:
                raise ConfigError(f"MLP width {m} is not a candidate; candidates: {list(self.mlp_choices)}")
        for a in arch.heads:
            if a not in self.head_choices:
                unit = "KV groups" if self.groups_axis else "heads per group"
                raise ConfigError(f"{a} {unit} is not a candidate; candidates: {list(self.head_choices)}")
        return arch

    def num_parameters(self, arch: ArchConfig) -> int:
        """Exact parameter count of the sliced sub-network (embeddings and LM head included)."""
        D, full = self.intermediate_size, self.head_choices[-1]
        per_neuron = 3 * self.hidden_size + (2 if self.mlp_bias else 0)  # gate row, up row, down column
        per_unit = self.params_per_head_unit()
        removed = sum((D - m) * per_neuron + (full - a) * per_unit for m, a in zip(arch.mlp, arch.heads))
        return self.total_params - removed

    def params_per_head_unit(self) -> int:
        """Parameters of one attention unit: a query head (q rows, o columns), or a KV group (its
        query heads plus its ``k_proj``/``v_proj`` rows)."""
        d, hd, b = self.hidden_size, self.head_dim, (1 if self.q_bias else 0)
        per_head = hd * (2 * d + b)
        if self.groups_axis:
            return self.heads_per_group * per_head + 2 * hd * (d + b)
        return self.num_key_value_heads * per_head

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> "SearchSpace":
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})


def sample_arch(space: SearchSpace, gen: torch.Generator, *, homogeneous: bool = False) -> ArchConfig:
    """A uniformly random configuration (per layer, or one choice for all layers)."""
    L = space.num_layers
    n = 1 if homogeneous else L
    mi = torch.randint(len(space.mlp_choices), (n,), generator=gen).tolist()
    hi = torch.randint(len(space.head_choices), (n,), generator=gen).tolist()
    if homogeneous:
        mi, hi = mi * L, hi * L
    return space.from_indices(mi, hi)


def nested_mask(probs: torch.Tensor, choices: Sequence[int], full: int, group: int = 1) -> torch.Tensor:
    """Unit mask from probabilities over nested candidates (METHOD §3).

    ``probs``: ``(B, K)`` over candidates ``choices`` (ascending unit counts). Returns ``(B, full)``
    with ``μ_i = Σ_{k: c_k > i} π_k``. For heads, ``choices`` count heads per group and the mask is
    tiled over ``group`` KV groups (``full`` = heads per group).
    """
    idx = torch.arange(full, device=probs.device)
    keep = (torch.tensor(choices, device=probs.device)[:, None] > idx[None, :]).to(probs.dtype)  # (K, full)
    mask = probs @ keep  # (B, full)
    return mask.repeat(1, group) if group > 1 else mask
