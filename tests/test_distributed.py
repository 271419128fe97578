"""Invariant 6: training on two processes (DDP, gloo on CPU) equals one process with the same
global batch; every rank samples the same sub-network each step."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

WORKER = Path(__file__).parent / "ddp_worker.py"


def _launch(out: Path, nproc: int, micro_batch: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(WORKER), str(out), str(micro_batch)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]


def test_two_process_ddp_equals_one_process(tmp_path):
    _launch(tmp_path / "one", 1, 4)
    _launch(tmp_path / "two", 2, 2)  # 2 ranks × 2 sequences = the same global batch of 4
    assert (tmp_path / "two" / "world_0.txt").read_text() == "2" and (tmp_path / "two" / "world_1.txt").read_text() == "2"
    a, b = load_file(tmp_path / "one" / "weights.safetensors"), load_file(tmp_path / "two" / "weights.safetensors")
    init = None
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-9, rtol=0), k
    # training changed the weights (the comparison is not vacuous)
    from conftest import make_tiny

    init = make_tiny("llama_gqa_tied").state_dict()
    assert any(not torch.allclose(a[k], init[k]) for k in a)
    # every rank logged the same sub-network: only rank 0 writes metrics, so compare the sampled budgets of both runs
    import json

    budgets = lambda p: [json.loads(l)["budget"] for l in (p / "run" / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert budgets(tmp_path / "one") == budgets(tmp_path / "two")
