"""Conversion time per stage at two model sizes, and its growth with size (issue 5).

    python benchmarks/conversion_scaling.py CONFIG --out OUT [--depth-mult 2] [--width-mult 1.333]
        [--extrapolate 1e9,8e9]

Runs the whole pipeline of CONFIG (its step counts, data and settings) twice, on randomly
initialised models: the geometry of CONFIG's model (e.g. SmolLM2-135M) and a deeper/wider one
(layers × depth-mult, KV groups, hidden and intermediate size × width-mult, same tokenizer).
Conversion cost does not depend on the weights' values, so random weights time it faithfully.
Per stage, the exponent ``k`` of ``time ∝ params^k`` through the two points extrapolates the
cost to larger models at the same token counts (the total as the sum of the stages). Runs resume in ``OUT/runs``. Writes
``OUT/conversion_scaling.json``; prints the table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for the benchmarks package


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config", help="run config (YAML); its model gives the base geometry and tokenizer")
    ap.add_argument("--out", required=True, help="output folder (conversion_scaling.json, models/, runs/)")
    ap.add_argument("--depth-mult", type=float, default=2.0, help="layer multiplier of the larger model (default 2)")
    ap.add_argument(
        "--width-mult", type=float, default=4 / 3, help="width multiplier of the larger model (default 4/3)"
    )
    ap.add_argument("--extrapolate", default="1e9,8e9", help="comma-separated parameter counts to extrapolate to")
    ap.add_argument("-q", "--quiet", action="store_true", help="warnings only")
    args = ap.parse_args(argv)

    def body() -> int:
        from transformers import AutoConfig

        import flextron
        from benchmarks.harness import format_table, write_json
        from benchmarks.measure import scaled_random_model
        from flextron.config import ModelConfig, to_dict
        from flextron.errors import ConfigError

        try:
            sizes_out = [float(x) for x in args.extrapolate.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"--extrapolate {args.extrapolate!r} is not a comma-separated list of numbers") from None
        if args.depth_mult < 1 or args.width_mult < 1 or (args.depth_mult == 1 and args.width_mult == 1):
            raise ConfigError(
                "--depth-mult and --width-mult must be >= 1 and not both 1 (the second model must be larger)"
            )
        cfg = flextron.load_config(args.config)
        if cfg.model.source == "smollm2":
            from flextron.data.assets import smollm2_model_dir

            base = smollm2_model_dir()
        else:
            base = Path(cfg.model.source).expanduser()
            if not (base / "config.json").is_file():
                raise ConfigError(
                    f"model.source {cfg.model.source!r} must be 'smollm2' or a Hugging Face directory "
                    "for this benchmark"
                )
        out = Path(args.out)
        results = []
        for label, dm, wm in (("base", 1.0, 1.0), ("larger", args.depth_mult, args.width_mult)):
            mdir = out / "models" / f"{label}_d{dm:g}_w{wm:.3g}"
            if not (mdir / "config.json").is_file():  # deterministic (seeded), so an existing one is reused
                scaled_random_model(
                    base, mdir, depth_mult=dm, width_mult=wm, divisor=cfg.elastic.mlp_divisor, seed=cfg.seed
                )
            c = AutoConfig.from_pretrained(mdir)
            info = {
                k: getattr(c, k)
                for k in (
                    "num_hidden_layers",
                    "hidden_size",
                    "intermediate_size",
                    "num_attention_heads",
                    "num_key_value_heads",
                )
            }
            rcfg = dataclasses.replace(
                cfg, name=mdir.name, out_dir=str(out / "runs"), model=ModelConfig(source=str(mdir))
            )
            run_dir = flextron.run(rcfg)
            stages = json.loads((run_dir / "stages.json").read_text())
            meta = json.loads((run_dir / "ranked" / "flextron.json").read_text())
            info["params"] = meta["search_space"]["total_params"]
            results.append(
                {
                    "label": label,
                    "depth_mult": dm,
                    "width_mult": wm,
                    "model": {"path": str(mdir), **info},
                    "run_dir": str(run_dir),
                    "stages": {k: {"wall_s": v["wall_s"], "tokens": v["tokens"]} for k, v in stages.items()},
                    "total_wall_s": sum(v["wall_s"] for v in stages.values()),
                }
            )
        a, b = results
        ratio = b["model"]["params"] / a["model"]["params"]
        scaling = {}
        for stage in list(a["stages"]) + ["total"]:
            ta = a["total_wall_s"] if stage == "total" else a["stages"][stage]["wall_s"]
            tb = b["total_wall_s"] if stage == "total" else b["stages"][stage]["wall_s"]
            k = math.log(tb / ta) / math.log(ratio) if ta > 0 and tb > 0 else None
            if stage == "total":  # each stage grows at its own rate: the total extrapolates as their sum
                ext = {
                    f"{p:.3g}": sum(v["extrapolated_s"][f"{p:.3g}"] or 0.0 for v in scaling.values()) for p in sizes_out
                }
            else:
                ext = {f"{p:.3g}": (ta * (p / a["model"]["params"]) ** k if k is not None else None) for p in sizes_out}
            scaling[stage] = {
                "base_s": ta,
                "larger_s": tb,
                "time_ratio": tb / ta if ta > 0 else None,
                "exponent": k,
                "extrapolated_s": ext,
            }
        res = {
            "config": to_dict(cfg),
            "sizes": results,
            "param_ratio": ratio,
            "scaling": scaling,
            "note": "time ∝ params^k through two points, at the config's token counts; a shared machine adds noise",
        }
        write_json(out / "conversion_scaling.json", res)
        print(
            f"\nwrote {out / 'conversion_scaling.json'}; base {a['model']['params'] / 1e6:.2f} M params "
            f"({a['model']['num_hidden_layers']} layers, hidden {a['model']['hidden_size']}), "
            f"larger {b['model']['params'] / 1e6:.2f} M "
            f"({b['model']['num_hidden_layers']} layers, hidden {b['model']['hidden_size']}): ×{ratio:.2f} params\n"
        )
        hdr = ["stage", "base s", "larger s", "time ×", "exponent k"] + [f"≈ s at {p:.3g}" for p in sizes_out]
        print(
            format_table(
                hdr,
                [
                    [st, v["base_s"], v["larger_s"], v["time_ratio"], v["exponent"], *v["extrapolated_s"].values()]
                    for st, v in scaling.items()
                ],
            )
        )
        return 0

    from benchmarks.harness import script_main

    return script_main(body, args.quiet)


if __name__ == "__main__":
    sys.exit(main())
