"""Worker for test_interruptions: elastic training, router training or joint fine-tuning of a tiny
float64 model through the real ``train_elastic`` / ``train_routers`` / ``train_joint`` code
paths, in a process the test kills.

The test starts :func:`train` in a forkserver child (this module is preloaded there, so a child
starts without importing torch again). Files in ``run_dir``: ``metrics.jsonl`` (one line per
finished step, written by the library), ``training`` (created at the first forward of the
elastic model, i.e. after the resume, or at the start of the router stage's warm-up),
``in_save`` (created while :func:`train` with ``hold_in_save`` is parked inside a checkpoint
write, between the tensor files and the rename) and ``result.json`` (written when the stage
finishes: summary, forwards of the elastic model run by this process, how many of them came
before the first router step, router steps run, sha256 of the final weights).
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

import flextron.train.checkpoint  # noqa: E402
import flextron.train.routers  # noqa: E402
from flextron.config import ElasticConfig, JointConfig, RouterConfig, TrainConfig
from flextron.cost.table import CostTable
from flextron.model.elastic import convert
from flextron.routing.router import StaticRouter
from flextron.routing.surrogate import Surrogate
from flextron.train.elastic import train_elastic
from flextron.train.joint import train_joint
from flextron.train.routers import train_routers

CFG = TrainConfig(steps=16, batch_size=2, seq_len=12, checkpoint_every=3, warmup_steps=2, lr=1e-2)
# the surrogate gate is forced open so that every router step also trains the router through it
ROUTER_CFG = RouterConfig(
    targets=(0.6, 0.8, 1.0),
    steps=16,
    warmup_samples=4,
    heldout_configs=4,
    batch_size=2,
    seq_len=12,
    surrogate_updates=5,
    surrogate_gate_spearman=-1.0,
    surrogate_gate_error=1e9,
    checkpoint_every=3,
)
JOINT_CFG = JointConfig(steps=12, batch_size=2, seq_len=12, checkpoint_every=3)
STEPS = {"elastic": CFG.steps, "routers": ROUTER_CFG.steps, "joint": JOINT_CFG.steps}


def build():
    """The tiny elastic model, its teacher, the training blocks and the cost table."""
    fx = convert(
        make_tiny("llama_gqa_tied", dtype=torch.float64), ElasticConfig(mlp_fractions=(0.25, 0.5, 1.0), mlp_divisor=8)
    )
    teacher = copy.deepcopy(fx.model).requires_grad_(False)
    blocks = torch.randint(0, 97, (24, 12), generator=torch.Generator().manual_seed(0))
    return fx, teacher, blocks, CostTable.from_parameters(fx.space)


def build_router(fx) -> tuple[StaticRouter, Surrogate]:
    """The router and surrogate (float64, seeded) the router and joint stages start from."""
    sp = fx.space
    torch.manual_seed(0)
    router = StaticRouter(ROUTER_CFG.targets, sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), 16).double()
    return router, Surrogate(sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), 16).double()


def checkpointed(stage: str):
    """``(modules, optimizers)`` of a fresh model to load ``stage``'s checkpoints into."""
    fx, *_ = build()
    router, sm = build_router(fx)
    if stage == "elastic":
        return {"model": fx}, torch.optim.AdamW(fx.parameters())
    if stage == "joint":
        return {"model": fx, "router": router}, torch.optim.AdamW(
            [{"params": list(fx.parameters())}, {"params": list(router.parameters())}]
        )
    return {"router": router, "surrogate": sm}, {
        "router_optimizer": torch.optim.Adam(router.parameters()),
        "surrogate_optimizer": torch.optim.AdamW(sm.parameters()),
    }


def weights_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def train(run_dir: str, stage: str = "elastic", step_sleep: float = 0.0, hold_in_save: bool = False) -> None:
    """Run ``stage`` to the end (resuming from ``run_dir``'s checkpoint); exit 130 on KeyboardInterrupt."""
    torch.set_num_threads(1)
    run = Path(run_dir)
    fx, teacher, blocks, table = build()
    router, sm = build_router(fx)
    forwards, router_steps = [], []
    before_first_step = []

    def counted(module, args, kwargs):
        if not forwards:
            (run / "training").touch()
        forwards.append(time.sleep(step_sleep))

    fx.model.get_decoder().register_forward_pre_hook(counted, with_kwargs=True)  # also run by the chunked perplexity
    real_gumbel = flextron.train.routers.gumbel_choice

    def gumbel(logits, tau, gen):  # the router stage draws twice per step, nowhere else
        if not router_steps:
            before_first_step.append(len(forwards))
        router_steps.append(1)
        return real_gumbel(logits, tau, gen)

    if hold_in_save:
        real = flextron.train.checkpoint.save_file

        def parked(tensors, path, *a, **k):
            real(tensors, path, *a, **k)
            (run / "in_save").touch()
            time.sleep(600)  # the test kills the process here

        flextron.train.checkpoint.save_file = parked
    try:
        if stage == "elastic":
            summary = train_elastic(fx, teacher, blocks, CFG, table, run, seed=0, progress=False)
            weights = {"model": fx}
        elif stage == "routers":
            flextron.train.routers.gumbel_choice = gumbel
            summary = train_routers(fx, router, sm, table, blocks, ROUTER_CFG, run, seed=0, progress=False)
            weights = {"router": router, "surrogate": sm}
        else:
            summary = train_joint(
                fx, teacher, router, table, blocks, JOINT_CFG, ROUTER_CFG, run, seed=0, progress=False
            )
            weights = {"model": fx, "router": router}
    except KeyboardInterrupt:
        sys.exit(130)
    result = {
        "summary": summary,
        "forwards": len(forwards),
        "router_steps": len(router_steps) // 2,
        "forwards_before_first_router_step": before_first_step[0] if before_first_step else None,
        "sha256": {k: weights_sha256(m) for k, m in weights.items()},
    }
    (run / "result.json").write_text(json.dumps(result))
