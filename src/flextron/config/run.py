"""The whole run's configuration (:class:`RunConfig`, one section per stage) and YAML in and out:
:func:`load_config` reads YAML, rejects unknown keys and wrong types with a
:class:`~flextron.errors.ConfigError` that names the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flextron.config.sections import (
    CalibrationConfig,
    DataConfig,
    DynamicConfig,
    ElasticConfig,
    EvalConfig,
    GuardConfig,
    JointConfig,
    LatencyConfig,
    ModelConfig,
    RouterConfig,
    TrainConfig,
    check_field,
)
from flextron.errors import ConfigError


@dataclass(frozen=True)
class RunConfig:
    """The whole conversion: one section per stage. ``threads``: torch CPU threads (0 keeps the
    default). ``keep_checkpoints``: keep what a finished run no longer needs, each training
    stage's last checkpoint and the ``elastic/`` weights (by default they are deleted once the
    stages that read them have finished)."""

    name: str = "smollm2"
    seed: int = 0
    out_dir: str = "runs"
    threads: int = 0
    keep_checkpoints: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    latency: LatencyConfig = field(default_factory=LatencyConfig)
    routers: RouterConfig = field(default_factory=RouterConfig)
    joint: JointConfig = field(default_factory=JointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    dynamic: DynamicConfig | None = None  # the dynamic stage runs only when the section is given

    def __post_init__(self) -> None:
        check_field(bool(self.name) and "/" not in self.name, "name", self.name, "a non-empty name without '/'")
        check_field(self.threads >= 0, "threads", self.threads, "must be >= 0")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


# --------------------------------------------------------------------------- YAML in / out


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} is invalid: expected a list")
        (item_tp, _ellipsis) = typing.get_args(tp)
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{where}={value!r} is invalid: expected a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r} is invalid: expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} is invalid: expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} is invalid: expected a string")
        return value
    raise AssertionError(f"unhandled annotation {tp!r} at {where}")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build the dataclass ``cls`` from a (YAML) mapping; unknown keys and bad types raise
    :class:`ConfigError` naming the key and the allowed ones."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown config key {prefix}{unknown[0]}; allowed keys here: {', '.join(names)}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - all fields have defaults
        raise ConfigError(f"{where or 'config'}: {e}") from None


def to_dict(cfg: Any) -> dict:
    """Plain-dict (JSON/YAML-ready) view of a config dataclass; tuples become lists."""

    def conv(v: Any) -> Any:
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML run config.

    Raises:
        ConfigError: the file is missing, empty (no YAML document, e.g. only comments), not valid
            YAML, or a key/value is invalid.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist; pass the path of a YAML file such as configs/smollm2.yaml")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"config file {p} is not valid YAML{at}: {getattr(e, 'problem', e)}") from None
    if data is None:
        raise ConfigError(
            f"config file {p} is empty; copy configs/smollm2.yaml (the demo, sized for the embedded data and a "
            "few CPU cores) and edit it (missing keys take the library defaults, sized for larger corpora)"
        )
    return from_dict(RunConfig, data)


def dump_config(cfg: RunConfig) -> str:
    """YAML text of a run config (round-trips through :func:`load_config`)."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def config_from_overrides(base: DynamicConfig | None = None, **overrides) -> DynamicConfig:
    """A :class:`DynamicConfig`: ``base`` (default: the defaults) with keyword overrides (``None``
    values ignored).

    Raises:
        ConfigError: unknown field or invalid value (naming it)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return from_dict(DynamicConfig, {**(to_dict(base) if base is not None else {}), **given}, "dynamic")
    except TypeError as e:
        raise ConfigError(f"dynamic: {e}") from None
