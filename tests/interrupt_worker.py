"""Worker for test_interruptions: elastic training of a tiny float64 model through the real
``train_elastic`` code path, in a process the test kills.

The test starts :func:`train` in a forkserver child (this module is preloaded there, so a child
starts without importing torch again). Files in ``run_dir``: ``metrics.jsonl`` (one line per
finished step, written by the library), ``training`` (created at the first training step, after the resume), ``in_save`` (created while :func:`train` with
``hold_in_save`` is parked inside a checkpoint write, between the tensor files and the rename) and
``result.json`` (written when training finishes: summary, student forwards run by this process,
sha256 of the final weights).
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny  # noqa: E402

import flextron.checkpoint  # noqa: E402
from flextron.config import ElasticConfig, TrainConfig  # noqa: E402
from flextron.elastic import convert  # noqa: E402
from flextron.latency import CostTable  # noqa: E402
from flextron.training import train_elastic  # noqa: E402

CFG = TrainConfig(steps=16, batch_size=2, seq_len=12, checkpoint_every=3, warmup_steps=2, lr=1e-2)


def build():
    """The tiny elastic model, its teacher, the training blocks and the cost table."""
    fx = convert(make_tiny("llama_gqa_tied", dtype=torch.float64), ElasticConfig(mlp_fractions=(0.25, 0.5, 1.0), mlp_divisor=8))
    teacher = copy.deepcopy(fx.model).requires_grad_(False)
    blocks = torch.randint(0, 97, (24, 12), generator=torch.Generator().manual_seed(0))
    return fx, teacher, blocks, CostTable.from_parameters(fx.space)


def weights_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(run_dir: str, step_sleep: float = 0.0, hold_in_save: bool = False) -> None:
    """Train to the end (resuming from ``run_dir``'s checkpoint); exit 130 on KeyboardInterrupt."""
    torch.set_num_threads(1)
    run = Path(run_dir)
    fx, teacher, blocks, table = build()
    forwards = []

    def counted(module, args, kwargs):
        if not forwards:
            (run / "training").touch()
        forwards.append(time.sleep(step_sleep))

    fx.model.register_forward_pre_hook(counted, with_kwargs=True)
    if hold_in_save:
        real = flextron.checkpoint.save_file

        def parked(tensors, path, *a, **k):
            real(tensors, path, *a, **k)
            (run / "in_save").touch()
            time.sleep(600)  # the test kills the process here

        flextron.checkpoint.save_file = parked
    try:
        summary = train_elastic(fx, teacher, blocks, CFG, table, run, seed=0, progress=False)
    except KeyboardInterrupt:
        sys.exit(130)
    result = {"summary": summary, "forwards": len(forwards), "sha256": weights_sha256(fx)}
    (run / "result.json").write_text(json.dumps(result))
