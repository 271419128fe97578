"""A finished run with its dynamic (input-adaptive) router, loaded for evaluation and generation:
:func:`load_dynamic_run` (the jointly fine-tuned weights when the dynamic directory holds them) and
:func:`generate_dynamic` (the prompt chooses its sub-network at prefill).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from flextron.eval.deploy import prompt_ids
from flextron.routing.runtime import DynamicRouting
from flextron.routing.store import MODEL_DIR, load_dynamic

log = logging.getLogger(__name__)


def load_dynamic_run(run_dir: str | Path, dyn_dir: str | Path | None = None):
    """``(LoadedRun, DynamicRouter, manifest)``; the model is the jointly fine-tuned one when the
    dynamic directory holds it. Raises ModelError when either is missing or corrupt."""
    from flextron.eval.deploy import load_run
    from flextron.model.export import load_elastic

    run = load_run(run_dir)
    dyn_dir = Path(dyn_dir) if dyn_dir is not None else run.run_dir / "dynamic"
    if (dyn_dir / MODEL_DIR).exists():
        static_router = run.fx.router
        run.fx = load_elastic(dyn_dir / MODEL_DIR)
        run.fx.router = static_router
    router, meta = load_dynamic(dyn_dir, run.fx)
    return run, router, meta


def generate_dynamic(
    run_dir: str | Path,
    target: float,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    dyn_dir: str | Path | None = None,
    truncate: bool = False,
) -> str:
    """Greedy generation where the prompt chooses its sub-network (``flextron generate --dynamic``);
    the choice is made at prefill and kept for every decode step (the KV cache stays valid).

    Raises:
        ConfigError: empty prompt, or one that does not fit the context (:func:`~flextron.eval.deploy.prompt_ids`)."""
    run, router, meta = load_dynamic_run(run_dir, dyn_dir)
    ids = prompt_ids(run, prompt, max_new_tokens, truncate)
    enc = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if target >= 1.0:
        out = run.fx.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    else:
        with DynamicRouting(run.fx, router, target, per_token=bool(meta.get("per_token"))):
            out = run.fx.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
    return run.tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
