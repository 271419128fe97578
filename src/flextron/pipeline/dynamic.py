"""Dynamic routing on a finished run (``flextron dynamic RUN``, ``flextron eval RUN --dynamic``):
per-domain blocks, training of the dynamic router (:func:`train_dynamic_run`), and its evaluation
with the dynamic report (:func:`evaluate_dynamic_run`).
"""

from __future__ import annotations

import logging
from pathlib import Path

from flextron.config import DynamicConfig, RunConfig
from flextron.data.domains import domain_blocks, domain_documents
from flextron.eval.deploy_dynamic import load_dynamic_run
from flextron.eval.dynamic import append_dynamic_rows, evaluate_dynamic
from flextron.train.dynamic import train_dynamic

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- run-level entry points


def train_dynamic_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    cfg: DynamicConfig | None = None,
    *,
    ckpt_dir: str | Path | None = None,
    progress: bool = True,
) -> dict:
    """Train a dynamic router on a finished run (``flextron dynamic RUN``, and the run's ``dynamic``
    stage): ``cfg.train_blocks`` blocks per domain of ``cfg.seq_len`` tokens (0: the run's
    ``eval.seq_len``), written to ``out_dir`` (default ``RUN/dynamic``), checkpoints in ``ckpt_dir``
    (default ``out_dir/checkpoints``, see :func:`~flextron.train.dynamic.train_dynamic`). ``cfg``
    defaults to the run's ``dynamic`` section, else
    :class:`~flextron.config.DynamicConfig`'s defaults. Returns the summary of
    :func:`~flextron.train.dynamic.train_dynamic`.

    Raises:
        ModelError: unfinished run; TargetError: a target below the model's floor; DataError.
    """
    from flextron.eval.deploy import load_run, set_threads

    run = load_run(run_dir)
    cfg = cfg or run.cfg.dynamic or DynamicConfig()
    set_threads(run.cfg)
    out_dir = Path(out_dir) if out_dir is not None else run.run_dir / "dynamic"
    seq = cfg.seq_len or run.cfg.eval.seq_len
    pool, _ = domain_blocks(run.tokenizer, domain_documents(run.cfg), seq, cfg.train_blocks, 1, seed=run.cfg.seed)
    _, summary = train_dynamic(
        run.fx,
        run.fx.router,
        run.table,
        pool,
        cfg,
        out_dir,
        seed=run.cfg.seed,
        tokenizer=run.tokenizer,
        ckpt_dir=ckpt_dir,
        progress=progress,
    )
    return summary


def stage_dynamic(cfg: RunConfig, run_dir: Path) -> dict:
    """The run's ``dynamic`` stage: :func:`train_dynamic_run` into ``RUN/dynamic`` (checkpoints in
    ``RUN/dynamic/checkpoints``, resumable), then :func:`evaluate_dynamic_run` (rows in
    ``results.json``, ``dynamic_results.json``, ``dynamic_report.md``). Returns the stage summary."""
    d = cfg.dynamic
    summary = train_dynamic_run(run_dir, run_dir / "dynamic", d)
    res = evaluate_dynamic_run(
        run_dir, blocks_per_domain=d.eval_blocks, timed_blocks=d.timed_blocks, repeats=d.eval_repeats
    )
    evals = summary.get("routers", {}).get("llm_evaluations", 0)
    router_tokens = evals * (d.seq_len or cfg.eval.seq_len)
    joint_tokens = (summary.get("joint") or {}).get("tokens", 0)
    return {
        "tokens": router_tokens + joint_tokens,  # as the routers and joint stages count theirs
        "llm_evaluations": evals,
        "router_tokens": router_tokens,
        "joint_tokens": joint_tokens,
        "router_steps_with_surrogate_grad": summary.get("routers", {}).get("router_steps_with_surrogate_grad"),
        "validation": summary.get("validation"),
        "targets": {
            str(r["target"]): {
                "perplexity": r["perplexity"],
                "predicted_fraction": r["predicted_fraction"],
                "timed_fraction": r.get("timed_fraction"),
            }
            for r in res["dynamic"]
        },
    }


def evaluate_dynamic_run(
    run_dir: str | Path,
    dyn_dir: str | Path | None = None,
    *,
    targets: list[float] | None = None,
    blocks_per_domain: int | None = None,
    timed_blocks: int | None = None,
    repeats: int | None = None,
    progress: bool = True,
) -> dict:
    """``flextron eval RUN --dynamic``: :func:`evaluate_dynamic` on ``blocks_per_domain`` held-out
    blocks of every domain (sequence length ``eval.seq_len``), then :func:`append_dynamic_rows`
    and the dynamic report (``RUN/dynamic_report.md`` + PNGs). Returns the results. Settings left
    ``None`` come from the run's ``dynamic:`` section (else the defaults); at most
    ``blocks_per_domain`` blocks per domain are timed.

    Raises:
        ModelError: no run or no dynamic router; TargetError: a target the router was not trained for.
    """
    from flextron.eval.deploy import set_threads
    from flextron.report.dynamic import write_dynamic_report

    run, router, meta = load_dynamic_run(run_dir, dyn_dir)
    d = run.cfg.dynamic or DynamicConfig()
    blocks_per_domain = d.eval_blocks if blocks_per_domain is None else blocks_per_domain
    timed_blocks = min(blocks_per_domain, d.timed_blocks if timed_blocks is None else timed_blocks)
    repeats = d.eval_repeats if repeats is None else repeats
    if targets is not None:
        for t in targets:
            router.check_target(t)
    set_threads(run.cfg)
    _, held = domain_blocks(
        run.tokenizer, domain_documents(run.cfg), run.cfg.eval.seq_len, 1, blocks_per_domain, seed=run.cfg.seed
    )
    res = evaluate_dynamic(
        run,
        router,
        held,
        targets=targets,
        timed_blocks=timed_blocks,
        repeats=repeats,
        per_token=bool(meta.get("per_token")),
        batch_size=run.cfg.eval.batch_size,
        progress=progress,
    )
    res["router_summary"] = meta.get("summary")
    append_dynamic_rows(run.run_dir, res)
    dyn_dir = Path(dyn_dir) if dyn_dir is not None else run.run_dir / "dynamic"
    write_dynamic_report(run.run_dir, res, dyn_dir / "metrics.jsonl")
    return res
