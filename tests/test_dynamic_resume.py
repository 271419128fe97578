"""The dynamic stage of a run resumes: SIGKILL during its surrogate phase and during its price
calibration, then a rerun, ends with the same dynamic results and router sha256 as an
uninterrupted run (tiny model; predicted latency only, so nothing depends on timings)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import write_tiny_run

WORKER = Path(__file__).with_name("dynamic_worker.py")
DYNAMIC = {
    "targets": [0.6, 1.0],
    "steps": 6,
    "batch_size": 2,
    "train_blocks": 4,
    "seq_len": 16,
    "heldout_steps": 1,
    "warmup_steps": 1,
    "calibrate_blocks": 4,
    "calibrate_iters": 3,
    "timing_repeats": 0,
    "eval_blocks": 2,
    "timed_blocks": 0,
    "eval_repeats": 1,
    "checkpoint_every": 2,
    "gate_spearman": -1.0,
    "gate_error": 100.0,
}


def _start(cfg: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(WORKER.parent), *sys.path])}
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(cfg), mode],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(cond, p: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert p.poll() is None, f"worker exited early ({p.returncode}): {p.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "worker made no progress"
        time.sleep(0.01)


def _router_steps(run: Path) -> int:
    p = run / "dynamic" / "metrics.jsonl"
    if not p.exists():
        return 0
    return sum(1 for line in p.read_text().splitlines() if line.endswith("}") and '"dynamic_routers"' in line)


def _outcome(run: Path) -> dict:
    """What must not depend on interruptions: the router files' sha256 and the dynamic results."""
    manifest = json.loads((run / "dynamic" / "router" / "routers.json").read_text())
    res = json.loads((run / "dynamic_results.json").read_text())
    rows = [{k: r[k] for k in ("target", "perplexity", "predicted_fraction", "perplexity_ci")} for r in res["dynamic"]]
    stage = json.loads((run / "stages.json").read_text())["dynamic"]["summary"]
    return {
        "sha256": manifest["sha256"],
        "rows": rows,
        "validation": stage["validation"],
        "calibration": manifest["summary"]["calibration"],
    }


def _summary(run: Path) -> dict:
    return json.loads((run / "dynamic" / "router" / "routers.json").read_text())["summary"]


def _run(tmp: Path, name: str, mode: str = "plain", kill_when=None) -> Path:
    cfg = write_tiny_run(tmp / name, dynamic=DYNAMIC)
    run = tmp / name / "runs" / "tiny"
    if kill_when is not None:
        p = _start(cfg, mode)
        _wait_for(lambda: kill_when(run), p)
        p.send_signal(signal.SIGKILL)
        p.wait()
        assert "dynamic" not in json.loads((run / "stages.json").read_text())
    p = _start(cfg, "plain")
    assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    return run


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _outcome(_run(tmp_path_factory.mktemp("dyn"), "reference"))


def test_sigkill_during_the_surrogate_phase_resumes_to_the_same_router(tmp_path, reference):
    ckpts = lambda run: run / "dynamic" / "checkpoints" / "dynamic_routers"  # noqa: E731
    # killed after at least one checkpoint inside the steps (step 2 or 4) and before the last step
    run = _run(
        tmp_path, "killed", "slow_steps", lambda run: _router_steps(run) >= 3 and any(ckpts(run).glob("step_00000[24]"))
    )
    assert _outcome(run) == reference
    resumed = _summary(run)["resumed"]
    assert resumed[0]["phase"] == "steps" and resumed[0]["step"] in (2, 4)


def test_sigkill_during_the_calibration_resumes_to_the_same_router(tmp_path, reference):
    run = _run(tmp_path, "killed", "slow_calibration", lambda run: (run / "in_calibration").exists())
    assert _outcome(run) == reference
    assert _summary(run)["resumed"] == [{"phase": "calibrate", "step": DYNAMIC["steps"] + 1}]


def test_a_dynamic_section_added_or_changed_later_runs_only_the_dynamic_stage(tmp_path, capsys):
    from flextron.cli import main

    cfg = write_tiny_run(tmp_path)
    assert main(["run", str(cfg), "-q"]) == 0
    run = tmp_path / "runs" / "tiny"
    before = json.loads((run / "stages.json").read_text())
    for dynamic in (DYNAMIC, {**DYNAMIC, "steps": 2}):  # added, then changed: the other stages are kept
        cfg = write_tiny_run(tmp_path, dynamic=dynamic)
        capsys.readouterr()
        assert main(["run", str(cfg), "-q"]) == 0
        assert "dynamic stage runs again" in capsys.readouterr().out
        stages = json.loads((run / "stages.json").read_text())
        assert {k: v for k, v in stages.items() if k != "dynamic"} == before and "dynamic" in stages
        assert _summary(run)["config"]["steps"] == dynamic["steps"]
