"""Invariant 7: a run killed at any point (SIGKILL at random steps, SIGKILL inside a checkpoint
write, SIGINT) resumes from its last checkpoint and ends with the same weights as an
uninterrupted run; only complete checkpoints are ever visible."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from pathlib import Path

import pytest

import interrupt_worker
from flextron.checkpoint import load_checkpoint

TIMEOUT_S = 120


@pytest.fixture(scope="module")
def ctx():
    """Children fork from a server that has imported flextron (torch, transformers) once. (The
    server of Python 3.11 does not get the test directory on its path, so the worker module
    itself is imported by each child, which is quick once its dependencies are loaded.)"""
    c = multiprocessing.get_context("forkserver")
    c.set_forkserver_preload(["flextron.training", "flextron.elastic", "flextron.latency"])
    return c


def _start(ctx, run: Path, **kw):
    (run / "training").unlink(missing_ok=True)
    p = ctx.Process(target=interrupt_worker.train, args=(str(run),), kwargs=kw)
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


def _complete_checkpoints(run: Path) -> int:
    """Every visible ``step_*`` directory is a complete checkpoint (hashes and shapes verified);
    returns the latest step (0 if none)."""
    root = run / "checkpoints" / "elastic"
    steps = []
    for d in sorted(root.glob("step_*")) if root.exists() else []:
        fx, *_ = interrupt_worker.build()
        opt = __import__("torch").optim.AdamW(fx.parameters())
        steps.append(load_checkpoint(d, {"model": fx}, opt)["step"])
        assert d.name == f"step_{steps[-1]:06d}"
    return max(steps, default=0)


def test_killed_run_resumes_to_the_same_weights(tmp_path, ctx):
    steps = interrupt_worker.CFG.steps
    ref_dir = tmp_path / "ref"
    p = _start(ctx, ref_dir)
    p.join(TIMEOUT_S)
    assert p.exitcode == 0
    ref = json.loads((ref_dir / "result.json").read_text())
    assert ref["summary"]["resumed_from"] == 0 and ref["forwards"] == steps

    run = tmp_path / "run"
    run.mkdir()
    rng = random.Random(6)
    # 1) SIGKILL at random points of training (two kills)
    for _ in range(2):
        p = _start(ctx, run, step_sleep=0.02)
        _wait_training(run, p, rng.randint(2, 4))
        time.sleep(rng.uniform(0, 0.03))
        assert _kill(p) == -signal.SIGKILL
        _complete_checkpoints(run)
    done = _complete_checkpoints(run)
    assert 0 < done < steps

    # 2) SIGKILL inside a checkpoint write (tensor files written, not yet renamed)
    p = _start(ctx, run, hold_in_save=True)
    _wait_for(lambda: (run / "in_save").exists(), p)
    assert _kill(p) == -signal.SIGKILL
    assert list((run / "checkpoints" / "elastic").glob(".tmp_step_*")), "the kill did not land inside a write"
    assert _complete_checkpoints(run) == done  # the half-written checkpoint is not visible

    # 3) SIGINT: the current step finishes, is checkpointed, and the process exits
    p = _start(ctx, run, step_sleep=0.02)
    _wait_training(run, p, rng.randint(1, 3))
    assert _kill(p, signal.SIGINT) == 130
    interrupted_at = _complete_checkpoints(run)
    assert interrupted_at == _steps_logged(run) > done  # saved at the step it stopped, not at the last multiple of every
    assert not [d for d in (run / "checkpoints" / "elastic").iterdir() if d.name.startswith(".")]  # leftovers cleaned

    # 4) the resumed run finishes where the uninterrupted one did, running only the missing steps
    p = _start(ctx, run)
    p.join(TIMEOUT_S)
    assert p.exitcode == 0
    res = json.loads((run / "result.json").read_text())
    assert res["summary"]["resumed_from"] == interrupted_at and res["summary"]["steps_run_now"] == steps - interrupted_at
    assert res["forwards"] == steps - interrupted_at  # counted independently of the summary
    assert res["sha256"] == ref["sha256"]
    assert _steps_logged(run) == steps  # one metrics record per step, none duplicated
    assert [d.name for d in (run / "checkpoints" / "elastic").iterdir()] == [f"step_{steps:06d}"]
