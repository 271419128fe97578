"""Invariant 7: a run killed at any point (SIGKILL at random steps, SIGKILL inside a checkpoint
write, SIGINT; for router training also SIGKILL during its warm-up) resumes from its last
checkpoint and ends with the same weights as an uninterrupted run, for each stage that trains;
only complete checkpoints are ever visible."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import interrupt_worker
import pytest

from flextron.train.checkpoint import load_checkpoint

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def ctx():
    """Children fork from a server that has imported flextron (torch, transformers) once. (The
    server of Python 3.11 does not get the test directory on its path, so the worker module
    itself is imported by each child, which is quick once its dependencies are loaded.)"""
    c = multiprocessing.get_context("forkserver")
    c.set_forkserver_preload(
        ["flextron.train.loop", "flextron.train.routers", "flextron.model.elastic", "flextron.cost.measure"]
    )
    return c


def _start(ctx, run: Path, stage: str, **kw):
    (run / "training").unlink(missing_ok=True)
    p = ctx.Process(target=interrupt_worker.train, args=(str(run), stage), kwargs=kw)
    p.start()
    return p


def _wait_training(run: Path, p, more_steps: int) -> None:
    """Wait until ``p`` has resumed and finished ``more_steps`` further steps."""
    _wait_for(lambda: (run / "training").exists(), p)
    target = _steps_logged(run) + more_steps
    _wait_for(lambda: _steps_logged(run) >= target, p)


def _wait_for(cond, p) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not cond():
        assert p.is_alive(), f"worker exited early with {p.exitcode}"
        assert time.monotonic() < deadline, "worker made no progress"
        time.sleep(0.005)


def _steps_logged(run: Path) -> int:
    p = run / "metrics.jsonl"
    return sum(1 for line in p.read_text().splitlines() if line.endswith("}")) if p.exists() else 0


def _kill(p, sig=signal.SIGKILL) -> int:
    os.kill(p.pid, sig)
    p.join(TIMEOUT_S)
    return p.exitcode


def _complete_checkpoints(run: Path, stage: str) -> int:
    """Every visible ``step_*`` directory is a complete checkpoint (hashes and shapes verified);
    returns the latest step (-1 if none)."""
    root = run / "checkpoints" / stage
    steps = []
    for d in sorted(root.glob("step_*")) if root.exists() else []:
        steps.append(load_checkpoint(d, *interrupt_worker.checkpointed(stage))["step"])
        assert d.name == f"step_{steps[-1]:06d}"
    return max(steps, default=-1)


def _finish(ctx, run: Path, stage: str) -> dict:
    p = _start(ctx, run, stage)
    p.join(TIMEOUT_S)
    assert p.exitcode == 0
    return json.loads((run / "result.json").read_text())


@pytest.mark.parametrize("stage", ["elastic", "routers", "joint"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, ctx, stage):
    steps = interrupt_worker.STEPS[stage]
    ref_dir = tmp_path / "ref"
    ref = _finish(ctx, ref_dir, stage)
    assert ref["summary"]["resumed_from"] == 0 and ref["summary"]["steps_run_now"] == steps
    assert (ref["router_steps"] if stage == "routers" else ref["forwards"]) == steps

    run = tmp_path / "run"
    run.mkdir()
    root = run / "checkpoints" / stage
    rng = random.Random(6)
    if stage == "routers":
        # 0) SIGKILL during the warm-up (measuring configurations, fitting the warm start): nothing
        #    is saved yet, and the next run starts the stage again
        p = _start(ctx, run, stage, step_sleep=0.05)
        _wait_for(lambda: (run / "training").exists(), p)
        time.sleep(rng.uniform(0, 0.2))
        assert _kill(p) == -signal.SIGKILL
        assert _steps_logged(run) == 0 and not list(root.glob("step_*")), "the kill did not land inside the warm-up"
    # 1) SIGKILL at random points of training (two kills)
    for _ in range(2):
        p = _start(ctx, run, stage, step_sleep=0.02)
        _wait_training(run, p, rng.randint(2, 4))
        time.sleep(rng.uniform(0, 0.03))
        assert _kill(p) == -signal.SIGKILL
        _complete_checkpoints(run, stage)
    done = _complete_checkpoints(run, stage)
    assert 0 <= done < steps and (done > 0 or stage == "routers")  # the router stage checkpoints its warm-up as step 0

    # 2) SIGKILL inside a checkpoint write (tensor files written, not yet renamed)
    p = _start(ctx, run, stage, hold_in_save=True)
    _wait_for(lambda: (run / "in_save").exists(), p)
    assert _kill(p) == -signal.SIGKILL
    assert list(root.glob(".tmp_step_*")), "the kill did not land inside a write"
    assert _complete_checkpoints(run, stage) == done  # the half-written checkpoint is not visible

    # 3) SIGINT: the current step finishes, is checkpointed, and the process exits
    p = _start(ctx, run, stage, step_sleep=0.02)
    _wait_training(run, p, rng.randint(1, 3))
    assert _kill(p, signal.SIGINT) == 130
    interrupted_at = _complete_checkpoints(run, stage)
    assert (
        interrupted_at == _steps_logged(run) > done
    )  # saved at the step it stopped, not at the last multiple of every
    assert interrupted_at < steps, "nothing left to resume; give the stage more steps"
    assert not [d for d in root.iterdir() if d.name.startswith(".")]  # leftovers cleaned

    # 4) the resumed run finishes where the uninterrupted one did, running only the missing steps
    res = _finish(ctx, run, stage)
    assert (
        res["summary"]["resumed_from"] == interrupted_at and res["summary"]["steps_run_now"] == steps - interrupted_at
    )
    if stage == "routers":  # counted independently of the summary: router steps, and no warm-up measurement redone
        assert res["router_steps"] == steps - interrupted_at and res["forwards_before_first_router_step"] == 0
        same = lambda s: {k: v for k, v in s.items() if k not in ("wall_s", "resumed_from", "steps_run_now")}  # noqa: E731
        assert same(res["summary"]) == same(ref["summary"])  # counters, surrogate accuracy, warm start, validation
    else:
        assert res["forwards"] == steps - interrupted_at
    assert res["sha256"] == ref["sha256"]
    assert _steps_logged(run) == steps  # one metrics record per step, none duplicated
    assert [d.name for d in root.iterdir()] == [f"step_{steps:06d}"]
