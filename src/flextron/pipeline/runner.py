"""The conversion as one resumable run: config → data → rank → latency table → elastic training →
routers → joint fine-tuning → evaluation → report.

Input: a :class:`~flextron.config.RunConfig`. Output: ``run_dir = out_dir/name`` holding
``config.yaml``, ``flextron_run.json`` (the run directory's format), ``stages.json`` (finished
stages with wall time, tokens and summaries), the
ranked/trained elastic weights (safetensors), ``latency_table.json``, routers and surrogate,
``metrics.jsonl``, ``results.json`` and ``report.md`` with PNG plots. A finished stage (listed in
``stages.json`` with its outputs, :data:`STAGE_OUTPUTS`, present) is skipped on rerun; a stage whose
outputs are missing runs again, and so does every later stage; an interrupted training stage
resumes from its last checkpoint. A run directory in which no stage has finished is started
again from the current config (no ``--overwrite`` needed). Under ``accelerate
launch`` the training stages run on every process and the others on the main one
(:mod:`flextron.train.distributed`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import sys
import time
from pathlib import Path

from flextron.config import RunConfig, dump_config, load_config
from flextron.cost.table import CostTable, check_targets
from flextron.data.inputs import make_inputs
from flextron.errors import FlextronError, OutputExistsError
from flextron.eval.deploy import RUN_INFO_FILE, check_run_format, finished_stages, set_threads, write_run_format
from flextron.eval.static import evaluate_targets
from flextron.files import atomic_write_json, atomic_write_text, check_not_under_file, remove_path, remove_stale_temps
from flextron.model.elastic import convert
from flextron.model.export import load_original
from flextron.pipeline.dynamic import stage_dynamic
from flextron.pipeline.stages import (
    configured_targets,
    stage_elastic,
    stage_joint,
    stage_latency,
    stage_rank,
    stage_routers,
)
from flextron.report.format import disk_usage
from flextron.report.static import write_report
from flextron.train.distributed import on_main, process_state

log = logging.getLogger(__name__)

#: the stages of every run, in order
STAGES = ("rank", "latency", "elastic", "routers", "joint", "evaluate")
#: what each stage writes (relative to the run directory); a stage counts as finished only while they exist
STAGE_OUTPUTS = {
    "rank": ("ranked",),
    "latency": ("latency_table.json",),
    "elastic": ("elastic",),
    "routers": ("routers",),
    "joint": ("final", "final_routers"),
    "evaluate": ("results.json", "report.md"),
    "dynamic": ("dynamic/router", "dynamic_results.json"),
}
#: each stage's checkpoints (relative to the run directory)
STAGE_CHECKPOINTS = {
    "elastic": "checkpoints/elastic",
    "routers": "checkpoints/routers",
    "joint": "checkpoints/joint",
    "dynamic": "dynamic/checkpoints",
}


def stages_of(cfg: RunConfig) -> tuple[str, ...]:
    """The stages a run of ``cfg`` has: :data:`STAGES`, then ``dynamic`` when the config has a
    ``dynamic:`` section."""
    return STAGES + (("dynamic",) if cfg.dynamic is not None else ())


def _finish_stage(run_dir: Path, name: str, summary: dict, wall_s: float) -> None:
    st = finished_stages(run_dir)
    st[name] = {"wall_s": round(wall_s, 2), "tokens": int(summary.get("tokens", 0)), "summary": summary}
    atomic_write_json(run_dir / "stages.json", st)
    log.info("stage %s done in %.1f s (%d tokens)", name, wall_s, st[name]["tokens"])
    print(f"[flextron] stage {name}: {wall_s:.1f} s, {st[name]['tokens']} tokens", flush=True)


#: training stages whose checkpoints (``checkpoints/<stage>``) only serve to resume them
TRAINING_STAGES = ("elastic", "routers", "joint")


def _tidy(cfg: RunConfig, run_dir: Path) -> None:
    """Delete what the finished stages of ``run_dir`` no longer need (unless ``keep_checkpoints``):
    the checkpoints of finished training stages (and of a finished dynamic stage), and
    ``elastic/`` once the routers and joint stages that read it have finished (``final/``
    supersedes it; ``ranked/`` stays: the teacher and the untrained baseline of evaluation)."""
    if cfg.keep_checkpoints:
        return
    done = finished_stages(run_dir)
    gone = [run_dir / "checkpoints" / s for s in TRAINING_STAGES if s in done]
    if "dynamic" in done:
        gone.append(run_dir / "dynamic" / "checkpoints")
    if "routers" in done and "joint" in done:
        gone.append(run_dir / "elastic")
    for path in gone:
        if path.exists():
            remove_path(path)
            log.info("removed %s (no longer needed; keep_checkpoints: true keeps it)", path)
    if (run_dir / "checkpoints").is_dir() and not any((run_dir / "checkpoints").iterdir()):
        (run_dir / "checkpoints").rmdir()


#: outputs :func:`_tidy` removes once these stages (which read them) have finished
TIDIED_AFTER = {"elastic": ("routers", "joint")}


def done_stages(run_dir: Path, names: tuple[str, ...]) -> list[str]:
    """The leading stages of ``names`` that count as finished: listed in ``stages.json`` with every
    output of :data:`STAGE_OUTPUTS` present (``elastic/``, removed by :func:`_tidy` once the stages
    of :data:`TIDIED_AFTER` that read it have finished, counts while those stay finished). The
    first stage that is not, and every stage after it, run again.

    Raises:
        ModelError: ``stages.json`` is unreadable (:func:`~flextron.eval.deploy.finished_stages`).
    """
    recorded = finished_stages(run_dir)

    def present(name: str) -> bool:
        return name in recorded and all((run_dir / o).exists() for o in STAGE_OUTPUTS[name])

    def tidied(name: str) -> bool:  # removed by _tidy because the stages reading it have finished
        readers = TIDIED_AFTER.get(name, ())
        return bool(readers) and name in recorded and all(present(r) for r in readers)

    done = []
    for name in names:
        if not (present(name) or tidied(name)):
            break
        done.append(name)
    return done


def _forget_after(run_dir: Path, names: tuple[str, ...], done: list[str]) -> None:
    """Before stages run again: drop the records of every stage after the first one to run, and
    their checkpoints (their inputs are recomputed, so those checkpoints no longer apply). The
    first one keeps its checkpoints (its inputs are unchanged): an interrupted stage resumes."""
    later = names[len(done) + 1 :]
    recorded = finished_stages(run_dir)
    stale = [n for n in names[len(done) :] if n in recorded]
    if stale:
        for n in stale:
            del recorded[n]
        atomic_write_json(run_dir / "stages.json", recorded)
        print(f"[flextron] stage {stale[0]}'s outputs are missing; it runs again, with every later stage", flush=True)
    for n in later:
        if n in STAGE_CHECKPOINTS:
            shutil.rmtree(run_dir / STAGE_CHECKPOINTS[n], ignore_errors=True)


def _same_config(saved: Path, cfg: RunConfig, *, ignore_dynamic: bool = False) -> bool:
    """Whether ``saved`` describes ``cfg`` (a config written before a field was added reads with
    that field's default). ``ignore_dynamic``: the
    ``dynamic:`` sections may differ (the dynamic stage is the last and runs again)."""
    try:
        old = load_config(saved)
    except FlextronError:
        return False
    return old == cfg or (ignore_dynamic and dataclasses.replace(old, dynamic=cfg.dynamic) == cfg)


def _restart_dynamic(run_dir: Path) -> None:
    """Forget the dynamic stage of ``run_dir`` (its record and checkpoints; the files it wrote are
    replaced when it runs again): the ``dynamic:`` section it ran with has changed or gone."""
    stages = finished_stages(run_dir)
    if "dynamic" in stages:
        del stages["dynamic"]
        atomic_write_json(run_dir / "stages.json", stages)
    shutil.rmtree(run_dir / "dynamic" / "checkpoints", ignore_errors=True)


def _finished_nothing(run_dir: Path) -> bool:
    """Whether ``run_dir`` is a flextron run that failed before finishing any stage: it holds
    nothing but ``config.yaml``, ``flextron_run.json`` and an empty ``stages.json``."""
    names = {p.name for p in run_dir.iterdir()}
    if not {"config.yaml", RUN_INFO_FILE} <= names or not names <= {"config.yaml", RUN_INFO_FILE, "stages.json"}:
        return False
    try:
        return not finished_stages(run_dir)
    except FlextronError:
        return False


def _prepare_run_dir(cfg: RunConfig, overwrite: bool) -> Path:
    """Create or reuse ``run_dir``. A run directory written by a different config is refused
    (nothing overwritten) unless ``overwrite``, or unless it is a flextron run that finished no
    stage (then it is started again with ``cfg``, saying so on stderr); one in a format this version
    does not read is refused (:func:`~flextron.eval.deploy.check_run_format`). Leftovers of killed
    writes are removed (:func:`~flextron.files.remove_stale_temps`)."""
    run_dir = cfg.run_dir
    text = dump_config(cfg)
    saved = run_dir / "config.yaml"
    check_not_under_file(saved)  # out_dir/name under a file: one line, not [Errno 17]
    for folder in (run_dir, run_dir / "exported", run_dir / "dynamic"):
        remove_stale_temps(folder)  # left by a process killed while writing
    if run_dir.exists() and any(run_dir.iterdir()):
        if saved.exists() and (saved.read_text() == text or _same_config(saved, cfg)):
            check_run_format(run_dir)
            log.info("resuming run in %s", run_dir)
            return run_dir
        if saved.exists() and _same_config(saved, cfg, ignore_dynamic=True):
            check_run_format(run_dir)
            _restart_dynamic(run_dir)
            atomic_write_text(saved, text)
            print(
                f"[flextron] the run's dynamic: section changed; its dynamic stage runs again in {run_dir}", flush=True
            )
            return run_dir
        if not overwrite and _finished_nothing(run_dir):
            print(
                f"[flextron] run directory {run_dir} holds a run that finished no stage; "
                "starting it again with this config",
                file=sys.stderr,
                flush=True,
            )
            overwrite = True
        if not overwrite:
            raise OutputExistsError(
                f"run directory {run_dir} exists and holds a different run; "
                "pass --overwrite or choose another name/out_dir"
            )
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_format(run_dir)
    atomic_write_text(saved, text)
    return run_dir


def _check_targets_early(cfg: RunConfig, run_dir: Path, space) -> None:
    """Refuse unreachable targets before any training when the cost table is known already: the
    parameter table (``latency.budget: params``) or a measured table of a finished latency stage.
    (A table still to be measured is checked by the latency stage, before any training.)"""
    path = run_dir / "latency_table.json"
    if cfg.latency.budget == "params":
        check_targets(CostTable.from_parameters(space), space, configured_targets(cfg), "parameter count")
    elif "latency" in finished_stages(run_dir) and path.is_file():
        check_targets(CostTable.load(path), space, configured_targets(cfg), f"table {path}")


def stage_evaluate(run_dir: Path) -> dict:
    evaluate_run(run_dir, merge=False)  # writes results.json and the report; rows of earlier weights go
    return {"tokens": 0}


# --------------------------------------------------------------------------- public entry points


def run(cfg: RunConfig, *, overwrite: bool = False) -> Path:
    """Run every stage of the conversion (resumable); returns the run directory.

    Under ``accelerate launch`` (several processes; :mod:`flextron.train.distributed`) the training
    stages (elastic, routers, joint) run on every process, each on its share of the global batch;
    ranking, the latency table and evaluation run on the main process while the others wait.
    Whether a stage is finished is decided by the main process and sent to the others.

    Raises:
        FlextronError subclasses for bad input (config, model path, data, existing output).
    """
    state = process_state()
    main = state.is_main_process
    run_dir = Path(on_main(state, lambda: str(_prepare_run_dir(cfg, overwrite))))
    set_threads(cfg)
    names = stages_of(cfg)

    def plan() -> list[str]:
        done = done_stages(run_dir, names)
        if len(done) < len(names):
            _forget_after(run_dir, names, done)
        return done

    done = on_main(state, plan)
    if len(done) == len(names):
        if main:
            print(f"[flextron] run {run_dir} is complete; nothing to do", flush=True)
        return run_dir
    t0 = time.time()
    model, tok = load_original(cfg)  # fails early on a bad model path or unsupported family
    space = convert(model, cfg.elastic).space
    del model
    on_main(state, lambda: _check_targets_early(cfg, run_dir, space))
    inp = make_inputs(cfg, tok, state.num_processes)
    log.info(
        "inputs: calibration %s, train %s, held-out %s, ood %s (%.1f s)",
        tuple(inp.calibration.shape),
        tuple(inp.train.shape),
        tuple(inp.heldout.shape),
        tuple(inp.ood.shape),
        time.time() - t0,
    )
    steps = {  # name: (stage, runs on every process)
        "rank": (lambda: stage_rank(cfg, run_dir, inp), False),
        "latency": (lambda: stage_latency(cfg, run_dir), False),
        "elastic": (lambda: stage_elastic(cfg, run_dir, inp), True),
        "routers": (lambda: stage_routers(cfg, run_dir, inp), True),
        "joint": (lambda: stage_joint(cfg, run_dir, inp), True),
        "evaluate": (lambda: stage_evaluate(run_dir), False),
        "dynamic": (lambda: stage_dynamic(cfg, run_dir), False),
    }
    for name in names:
        fn, everywhere = steps[name]
        if name in done:
            log.info("stage %s already finished; skipped", name)
            continue
        if main:
            print(f"[flextron] stage {name} ...", flush=True)
        s0 = time.time()
        summary = fn() if everywhere else on_main(state, fn)
        if main:
            _finish_stage(run_dir, name, summary, time.time() - s0)
            _tidy(cfg, run_dir)
        state.wait_for_everyone()  # the next stage reads what this one wrote
    if main:
        _tidy(cfg, run_dir)  # also what a run killed between a stage's record and its tidying left
        du = disk_usage(run_dir)
        print(
            f"[flextron] run {run_dir} uses {du['total'] / 1e6:.1f} MB on disk "
            f"({du['total'] / max(du['weights'], 1):.1f}x the model's weights; exports {du['exported'] / 1e6:.1f} MB)",
            flush=True,
        )
    return run_dir


def evaluate_run(
    run_dir: str | Path,
    targets: list[float] | None = None,
    *,
    tasks: list[str] | None = None,
    limit: int | None = None,
    num_fewshot: int | None = None,
    progress: bool = True,
    merge: bool = True,
) -> dict:
    """Evaluate a finished run at every target (:func:`~flextron.eval.static.evaluate_targets`:
    writes ``results.json``; with ``merge`` the rows measured are updated and the others kept),
    then write ``report.md`` with its plots from all of them; returns the (merged) results.

    Raises:
        TargetError, ConfigError, TaskFileError, ModelError: as
        :func:`~flextron.eval.static.evaluate_targets`.
    """
    results = evaluate_targets(
        run_dir, targets, tasks=tasks, limit=limit, num_fewshot=num_fewshot, progress=progress, merge=merge
    )
    write_report(Path(run_dir), results)
    return results
