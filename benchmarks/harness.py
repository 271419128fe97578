"""The benchmark harness shared by the scripts under ``benchmarks/`` (not installed with the library):
tables, JSON output, overrides, error handling, device choice, exported sub-models of a run.
"""

from __future__ import annotations
from pathlib import Path
from typing import Callable, Sequence
import torch
from flextron.files import atomic_write_json
from flextron.model.space import ArchConfig
from flextron.errors import ConfigError


def format_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A fixed-width text table (floats with 4 significant digits)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "—" if v is None else str(v)

    cells = [[cell(v) for v in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in cells])


def write_json(path: str | Path, obj) -> Path:
    """Write ``obj`` as indented JSON atomically (see :func:`flextron.files.atomic_write_json`)."""
    return atomic_write_json(Path(path), obj)


def parse_overrides(items: Sequence[str]) -> dict:
    """``["key=value", ...]`` → ``{key: value}``, values parsed as YAML (``8``, ``0.5``,
    ``[0.6, 1.0]``, ``true``).

    Raises:
        ConfigError: an item without ``=`` or with a value that is not YAML.
    """
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r} is invalid: write key=value")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
    return out


def script_main(fn: Callable[[], int], quiet: bool = False) -> int:
    """Run a benchmark script's body: INFO logging (WARNING when ``quiet``), and a bad input
    (:class:`~flextron.errors.FlextronError`) printed as one ``error:`` line with exit status 2."""
    import logging
    import sys

    from flextron.errors import FlextronError

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return fn()
    except FlextronError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ConfigError: an unknown device, or CUDA requested where none is available.
    """
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name!r} is not supported; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was given but torch sees no CUDA device; use --device cpu")
    return dev


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- exported checkpoints


def export_targets(
    run, targets: Sequence[float], out_root: str | Path, *, include_full: bool = True
) -> dict[str, tuple[Path, ArchConfig]]:
    """Save the routed sub-model of every target of a loaded run (:func:`flextron.load_run`) as a
    checkpoint ``out_root/target_<t>`` (and the full model as ``out_root/full``), overwriting.

    Returns ``{"<t>": (path, configuration), ..., "full": (path, configuration)}`` (keys are the
    targets formatted with ``:g``).
    """
    from flextron.model.export import export_subnetwork, save_subnetwork

    root = Path(out_root)
    out: dict[str, tuple[Path, ArchConfig]] = {}
    items = [(f"{t:g}", run.fx.set_target(t)) for t in targets]
    if include_full:
        items.append(("full", run.fx.space.full()))
    for key, arch in items:
        meta = {
            "target": None if key == "full" else float(key),
            "config": arch.to_dict(),
            "predicted_fraction": run.table.fraction(arch),
        }
        sub = export_subnetwork(run.fx, arch)
        name = "full" if key == "full" else f"target_{key}"
        out[key] = (save_subnetwork(sub, root / name, tokenizer=run.tokenizer, metadata=meta, overwrite=True), arch)
        del sub
    run.fx.set_arch(None)
    return out


def run_inputs(cfg, tokenizer):
    """The token blocks of a run config, rebuilt deterministically as the pipeline builds them:
    ``calibration``, ``train``, ``router``, ``heldout``, ``ood`` (each ``(N, T)`` token ids)."""
    from flextron.data.inputs import make_inputs

    return make_inputs(cfg, tokenizer)


def load_exported(path: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """Reload an exported checkpoint with plain transformers (``trust_remote_code`` for per-layer
    configurations), float32, eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True, dtype=torch.float32)
    return model.to(device).eval()
