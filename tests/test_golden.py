"""Golden values of a complete tiny run (exact parameter budget): the rank stage's importance
scores, the first 10 elastic losses and the final elastic weights, pinned by sha256.

A restructuring of the code must not change a bit of them; a change of the method must update
them on purpose (and say so). float32 on one thread, CPU, the pinned torch.
"""

from __future__ import annotations

import hashlib
import json
import struct

import torch
from conftest import write_tiny_run
from safetensors.torch import load_file

import flextron.pipeline.stages as stage_module  # where the rank stage looks up compute_importance
from flextron.cli import main

GOLDEN = {
    "importance": "347a644946679a0746a7e31ba53b46f47e1097fe49169780f7ddaa0ff3dadbb4",
    "elastic_losses": "60c4b076bc0ed95e3ec17045c993b657d63124b1d6fa94cb634c2788b60ceae4",
    "elastic_weights": "1dc2aece925c185853938e6207419d2364beee02e3168428fb894e556a3b69fd",
}


def _tensor_digest(named: list[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def test_golden_run(tmp_path, monkeypatch):
    seen = []
    original = stage_module.compute_importance

    def spy(*args, **kwargs):
        imp = original(*args, **kwargs)
        seen.append(imp)
        return imp

    monkeypatch.setattr(stage_module, "compute_importance", spy)
    cfg = write_tiny_run(tmp_path, train={"steps": 10, "checkpoint_every": 5}, keep_checkpoints=True)  # reads elastic/
    assert main(["run", str(cfg), "-q"]) == 0
    run_dir = tmp_path / "runs" / "tiny"

    assert len(seen) == 1
    imp = seen[0]
    got = {
        "importance": _tensor_digest(
            [(f"mlp.{i}", t) for i, t in enumerate(imp.mlp)] + [(f"heads.{i}", t) for i, t in enumerate(imp.heads)]
        )
    }

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["lm_loss"] for r in rows if r.get("stage") == "elastic"]
    assert len(losses) == 10, losses
    got["elastic_losses"] = hashlib.sha256(b"".join(struct.pack("<d", x) for x in losses)).hexdigest()

    weights = {}
    for f in sorted((run_dir / "elastic").glob("*.safetensors")):
        weights.update(load_file(f))
    got["elastic_weights"] = _tensor_digest(sorted(weights.items()))

    print("golden:", json.dumps(got, indent=1), "losses:", losses)
    assert got == GOLDEN
