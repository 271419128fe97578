"""Worker for test_distributed's FSDP check: one elastic training step of a tiny float64 model,
sharded with torch's FSDP2 (``fully_shard``) over the processes of a gloo group, or unsharded on
one process (the reference, also importable: :func:`elastic_step`).

Usage: python -m torch.distributed.run --nproc_per_node=2 tests/fsdp_worker.py OUT_DIR
Writes OUT_DIR/weights.safetensors (the gathered full weights, rank 0) and OUT_DIR/world_<rank>.txt.
"""

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny  # noqa: E402

from flextron.config import ElasticConfig
from flextron.cost.table import CostTable
from flextron.model.elastic import convert
from flextron.train.loop import BudgetSampler, batch_for_step, step_generator
from flextron.train.losses import lm_kd_loss

GLOBAL_BATCH = 4


def elastic_step(rank: int, world: int) -> dict[str, torch.Tensor]:
    """One step on a sampled (not full) sub-network: some parameters get no gradient. Returns the
    full state dict after the step (gathered from the shards when ``world > 1``)."""
    fx = convert(
        make_tiny("llama_gqa_tied", dtype=torch.float64), ElasticConfig(mlp_fractions=(0.25, 0.5, 1.0), mlp_divisor=8)
    )
    teacher = copy.deepcopy(fx.model).requires_grad_(False)
    arch, _ = BudgetSampler(fx.space, CostTable.from_parameters(fx.space), p_full=0.0).sample(step_generator(0, 0))
    assert arch != fx.space.full()
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in fx.adapter.layers(fx.model):
            fully_shard(layer)
        fully_shard(fx.model)
    opt = torch.optim.AdamW(fx.parameters(), lr=1e-2)
    blocks = torch.randint(0, 97, (16, 12), generator=torch.Generator().manual_seed(0))
    batch = batch_for_step(blocks, 0, GLOBAL_BATCH, 0, rank, world)  # this rank's rows of the global batch
    fx.train().set_arch(arch)
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch).logits
    loss = lm_kd_loss(fx(input_ids=batch, use_cache=False).logits, batch, teacher_logits, 0.5)[0]
    loss.backward()  # FSDP2 reduce-scatters the mean gradient over the ranks
    opt.step()
    if world == 1:
        return {k: v.detach().clone() for k, v in fx.model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(fx.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def main(out: Path) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"world_{rank}.txt").write_text(str(world))
    sd = elastic_step(rank, world)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in sd.items() if "lm_head" not in k}, str(out / "weights.safetensors"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
