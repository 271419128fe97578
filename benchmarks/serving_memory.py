"""Serving memory: one flextron checkpoint serving N targets against N separate exported
checkpoints — bytes on disk and resident memory while serving all N (issue 5).

    python benchmarks/serving_memory.py RUN_DIR --out OUT [--targets 0.6,0.7,0.85,1.0] [--device cpu|cuda]

Disk: the run's deployable files (``final/`` weights, config and tokenizer, ``final_routers/``,
``latency_table.json``) against the N exported checkpoints of the same targets. Memory: each
scenario runs in a fresh process, loads its model(s) and generates a few tokens for every target;
resident memory above the process's baseline (torch and transformers imported) after loading,
after serving, and at peak (the two processes run concurrently; each measures itself). Writes
``OUT/serving_memory.json``; prints the table last.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the benchmarks package


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", help="a finished `flextron run` directory")
    ap.add_argument("--out", required=True, help="output folder (serving_memory.json, exported/)")
    ap.add_argument("--targets", help="comma-separated latency targets (default: the run's eval targets)")
    ap.add_argument("--new-tokens", type=int, default=8, help="tokens generated per target (default 8)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    args = ap.parse_args(argv)

    def body() -> int:
        import flextron
        from benchmarks.measure import dir_bytes, serving_memory
        from benchmarks.harness import export_targets, format_table, resolve_device, write_json
        from flextron.errors import ConfigError

        device = resolve_device(args.device)
        if args.new_tokens < 1:
            raise ConfigError(f"--new-tokens {args.new_tokens} is invalid: must be >= 1")
        run = flextron.load_run(args.run_dir)
        try:
            targets = [float(t) for t in args.targets.split(",")] if args.targets else list(run.cfg.eval.targets)
        except ValueError:
            raise ConfigError(f"--targets {args.targets!r} is not a comma-separated list of numbers") from None
        for t in targets:
            run.fx.router.check_target(t)
        out = Path(args.out)
        exported = export_targets(run, targets, out / "exported", include_full=False)
        threads = run.cfg.threads
        del run
        run_dir = Path(args.run_dir)
        flex_files = [run_dir / "final", run_dir / "final_routers", run_dir / "latency_table.json"]
        disk = {
            "flextron_bytes": sum(dir_bytes(p) if p.is_dir() else p.stat().st_size for p in flex_files),
            "flextron_weight_bytes": dir_bytes(run_dir / "final", "*.safetensors")
            + dir_bytes(run_dir / "final_routers", "*.safetensors"),
            "separate_bytes": sum(dir_bytes(p) for p, _ in exported.values()),
            "separate_weight_bytes": sum(dir_bytes(p, "*.safetensors") for p, _ in exported.values()),
        }
        mem = serving_memory(
            {"flextron": ("flextron", [run_dir]), "separate": ("separate", [p for p, _ in exported.values()])},
            targets,
            device=str(device),
            new_tokens=args.new_tokens,
            threads=threads,
        )
        ratios = {
            "disk_separate_over_flextron": disk["separate_bytes"] / disk["flextron_bytes"],
            "serving_rss_separate_over_flextron": mem["separate"]["serving_rss_bytes"]
            / max(1, mem["flextron"]["serving_rss_bytes"]),
            "peak_rss_separate_over_flextron": mem["separate"]["peak_rss_bytes"]
            / max(1, mem["flextron"]["peak_rss_bytes"]),
        }
        write_json(
            out / "serving_memory.json",
            {
                "run_dir": str(run_dir),
                "targets": targets,
                "device": str(device),
                "disk": disk,
                "memory": mem,
                "ratios": ratios,
            },
        )
        mib = lambda b: None if b is None else f"{b / 2**20:.1f}"  # noqa: E731
        print(f"\nwrote {out / 'serving_memory.json'}; {len(targets)} targets {targets}\n")
        rows = [
            [
                "disk, all files (MiB)",
                mib(disk["flextron_bytes"]),
                mib(disk["separate_bytes"]),
                ratios["disk_separate_over_flextron"],
            ],
            [
                "disk, weights (MiB)",
                mib(disk["flextron_weight_bytes"]),
                mib(disk["separate_weight_bytes"]),
                disk["separate_weight_bytes"] / max(1, disk["flextron_weight_bytes"]),
            ],
            [
                "RSS after loading (MiB)",
                mib(mem["flextron"]["loaded_rss_bytes"]),
                mib(mem["separate"]["loaded_rss_bytes"]),
                mem["separate"]["loaded_rss_bytes"] / max(1, mem["flextron"]["loaded_rss_bytes"]),
            ],
            [
                "RSS serving all N (MiB)",
                mib(mem["flextron"]["serving_rss_bytes"]),
                mib(mem["separate"]["serving_rss_bytes"]),
                ratios["serving_rss_separate_over_flextron"],
            ],
            [
                "peak RSS (MiB)",
                mib(mem["flextron"]["peak_rss_bytes"]),
                mib(mem["separate"]["peak_rss_bytes"]),
                ratios["peak_rss_separate_over_flextron"],
            ],
        ]
        if device.type == "cuda":
            rows.append(
                [
                    "CUDA peak allocated (MiB)",
                    mib(mem["flextron"]["cuda_peak_bytes"]),
                    mib(mem["separate"]["cuda_peak_bytes"]),
                    mem["separate"]["cuda_peak_bytes"] / max(1, mem["flextron"]["cuda_peak_bytes"]),
                ]
            )
        print(format_table(["", "flextron (1 checkpoint)", f"{len(targets)} separate", "separate / flextron"], rows))
        return 0

    from benchmarks.harness import script_main

    return script_main(body, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
