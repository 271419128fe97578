"""Configuration: takes YAML (or keyword overrides); gives one tree of typed, validated, frozen
dataclasses, one section per stage (the dynamic stage too), and writes it back as YAML.

Every name is defined in ``sections`` (the stage sections) or ``run`` (the whole run, YAML in and
out); they are gathered here so that ``from flextron.config import RunConfig`` is the one import
users need.
"""

from flextron.config.run import RunConfig, config_from_overrides, dump_config, from_dict, load_config, to_dict
from flextron.config.sections import (
    MIXED_PRECISION,
    ORDERINGS,
    TASKS,
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

__all__ = [
    "MIXED_PRECISION",
    "ORDERINGS",
    "TASKS",
    "CalibrationConfig",
    "DataConfig",
    "DynamicConfig",
    "ElasticConfig",
    "EvalConfig",
    "GuardConfig",
    "JointConfig",
    "LatencyConfig",
    "ModelConfig",
    "RouterConfig",
    "RunConfig",
    "TrainConfig",
    "check_field",
    "config_from_overrides",
    "dump_config",
    "from_dict",
    "load_config",
    "to_dict",
]
