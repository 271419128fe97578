"""Sub-model speed: measured prefill and decode speed-up of each target's exported sub-model over
the full model, next to the ideal speed-up from the FLOP ratio (issue 5).

    python benchmarks/speed.py RUN_DIR --out OUT [--targets 0.6,0.7,0.85,1.0] [--repeats 15] [--device cpu|cuda]

Every sub-model is exported (``save_subnetwork``) and reloaded with plain transformers, then all
models are timed round-robin in one session (prefill of the run's latency workload; greedy
decode per token). ``real / ideal`` below ``--threshold`` triggers a torch.profiler comparison
of that sub-model with the full model: the operators whose time shrank least against the ideal
are printed ("which op loses the time"). Writes ``OUT/speed.json``; prints the table last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the benchmarks package


def _losers(sub: dict[str, float], full: dict[str, float], ideal: float, top: int = 5) -> list[dict]:
    """Operators ranked by the time they take beyond perfect scaling: ``t_sub − t_full / ideal``."""
    rows = []
    for op in set(sub) | set(full):
        s, f = sub.get(op, 0.0), full.get(op, 0.0)
        rows.append({"op": op, "sub_s": s, "full_s": f, "excess_s": s - f / ideal})
    rows.sort(key=lambda r: -r["excess_s"])
    return rows[:top]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a finished `flextron run` directory")
    ap.add_argument("--out", required=True, help="output folder (speed.json, exported/)")
    ap.add_argument("--targets", help="comma-separated latency targets (default: the run's eval targets)")
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds (default 15)")
    ap.add_argument("--prompt-len", type=int, default=64, help="decode prompt length (default 64)")
    ap.add_argument("--new-tokens", type=int, default=16, help="decoded tokens per timed generate (default 16)")
    ap.add_argument("--threshold", type=float, default=0.8, help="profile when real/ideal is below this (default 0.8)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    args = ap.parse_args(argv)

    def body() -> int:
        import torch

        import flextron
        from benchmarks.harness import export_targets, format_table, load_exported, resolve_device, write_json
        from benchmarks.measure import forward_flops, profile_ops, time_prefill_decode
        from flextron.eval.perplexity import generate_fn
        from flextron.errors import ConfigError
        from flextron.cost.timing import prefill_fn

        device = resolve_device(args.device)
        if args.repeats < 3:
            raise ConfigError(f"--repeats {args.repeats} is too few; give at least 3")
        run = flextron.load_run(args.run_dir)
        cfg, sp = run.cfg, run.fx.space
        try:
            targets = [float(t) for t in args.targets.split(",")] if args.targets else list(cfg.eval.targets)
        except ValueError:
            raise ConfigError(f"--targets {args.targets!r} is not a comma-separated list of numbers") from None
        for t in targets:
            run.fx.router.check_target(t)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        out = Path(args.out)
        paths = export_targets(run, targets, out / "exported")
        archs = {k: arch for k, (_, arch) in paths.items()}
        models = {k: load_exported(p, device) for k, (p, _) in paths.items()}
        B, T = cfg.latency.batch_size, cfg.latency.seq_len
        ids = torch.randint(0, run.fx.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0)).to(device)
        timing = time_prefill_decode(
            models,
            "full",
            ids,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            progress=not args.quiet,
        )
        V = run.fx.config.vocab_size
        ctx = args.prompt_len + args.new_tokens // 2  # mean context of a decoded token

        def flops(arch, kind: str) -> float:
            if kind == "prefill":
                return forward_flops(sp, arch, V, batch=B, new_tokens=T, context=0, lm_head_tokens=1)
            return forward_flops(sp, arch, V, batch=1, new_tokens=1, context=ctx, lm_head_tokens=1)

        rows = []
        for t in targets:
            k = f"{t:g}"
            arch, tm = archs[k], timing[k]
            row = {
                "target": t,
                "config": arch.to_dict(),
                "params": sp.num_parameters(arch),
                "predicted_fraction": run.table.fraction(arch),
                **tm,
            }
            for kind in ("prefill", "decode"):
                ideal = flops(archs["full"], kind) / flops(arch, kind)
                row[f"{kind}_ideal_speedup"] = ideal
                row[f"{kind}_real_over_ideal"] = tm[f"{kind}_speedup"] / ideal
                if row[f"{kind}_real_over_ideal"] < args.threshold:
                    if kind == "prefill":
                        fs, ff = prefill_fn(models[k], ids), prefill_fn(models["full"], ids)
                    else:
                        prompt = torch.randint(
                            0, V, (1, args.prompt_len), generator=torch.Generator().manual_seed(1)
                        ).to(device)
                        fs, ff = (
                            generate_fn(models[k], prompt, args.new_tokens),
                            generate_fn(models["full"], prompt, args.new_tokens),
                        )
                    losers = _losers(profile_ops(fs, device=device), profile_ops(ff, device=device), ideal)
                    row[f"{kind}_profile"] = losers
            rows.append(row)
        res = {
            "run_dir": str(args.run_dir),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "workload": {
                "prefill_batch": B,
                "prefill_seq_len": T,
                "decode_prompt_len": args.prompt_len,
                "decode_new_tokens": args.new_tokens,
                "repeats": args.repeats,
            },
            "full": timing["full"],
            "rows": rows,
        }
        write_json(out / "speed.json", res)
        for r in rows:
            for kind in ("prefill", "decode"):
                for i, op in enumerate(r.get(f"{kind}_profile", [])):
                    if i == 0:
                        print(
                            f"\ntarget {r['target']:g} {kind}: real/ideal {r[f'{kind}_real_over_ideal']:.2f} "
                            f"< {args.threshold}; "
                            f"operators losing the most time against ideal scaling (per call):"
                        )
                    print(
                        f"  {op['op']:<40} sub {1e3 * op['sub_s']:8.2f} ms  full {1e3 * op['full_s']:8.2f} ms  "
                        f"excess {1e3 * op['excess_s']:8.2f} ms"
                    )
        print(
            f"\nwrote {out / 'speed.json'}; full model: prefill {1e3 * timing['full']['prefill_s']:.1f} ms, "
            f"decode {1e3 * timing['full']['decode_s_per_token']:.1f} ms/token\n"
        )
        print(
            format_table(
                [
                    "target",
                    "params M",
                    "prefill ms",
                    "prefill ×",
                    "ideal ×",
                    "real/ideal",
                    "decode ms/tok",
                    "decode ×",
                    "ideal ×",
                    "real/ideal",
                ],
                [
                    [
                        f"{r['target']:g}",
                        f"{r['params'] / 1e6:.2f}",
                        f"{1e3 * r['prefill_s']:.1f}",
                        r["prefill_speedup"],
                        r["prefill_ideal_speedup"],
                        r["prefill_real_over_ideal"],
                        f"{1e3 * r['decode_s_per_token']:.2f}",
                        r["decode_speedup"],
                        r["decode_ideal_speedup"],
                        r["decode_real_over_ideal"],
                    ]
                    for r in rows
                ],
            )
        )
        return 0

    from benchmarks.harness import script_main

    return script_main(body, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
