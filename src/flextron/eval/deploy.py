"""A finished run, loaded for evaluation and deployment: the trained elastic model with its static
router, lookup table and tokenizer (:func:`load_run`); export of a target's sub-model
(:func:`export_target`) and greedy generation at a target (:func:`generate_text`). Also reads the
run directory's stage record (``stages.json``) and writes and checks its format
(``flextron_run.json``: :func:`write_run_format`, :func:`check_run_format`); recognises run
directories (:func:`is_run_dir`) so that no export replaces one (:func:`check_export_path`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from flextron.config import RunConfig, load_config
from flextron.cost.table import CostTable
from flextron.data.bos import NO_BOS, encode_text, resolve_bos_policy
from flextron.errors import ConfigError, ModelError, OutputExistsError, TargetError
from flextron.files import atomic_write_json, check_format, remove_stale_temps
from flextron.model.elastic import ElasticModel
from flextron.model.export import export_subnetwork, load_elastic, save_subnetwork
from flextron.model.sources import licence_files, source_dtype
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


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a flextron run directory: it holds ``config.yaml`` and ``stages.json``
    or ``flextron_run.json``."""
    p = Path(path)
    return (p / "config.yaml").is_file() and ((p / "stages.json").is_file() or (p / RUN_INFO_FILE).is_file())


def check_export_path(run_dir: str | Path, out_dir: str | Path, *, search: bool = True) -> None:
    """Refuse an export destination that would replace or delete a run: ``out_dir`` is, contains or
    lies inside ``run_dir`` or any flextron run directory (:func:`is_run_dir`); or a part of its path
    is an existing file. ``search``: look through an existing ``out_dir`` for run directories (only
    needed when it is to be replaced: a non-empty one is refused otherwise).

    Raises:
        OutputExistsError: one line naming the run directory and the fix.
    """
    run = Path(run_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    fix = "choose an --out outside every run directory, e.g. exports/<name>"
    if out == run or run in out.parents:
        raise OutputExistsError(f"--out {out_dir} is the run directory {run_dir} or lies inside it; {fix}")
    if out in run.parents:
        raise OutputExistsError(f"--out {out_dir} contains the run directory {run_dir}; {fix}")
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            raise OutputExistsError(
                f"{p} is a file, so --out {out_dir} cannot be a directory; choose an --out that is not under a file"
            )
        if is_run_dir(p):
            raise OutputExistsError(f"--out {out_dir} is or lies inside the flextron run directory {p}; {fix}")
    if search and out.is_dir():
        for root, dirs, _files in os.walk(out):
            if is_run_dir(root):
                raise OutputExistsError(f"--out {out_dir} contains the flextron run directory {root}; {fix}")
            dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]


def fit_prompt(input_ids: torch.Tensor, max_positions: int | None, max_new_tokens: int, truncate: bool) -> torch.Tensor:
    """``input_ids`` (1, n) checked against the model's context: the prompt and ``max_new_tokens``
    must fit in ``max_positions`` (``max_position_embeddings``; None: no limit). With ``truncate`` a
    longer prompt keeps its last tokens (a warning says how many were dropped).

    Raises:
        ConfigError: the prompt is empty, or too long without ``truncate`` (names the limit), or
            ``max_new_tokens`` alone fills the context.
    """
    n = input_ids.shape[1]
    if n == 0:
        raise ConfigError("the prompt is empty; give some text to continue")
    if not max_positions:
        return input_ids
    room = int(max_positions) - max_new_tokens
    if room < 1:
        raise ConfigError(
            f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the model's context of "
            f"{max_positions} tokens; choose at most {int(max_positions) - 1}"
        )
    if n <= room:
        return input_ids
    if not truncate:
        raise ConfigError(
            f"the prompt is {n} tokens but at most {room} fit (context {max_positions} tokens minus "
            f"--max-new-tokens {max_new_tokens}); shorten it, lower --max-new-tokens, or pass --truncate "
            f"to keep its last {room} tokens"
        )
    log.warning("the prompt is %d tokens; only its last %d are used (--truncate)", n, room)
    return input_ids[:, n - room :]


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
    for need in ("final", "final_routers", "latency_table.json"):
        if not (run_dir / need).exists():
            again = (
                ""
                if (run_dir / "elastic").is_dir()
                else ("; elastic/ was removed when training finished, so elastic training runs again first")
            )
            raise ModelError(
                f"{run_dir / need} does not exist; rerun `flextron run {run_dir / 'config.yaml'}` "
                f"to recompute it (the stage that writes it and the later ones run again{again})"
            )
    fx = load_elastic(run_dir / "final")
    table = CostTable.load(run_dir / "latency_table.json")
    router, sm = load_routers(run_dir / "final_routers", cfg, fx)
    fx.router = TargetRouter(router, table, fx.space, sm)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(run_dir / "final")
    return LoadedRun(cfg, run_dir, fx, table, tok)


def target_milliseconds(text: str) -> float | None:
    """The milliseconds of a target written ``250ms``, or None for text without the ``ms`` suffix.

    Raises:
        TargetError: ``ms`` after something that is not a positive finite number.
    """
    t = text.strip().lower()
    if not t.endswith("ms"):
        return None
    try:
        ms = float(t[:-2])
    except ValueError:
        ms = float("nan")
    if not 0 < ms < float("inf"):
        raise TargetError(f"target {text!r} is not a positive number of milliseconds, e.g. 250ms")
    return ms


def resolve_target(run: LoadedRun, target: float | str) -> float:
    """A latency target as a fraction of the full model's latency: a number in (0, 1] as it is, or
    milliseconds (``"250ms"``) divided by the full model's latency in the run's lookup table (the
    machine and workload that measured it; a target at or above it is the full model).

    Raises:
        TargetError: a millisecond target for a table priced in parameters, or not a positive number.
    """
    if isinstance(target, (int, float)):
        return float(target)
    ms = target_milliseconds(str(target))
    if ms is None:
        raise TargetError(f"target {target!r} is invalid; give a fraction in (0, 1] such as 0.6 or milliseconds: 250ms")
    if run.table.unit != "s":
        raise TargetError(
            f"target {target!r} is in milliseconds, but this run's table prices parameters (latency.budget: params); "
            "give a fraction in (0, 1] such as 0.6"
        )
    frac = min(1.0, ms / 1000 / run.table.full)
    log.info("target %s = %.3f of the full model's %.1f ms (%s)", target, frac, 1000 * run.table.full, run.table.device)
    return frac


def export_target(
    run_dir: str | Path, target: float | str, out_dir: str | Path, *, overwrite: bool = False, dtype: str | None = None
) -> Path:
    """Export the sub-model for ``target`` as a checkpoint ``AutoModelForCausalLM`` loads
    (homogeneous: a plain config where the family's config class accepts it; per-layer: with
    ``trust_remote_code=True``), in ``dtype`` (``float32``, ``bfloat16`` or ``float16``; default:
    the source model's dtype, :func:`~flextron.model.sources.source_dtype`).

    Raises:
        TargetError: target out of range; OutputExistsError: ``out_dir`` is not empty, or is,
            contains or lies inside a run directory (:func:`check_export_path`).
    """
    out_dir = Path(out_dir)
    check_export_path(run_dir, out_dir, search=overwrite)
    remove_stale_temps(out_dir.parent, out_dir.name)  # left by a killed export to the same place
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(
            f"output directory {out_dir} exists and is not empty; pass --overwrite or choose another path"
        )
    run = load_run(run_dir)
    return save_target(run, resolve_target(run, target), out_dir, overwrite=overwrite, dtype=dtype)


def save_target(run: LoadedRun, target: float, out_dir: str | Path, *, overwrite: bool = False, dtype=None) -> Path:
    """Write the sub-model of ``run`` at ``target`` to ``out_dir`` (no check of the destination
    against run directories: :func:`export_target` does that). ``flextron_subnetwork.json``
    records ``dtype`` and where it came from (``dtype_from``)."""
    if dtype is None:
        dtype, dtype_from = source_dtype(run.cfg)
    else:
        dtype_from = "asked for"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"dtype {dtype!r} is not supported; choose float32, bfloat16 or float16")
    arch = run.fx.set_target(target)
    sub = export_subnetwork(run.fx, arch).to(getattr(torch, dtype))
    meta = {
        "target": target,
        "config": arch.to_dict(),
        "params": run.fx.space.num_parameters(arch),
        # the table's unit: seconds of its workload, or parameters (latency.budget: params)
        ("predicted_latency_s" if run.table.unit == "s" else "predicted_params"): run.table.predict(arch),
        "predicted_fraction": run.table.fraction(arch),
        "dtype": dtype,
        "dtype_from": dtype_from,
    }
    run.fx.set_arch(None)
    return save_subnetwork(
        sub, out_dir, tokenizer=run.tokenizer, metadata=meta, overwrite=overwrite, extra_files=licence_files(run.cfg)
    )


def prompt_ids(run: LoadedRun, prompt: str, max_new_tokens: int, truncate: bool) -> torch.Tensor:
    """The prompt's token ids ``(1, n)`` for generation: the text without special tokens, fitted to
    the context (:func:`fit_prompt`, room kept for the BOS), then the BOS the tokenizer declares.

    Raises:
        ConfigError: as :func:`fit_prompt`.
    """
    bos = resolve_bos_policy(run.tokenizer)
    limit = getattr(run.fx.config, "max_position_embeddings", None)
    text = torch.tensor([encode_text(run.tokenizer, prompt, NO_BOS)], dtype=torch.long)  # (1, n)
    text = fit_prompt(text, None if limit is None else limit - int(bos.add_bos), max_new_tokens, truncate)
    return torch.tensor([bos.prepend(text[0].tolist())])


def generate_text(
    run_dir: str | Path, target: float | str, prompt: str, *, max_new_tokens: int = 64, truncate: bool = False
) -> str:
    """Greedy generation with the routed sub-network for ``target``; returns the new text.

    Raises:
        ConfigError: empty prompt, or one that does not fit the context (:func:`fit_prompt`)."""
    run = load_run(run_dir)
    run.fx.set_target(resolve_target(run, target))
    ids = prompt_ids(run, prompt, max_new_tokens, truncate)
    out = run.fx.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return run.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
