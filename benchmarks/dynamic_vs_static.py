"""Dynamic (input-adaptive) against static routing on held-out text of three domains (issue 4).

    python benchmarks/dynamic_vs_static.py RUN --out OUT [--targets 0.6,0.7,0.85,1.0] [--steps 30]
        [--direct-steps 10] [--train-blocks 16] [--blocks-per-domain 8] [--timed-blocks 2] [--repeats 3]
        [--latency-weight 10] [--route-every 3] [--per-token]

Trains the dynamic router on RUN's final model without touching RUN (the default trainer: the
surrogate path, then kept only if its routed LM loss beats the warm start's, into
``OUT/dynamic``; with ``--direct-steps`` > 0 also the direct LM-loss ablation into
``OUT/dynamic_direct``, evaluated the same way), then measures on held-out Wikipedia,
Shakespeare and Python-stdlib blocks: the average predicted and timed latency against each
target, perplexity, dynamic vs static at equal latency (interpolated, bootstrap CIs over
blocks), the shuffled control (input adaptivity), compute and width shares per domain, collapse.
Writes ``OUT/dynamic_results.json``, ``OUT/dynamic_report.md`` and PNGs (the ablation:
``OUT/direct/``); prints a summary last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the benchmarks package


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a finished `flextron run` directory (read only)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--targets", default="0.6,0.7,0.85,1.0", help="dynamic targets (default 0.6,0.7,0.85,1.0)")
    ap.add_argument("--steps", type=int, default=30, help="surrogate-path router steps (default 30)")
    ap.add_argument(
        "--direct-steps", type=int, default=0, help="steps of the direct LM-loss ablation (default 0: not run)"
    )
    ap.add_argument("--train-blocks", type=int, default=16, help="training blocks per domain (default 16)")
    ap.add_argument("--blocks-per-domain", type=int, default=8, help="held-out blocks per domain (default 8)")
    ap.add_argument("--timed-blocks", type=int, default=2, help="timed blocks per domain (default 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds per block (default 3)")
    ap.add_argument("--latency-weight", type=float, default=10.0, help="λ of the latency loss (default 10)")
    ap.add_argument("--batch-size", type=int, default=8, help="inputs per router step (default 8)")
    ap.add_argument(
        "--calibrate-blocks", type=int, default=16, help="training blocks the latency price is fitted on (default 16)"
    )
    ap.add_argument("--per-token", action="store_true", help="per-token MLP routing")
    ap.add_argument(
        "--route-every", type=int, default=None, help="layers that share one read of the hidden state (default 3)"
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)

    def body() -> int:
        import json

        from flextron.files import atomic_write_json
        from flextron.data.domains import domain_blocks, domain_documents
        from flextron.eval.dynamic import evaluate_dynamic
        from flextron.eval.deploy_dynamic import load_dynamic_run
        from flextron.report.dynamic import write_dynamic_report
        from flextron.config import config_from_overrides
        from flextron.train.dynamic import train_dynamic
        from flextron.errors import ConfigError
        from flextron.eval.deploy import set_threads, load_run

        try:
            targets = tuple(float(t) for t in args.targets.split(","))
        except ValueError:
            raise ConfigError(f"--targets {args.targets!r} is not a comma-separated list of numbers") from None
        out = Path(args.out)
        run = load_run(args.run_dir)
        set_threads(run.cfg)
        seq = run.cfg.eval.seq_len
        pool, held = domain_blocks(
            run.tokenizer, domain_documents(run.cfg), seq, args.train_blocks, args.blocks_per_domain, seed=run.cfg.seed
        )
        variants = {"dynamic": dict(surrogate=True, steps=args.steps)}
        if args.direct_steps > 0:
            variants["dynamic_direct"] = dict(
                surrogate=False, steps=args.direct_steps, batch_size=min(args.batch_size, 4)
            )
        results = {}
        for name, kw in variants.items():  # each variant trained, then evaluated and written, before the next
            cfg = config_from_overrides(
                targets=targets,
                latency_weight=args.latency_weight,
                per_token=args.per_token or None,
                route_every=args.route_every,
                batch_size=kw.pop("batch_size", args.batch_size),
                calibrate_blocks=args.calibrate_blocks,
                **kw,
            )
            fresh = load_run(args.run_dir)  # every variant starts from the same weights
            _, summary = train_dynamic(
                fresh.fx,
                fresh.fx.router,
                fresh.table,
                pool,
                cfg,
                out / name,
                seed=run.cfg.seed,
                progress=not args.quiet,
            )
            del fresh
            run, router, meta = load_dynamic_run(args.run_dir, out / name)
            res = evaluate_dynamic(
                run,
                router,
                held,
                timed_blocks=args.timed_blocks,
                repeats=args.repeats,
                per_token=args.per_token,
                batch_size=run.cfg.eval.batch_size,
                progress=not args.quiet,
            )
            res["router_summary"] = summary
            folder = out if name == "dynamic" else out / "direct"
            atomic_write_json(folder / "dynamic_results.json", res)
            write_dynamic_report(
                folder, res, [out / v / "metrics.jsonl" for v in variants if (out / v / "metrics.jsonl").exists()]
            )
            results[name] = res
        for name, res in results.items():
            print(f"\n{name}: held-out blocks {json.dumps({d: v['blocks'] for d, v in res['domains'].items()})}")
            for r in res["dynamic"]:
                vp, vt = r["vs_static_predicted"], r.get("vs_static_timed") or {}
                print(
                    f"  target {r['target']:g}: avg predicted {r['predicted_fraction']:.3f} "
                    f"({100 * r['predicted_latency_error']:+.1f}%), "
                    f"timed {r.get('timed_fraction', float('nan')):.3f}, ppl {r['perplexity']:.2f}; vs static (pred.) "
                    f"{vp.get('ppl_ratio', float('nan')):.3f} {vp['verdict']}; "
                    f"(timed) {vt.get('ppl_ratio', float('nan')):.3f} "
                    f"{vt.get('verdict', '—')}; per domain "
                    + ", ".join(f"{d} {v['mean_fraction']:.3f}" for d, v in r["per_domain"].items())
                    + f"; entropy {r['collapse']['entropy_nats']:.3f}"
                    + (
                        f"; vs shuffled {r['vs_shuffled']['ppl_ratio']:.3f} {r['vs_shuffled']['verdict']}"
                        if "vs_shuffled" in r
                        else ""
                    )
                )
        print(f"\nreport: {out / 'dynamic_report.md'}")
        return 0

    from benchmarks.harness import script_main

    return script_main(body, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
