"""Router files: static routers with their surrogate (``router.safetensors``, ``surrogate.safetensors``,
``routers.json``) and dynamic routers (``dynamic_router.safetensors``, ``dynamic_surrogate.safetensors``,
``dynamic.json``), written atomically with sha256 manifests and checked (hashes, shapes) on load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from flextron.config import RunConfig
from flextron.errors import ModelError
from flextron.files import atomic_write_dir, check_shapes, file_hashes, verify_hashes
from flextron.model.elastic import ElasticModel
from flextron.routing.dynamic_router import DynamicRouter
from flextron.routing.router import StaticRouter
from flextron.routing.surrogate import Surrogate

log = logging.getLogger(__name__)

ROUTER_FILE = "dynamic_router.safetensors"
SURROGATE_FILE = "dynamic_surrogate.safetensors"
MANIFEST = "dynamic.json"
MODEL_DIR = "model"  # joint fine-tuning's weights (absent without joint fine-tuning)


def save_dynamic(out_dir: str | Path, router: DynamicRouter, surrogate: Surrogate, summary: dict) -> Path:
    """Write the router and surrogate (safetensors) and ``dynamic.json`` (shapes, summary,
    sha256 of both files) into ``out_dir`` atomically (other files there are kept)."""
    out_dir = Path(out_dir)
    meta = {
        "targets": router.trained_targets,
        "num_layers": router.num_layers,
        "n_mlp": router.n_mlp,
        "n_heads": router.n_heads,
        "hidden_size": router.hidden_size,
        "hidden": router.b1.shape[1],
        "anchor_scale": router.anchor_scale,
        "route_every": router.route_every,
        "surrogate_hidden": surrogate.net[0].out_features,
        "per_token": bool(summary.get("config", {}).get("per_token", False)),
        "summary": summary,
    }

    def write(tmp: Path) -> None:
        save_model(router, str(tmp / ROUTER_FILE))
        save_model(surrogate, str(tmp / SURROGATE_FILE))
        (tmp / MANIFEST).write_text(
            json.dumps({**meta, "sha256": file_hashes(tmp, [ROUTER_FILE, SURROGATE_FILE])}, indent=2)
        )

    sub = out_dir / "router"
    atomic_write_dir(sub, write)
    return sub


def load_dynamic(path: str | Path, fx: ElasticModel) -> tuple[DynamicRouter, dict]:
    """The router saved by :func:`save_dynamic` under ``path`` (the directory given to it), checked
    against its sha256 and ``fx``'s geometry. Returns ``(router (eval mode, fx's dtype), manifest)``.

    Raises:
        ModelError: missing/malformed manifest, altered files, or a router built for another model.
    """
    sub = Path(path) / "router"
    fix = f"train it again with `flextron dynamic RUN --out {path}`"
    try:
        meta = json.loads((sub / MANIFEST).read_text())
        hashes = meta["sha256"]
        router = DynamicRouter(
            meta["targets"],
            meta["num_layers"],
            meta["hidden_size"],
            meta["n_mlp"],
            meta["n_heads"],
            meta["hidden"],
            meta["anchor_scale"],
            meta.get("route_every", 1),
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"no readable dynamic router in {sub} ({type(e).__name__}: {e}); {fix}") from None
    verify_hashes(sub, hashes, fix)
    sp = fx.space
    if (meta["num_layers"], meta["n_mlp"], meta["n_heads"], meta["hidden_size"]) != (
        sp.num_layers,
        len(sp.mlp_choices),
        len(sp.head_choices),
        sp.hidden_size,
    ):
        raise ModelError(f"the dynamic router in {sub} was trained for another model geometry; {fix}")
    try:
        load_model(router, str(sub / ROUTER_FILE))
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelError(f"dynamic router weights in {sub} are unreadable ({e}); {fix}") from None
    return router.to(next(fx.parameters()).dtype).eval(), meta


def new_router(cfg: RunConfig, fx: ElasticModel) -> tuple[StaticRouter, Surrogate]:
    sp = fx.space
    torch.manual_seed(cfg.seed)
    router = StaticRouter(
        cfg.routers.targets, sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), cfg.routers.hidden
    )
    sm = Surrogate(sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), cfg.routers.surrogate_hidden)
    return router, sm


ROUTER_FILES = {"router": "router.safetensors", "surrogate": "surrogate.safetensors"}
ROUTER_MANIFEST = "routers.json"


def save_routers(path: Path, router: StaticRouter, sm: Surrogate) -> None:
    """Router and surrogate (safetensors) plus ``routers.json`` with their sha256, written atomically."""

    def write(tmp: Path) -> None:
        save_model(router, str(tmp / ROUTER_FILES["router"]))
        save_model(sm, str(tmp / ROUTER_FILES["surrogate"]))
        (tmp / ROUTER_MANIFEST).write_text(
            json.dumps({"sha256": file_hashes(tmp, list(ROUTER_FILES.values()))}, indent=2)
        )

    atomic_write_dir(path, write)


def load_routers(path: Path, cfg: RunConfig, fx: ElasticModel) -> tuple[StaticRouter, Surrogate]:
    """Routers written by :func:`save_routers`, checked against their sha256 and the config's shapes.

    Raises:
        ModelError: missing or malformed manifest, altered file, or shapes that differ from ``cfg``.
    """
    router, sm = new_router(cfg, fx)
    fix = "rerun the router stage (delete the directory and the 'routers'/'joint' entries of stages.json)"
    try:
        manifest = json.loads((path / ROUTER_MANIFEST).read_text())
        hashes = manifest["sha256"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path / ROUTER_MANIFEST} is missing or malformed ({type(e).__name__}: {e}); {fix}") from None
    verify_hashes(path, hashes, fix)
    for name, mod in (("router", router), ("surrogate", sm)):
        check_shapes(mod, path / ROUTER_FILES[name], fix)
    try:
        load_model(router, str(path / ROUTER_FILES["router"]))
        load_model(sm, str(path / ROUTER_FILES["surrogate"]))
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelError(f"routers in {path} are unreadable or do not match the config ({e}); {fix}") from None
    return router.eval(), sm.eval()
