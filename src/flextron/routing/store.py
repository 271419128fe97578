"""Router files: static routers with their surrogate (``router.safetensors``, ``surrogate.safetensors``,
``routers.json``) and dynamic routers (``dynamic_router.safetensors``, ``dynamic_surrogate.safetensors``,
``dynamic.json``), written atomically with sha256 manifests and checked (hashes, shapes) on load.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_model, save_model

from flextron.config import RunConfig
from flextron.errors import ModelError
from flextron.files import atomic_write_dir, check_format, check_shapes, file_hashes, verify_hashes
from flextron.model.elastic import ElasticModel
from flextron.routing.dynamic_router import DynamicRouter
from flextron.routing.router import Router, StaticRouter
from flextron.routing.surrogate import Surrogate
from flextron.version import ROUTER_FORMAT, ROUTER_FORMATS_READ

log = logging.getLogger(__name__)


#: the files of a router directory, for either kind of router
ROUTER_FILES = {"router": "router.safetensors", "surrogate": "surrogate.safetensors"}
ROUTER_MANIFEST = "routers.json"
MODEL_DIR = "model"  # a dynamic stage's jointly fine-tuned weights (absent without joint fine-tuning)

ROUTER_KINDS: dict[str, type[Router]] = {"static": StaticRouter, "dynamic": DynamicRouter}


def new_router(cfg: RunConfig, fx: ElasticModel) -> tuple[StaticRouter, Surrogate]:
    """The static router and surrogate of a run's config, freshly initialised (seeded by ``cfg.seed``)."""
    sp = fx.space
    torch.manual_seed(cfg.seed)
    router = StaticRouter(
        cfg.routers.targets, sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), cfg.routers.hidden
    )
    sm = Surrogate(sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), cfg.routers.surrogate_hidden)
    return router, sm


def save_router(path: str | Path, router: Router, surrogate: Surrogate, summary: dict | None = None) -> Path:
    """Write a router of either kind and its surrogate (safetensors) plus ``routers.json`` (format,
    kind, constructor arguments of both, ``summary``, sha256 of both files) into the directory
    ``path``, atomically (the directory is replaced as a whole). Returns ``path``."""
    meta = {
        "format": ROUTER_FORMAT,
        "kind": router.kind,
        "router_args": router.init_args(),
        "surrogate_args": surrogate.init_args(),
        "summary": summary or {},
    }

    def write(tmp: Path) -> None:
        save_model(router, str(tmp / ROUTER_FILES["router"]))
        save_model(surrogate, str(tmp / ROUTER_FILES["surrogate"]))
        sha = file_hashes(tmp, list(ROUTER_FILES.values()))
        (tmp / ROUTER_MANIFEST).write_text(json.dumps({**meta, "sha256": sha}, indent=2))

    return atomic_write_dir(Path(path), write)


def save_routers(path: Path, router: StaticRouter, sm: Surrogate) -> None:
    """A static router and its surrogate (:func:`save_router` without a summary)."""
    save_router(path, router, sm)


def load_router(
    path: str | Path,
    fx: ElasticModel,
    *,
    kind: str | None = None,
    legacy: Callable[[], tuple[Router, Surrogate]] | None = None,
    expected: tuple[Router, Surrogate] | None = None,
    fix: str = "train the routers again",
) -> tuple[Router, Surrogate, dict]:
    """The router and surrogate in the directory ``path`` (:func:`save_router`), checked against
    their sha256, ``fx``'s search space and (``kind``) the expected kind. Returns ``(router,
    surrogate, manifest)`` in eval mode and ``fx``'s dtype. ``legacy`` builds the modules of a
    manifest written before formats were recorded (format 1: static routers, shapes from the run's
    config). ``expected``: modules whose shapes the files must have (checked before anything else
    of the files is read).

    Raises:
        ModelError: missing or malformed manifest, an unknown format or kind, altered files, or a
        router built for another model geometry (each message names the file and ``fix``).
    """
    path = Path(path)
    try:
        meta = json.loads((path / ROUTER_MANIFEST).read_text())
        hashes = meta["sha256"]
        fmt = meta.get("format")
        check_format(path / ROUTER_MANIFEST, fmt, ROUTER_FORMATS_READ if legacy else (ROUTER_FORMAT,), fix)
        if fmt is None:  # format 1: a static router of flextron 0.1, shapes from the run's config
            router, sm = legacy()
            meta = {**meta, "format": 1, "kind": router.kind}
        else:
            cls = ROUTER_KINDS[meta["kind"]]
            router, sm = cls(**meta["router_args"]), Surrogate(**meta["surrogate_args"])
    except ModelError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{path / ROUTER_MANIFEST} is missing or malformed ({type(e).__name__}: {e}); {fix}") from None
    if kind is not None and meta["kind"] != kind:
        raise ModelError(f"{path} holds a {meta['kind']} router, not a {kind} one; {fix}")
    verify_hashes(path, hashes, fix)
    for name, mod in zip(ROUTER_FILES, expected or ()):
        check_shapes(mod, path / ROUTER_FILES[name], fix)
    sp = fx.space
    if (router.num_layers, router.n_mlp, router.n_heads) != (sp.num_layers, len(sp.mlp_choices), len(sp.head_choices)):
        raise ModelError(f"the router in {path} was trained for another model geometry; {fix}")
    for name, mod in (("router", router), ("surrogate", sm)):
        check_shapes(mod, path / ROUTER_FILES[name], fix)
    try:
        load_model(router, str(path / ROUTER_FILES["router"]))
        load_model(sm, str(path / ROUTER_FILES["surrogate"]))
    except (OSError, RuntimeError, ValueError) as e:
        raise ModelError(f"routers in {path} are unreadable or do not match the model ({e}); {fix}") from None
    dtype = next(fx.parameters()).dtype
    return router.to(dtype).eval(), sm.eval(), meta


def load_routers(path: Path, cfg: RunConfig, fx: ElasticModel) -> tuple[StaticRouter, Surrogate]:
    """The static router and surrogate of a run (:func:`load_router`, kind ``static``); a router
    directory written before formats were recorded is rebuilt from ``cfg``.

    Raises:
        ModelError: as :func:`load_router`.
    """
    again = "" if (path.parent / "elastic").is_dir() else "; without elastic/, elastic training runs again first"
    fix = f"delete {path} and rerun `flextron run` on the run's config (the stage that writes it runs again{again})"
    expected = new_router(cfg, fx)
    router, sm, _ = load_router(path, fx, kind="static", legacy=lambda: expected, expected=expected, fix=fix)
    if router.init_args() != expected[0].init_args():
        raise ModelError(
            f"the router in {path} was trained with {router.init_args()}, the run's config asks for "
            f"{expected[0].init_args()}; {fix}"
        )
    return router.float().eval(), sm


def save_dynamic(out_dir: str | Path, router: DynamicRouter, surrogate: Surrogate, summary: dict) -> Path:
    """A dynamic router in ``out_dir/router`` (:func:`save_router`); other files of ``out_dir`` are kept."""
    return save_router(Path(out_dir) / "router", router, surrogate, summary)


def dynamic_fix(path: str | Path) -> str:
    """How to get a dynamic router into ``path`` (the end of every refusal about it)."""
    return f"train it (the run's `dynamic` stage, or `flextron dynamic RUN --out {path}`)"


def require_dynamic(path: str | Path) -> Path:
    """The router folder ``path/router`` of a dynamic router directory (:func:`save_dynamic`).

    Raises:
        ModelError: it holds no router manifest (naming a flextron 0.1 one, whose files this version
        does not read).
    """
    sub = Path(path) / "router"
    if not (sub / ROUTER_MANIFEST).is_file():
        old = " (its dynamic.json was written by flextron 0.1, whose router files this version does not read)"
        raise ModelError(
            f"no readable dynamic router in {sub}{old if (sub / 'dynamic.json').exists() else ''}; {dynamic_fix(path)}"
        )
    return sub


def load_dynamic(path: str | Path, fx: ElasticModel) -> tuple[DynamicRouter, dict]:
    """The dynamic router saved by :func:`save_dynamic` under ``path``: ``(router, manifest)``, with
    the training summary and ``per_token`` in the manifest.

    Raises:
        ModelError: missing/malformed manifest, altered files, or a router built for another model.
    """
    fix = dynamic_fix(path)
    router, _, meta = load_router(require_dynamic(path), fx, kind="dynamic", fix=fix)
    if router.hidden_size != fx.space.hidden_size:
        raise ModelError(f"the dynamic router in {path} was trained for another model geometry; {fix}")
    meta["per_token"] = bool(meta.get("summary", {}).get("config", {}).get("per_token", False))
    return router, meta
