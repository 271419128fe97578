"""A finished run, loaded for evaluation and deployment: the trained elastic model with its static
router, lookup table and tokenizer (:func:`load_run`); export of a target's sub-model
(:func:`export_target`) and greedy generation at a target (:func:`generate_text`). Also reads the
run directory's stage record (``stages.json``) and writes and checks its format
(``flextron_run.json``: :func:`write_run_format`, :func:`check_run_format`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from flextron.config import RunConfig, load_config
from flextron.cost.table import CostTable
from flextron.data.bos import NO_BOS, encode_text, resolve_bos_policy
from flextron.errors import ConfigError, ModelError, OutputExistsError
from flextron.files import atomic_write_json, check_format
from flextron.model.elastic import ElasticModel
from flextron.model.export import export_subnetwork, load_elastic, save_subnetwork
from flextron.routing.deploy import TargetRouter
from flextron.routing.store import load_routers
from flextron.version import RUN_FORMAT, RUN_FORMATS_READ, __version__

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- run directory state


#: the run directory's format record, written when the directory is created
RUN_INFO_FILE = "flextron_run.json"


def finished_stages(run_dir: Path) -> dict:
    """The finished stages recorded in ``run_dir/stages.json`` (stage → wall time, tokens, summary;
    empty when none has finished).

    Raises:
        ModelError: the file is unreadable or not a JSON object (names the file and the fix).
    """
    p = Path(run_dir) / "stages.json"
    if not p.exists():
        return {}
    try:
        stages = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        stages = e
    if not isinstance(stages, dict):
        raise ModelError(
            f"{p} is unreadable or not a JSON object ({stages}); delete it to rerun every stage "
            "(finished stages' outputs are then recomputed)"
        )
    return stages


def write_run_format(run_dir: Path) -> Path:
    """Record in ``run_dir`` the format (:data:`~flextron.version.RUN_FORMAT`) and the flextron
    version that created it."""
    return atomic_write_json(Path(run_dir) / RUN_INFO_FILE, {"format": RUN_FORMAT, "flextron_version": __version__})


def check_run_format(run_dir: str | Path) -> None:
    """Refuse a run directory whose recorded format this flextron does not read; a directory
    without ``flextron_run.json`` (written before formats were recorded) is version 1.

    Raises:
        ModelError: unreadable ``flextron_run.json``, or a format not in
            :data:`~flextron.version.RUN_FORMATS_READ` (the message names it and the fix).
    """
    path = Path(run_dir) / RUN_INFO_FILE
    found = None
    if path.exists():
        try:
            found = json.loads(path.read_text()).get("format")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            raise ModelError(
                f"{path} is corrupt ({type(e).__name__}: {e}); delete it if this flextron version made the run "
                f"(a run without it reads as format 1)"
            ) from None
    check_format(
        path,
        found,
        RUN_FORMATS_READ,
        "upgrade flextron to read this run, or rerun the conversion with this version into a new run directory",
    )


def set_threads(cfg: RunConfig) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)


# --------------------------------------------------------------------------- loading a finished run


@dataclass
class LoadedRun:
    """A finished run: the trained elastic model with its deployment router attached."""

    cfg: RunConfig
    run_dir: Path
    fx: ElasticModel
    table: CostTable
    tokenizer: object


def load_run(run_dir: str | Path) -> LoadedRun:
    """Load the final elastic model, cost table and routers of a run directory.

    Raises:
        ModelError: the run is missing, was written in a format this version does not read
            (:func:`check_run_format`) or has not finished its training stages.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ModelError(f"{run_dir} is not a flextron run directory (no config.yaml); run `flextron run CONFIG` first")
    check_run_format(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    if "joint" not in finished_stages(run_dir):
        raise ModelError(
            f"run {run_dir} has not finished training (stage 'joint' missing); rerun `flextron run` to resume it"
        )
    fx = load_elastic(run_dir / "final")
    table = CostTable.load(run_dir / "latency_table.json")
    router, sm = load_routers(run_dir / "final_routers", cfg, fx)
    fx.router = TargetRouter(router, table, fx.space, sm)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    return LoadedRun(cfg, run_dir, fx, table, tok)


def export_target(
    run_dir: str | Path, target: float, out_dir: str | Path, *, overwrite: bool = False, _run: LoadedRun | None = None
) -> Path:
    """Export the sub-model for ``target`` as a checkpoint ``AutoModelForCausalLM`` loads
    (homogeneous: a plain config; per-layer: with ``trust_remote_code=True``).

    Raises:
        TargetError: target out of range; OutputExistsError: ``out_dir`` is not empty.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output directory {out_dir} exists and is not empty; pass --overwrite or choose another path"
        )
    run = _run or load_run(run_dir)
    arch = run.fx.set_target(target)
    sub = export_subnetwork(run.fx, arch)
    meta = {
        "target": target,
        "config": arch.to_dict(),
        "params": run.fx.space.num_parameters(arch),
        "predicted_latency_s": run.table.predict(arch),
        "predicted_fraction": run.table.fraction(arch),
    }
    run.fx.set_arch(None)
    return save_subnetwork(sub, out_dir, tokenizer=run.tokenizer, metadata=meta, overwrite=overwrite)


def generate_text(run_dir: str | Path, target: float, prompt: str, *, max_new_tokens: int = 64) -> str:
    """Greedy generation with the routed sub-network for ``target``; returns the new text."""
    run = load_run(run_dir)
    run.fx.set_target(target)
    text_ids = encode_text(run.tokenizer, prompt, NO_BOS)
    if not text_ids:
        raise ConfigError("the prompt is empty; give some text to continue")
    ids = torch.tensor([resolve_bos_policy(run.tokenizer).prepend(text_ids)])  # BOS: as the tokenizer declares
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    out = run.fx.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return run.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
