"""Command line: a thin layer over :mod:`flextron.pipeline` (parse, call, print).

``flextron run CONFIG``, ``flextron export RUN --target T --out DIR``, ``flextron eval RUN``,
``flextron generate RUN --target T PROMPT``, ``flextron dynamic RUN`` (input-adaptive routers; ``eval`` and
``generate`` take ``--dynamic``). Errors the user can cause (every
:class:`~flextron.errors.FlextronError`, and ``OSError`` on paths they gave) print one line
``error: <message>`` to stderr and exit with status 2; Ctrl-C exits with 130. The pipeline is
imported inside the command functions so ``--help`` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from flextron.errors import FlextronError, TargetError
from flextron.version import __version__

log = logging.getLogger("flextron")

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad command-line arguments (raised instead of argparse's multi-line usage + exit)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def parse_target(text: str) -> float:
    """A latency target: a number in (0, 1], the fraction of the full model's latency."""
    try:
        t = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"target {text!r} is not a number; give a fraction in (0, 1] such as 0.6"
        ) from None
    if not (0 < t <= 1):  # also rejects nan
        raise argparse.ArgumentTypeError(f"target {text!r} is out of range; give a fraction in (0, 1] such as 0.6")
    return t


def parse_deploy_target(text: str) -> float | str:
    """A deployment target: a fraction in (0, 1] (:func:`parse_target`) or milliseconds of the run's
    lookup-table workload, ``250ms`` (kept as text; the run's table converts it)."""
    from flextron.eval.deploy import target_milliseconds

    try:
        ms = target_milliseconds(text)
    except TargetError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return parse_target(text) if ms is None else text.strip().lower()


def parse_targets(text: str) -> list[float]:
    """Comma-separated targets, each in (0, 1]: ``0.6,0.7,0.85,1.0``."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("give at least one target, e.g. 0.6,0.7,0.85,1.0")
    return [parse_target(p) for p in parts]


def parse_tasks(text: str) -> list[str]:
    """Comma-separated downstream task names: ``arc_easy,piqa``."""
    from flextron.eval.tasks import TASKS

    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"give at least one task, from {','.join(TASKS)}")
    bad = [p for p in parts if p not in TASKS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown task {bad[0]!r}; choose from {','.join(TASKS)}")
    return parts


def _nonnegative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return n


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 1")
    return n


# --------------------------------------------------------------------------- commands


def cmd_run(args: argparse.Namespace) -> int:
    from flextron.config import load_config

    cfg = load_config(args.config)  # config errors surface before the (heavy) pipeline import
    from flextron.model.sources import check_model_source

    check_model_source(cfg.model.source)  # an unsupported family too: from its GGUF header or config.json
    from flextron.pipeline import runner as pipeline

    run_dir = Path(pipeline.run(cfg, overwrite=args.overwrite))
    if os.environ.get("RANK", "0") == "0":  # under accelerate launch every process gets here; one reports
        print(f"run directory: {run_dir}")
        print(f"report: {run_dir / 'report.md'}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from flextron.eval.deploy import export_target

    out = export_target(Path(args.run), args.target, Path(args.out), overwrite=args.overwrite, dtype=args.dtype)
    print(f"exported target {args.target if isinstance(args.target, str) else format(args.target, 'g')} to {out}")
    try:
        info = json.loads((Path(out) / "flextron_subnetwork.json").read_text())
    except (OSError, ValueError):
        return 0
    if info.get("dtype"):
        print(f"dtype: {info['dtype']} ({info.get('dtype_from')}; --dtype float32|bfloat16|float16 to choose)")
    if info.get("heterogeneous"):
        print(
            "load it with AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) (it ships hf_modeling.py)"
        )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from flextron.pipeline import runner as pipeline

    run_dir = Path(args.run)
    if args.dynamic or args.dynamic_only:
        from flextron.pipeline.dynamic import evaluate_dynamic_run
        from flextron.routing.store import require_dynamic

        require_dynamic(args.dynamic_dir or run_dir / "dynamic")  # before a long static evaluation
        if not args.dynamic_only:
            pipeline.evaluate_run(
                run_dir, args.targets, tasks=args.tasks, limit=args.limit, num_fewshot=args.num_fewshot
            )
        targets = [t for t in args.targets if t < 1.0] if args.targets else None
        res = evaluate_dynamic_run(
            run_dir,
            args.dynamic_dir,
            targets=targets,
            blocks_per_domain=args.blocks_per_domain,
            timed_blocks=args.timed_blocks,
        )
        for r in res["dynamic"]:
            v = r["vs_static_predicted"]
            print(
                f"target {r['target']:g} (dynamic): average predicted latency {r['predicted_fraction']:.3f} of full "
                f"({100 * r['predicted_latency_error']:+.1f}%), perplexity {r['perplexity']:.2f}"
                + (f", static at equal latency {v['static_ppl']:.2f} ({v['verdict']})" if "static_ppl" in v else "")
            )
        print(f"report: {run_dir / 'dynamic_report.md'}")
        return 0
    results = pipeline.evaluate_run(
        run_dir, args.targets, tasks=args.tasks, limit=args.limit, num_fewshot=args.num_fewshot
    )
    for row in results.get("rows", []) if isinstance(results, dict) else []:
        if row.get("mode", "static") != "static" or (args.targets and row.get("target") not in args.targets):
            continue  # rows kept from earlier evaluations
        ppl, lat = row.get("perplexity"), row.get("latency_s")
        print(
            f"target {row.get('target', float('nan')):g}: perplexity "
            + (f"{ppl:.2f}" if isinstance(ppl, (int, float)) else "n/a")
            + (f", timed latency {1e3 * lat:.1f} ms" if isinstance(lat, (int, float)) else "")
        )
        for name, res in (row.get("tasks") or {}).items():
            shown = ", ".join(f"{k} {v:.4g}" for k, v in res.items() if k != "n" and not k.endswith("_stderr"))
            print(f"  {name}: {shown} ({res.get('n')} items)")
    print(f"results: {run_dir / 'results.json'} (rows of other targets and earlier evaluations kept)")
    print(f"report: {run_dir / 'report.md'}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from flextron.eval.deploy import generate_text

    if args.dynamic:
        from flextron.eval.deploy_dynamic import generate_dynamic

        if isinstance(args.target, str):
            raise TargetError(f"--dynamic takes a fraction target in (0, 1], not {args.target}")

        text = generate_dynamic(
            Path(args.run),
            args.target,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            dyn_dir=args.dynamic_dir,
            truncate=args.truncate,
        )
    else:
        text = generate_text(
            Path(args.run), args.target, args.prompt, max_new_tokens=args.max_new_tokens, truncate=args.truncate
        )
    print(args.prompt + text)  # the prompt, then its continuation
    return 0


def cmd_dynamic(args: argparse.Namespace) -> int:
    from flextron.config import config_from_overrides, load_config
    from flextron.pipeline.dynamic import train_dynamic_run

    saved = Path(args.run) / "config.yaml"
    cfg = config_from_overrides(
        load_config(saved).dynamic if saved.is_file() else None,
        targets=tuple(args.targets) if args.targets else None,
        steps=args.steps,
        latency_weight=args.latency_weight,
        surrogate=False if args.direct else None,
        route_every=args.route_every,
        train_blocks=args.train_blocks,
        per_token=True if args.per_token else None,
        joint_steps=args.joint_steps,
    )
    out = Path(args.out) if args.out else Path(args.run) / "dynamic"
    summary = train_dynamic_run(Path(args.run), out, cfg)
    timing = summary.get("timing", {})
    for t, c in summary["calibration"].items():
        tm = (
            (
                f"; one block timed {timing[t]['timed_fraction']:.3f} against a predicted "
                f"{timing[t]['predicted_fraction']:.3f} "
                f"(router overhead {100 * timing[t]['overhead_fraction']:+.1f}%)"
            )
            if t in timing
            else ""
        )
        print(
            f"target {t}: average predicted latency {c['mean_fraction']:.3f} of full, budget {c['budget']:.3f} "
            f"({100 * c['error']:+.1f}%) on the calibration blocks{tm}"
        )
    val = summary.get("validation") or {}
    if val:
        nll = val["nll"]
        print(
            f"kept the {val['kept'].replace('_', ' ')} router: routed NLL {nll['trained']:.4f} trained against "
            f"{nll['warm_start']:.4f} for the warm start (both calibrated)"
        )
    print(f"dynamic router: {out / 'router'}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    # -v/-q are accepted before or after the sub-command (SUPPRESS keeps the sub-parser from
    # overwriting a value given before it).
    common = _Parser(add_help=False)
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more logging (-vv: debug)")
    common.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only warnings and errors"
    )

    p = _Parser(
        prog="flextron",
        parents=[common],
        description="Turn a pretrained Hugging Face decoder into a many-in-one elastic model (Flextron).",
    )
    p.add_argument("--version", action="version", version=f"flextron {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    r = sub.add_parser(
        "run",
        parents=[common],
        help="run every stage (resumable); writes OUT_DIR/NAME/",
        description="Run the whole conversion described by a YAML config. A finished stage is "
        "skipped; an interrupted one resumes from its last checkpoint.",
    )
    r.add_argument("config", metavar="CONFIG", help="YAML run config, e.g. configs/smollm2.yaml")
    r.add_argument("--overwrite", action="store_true", help="start over even if the run directory holds another run")
    r.set_defaults(func=cmd_run)

    e = sub.add_parser("export", parents=[common], help="save the sub-network of one target as a HF checkpoint")
    e.add_argument("run", metavar="RUN", help="run directory (runs/<name>)")
    e.add_argument(
        "--target",
        type=parse_deploy_target,
        required=True,
        help="latency target: a fraction in (0, 1] of the full model's latency, e.g. 0.6, or milliseconds of the "
        "lookup table's workload on the machine that measured it, e.g. 250ms",
    )
    e.add_argument("--out", required=True, metavar="DIR", help="output directory")
    e.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty output directory (never a run directory, nor one that contains or holds a run)",
    )
    e.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default=None,
        help="dtype of the saved weights (default: the source model's dtype, float32 when unknown)",
    )
    e.set_defaults(func=cmd_export)

    v = sub.add_parser(
        "eval",
        parents=[common],
        help="re-evaluate a run; updates its rows of results.json (keeping the others) and rewrites report.md",
    )
    v.add_argument("run", metavar="RUN", help="run directory (runs/<name>)")
    v.add_argument(
        "--targets",
        type=parse_targets,
        default=None,
        help="comma-separated targets in (0, 1] (default: the config's eval.targets), e.g. 0.6,0.7,0.85,1.0",
    )
    v.add_argument(
        "--tasks",
        type=parse_tasks,
        default=None,
        help="downstream tasks scored with lm-eval at every target, from "
        "arc_easy,lambada,piqa,winogrande,mmlu,hellaswag "
        "(default: the config's eval.tasks at eval.task_targets)",
    )
    v.add_argument(
        "--limit",
        type=_positive_int,
        default=None,
        metavar="N",
        help="items per task: a fixed seeded subset, the same in every run (default: eval.task_limit; all)",
    )
    v.add_argument(
        "--num-fewshot",
        type=_nonnegative_int,
        default=None,
        metavar="K",
        help="few-shot examples for every task (default: each task's protocol: MMLU 5, HellaSwag 10, others 0)",
    )
    v.add_argument(
        "--dynamic",
        action="store_true",
        help="also evaluate the dynamic router (RUN/dynamic): per-domain compute, "
        "dynamic vs static at equal latency; adds mode=dynamic rows and writes dynamic_report.md",
    )
    v.add_argument(
        "--dynamic-only", action="store_true", help="like --dynamic, without re-running the static evaluation"
    )
    v.add_argument("--dynamic-dir", default=None, metavar="DIR", help="dynamic router directory (default RUN/dynamic)")
    v.add_argument(
        "--blocks-per-domain",
        type=_positive_int,
        default=None,
        metavar="N",
        help="held-out blocks per domain (default: the run's dynamic.eval_blocks, else 8)",
    )
    v.add_argument(
        "--timed-blocks",
        type=_nonnegative_int,
        default=None,
        metavar="N",
        help="blocks per domain timed for every static and dynamic point (default: the run's dynamic.timed_blocks, "
        "else 2; 0 = predicted latency only)",
    )
    v.set_defaults(func=cmd_eval)

    g = sub.add_parser("generate", parents=[common], help="generate text with the sub-network of one target")
    g.add_argument("run", metavar="RUN", help="run directory (runs/<name>)")
    g.add_argument(
        "--target",
        type=parse_deploy_target,
        required=True,
        help="latency target: a fraction in (0, 1], e.g. 0.5, or milliseconds of the lookup table's workload, "
        "e.g. 250ms (static routing only)",
    )
    g.add_argument(
        "--max-new-tokens", type=_positive_int, default=64, metavar="N", help="tokens to generate (default 64)"
    )
    g.add_argument(
        "--dynamic", action="store_true", help="let the prompt choose its sub-network (dynamic router, RUN/dynamic)"
    )
    g.add_argument("--dynamic-dir", default=None, metavar="DIR", help="dynamic router directory (default RUN/dynamic)")
    g.add_argument(
        "--truncate",
        action="store_true",
        help="keep only the last tokens of a prompt longer than the context (max_position_embeddings minus "
        "--max-new-tokens); without it such a prompt is refused",
    )
    g.add_argument("prompt", metavar="PROMPT", help="text to continue")
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser(
        "dynamic",
        parents=[common],
        help="train input-adaptive (dynamic) routers on a finished run",
        description="Train dynamic routers (warm start from the run's static router, training through the "
        "surrogate, kept only if better than the warm start, latency price calibrated so the average "
        "predicted latency meets each target) on Wikipedia, Shakespeare and Python source; writes OUT "
        "(default RUN/dynamic). Settings not given here come from the run's `dynamic:` section, if any "
        "(the defaults below apply without one). "
        "Interrupted, it resumes from OUT/checkpoints.",
    )
    d.add_argument("run", metavar="RUN", help="run directory (runs/<name>)")
    d.add_argument("--out", default=None, metavar="DIR", help="output directory (default RUN/dynamic)")
    d.add_argument("--targets", type=parse_targets, default=None, help="targets served (default 0.6,0.7,0.85,1.0)")
    d.add_argument(
        "--steps", type=_nonnegative_int, default=None, metavar="N", help="router training steps (default 30)"
    )
    d.add_argument(
        "--train-blocks", type=_positive_int, default=None, metavar="N", help="training blocks per domain (default 16)"
    )
    d.add_argument(
        "--latency-weight", type=float, default=None, metavar="λ", help="weight of the latency loss (default 10)"
    )
    d.add_argument(
        "--direct", action="store_true", help="ablation: train through the LM loss (soft masks), no surrogate"
    )
    d.add_argument("--per-token", action="store_true", help="per-token MLP routing (grouped by width)")
    d.add_argument(
        "--route-every",
        type=_positive_int,
        default=None,
        metavar="K",
        help="layers that share one read of the hidden state (default 3; 1 = every layer reads its own input)",
    )
    d.add_argument(
        "--joint-steps",
        type=_nonnegative_int,
        default=None,
        metavar="N",
        help="joint fine-tuning steps of model and router afterwards (default 0; the model is saved to OUT/model)",
    )
    d.set_defaults(func=cmd_dynamic)
    return p


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.DEBUG if verbose >= 2 else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    if verbose < 2:  # third-party chatter only with -vv
        for name in ("urllib3", "filelock", "matplotlib", "PIL"):
            logging.getLogger(name).setLevel(max(level, logging.WARNING))


def _one_line(e: BaseException) -> str:
    msg = str(e).strip() or type(e).__name__
    return " ".join(line.strip() for line in msg.splitlines() if line.strip())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``flextron`` command; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    _setup_logging(getattr(args, "verbose", 0) or 0, bool(getattr(args, "quiet", False)))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        hint = "; run the same command again to resume" if getattr(args, "command", None) == "run" else ""
        print(f"\ninterrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (FlextronError, OSError) as e:
        log.debug("details", exc_info=True)
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
