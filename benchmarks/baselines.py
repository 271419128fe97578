"""Quality baselines at equal training tokens, and checks of the router and the latency table
(issue 5; ``benchmarks/pareto.py`` is the command line).

Input: a finished run directory (its config fixes the base model, data, held-out set and the
training-token budget) and :class:`ParetoSettings`. Output: one dict, written as ``pareto.json``,
with one row per method and target and paired comparisons with bootstrap intervals.

Methods, all evaluated on the run's held-out blocks and timed as exported sub-models:

- ``flextron``: the run's final model at the router's configuration of each target.
- ``matformer`` / ``matformer_unpermuted``: the same elastic training loop
  (:func:`~flextron.train.elastic.train_elastic`) with homogeneous sampling (uniform over the
  deployable homogeneous configurations, :class:`~flextron.train.loop.BudgetSampler`) and no routers, from the
  importance-permuted and from the unpermuted original model, for all of Flextron's weight-training
  tokens (elastic + joint stages); deployed, per target, at the trained homogeneous configuration
  within the target of least loss on training text (the router stage's blocks, as in the router
  checks); the one nearest the target is recorded beside it.
- ``minitron``: for each target, one-shot importance pruning to Flextron's configuration of that
  target, then distillation fine-tuning of that sub-network alone (the same loop with a fixed
  configuration); the token budget is split evenly between the targets (N separate models).
- ``untrained`` / ``untrained_unpermuted``: Flextron's configuration cut out of the permuted and
  the unpermuted original model, no training.

Router checks: at the router configuration's predicted latency, the best homogeneous
configuration and the best of a random search (both selected on the true loss of training text)
against the router's, on held-out perplexity. Latency-table check: predicted vs timed fraction
of full latency over random configurations (mean absolute error). Both live in
:mod:`benchmarks.checks`, with the rows of the printed table.
"""

from __future__ import annotations
import copy
import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
import torch
from flextron.eval.stats import paired_comparison
from benchmarks.checks import lut_check, router_checks, search_batches, search_loss
from benchmarks.harness import write_json
from flextron.config import RunConfig, from_dict, load_config, to_dict
from flextron.model.space import ArchConfig
from flextron.model.elastic import ElasticModel, convert
from flextron.errors import ConfigError
from flextron.eval.perplexity import perplexity
from flextron.model.export import export_subnetwork, load_elastic
from flextron.cost.timing import paired_ratio, prefill_fn, time_models
from flextron.train.loop import BudgetSampler, homogeneous_for_target
from flextron.train.distributed import make_accelerator
from flextron.train.elastic import train_elastic

log = logging.getLogger(__name__)

METHODS = ("flextron", "matformer", "matformer_unpermuted", "minitron", "untrained", "untrained_unpermuted")


@dataclass(frozen=True)
class ParetoSettings:
    """What the Pareto benchmark measures besides the run's own config.

    ``targets``: latency targets (fractions of full latency, sorted, in (0, 1]);
    ``random_search``: random configurations per target in the router check; ``search_batches``:
    batches of training text that score them (true loss); ``lut_configs``: random configurations
    timed to check the latency table (0 skips); ``latency_repeats``: timed rounds per
    sub-model; ``methods``: the methods to run (``flextron`` always included).
    """

    targets: tuple[float, ...] = (0.6, 0.7, 0.85, 1.0)
    random_search: int = 16
    search_batches: int = 2
    lut_configs: int = 20
    latency_repeats: int = 7
    methods: tuple[str, ...] = METHODS

    def __post_init__(self) -> None:
        if not self.targets or any(not 0 < t <= 1 for t in self.targets) or list(self.targets) != sorted(self.targets):
            raise ConfigError(f"targets={list(self.targets)} is invalid: give sorted fractions in (0, 1]")
        for k in ("random_search", "search_batches"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k}={getattr(self, k)} is invalid: must be >= 1")
        if self.lut_configs < 0:
            raise ConfigError(f"lut_configs={self.lut_configs} is invalid: must be >= 0")
        if self.latency_repeats < 3:
            raise ConfigError(f"latency_repeats={self.latency_repeats} is invalid: must be >= 3")
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown or "flextron" not in self.methods:
            raise ConfigError(
                f"methods={list(self.methods)} is invalid: choose from {list(METHODS)}, flextron included"
            )


PRESETS = {
    "tiny": ParetoSettings(
        targets=(0.6, 0.8, 1.0), random_search=3, search_batches=1, lut_configs=4, latency_repeats=3
    ),
    # sized so that the real SmolLM2 demo run (2 CPU cores) stays under an hour: baseline training
    # is ~3× Flextron's tokens
    "demo": ParetoSettings(random_search=8, search_batches=1, lut_configs=20, latency_repeats=5),
}


def settings_for(scale: str, overrides: dict | None = None) -> ParetoSettings:
    """The preset ``scale`` (``tiny`` or ``demo``) with ``overrides`` (field → value) applied.

    Raises:
        ConfigError: unknown scale, unknown field or invalid value.
    """
    if scale not in PRESETS:
        raise ConfigError(f"--scale {scale!r} is unknown; choose one of {sorted(PRESETS)}")
    return from_dict(ParetoSettings, {**to_dict(PRESETS[scale]), **(overrides or {})}, "settings")


# --------------------------------------------------------------------------- token budget


def flextron_train_tokens(cfg: RunConfig) -> int:
    """Tokens that update Flextron's weights: elastic training plus joint fine-tuning. (The router
    stage only runs forward passes of the frozen model; reported apart.)"""
    t, j = cfg.train, cfg.joint
    return t.steps * t.batch_size * t.grad_accum * t.seq_len + j.steps * j.batch_size * j.seq_len


def _steps_for(tokens: float, cfg: RunConfig) -> int:
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.train.seq_len
    return max(1, round(tokens / per_step))


@dataclass
class FixedSampler:
    """A "sampler" for :func:`~flextron.train.elastic.train_elastic` that always returns one
    configuration: fine-tuning a single pruned sub-network with the elastic loop (only the kept
    slices get gradients, so this is training the pruned model)."""

    arch: ArchConfig
    budget: float | None

    def sample(self, gen: torch.Generator) -> tuple[ArchConfig, float | None]:
        return self.arch, self.budget


# --------------------------------------------------------------------------- run resolution


def resolve_run(config_path: str | Path | None, run_dir: str | Path | None, *, overwrite: bool = False) -> Path:
    """The finished run directory to benchmark: ``run_dir`` (whose config must equal
    ``config_path`` when both are given), else the result of running the pipeline on
    ``config_path`` (resumable: a finished run is reused).

    Raises:
        ConfigError: neither given, or the two configs differ.
    """
    from flextron.pipeline.runner import run as run_pipeline

    if run_dir is None and config_path is None:
        raise ConfigError("give a CONFIG, a finished run directory (--run-dir), or both")
    if run_dir is not None:
        run_dir = Path(run_dir)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"{run_dir} is not a flextron run directory (no config.yaml)")
        if config_path is not None:
            a, b = to_dict(load_config(config_path)), to_dict(load_config(saved))
            for d in (a, b):
                d.pop("out_dir"), d.pop("name")
            if a != b:
                diff = sorted(k for k in a if a[k] != b[k])
                raise ConfigError(
                    f"{config_path} and {saved} differ in {', '.join(diff)}; the baselines must share the run's config"
                )
        return run_dir
    return run_pipeline(load_config(config_path), overwrite=overwrite)


# --------------------------------------------------------------------------- the benchmark


class _Work:
    """Per-baseline scratch directories. Training resumes from their checkpoints; a directory
    written for a different training spec is wiped first, so stale weights are never reused."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def dir(self, name: str, spec: dict) -> Path:
        d = self.root / name
        f = d / "spec.json"
        if d.exists() and (not f.is_file() or json.loads(f.read_text()) != spec):
            shutil.rmtree(d)
        d.mkdir(parents=True, exist_ok=True)
        write_json(f, spec)
        return d


def run_pareto(
    run_dir: str | Path,
    out: str | Path,
    settings: ParetoSettings,
    *,
    device: torch.device | None = None,
    progress: bool = True,
) -> dict:
    """Train and evaluate every method of ``settings.methods`` at ``settings.targets`` against the
    finished run ``run_dir``; the router and latency-table checks; returns the results (see the
    module docstring) and writes ``out/pareto.json``. Baseline training happens in
    ``out/work/`` and resumes there.

    Raises:
        ModelError: the run is not finished; TargetError: a target below the smallest
        sub-network.
    """
    from flextron.data.inputs import make_inputs
    from flextron.model.export import load_original
    from flextron.eval.deploy import set_threads, load_run

    t_start = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = load_run(run_dir)
    cfg, table, space = run.cfg, run.table, run.fx.space
    for t in settings.targets:
        run.fx.router.check_target(t)
    set_threads(cfg)
    device = device or torch.device("cpu")
    original, tok = load_original(cfg)
    inp = make_inputs(cfg, tok or run.tokenizer)
    original.eval().requires_grad_(False)
    work = _Work(out / "work")
    wall: dict[str, float] = {}

    fx = run.fx.to(device)
    archs = {t: fx.set_target(t) for t in settings.targets}
    fx.set_arch(None)
    homo = {t: homogeneous_for_target(space, table, t, cfg.routers.latency_tol) for t in settings.targets}
    budget = flextron_train_tokens(cfg)
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.train.seq_len
    results: dict[tuple[str, float], dict] = {}

    def evaluate(model: torch.nn.Module, arch: ArchConfig) -> dict:
        model.to(device)
        if isinstance(model, ElasticModel):
            model.set_arch(arch)
        r = perplexity(model, inp.heldout, batch_size=cfg.eval.batch_size, progress=False)
        if isinstance(model, ElasticModel):
            model.set_arch(None)
        return {"perplexity": r["perplexity"], "perplexity_ci": r["ci95"], "nll_per_block": r["nll_per_block"]}

    def record(method: str, t: float, arch: ArchConfig, tokens: int, ev: dict) -> None:
        results[(method, t)] = {
            "method": method,
            "target": t,
            "config": arch.to_dict(),
            "homogeneous": arch.is_homogeneous,
            "params": space.num_parameters(arch),
            "predicted_fraction": table.fraction(arch),
            "train_tokens": tokens,
            **ev,
        }
        log.info("%s @ %.2f: perplexity %.2f", method, t, ev["perplexity"])

    def train(fx_b: ElasticModel, name: str, steps: int, sampling: str, sampler=None, extra_spec=None) -> dict:
        tcfg = dataclasses.replace(
            cfg.train, steps=steps, sampling=sampling, checkpoint_every=min(cfg.train.checkpoint_every, steps)
        )
        spec = {"run_dir": str(Path(run_dir).resolve()), "train": to_dict(tcfg), "seed": cfg.seed, **(extra_spec or {})}
        acc = make_accelerator(tcfg.grad_accum)
        teacher = original.to(acc.device)
        return train_elastic(
            fx_b,
            teacher,
            inp.train,
            tcfg,
            table,
            work.dir(name, spec),
            seed=cfg.seed,
            accelerator=acc,
            min_fraction=min(cfg.routers.targets),
            sampler=sampler,
            progress=progress,
        )

    # -- Flextron and the untrained cuts ------------------------------------------------------------
    s0 = time.time()
    for t in settings.targets:
        record("flextron", t, archs[t], budget, evaluate(fx, archs[t]))
    ranked = load_elastic(Path(run_dir) / "ranked")
    unpermuted = convert(copy.deepcopy(original).requires_grad_(True), cfg.elastic)
    for method, model in (("untrained", ranked), ("untrained_unpermuted", unpermuted)):
        if method in settings.methods:
            for t in settings.targets:
                record(method, t, archs[t], 0, evaluate(model, archs[t]))
    wall["flextron_and_untrained_eval"] = time.time() - s0

    # -- MatFormer-style: homogeneous sampling, no routers --------------------------------------------
    mat_steps = _steps_for(budget, cfg)
    search = search_batches(inp, cfg, settings, device)
    pool = BudgetSampler(space, table, mode="homogeneous", min_fraction=min(cfg.routers.targets)).homogeneous_pool() + [
        space.full()
    ]
    for method, model in (("matformer", ranked), ("matformer_unpermuted", unpermuted)):
        if method not in settings.methods:
            continue
        s0 = time.time()
        train(model, method, mat_steps, "homogeneous")
        model.to(device)
        for t in settings.targets:
            # MatFormer's deployment: among its trained homogeneous configurations within the target,
            # the one of least loss on training text (the one nearest the target is reported beside it)
            cands = [a for a in pool if table.fraction(a) <= t * (1 + cfg.routers.latency_tol)] or [homo[t]]
            scored = sorted(((search_loss(model, a, search), a) for a in cands), key=lambda x: x[0])
            arch = scored[0][1]
            sel = {
                "candidates": [
                    {"config": a.to_dict(), "predicted_fraction": table.fraction(a), "search_loss": l}
                    for l, a in scored
                ],
                "nearest": homo[t].to_dict(),
            }
            record(method, t, arch, mat_steps * per_step, {**evaluate(model, arch), "selection": sel})
        wall[method] = time.time() - s0
    del ranked, unpermuted

    # -- Minitron-style: prune to each target's configuration, distil each separately ------------------
    if "minitron" in settings.methods:
        s0 = time.time()
        steps = _steps_for(budget / len(settings.targets), cfg)
        for t in settings.targets:
            pruned = load_elastic(Path(run_dir) / "ranked")
            arch = archs[t]
            frac = None if arch == space.full() else table.fraction(arch)
            train(
                pruned, f"minitron_{t:g}", steps, cfg.train.sampling, FixedSampler(arch, frac), {"arch": arch.to_dict()}
            )
            record("minitron", t, arch, steps * per_step, evaluate(pruned, arch))
            del pruned
        wall["minitron"] = time.time() - s0

    # -- latency of every deployed configuration, one interleaved session --------------------------------
    s0 = time.time()
    fx.to(device).eval()
    ids = torch.randint(
        0,
        fx.config.vocab_size,
        (cfg.latency.batch_size, cfg.latency.seq_len),
        generator=torch.Generator().manual_seed(0),
    ).to(device)
    distinct = sorted({ArchConfig.from_dict(r["config"]) for r in results.values()}, key=table.predict)
    fns = {"full": prefill_fn(export_subnetwork(fx, space.full()), ids)}
    fns.update({f"c{i}": prefill_fn(export_subnetwork(fx, a), ids) for i, a in enumerate(distinct)})
    timing = time_models(
        fns, repeats=settings.latency_repeats, warmup=2, progress=progress, desc="latency of deployed configs"
    )
    lat = {a: (timing[f"c{i}"]["median_s"], paired_ratio(timing, f"c{i}", "full")) for i, a in enumerate(distinct)}
    del fns
    for r in results.values():
        r["latency_s"], r["latency_ratio"] = lat[ArchConfig.from_dict(r["config"])]
    wall["latency"] = time.time() - s0

    # -- comparisons: Flextron against every other method, paired over held-out blocks ----------------------
    comparisons = []
    for t in settings.targets:
        ref = results[("flextron", t)]
        for m in settings.methods:
            if m != "flextron" and (m, t) in results:
                c = paired_comparison(ref["nll_per_block"], results[(m, t)]["nll_per_block"])
                comparisons.append(
                    {
                        "target": t,
                        "flextron_vs": m,
                        "flextron_perplexity": ref["perplexity"],
                        "other_perplexity": results[(m, t)]["perplexity"],
                        **c,
                    }
                )

    s0 = time.time()
    checks = router_checks(fx, table, archs, inp, cfg, settings, results, evaluate, progress=progress)
    wall["router_checks"] = time.time() - s0
    s0 = time.time()
    lut = lut_check(fx, table, cfg, settings, progress=progress)
    wall["lut_check"] = time.time() - s0
    wall["total"] = time.time() - t_start

    res = {
        "run_dir": str(run_dir),
        "settings": to_dict(settings),
        "config": to_dict(cfg),
        "heldout": {"blocks": int(inp.heldout.shape[0]), "seq_len": int(inp.heldout.shape[1])},
        "token_budget": {
            "flextron_train_tokens": budget,
            "flextron_router_eval_tokens": _stage_tokens(Path(run_dir), "routers"),
            "matformer_steps": mat_steps,
            "minitron_steps_per_target": _steps_for(budget / len(settings.targets), cfg),
            "tokens_per_step": per_step,
        },
        "full_latency_s": timing["full"]["median_s"],
        "latency_workload": {
            "batch_size": cfg.latency.batch_size,
            "seq_len": cfg.latency.seq_len,
            "kind": "prefill",
            "device": str(device),
        },
        "rows": [results[k] for k in sorted(results, key=lambda k: (METHODS.index(k[0]), k[1]))],
        "comparisons": comparisons,
        "router_checks": checks,
        "lut_check": lut,
        "wall_s": wall,
    }
    write_json(out / "pareto.json", res)
    return res


def _stage_tokens(run_dir: Path, stage: str) -> int | None:
    p = run_dir / "stages.json"
    return json.loads(p.read_text()).get(stage, {}).get("tokens") if p.exists() else None
