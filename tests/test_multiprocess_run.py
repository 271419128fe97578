"""`flextron run` on several processes: ``accelerate launch --multi_gpu --num_processes 2 -m
flextron run CFG`` on CPU (gloo) with 1 sequence per process gives the run of 1 process with 2
sequences (same global batch), and a 2-process run killed during joint fine-tuning resumes to it.

Training stages run on both processes (their summaries say so); ranking, the latency table and
evaluation on the main one; whether a stage is finished is decided by the main process, so a
resumed run on 2 processes skips the finished stages on both (a process that decided alone
could skip a stage the other runs, and both would wait forever)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import write_tiny_run
from safetensors.torch import load_file

TIMEOUT_S = 600
JOINT_STEPS = 16
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


def _cmd(cfg: Path, processes: int) -> list[str]:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes)]
    return (launch if processes > 1 else [sys.executable]) + ["-m", "flextron", "run", str(cfg)]


def _run(cfg: Path, processes: int) -> str:
    r = subprocess.run(_cmd(cfg, processes), capture_output=True, text=True, env=ENV, timeout=TIMEOUT_S)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r.stdout


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (the launcher starts each worker in a session of its own, so
    killing the launcher's process group would leave the workers running)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def _kill_during_joint(cfg: Path, run_dir: Path) -> None:
    """Start the 2-process run and SIGKILL the launcher and both processes once joint fine-tuning
    has logged a few steps (past its first checkpoint)."""
    p = subprocess.Popen(_cmd(cfg, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while _joint_steps_logged(run_dir) < 3:
            assert p.poll() is None, f"the run ended ({p.returncode}) before it could be killed"
            assert time.monotonic() < deadline, "the run made no progress"
            time.sleep(0.005)
    finally:
        victims = _descendants(p.pid) + [p.pid]
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        p.wait(TIMEOUT_S)
        while any(_alive(pid) for pid in victims):  # all gone before the resume starts
            time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _joint_steps_logged(run_dir: Path) -> int:
    p = run_dir / "metrics.jsonl"
    if not p.exists():
        return 0
    return sum(1 for line in p.read_text().splitlines() if line.endswith("}") and json.loads(line)["stage"] == "joint")


def _close(a, b, tol: float = 1e-5) -> bool:
    """Equal JSON values, numbers within ``tol`` (configurations, being integers, exactly)."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and abs(a - b) <= tol
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    return a == b


def _tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for rel in (
        "elastic/model.safetensors",
        "final/model.safetensors",
        "final_routers/router.safetensors",
        "final_routers/surrogate.safetensors",
    ):
        out.update({f"{rel}:{k}": v for k, v in load_file(run_dir / rel).items()})
    return out


def test_two_processes_equal_one_with_the_same_global_batch_and_resume(tmp_path):
    joint = {"steps": JOINT_STEPS, "checkpoint_every": 2}
    keep = {"keep_checkpoints": True}  # elastic/ is compared below
    one_cfg = write_tiny_run(
        tmp_path / "one", name="one", train={"batch_size": 2}, joint={**joint, "batch_size": 2}, **keep
    )
    two_cfg = write_tiny_run(
        tmp_path / "two", name="two", train={"batch_size": 1}, joint={**joint, "batch_size": 1}, **keep
    )
    one, two = tmp_path / "one" / "runs" / "one", tmp_path / "two" / "runs" / "two"
    _run(one_cfg, 1)

    _kill_during_joint(two_cfg, two)
    before = json.loads((two / "stages.json").read_text())
    assert list(before) == ["rank", "latency", "elastic", "routers"]  # killed inside the joint stage
    _run(two_cfg, 2)  # resumes
    stages = json.loads((two / "stages.json").read_text())
    assert {k: stages[k] for k in before} == before  # the finished stages were not run again
    resumed = stages["joint"]["summary"]
    assert (
        2 <= resumed["resumed_from"] < JOINT_STEPS and resumed["steps_run_now"] == JOINT_STEPS - resumed["resumed_from"]
    )
    ref = json.loads((one / "stages.json").read_text())
    for stage in ("elastic", "routers", "joint"):
        assert ref[stage]["summary"]["processes"] == 1 and stages[stage]["summary"]["processes"] == 2
    assert _close(
        ref["routers"]["summary"]["warm_start"], stages["routers"]["summary"]["warm_start"]
    )  # same starts, measured losses within 1e-5
    assert ref["routers"]["summary"]["llm_evaluations"] == stages["routers"]["summary"]["llm_evaluations"]

    # the same weights (float32: reduction order differs) and the same routed configurations
    a, b = _tensors(one), _tensors(two)
    assert set(a) == set(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-5, worst
    print(f"max abs weight difference 2 vs 1 process: {worst:.3g}; joint resumed from step {resumed['resumed_from']}")
    ranked = load_file(one / "ranked" / "model.safetensors")
    assert any(not torch.allclose(ranked[k], v) for k, v in load_file(one / "final" / "model.safetensors").items())
    rows = lambda d: [(r["target"], r["config"]) for r in json.loads((d / "results.json").read_text())["rows"]]  # noqa: E731
    assert rows(one) == rows(two)

    # once finished, a rerun on 2 processes does nothing
    assert "is complete; nothing to do" in _run(two_cfg, 2)
    # an error on the main process (here: the run directory holds another run) stops both processes
    two_cfg.write_text(two_cfg.read_text().replace("seed: 0", "seed: 1"))
    r = subprocess.run(_cmd(two_cfg, 2), capture_output=True, text=True, env=ENV, timeout=TIMEOUT_S)
    assert r.returncode != 0
    assert (
        "error: run directory" in r.stderr and "error: the main process stopped with OutputExistsError" in r.stderr
    ), r.stderr[-3000:]
