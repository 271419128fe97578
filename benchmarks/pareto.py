"""Quality baselines at equal training tokens: Flextron vs MatFormer-style, Minitron-style and
untrained cuts, plus the router and latency-table checks (issue 5).

    python benchmarks/pareto.py CONFIG --out OUT [--run-dir RUN] [--scale tiny|demo] [--set key=value ...]
        [--device cpu|cuda]

Without ``--run-dir`` the pipeline is run on CONFIG first (resumable; a finished run is reused).
Writes ``OUT/pareto.json`` (rows: method, target, latency_s, perplexity, perplexity_ci, params,
train_tokens, ...; paired comparisons; router and latency-table checks) and ``OUT/pareto.png``,
and prints the table last. Baseline training runs in ``OUT/work/`` and resumes there.
"""

from __future__ import annotations

import argparse
import sys

from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the benchmarks package
from benchmarks.baselines import resolve_run, run_pareto, settings_for
from benchmarks.checks import summary_rows
from benchmarks.harness import format_table, parse_overrides, resolve_device, script_main
from flextron.report.plots import plot_pareto


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", nargs="?", help="run config (YAML); optional when --run-dir is given")
    ap.add_argument("--run-dir", help="a finished `flextron run` directory to reuse as the Flextron method")
    ap.add_argument("--out", required=True, help="output folder (pareto.json, pareto.png, work/)")
    ap.add_argument("--scale", default="demo", help="settings preset: tiny or demo (default demo)")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting (targets, random_search, search_batches, lut_configs, latency_repeats, methods)",
    )
    ap.add_argument(
        "--device", default="cpu", help="cpu or cuda (evaluation and timing; training uses accelerate's device)"
    )
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings only, no progress bars")
    args = ap.parse_args(argv)

    def body() -> int:
        from pathlib import Path

        settings = settings_for(args.scale, parse_overrides(args.set))
        device = resolve_device(args.device)
        run_dir = resolve_run(args.config, args.run_dir)
        res = run_pareto(run_dir, args.out, settings, device=device, progress=not args.quiet)
        plot_pareto(res["rows"], Path(args.out) / "pareto.png")
        b = res["token_budget"]
        print(
            f"\ntoken budget: Flextron {b['flextron_train_tokens']} weight-training tokens "
            f"(+{b['flextron_router_eval_tokens']} forward-only router tokens); "
            f"MatFormer {b['matformer_steps']} steps, "
            f"Minitron {b['minitron_steps_per_target']} steps per target, {b['tokens_per_step']} tokens per step"
        )
        for c in res["router_checks"]:
            h, r = c["homogeneous"], c["random_search"]
            print(
                f"router check @ {c['target']:g}: router ppl {c['router']['perplexity']:.2f} "
                f"(pred {c['router']['predicted_fraction']:.3f}); "
                f"best homogeneous {h['perplexity']:.2f} (pred {h['predicted_fraction']:.3f}): "
                f"router {h['router_vs']['verdict']}; "
                f"best of {r['candidates']} random {r['perplexity']:.2f} (pred {r['predicted_fraction']:.3f}): "
                f"router {r['router_vs']['verdict']}"
            )
        lut = res["lut_check"]
        if "skipped" in lut:
            print(f"latency table check: skipped ({lut['skipped']})")
        else:
            print(
                f"latency table check over {lut['n']} random configs: MAE {lut['mae_fraction']:.4f} of full latency "
                f"({1e3 * lut['mae_s']:.2f} ms), MAPE {lut['mape_fraction_pct']:.2f}%"
            )
        print(f"wrote {Path(args.out) / 'pareto.json'} and {Path(args.out) / 'pareto.png'}\n")
        print(
            format_table(
                [
                    "method",
                    "target",
                    "latency ms",
                    "lat/full",
                    "perplexity [95% CI]",
                    "params M",
                    "train tokens",
                    "vs Flextron",
                ],
                summary_rows(res),
            )
        )
        return 0

    return script_main(body, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
