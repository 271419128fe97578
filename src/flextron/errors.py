"""Error hierarchy of flextron.

Every error a user can cause derives from :class:`FlextronError` and from the matching builtin
(``ValueError``, ``FileNotFoundError`` ...), so ``except ValueError`` keeps working for callers that
do not know flextron. The CLI prints ``error: <message>`` for these and exits with status 2, without
a traceback. ``assert`` is used only for internal invariants, never for user input.
"""

from __future__ import annotations


class FlextronError(Exception):
    """Base class of all errors flextron raises on bad input or state."""


class ConfigError(FlextronError, ValueError):
    """A configuration field is missing, unknown, of the wrong type or out of range."""


class AssetError(FlextronError, OSError):
    """An embedded asset (model or data package) cannot be fetched, verified or read."""


class TaskFileError(AssetError):
    """A file of a downstream evaluation task (``flextron.eval.tasks``) is missing, truncated or malformed."""


class DataError(FlextronError, ValueError):
    """A corpus or calibration set is empty, too short or malformed."""


class ModelError(FlextronError, ValueError):
    """A model path is missing or corrupt, or its weights do not match its config."""


class UnsupportedModelError(ModelError):
    """The model family (``config.model_type``) has no adapter."""


class TargetError(FlextronError, ValueError):
    """A latency target is outside (0, 1] or below the smallest reachable sub-network."""


class OutputExistsError(FlextronError, FileExistsError):
    """An output directory already exists and is not empty; nothing is overwritten."""


class TrainingError(FlextronError, RuntimeError):
    """Training damaged the full model beyond the guard's tolerance (``guard:`` section)."""


class MeasurementError(FlextronError, RuntimeError):
    """A timing measurement is unreliable: the machine was busy while it was taken."""
