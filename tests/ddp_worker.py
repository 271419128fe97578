"""Worker for test_distributed: elastic training, router training and joint fine-tuning of a tiny
float64 model (router and surrogate in float64 too), on 1 or 2 processes.

Usage: python -m torch.distributed.run --nproc_per_node=N tests/ddp_worker.py OUT_DIR MICRO_BATCH
Writes OUT_DIR/weights_<rank>.safetensors (every stage's result, prefixed by stage),
OUT_DIR/world_<rank>.txt and OUT_DIR/summary.json (rank 0).
"""

import copy
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny  # noqa: E402

from flextron.config import ElasticConfig, JointConfig, RouterConfig, TrainConfig
from flextron.cost.table import CostTable
from flextron.model.elastic import convert
from flextron.routing.router import StaticRouter
from flextron.routing.surrogate import Surrogate
from flextron.train.distributed import make_accelerator
from flextron.train.elastic import train_elastic
from flextron.train.joint import train_joint
from flextron.train.routers import train_routers


def _snapshot(prefix: str, module: torch.nn.Module) -> dict:
    return {
        f"{prefix}.{k}": v.detach().clone().contiguous() for k, v in module.state_dict().items() if "lm_head" not in k
    }


def main(out: Path, micro_batch: int) -> None:
    acc = make_accelerator(1)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"world_{acc.process_index}.txt").write_text(str(acc.num_processes))
    fx = convert(
        make_tiny("llama_gqa_tied", dtype=torch.float64), ElasticConfig(mlp_fractions=(0.25, 0.5, 1.0), mlp_divisor=8)
    )
    teacher = copy.deepcopy(fx.model).requires_grad_(False)
    blocks = torch.randint(0, 97, (32, 12), generator=torch.Generator().manual_seed(0))
    table = CostTable.from_parameters(fx.space)
    cfg = TrainConfig(steps=5, batch_size=micro_batch, seq_len=12, checkpoint_every=100, warmup_steps=1, lr=1e-2)
    train_elastic(fx, teacher, blocks, cfg, table, out / "run", seed=0, accelerator=acc, progress=False)
    weights = _snapshot("elastic", fx.model)

    # routers: the batch of targets is global (4), each rank measures and back-propagates its share;
    # the surrogate gate is forced open so the router gets the surrogate's gradient every step
    sp = fx.space
    torch.manual_seed(0)
    router = StaticRouter((0.6, 0.8, 1.0), sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), 16).double()
    sm = Surrogate(sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), 16).double()
    weights.update(_snapshot("router_init", router))
    rcfg = RouterConfig(
        targets=(0.6, 0.8, 1.0),
        steps=4,
        warmup_samples=4,
        heldout_configs=4,
        batch_size=4,
        seq_len=12,
        surrogate_updates=5,
        surrogate_gate_spearman=-1.0,
        surrogate_gate_error=1e9,
        tau_start=2.0,
        tau_end=1.0,
    )  # a warm Gumbel-softmax keeps the joint stage's router gradient non-zero
    rsum = train_routers(fx, router, sm, table, blocks, rcfg, out / "run", seed=0, accelerator=acc, progress=False)
    weights.update(_snapshot("router", router))
    weights.update(_snapshot("surrogate", sm))

    jcfg = JointConfig(steps=3, batch_size=micro_batch, seq_len=12, checkpoint_every=100)
    train_joint(fx, teacher, router, table, blocks, jcfg, rcfg, out / "run", seed=0, accelerator=acc, progress=False)
    weights.update(_snapshot("joint_model", fx.model))
    weights.update(_snapshot("joint_router", router))
    save_file(weights, str(out / f"weights_{acc.process_index}.safetensors"))
    if acc.is_main_process:
        (out / "summary.json").write_text(json.dumps({"routers": rsum}))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
