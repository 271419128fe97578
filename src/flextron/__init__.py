"""flextron: many-in-one elastic LLMs from pretrained Hugging Face decoders (Flextron, ICML 2024).

The public API, next to transformers::

    import flextron
    fx = flextron.convert(hf_model, flextron.ElasticConfig())   # in place, like PEFT
    fx.rank(calibration_batches)                                 # importance order (METHOD §2)
    fx.set_arch(flextron.ArchConfig...) or fx.set_target(0.6)   # a sub-network, or a routed target
    sub = flextron.export_subnetwork(fx)                         # a plain transformers model
    flextron.save_elastic(fx, "dir"); fx = flextron.load_elastic("dir")
    run_dir = flextron.run(flextron.load_config("configs/smollm2.yaml"))   # the whole pipeline
    run = flextron.load_run(run_dir); flextron.export_target(run_dir, 0.6, "sub60/")

Everything else lives in the subpackages, one per stage (``flextron.model``, ``flextron.cost``,
``flextron.routing``, ``flextron.train``, ``flextron.eval``, ``flextron.report``,
``flextron.pipeline``); the README's "How the code is organised" lists them. Names are imported on
first use (PEP 562), so ``flextron --help`` does not load torch. Names that were public here
before 0.2 still resolve, with a ``DeprecationWarning`` naming their new home.
"""

from __future__ import annotations

import importlib
import warnings

from flextron.version import __version__ as __version__  # re-exported: flextron.__version__

#: public name -> module that defines it
_PUBLIC = {
    "ArchConfig": "flextron.model.space",
    "ElasticConfig": "flextron.config",
    "FlextronError": "flextron.errors",
    "convert": "flextron.model.elastic",
    "export_subnetwork": "flextron.model.export",
    "export_target": "flextron.eval.deploy",
    "load_config": "flextron.config",
    "load_elastic": "flextron.model.export",
    "load_run": "flextron.eval.deploy",
    "run": "flextron.pipeline.runner",
    "save_elastic": "flextron.model.export",
    "evaluate_run": "flextron.pipeline.runner",
}

#: names removed from the top level in 0.2: they resolve for one more release, with a warning
_DEPRECATED = {
    "CostTable": "flextron.cost.table",
    "DynamicConfig": "flextron.config",
    "DynamicRouter": "flextron.routing.dynamic_router",
    "DynamicRouting": "flextron.routing.runtime",
    "ElasticModel": "flextron.model.elastic",
    "RunConfig": "flextron.config",
    "SearchSpace": "flextron.model.space",
    "evaluate_dynamic_run": "flextron.pipeline.dynamic",
    "generate_dynamic": "flextron.eval.deploy_dynamic",
    "generate_text": "flextron.eval.deploy",
    "save_subnetwork": "flextron.model.export",
    "train_dynamic_run": "flextron.pipeline.dynamic",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    if name in _DEPRECATED:
        where = _DEPRECATED[name]
        warnings.warn(
            f"flextron.{name} is deprecated and will be removed in the next release; "
            f"import it from {where} (from {where} import {name})",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(importlib.import_module(where), name)
    raise AttributeError(f"module 'flextron' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
