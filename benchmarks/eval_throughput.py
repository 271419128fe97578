"""Downstream-evaluation throughput: items/s and the share of time spent outside the model forward.

Scores a fixed seeded subset of a task with lm-eval (flextron's local task definitions) at
several batch sizes, timing every call of the model forward (``HFLM._model_call``) with a
wrapper. Everything else (request building, tokenisation, padding, log-softmax, metric
computation) is "outside the forward". Batching must keep that share small. Building the task
(reading the data files) is a fixed cost per call, reported separately (``task_build_s``).

    OMP_NUM_THREADS=1 python benchmarks/eval_throughput.py [--model smollm2|tiny] [--task piqa] \
        [--items 64] [--batch-sizes 1,16] [--threads 1] [--out benchmarks/results/eval_throughput.json]

``--model smollm2`` uses the embedded SmolLM2-135M-Instruct wrapped as a flextron model at
target 1.0 (:class:`flextron.eval.lm_eval_model.FlextronLM`); ``tiny`` a tiny random Llama (seconds,
for a smoke test). Prints a table last and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def _tiny():
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from flextron.data.assets import smollm2_model_dir

    tok = AutoTokenizer.from_pretrained(smollm2_model_dir())  # a real tokenizer, a tiny random model
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )
    return LlamaForCausalLM(cfg).eval(), tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--task", default="piqa")
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="benchmarks/results/eval_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from flextron.config import ElasticConfig
    from flextron.model.elastic import convert
    from flextron.eval.lm_eval_model import FlextronLM, evaluate_tasks

    if args.model == "smollm2":
        from flextron.data.assets import smollm2_model_dir
        from flextron.model.export import load_hf_model

        model, tok = load_hf_model(smollm2_model_dir())
    else:
        model, tok = _tiny()
    fx = convert(model, ElasticConfig(mlp_divisor=8 if args.model == "tiny" else 64))
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        lm = FlextronLM(fx=fx, tokenizer=tok, target=1.0, batch_size=bs, device="cpu")
        forward = {"s": 0.0, "calls": 0}
        inner = lm._model_call

        def timed(*a, _inner=inner, **k):
            t0 = time.perf_counter()
            out = _inner(*a, **k)
            forward["s"] += time.perf_counter() - t0
            forward["calls"] += 1
            return out

        lm._model_call = timed  # instance attribute: HFLM calls self._model_call(...)
        evaluate_tasks(lm, [args.task], limit=min(8, args.items), num_fewshot=0)  # warm-up (task load, caches)
        forward.update(s=0.0, calls=0)
        t0 = time.perf_counter()
        summary, _ = evaluate_tasks(lm, [args.task], limit=args.items, num_fewshot=0)
        total = time.perf_counter() - t0
        wall = summary["_wall_s"]  # lm_eval.simple_evaluate only; building the task is extra
        n = summary[args.task]["n"]
        rows.append(
            {
                "batch_size": bs,
                "items": n,
                "wall_s": round(wall, 3),
                "task_build_s": round(total - wall, 3),
                "forward_s": round(forward["s"], 3),
                "forward_calls": forward["calls"],
                "items_per_s": round(n / wall, 3),
                "outside_forward_share": round(1 - forward["s"] / wall, 4),
                "acc": summary[args.task].get("acc"),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "model": args.model,
        "task": args.task,
        "num_fewshot": 0,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(
        f"\n{args.model} on {args.task} ({rows[0]['items'] if rows else 0} items, 0-shot, "
        f"{torch.get_num_threads()} thread(s)):"
    )
    print(f"{'batch':>6} {'items/s':>9} {'wall s':>8} {'forward s':>10} {'outside forward':>16}")
    for r in rows:
        print(
            f"{r['batch_size']:>6} {r['items_per_s']:>9.2f} {r['wall_s']:>8.1f} {r['forward_s']:>10.1f} "
            f"{100 * r['outside_forward_share']:>15.1f}%"
        )


if __name__ == "__main__":
    main()
