"""Dynamic routing overhead and per-token MLP routing speed (issue 4).

    python benchmarks/router_overhead.py RUN --dynamic-dir DIR --out OUT [--target 0.7] [--repeats 15] [--seq-len 256]

1. **Router overhead.** For one held-out prompt (batch of one, the run's latency workload
   length), :func:`flextron.routing.calibrate.measure_overhead` times the routed prefill (router forward in
   every layer + dispatch, ``dynamic``) against the *same* sub-network sliced without hooks
   (``static``) and the full model, interleaved in one session. Overhead = median of the
   per-round ratios − 1. The router's own forward (all layers, on one pooled feature vector,
   back to back, so with warm caches) is timed apart.
2. **Per-token MLP routing.** Every layer's MLP runs grouped by per-token width with a share
   ``p`` of the tokens at full width and the rest at the smallest, for ``p`` in 0, 0.25, 0.5,
   0.75, 1, timed interleaved: the prefill latency must fall with the chosen widths.

Writes ``OUT/router_overhead.json``; prints the tables last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the benchmarks package


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a finished `flextron run` directory")
    ap.add_argument("--dynamic-dir", default=None, help="dynamic router directory (default RUN/dynamic)")
    ap.add_argument("--out", required=True, help="output folder (router_overhead.json)")
    ap.add_argument("--target", type=float, default=0.7, help="latency target (default 0.7)")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds (default 15)")
    ap.add_argument("--seq-len", type=int, default=None, help="prompt length (default: the run's latency workload)")
    args = ap.parse_args(argv)

    def body() -> int:
        import torch

        from benchmarks.harness import format_table, write_json
        from flextron.routing.calibrate import measure_overhead
        from flextron.data.domains import domain_blocks, domain_documents
        from flextron.eval.deploy_dynamic import load_dynamic_run
        from flextron.errors import ConfigError
        from flextron.cost.timing import prefill_fn, time_models
        from flextron.eval.deploy import set_threads

        if args.repeats < 3:
            raise ConfigError(f"--repeats {args.repeats} is too few; give at least 3")
        run, router, _ = load_dynamic_run(args.run_dir, args.dynamic_dir)
        set_threads(run.cfg)
        fx, sp = run.fx, run.fx.space
        seq = args.seq_len or run.cfg.latency.seq_len
        _, held = domain_blocks(run.tokenizer, domain_documents(run.cfg), seq, 1, 1, seed=run.cfg.seed)
        ids = held["wikipedia"][:1]
        ov = measure_overhead(
            fx, router, args.target, ids, repeats=args.repeats, warmup=2, table=run.table, progress=True
        )
        arch, run_sub = ov["config"], prefill_fn(fx, ids)
        pooled = torch.randn(1, sp.hidden_size)

        def router_only():  # what the hooks compute: the target part once, then every layer's choice
            with torch.inference_mode():
                prep = router.prepare(args.target, fused=True)
                for g in range(len(prep["g_w1"])):
                    router.group_argmax(g, pooled, prep).tolist()

        r_only = time_models({"router": router_only}, repeats=args.repeats, warmup=2)["router"]["median_s"]
        overhead = ov["overhead_fraction"]
        fx.set_arch(None)

        # per-token MLP routing: a share p of the tokens at full width, the rest at the smallest
        T = ids.shape[1]
        gen = torch.Generator().manual_seed(0)
        order = torch.randperm(T, generator=gen)
        shares = (0.0, 0.25, 0.5, 0.75, 1.0)

        def tokens_at(p: float):
            w = torch.full((1, T), sp.mlp_choices[0], dtype=torch.long)
            w[0, order[: int(round(p * T))]] = sp.mlp_choices[-1]

            def go():
                for m in fx.mlps:
                    m.token_widths = w
                try:
                    run_sub()
                finally:
                    for m in fx.mlps:
                        m.token_widths = None

            return go

        tok = time_models(
            {f"{p:g}": tokens_at(p) for p in shares},
            repeats=args.repeats,
            warmup=2,
            progress=True,
            desc="per-token widths",
        )
        per_token = [
            {
                "share_full_width": p,
                "mean_width": (1 - p) * sp.mlp_choices[0] + p * sp.mlp_choices[-1],
                "median_s": tok[f"{p:g}"]["median_s"],
            }
            for p in shares
        ]
        monotone = all(b["median_s"] > a["median_s"] for a, b in zip(per_token, per_token[1:]))
        out = {
            "target": args.target,
            "seq_len": T,
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
            "config": arch.to_dict(),
            "predicted_fraction": ov["predicted_fraction"],
            "static_s": ov["sliced_s"],
            "dynamic_s": ov["routed_s"],
            "full_s": ov["full_s"],
            "overhead_fraction": overhead,
            "timed_fraction": ov["timed_fraction"],
            "router_forward_s": r_only,
            "router_forward_fraction": r_only / ov["sliced_s"],
            "meets_2_percent": overhead < 0.02,
            "per_token": per_token,
            "per_token_latency_falls_with_width": monotone,
        }
        path = write_json(Path(args.out) / "router_overhead.json", out)
        print(
            format_table(
                ["", "median (ms)"],
                [
                    ["static (same sub-network, no hooks)", f"{1e3 * out['static_s']:.1f}"],
                    ["dynamic (router + dispatch)", f"{1e3 * out['dynamic_s']:.1f}"],
                    ["full model", f"{1e3 * out['full_s']:.1f}"],
                    ["router forward alone", f"{1e3 * r_only:.2f}"],
                ],
            )
        )
        print(
            f"overhead (median paired ratio − 1): {100 * overhead:+.2f}% of the sub-model's prefill "
            f"({'under' if overhead < 0.02 else 'NOT under'} 2%)"
        )
        print(
            format_table(
                ["share of tokens at full width", "mean MLP width", "prefill (ms)"],
                [
                    [f"{r['share_full_width']:g}", f"{r['mean_width']:.0f}", f"{1e3 * r['median_s']:.1f}"]
                    for r in per_token
                ],
            )
        )
        print(f"per-token latency falls with width: {'yes' if monotone else 'no'}; written {path}")
        return 0

    from benchmarks.harness import script_main

    return script_main(body, False)


if __name__ == "__main__":
    sys.exit(main())
