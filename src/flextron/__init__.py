"""flextron: many-in-one elastic LLMs from pretrained Hugging Face decoders (Flextron, ICML 2024).

The public API, next to transformers::

    import flextron
    fx = flextron.convert(hf_model, flextron.ElasticConfig())   # in place, like PEFT
    fx.rank(calibration_batches)                                 # importance order (METHOD §2)
    fx.set_arch(fx.space.homogeneous(768, 2))                    # or fx.set_target(0.6) once routed
    sub = flextron.export_subnetwork(fx)                         # a plain transformers model
    flextron.save_elastic(fx, "dir"); fx = flextron.load_elastic("dir")
    flextron.run(flextron.load_config("configs/smollm2.yaml"))   # the whole pipeline
    flextron.train_dynamic_run("runs/smollm2")                   # input-adaptive routers (RUN/dynamic)

Names are imported on first use (PEP 562), so ``flextron --help`` does not load torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "ArchConfig": "elastic",
    "CostTable": "latency",
    "DynamicConfig": "dynamic_train",
    "DynamicRouter": "dynamic",
    "DynamicRouting": "dynamic",
    "ElasticConfig": "config",
    "ElasticModel": "elastic",
    "FlextronError": "errors",
    "RunConfig": "config",
    "SearchSpace": "elastic",
    "convert": "elastic",
    "evaluate_dynamic_run": "dynamic_eval",
    "evaluate_run": "pipeline",
    "export_subnetwork": "export",
    "export_target": "pipeline",
    "generate_dynamic": "dynamic_eval",
    "generate_text": "pipeline",
    "load_config": "config",
    "load_elastic": "export",
    "load_run": "pipeline",
    "run": "pipeline",
    "save_elastic": "export",
    "save_subnetwork": "export",
    "train_dynamic_run": "dynamic_eval",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flextron' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
