"""What a model source is, known before any weight is read: the fast refusal of an unsupported family.

Stage: the first step of loading (:func:`flextron.model.export.load_hf_model`, ``flextron run``
before the pipeline is imported). Input: a config's ``model.source``: an embedded model asset name
(``smollm2``, ``gemma3-270m``), a ``.gguf`` file or a Hugging Face directory. Output: its
transformers ``model_type``, read from the asset table, the GGUF metadata header
(:func:`~flextron.data.gguf_header.read_gguf_metadata`, milliseconds, nothing dequantized) or
``config.json``; a family without adapter is refused in one line listing the supported ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from flextron.config import RunConfig
from flextron.data.assets import MODEL_ASSETS, default_cache_dir, model_asset_dir
from flextron.data.gguf_header import gguf_model_type, read_gguf_metadata
from flextron.errors import ModelError
from flextron.model.families import check_model_type


def source_model_type(source: str | Path) -> tuple[str, str] | None:
    """``(model_type, where it was read)`` of a model source, or ``None`` for a path that is neither
    a ``.gguf`` file nor a directory with ``config.json`` (loading reports those).

    Raises:
        ModelError: an unreadable GGUF header or ``config.json``, or one without a model type.
    """
    if isinstance(source, str) and source in MODEL_ASSETS:
        return MODEL_ASSETS[source].model_type, f"model asset {source!r}"
    path = Path(source).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        meta = read_gguf_metadata(path, ("general.architecture", "general.name"))
        arch = meta.get("general.architecture")
        return gguf_model_type(meta), f"{path} (GGUF architecture {arch!r})"
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return None
    try:
        model_type = json.loads(config.read_text()).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise ModelError(f"cannot read {config} ({type(e).__name__}: {e}); fix or replace the file") from None
    if not isinstance(model_type, str) or not model_type:
        raise ModelError(f"{config} names no model_type; it is not a transformers model config: fix or replace it")
    return model_type, str(config)


def check_model_source(source: str | Path) -> str | None:
    """Refuse an unsupported family from what the source declares, before loading anything;
    return its ``model_type`` (``None`` when :func:`source_model_type` cannot tell).

    Raises:
        UnsupportedModelError: no adapter for the model type (one line: where it was read, the
            supported types). ModelError: as :func:`source_model_type`.
    """
    found = source_model_type(source)
    if found is None:
        return None
    model_type, where = found
    check_model_type(model_type, where)
    return model_type


def source_dtype(cfg: RunConfig) -> tuple[str, str]:
    """``(dtype name, where it came from)`` of the run's source model: the ``dtype`` (or
    ``torch_dtype``) its ``config.json`` records, when it is float32, bfloat16 or float16; else
    ``float32`` (the embedded SmolLM2 and GGUF files are converted to float32; a source that has
    moved is unknown)."""
    src = Path(cfg.model.source).expanduser()
    if cfg.model.source in MODEL_ASSETS or src.is_file():
        return "float32", "source model (converted from GGUF to float32)"
    cj = src / "config.json"
    try:
        d = json.loads(cj.read_text())
        found = d.get("dtype") or d.get("torch_dtype")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return "float32", "default: the source model's dtype is unknown"
    if found in ("float32", "bfloat16", "float16"):
        return found, "source model"
    return "float32", "default: the source model records no dtype"


def model_source(cfg: RunConfig) -> Path:
    """The local path of ``cfg.model.source``: an embedded model asset (``smollm2``,
    ``gemma3-270m``: fetched and converted once, after its family is checked) or the path given.

    Raises:
        UnsupportedModelError: the asset's family has no adapter. AssetError: it cannot be fetched.
    """
    if cfg.model.source in MODEL_ASSETS:
        check_model_source(cfg.model.source)  # before a download
        return model_asset_dir(cfg.model.source)
    return Path(cfg.model.source).expanduser()


_LICENCE_NAMES = re.compile(r"(LICEN[CS]E|NOTICE|COPYING|USE_POLICY|.*TERMS).*", re.IGNORECASE)


def licence_files(cfg: RunConfig) -> list[Path]:
    """The licence, terms and NOTICE files that sit next to the run's source model (an embedded
    asset's converted folder, or the user's model directory; none for a bare ``.gguf`` file), for
    exports to carry: a model's terms may require them (Gemma's do). Nothing is fetched."""
    if cfg.model.source in MODEL_ASSETS:
        folder = default_cache_dir() / "models" / MODEL_ASSETS[cfg.model.source].dir_name
    else:
        folder = Path(cfg.model.source).expanduser()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and _LICENCE_NAMES.fullmatch(p.name))
