"""Elastic training cost: tokens/s of an elastic training step (budget sampling, sliced forward,
distillation) against plain fine-tuning of dense models at the same sampled widths and of the
full model, on the same batches; the teacher's forward reported separately (issue 5).

    python benchmarks/training_cost.py RUN_DIR --out OUT [--steps 8] [--device cpu|cuda]

Starts from the run's importance-ranked model with the run's sampler settings (``train.p_full``,
``train.sampling``, lowest router target), batch size and sequence length, so the width mix is the
one elastic training sees. Writes ``OUT/training_cost.json``; prints the table last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the benchmarks package


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a `flextron run` directory with a finished latency stage")
    ap.add_argument("--out", required=True, help="output folder (training_cost.json)")
    ap.add_argument("--steps", type=int, default=8, help="timed steps after one untimed warm-up step (default 8)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    args = ap.parse_args(argv)

    def body() -> int:
        import statistics

        import torch

        import flextron
        from benchmarks.harness import format_table, resolve_device, run_inputs, write_json
        from benchmarks.measure import training_step_costs
        from flextron.errors import ConfigError, ModelError
        from flextron.cost.table import CostTable
        from flextron.train.loop import BudgetSampler

        device = resolve_device(args.device)
        if args.steps < 1:
            raise ConfigError(f"--steps {args.steps} is invalid: must be >= 1")
        run_dir = Path(args.run_dir)
        if not (run_dir / "latency_table.json").is_file() or not (run_dir / "ranked").is_dir():
            raise ModelError(f"{run_dir} has no finished rank and latency stages; run `flextron run` first")
        cfg = flextron.load_config(run_dir / "config.yaml")
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        table = CostTable.load(run_dir / "latency_table.json")
        fx = flextron.load_elastic(run_dir / "ranked").to(device)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(run_dir / "ranked")
        blocks = run_inputs(cfg, tok).train
        teacher = None
        if cfg.train.kd_alpha > 0:
            teacher = flextron.load_elastic(run_dir / "ranked").model.to(device).eval().requires_grad_(False)
        sampler = BudgetSampler(fx.space, table, cfg.train.p_full, cfg.train.sampling, min(cfg.routers.targets))
        res = training_step_costs(
            fx,
            teacher,
            sampler,
            blocks,
            steps=args.steps,
            batch_size=cfg.train.batch_size,
            lr=cfg.train.lr,
            kd_alpha=cfg.train.kd_alpha,
            max_grad_norm=cfg.train.max_grad_norm,
            seed=cfg.seed,
            progress=not args.quiet,
        )
        tok_step = res["tokens_per_step"]
        el = res["elastic"]
        t_el = sum(v for k, v in el.items() if k != "teacher_forward")
        t_teacher = el.get("teacher_forward", 0.0)
        t_dense, t_full = sum(res["dense"].values()), sum(res["full"].values())
        ps = res["per_step_s"]
        summary = {
            "elastic_tokens_per_s": tok_step / t_el,
            "elastic_with_teacher_tokens_per_s": tok_step / (t_el + t_teacher),
            "dense_same_mix_tokens_per_s": tok_step / t_dense,
            "full_finetune_tokens_per_s": tok_step / t_full,
            # medians of per-step ratios: each step's elastic and dense runs share the batch and a moment of the machine
            "ratio_elastic_vs_dense_same_mix": statistics.median(d / e for d, e in zip(ps["dense"], ps["elastic"])),
            "ratio_elastic_vs_full_finetune": statistics.median(f / e for f, e in zip(ps["full"], ps["elastic"])),
            "teacher_forward_share_of_elastic_step": t_teacher / (t_el + t_teacher),
            "full_model_steps": sum(c is None for c in res["configs"]),
        }
        out = Path(args.out)
        write_json(
            out / "training_cost.json",
            {
                "run_dir": str(run_dir),
                "device": str(device),
                "threads": torch.get_num_threads(),
                "batch": [cfg.train.batch_size, cfg.train.seq_len],
                "kd_alpha": cfg.train.kd_alpha,
                **res,
                "summary": summary,
            },
        )
        print(
            f"\nwrote {out / 'training_cost.json'}; {args.steps} timed steps of {tok_step} tokens, "
            f"{summary['full_model_steps']} of them full-model steps; "
            f"budgets {['full' if c is None else round(c, 2) for c in res['configs']]}\n"
        )
        rows = []
        for kind, label in (
            ("elastic", "elastic step"),
            ("dense", "dense, same widths"),
            ("full", "full model fine-tune"),
        ):
            d = res[kind]
            total = sum(d.values())
            for ph, v in d.items():
                rows.append([label, ph, f"{1e3 * v:.1f}", f"{100 * v / total:.0f}%"])
        print(format_table(["run", "phase", "ms/step", "share"], rows))
        print()
        print(
            format_table(
                ["figure", "value"],
                [
                    ["elastic tokens/s (teacher excluded)", summary["elastic_tokens_per_s"]],
                    ["elastic tokens/s (teacher included)", summary["elastic_with_teacher_tokens_per_s"]],
                    ["dense same-mix tokens/s", summary["dense_same_mix_tokens_per_s"]],
                    ["full fine-tune tokens/s", summary["full_finetune_tokens_per_s"]],
                    ["elastic / dense same mix (median per step)", summary["ratio_elastic_vs_dense_same_mix"]],
                    ["elastic / full fine-tune (median per step)", summary["ratio_elastic_vs_full_finetune"]],
                    ["teacher forward share of the elastic step", summary["teacher_forward_share_of_elastic_step"]],
                ],
            )
        )
        return 0

    from benchmarks.harness import script_main

    return script_main(body, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
