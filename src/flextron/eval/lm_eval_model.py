"""lm-evaluation-harness adapter: score the routed sub-model of a latency target on downstream tasks.

Stage: evaluation. Input: a finished run directory (or an :class:`~flextron.model.elastic.ElasticModel`
with its tokenizer) and a target. :class:`FlextronLM` exports the routed configuration as a plain
transformers model (:func:`~flextron.model.export.export_subnetwork`) and hands it to lm-eval's own
``HFLM``, so tokenisation, batching and log-likelihoods are lm-eval's. It is registered as lm-eval
model ``flextron``::

    python -m flextron.lm_eval --model flextron --model_args run=runs/smollm2,target=0.6 --tasks piqa

:func:`evaluate_tasks` runs :mod:`flextron.eval.tasks` through ``lm_eval.simple_evaluate`` and returns
``{task: {metric: value, "n": items}}``, the ``tasks`` object of a ``results.json`` row.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from flextron.data.bos import resolve_bos_policy
from flextron.errors import ConfigError, TargetError
from flextron.model.elastic import ElasticModel
from flextron.model.export import export_subnetwork
from flextron.model.space import ArchConfig

log = logging.getLogger(__name__)


def _device(device: str | torch.device | None) -> torch.device:
    """``device`` as given; ``None`` or an unavailable CUDA device falls back to what exists."""
    if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@register_model("flextron")
class FlextronLM(HFLM):
    """lm-eval ``HFLM`` over the sub-model a flextron model routes for one latency target.

    Give either ``run`` (a run directory, as on the lm-eval command line: ``run=DIR,target=0.6``)
    or ``fx`` + ``tokenizer`` (Python). The configuration is ``arch`` if given, else the router's
    choice for ``target`` (``1.0`` is the full model, also without a router). The sub-model is a
    sliced copy (the elastic model is not changed) in float32 on ``device`` (default: CUDA if
    available, else CPU). Other keyword arguments go to ``HFLM`` (``batch_size``, ``max_length``,
    ...); ``add_bos_token`` defaults to the BOS policy the tokenizer declares
    (:func:`~flextron.data.bos.resolve_bos_policy`).

    Attributes: ``target``, ``arch`` (the evaluated :class:`ArchConfig`), ``params`` (its
    parameter count).

    Raises:
        ConfigError: neither or both of ``run`` and ``fx``; a missing tokenizer.
        TargetError: target outside (0, 1], below the smallest sub-network, or < 1 without router.
        ModelError: ``run`` is not a finished run directory.
    """

    def __init__(
        self,
        run: str | Path | None = None,
        target: float = 1.0,
        *,
        fx: ElasticModel | None = None,
        tokenizer: Any = None,
        arch: ArchConfig | None = None,
        device: str | torch.device | None = None,
        batch_size: int | str = 16,
        dtype: str | torch.dtype = torch.float32,
        **kwargs: Any,
    ) -> None:
        if (run is None) == (fx is None):
            raise ConfigError("FlextronLM needs exactly one of run=RUN_DIR or fx=ElasticModel")
        target = float(target)
        if not 0 < target <= 1:
            raise TargetError(f"target {target} is out of range; give a fraction in (0, 1] such as 0.6")
        if run is not None:
            from flextron.eval.deploy import load_run

            loaded = load_run(run)
            fx, tokenizer = loaded.fx, tokenizer or loaded.tokenizer
        assert fx is not None
        if tokenizer is None:
            raise ConfigError("FlextronLM(fx=...) needs the model's tokenizer (tokenizer=...)")
        if arch is None:
            if fx.router is not None:
                arch = fx.router.route(target)
            elif target == 1.0:
                arch = fx.space.full()
            else:
                raise TargetError(f"target {target:g} needs a trained router; give arch=... or use a finished run")
        arch = fx.space.validate(arch)
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        sub = export_subnetwork(fx, arch).to(device=_device(device), dtype=dtype).eval()
        self.target, self.arch, self.params = target, arch, fx.space.num_parameters(arch)
        kwargs.pop("pretrained", None)
        # the BOS policy the tokenizer declares (flextron.data.bos), as for every other text we score
        kwargs.setdefault("add_bos_token", resolve_bos_policy(tokenizer).add_bos)
        # the exported sub-model is causal; a per-layer one has a model type lm-eval does not know
        super().__init__(pretrained=sub, tokenizer=tokenizer, backend="causal", batch_size=batch_size, **kwargs)


def _metrics(entry: dict) -> dict:
    """lm-eval's ``{"acc,none": v, "acc_stderr,none": s, "alias": ...}`` → ``{"acc": v, "acc_stderr": s}``."""
    out = {}
    for key, v in entry.items():
        metric, _, filt = key.partition(",")
        if filt and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[metric if filt == "none" else f"{metric}[{filt}]"] = float(v)
    return out


def evaluate_tasks(
    lm: HFLM,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    seed: int = 0,
    num_fewshot: int | None = None,
    log_samples: bool = False,
) -> tuple[dict, dict]:
    """Score ``lm`` (any lm-eval ``HFLM``) on flextron's local tasks with ``lm_eval.simple_evaluate``.

    Args:
        tasks: names from :data:`flextron.eval.tasks.TASKS`.
        limit: items per task (a fixed seeded subset, :func:`flextron.eval.tasks.load_tasks`); ``None``: all.
        num_fewshot: ``None`` keeps each task's protocol (MMLU 5-shot, HellaSwag 10-shot, others
            0-shot); a number applies to every task.
        log_samples: keep lm-eval's per-item records (returned in ``raw["samples"]``).
    Returns:
        ``(summary, raw)``: ``summary[task] = {metric: value, ..., "n": items scored}`` (metrics
        as lm-eval names them: ``acc``, ``acc_norm``, ``perplexity``) and ``summary["_wall_s"]``,
        the seconds of lm-eval's evaluation (building the tasks not included); ``raw[task]`` is
        lm-eval's result dict (with only that task's logged samples).
    Raises:
        ConfigError: unknown task, ``limit < 1`` or ``num_fewshot < 0``; TaskFileError: bad data files.
    """
    import lm_eval

    from flextron.eval.tasks import load_tasks, task_manager

    if num_fewshot is not None and num_fewshot < 0:
        raise ConfigError(f"num_fewshot must be >= 0, got {num_fewshot}")
    tm = task_manager()
    objects, samples = load_tasks(tasks, limit=limit, seed=seed, manager=tm)
    t0 = time.perf_counter()
    # one call for all tasks: lm-eval's per-call fixed cost (environment report, ~3 s) is paid once
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=objects,
        task_manager=tm,
        samples=samples,
        num_fewshot=num_fewshot,
        log_samples=log_samples,
        bootstrap_iters=0,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    wall = time.perf_counter() - t0
    summary, raw = {}, {}
    for obj in objects:
        name = getattr(obj, "task_name", None) or obj.name
        leaves = [t.task_name for t in obj.get_all_tasks()] if hasattr(obj, "get_all_tasks") else [name]
        n = sum(res["n-samples"][leaf]["effective"] for leaf in leaves)
        summary[name] = {**_metrics(res["results"][name]), "n": int(n)}
        raw[name] = {**res, "samples": {leaf: res["samples"][leaf] for leaf in leaves}} if log_samples else res
        log.info("%s: %s (%d items)", name, {k: round(v, 4) for k, v in summary[name].items() if k != "n"}, n)
    log.info("downstream evaluation of %s: %.1f s", ", ".join(summary), wall)
    summary["_wall_s"] = round(wall, 2)
    return summary, raw
