"""Worker for test_distributed: elastic training on a tiny float64 model, 1 or 2 processes.

Usage: python -m torch.distributed.run --nproc_per_node=N tests/ddp_worker.py OUT_DIR MICRO_BATCH
Writes OUT_DIR/weights.safetensors (rank 0) and OUT_DIR/world_<rank>.txt.
"""

import copy
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny  # noqa: E402

from flextron.config import ElasticConfig, TrainConfig  # noqa: E402
from flextron.elastic import convert  # noqa: E402
from flextron.latency import CostTable  # noqa: E402
from flextron.training import make_accelerator, train_elastic  # noqa: E402


def main(out: Path, micro_batch: int) -> None:
    acc = make_accelerator(1)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"world_{acc.process_index}.txt").write_text(str(acc.num_processes))
    fx = convert(make_tiny("llama_gqa_tied", dtype=torch.float64), ElasticConfig(mlp_fractions=(0.25, 0.5, 1.0), mlp_divisor=8))
    teacher = copy.deepcopy(fx.model).requires_grad_(False)
    blocks = torch.randint(0, 97, (32, 12), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=5, batch_size=micro_batch, seq_len=12, checkpoint_every=100, warmup_steps=1, lr=1e-2)
    train_elastic(fx, teacher, blocks, cfg, CostTable.from_parameters(fx.space), out / "run", seed=0, accelerator=acc, progress=False)
    if acc.is_main_process:
        save_file({k: v.detach().contiguous() for k, v in fx.model.state_dict().items() if "lm_head" not in k}, str(out / "weights.safetensors"))
    acc.wait_for_everyone()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
