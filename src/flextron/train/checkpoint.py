"""Training checkpoints of every stage that trains: atomic, sha256-checked safetensors of modules and
optimizers, refused when written with other settings; resume of the latest one; the metrics log;
deferral of SIGINT/SIGTERM to the end of a training step.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model

from flextron.errors import ModelError
from flextron.files import atomic_write_text, check_shapes, file_hashes, remove_path, verify_hashes

log = logging.getLogger(__name__)


def _named_optimizers(optimizers) -> dict:
    """One optimizer (stored as ``optimizer``) or ``{name: optimizer}``; accelerate's wrappers are unwrapped."""
    named = optimizers if isinstance(optimizers, dict) else {"optimizer": optimizers}
    return {k: getattr(o, "optimizer", o) for k, o in named.items()}


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimizers,
    extra: dict,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Atomically write ``ckpt_root/step_{step:06d}``: module weights and optimizer tensors as
    safetensors; optimizer hyper-parameters, every file's sha256 and ``extra`` (JSON-ready) in
    ``state.json``. Older checkpoints and leftovers of killed writers are removed only after the
    new one is in place.

    ``optimizers``: one optimizer (file ``optimizer.safetensors``) or ``{name: optimizer}`` (file
    ``<name>.safetensors`` each; names must differ from the module names). ``tensors``: further
    named tensors of the stage's state (buffers, generator states), file ``state.safetensors``;
    :func:`load_checkpoint` returns them under ``"tensors"``.
    """
    optimizers = _named_optimizers(optimizers)
    assert not set(optimizers) & (set(modules) | {"state"}), "optimizer names must differ from module names"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:06d}"
    tmp = ckpt_root / f".tmp_step_{step:06d}_{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for name, mod in modules.items():
        save_model(mod, str(tmp / f"{name}.safetensors"))  # handles tied (shared) tensors
    opt_meta = {}
    for name, opt in optimizers.items():
        sd = opt.state_dict()
        arrays, scalars = {}, {}
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    arrays[f"{pid}.{k}"] = v.detach().contiguous().cpu()
                else:
                    scalars[f"{pid}.{k}"] = v
        save_file(arrays, tmp / f"{name}.safetensors")
        opt_meta[name] = {"param_groups": sd["param_groups"], "scalars": scalars}
    files = [f"{n}.safetensors" for n in (*modules, *optimizers)]
    if tensors is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp / "state.safetensors")
        files.append("state.safetensors")
    state = {"step": step, "optimizers": opt_meta, "sha256": file_hashes(tmp, files), **extra}
    (tmp / "state.json").write_text(json.dumps(state))  # written last: a directory with state.json is complete
    if final.exists():
        remove_path(final)
    os.replace(tmp, final)
    for old in ckpt_root.iterdir():
        if old == final:
            continue
        if old.name.startswith("step_"):
            remove_path(old)
        elif old.name.startswith((".tmp_step_", ".trash_")):  # left by a killed writer
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest complete checkpoint (temporary and trash directories are ignored)."""
    done = sorted(p for p in Path(ckpt_root).glob("step_*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_checkpoint(path: Path, modules: dict[str, torch.nn.Module], optimizers, settings: dict | None = None) -> dict:
    """Restore modules and optimizers from :func:`save_checkpoint`; returns the JSON state, with
    the checkpoint's extra tensors (if any) under ``"tensors"``.

    ``optimizers``: as given to :func:`save_checkpoint` (one, or ``{name: optimizer}``).
    ``settings``: what the resuming run was configured with; each key must equal the value
    recorded in the checkpoint (a resume with another batch size, learning rate or data would
    not reproduce the uninterrupted run).

    Raises:
        ModelError: a file is missing, corrupt or altered (sha256), a tensor's shape differs from
            the model's or optimizer's, or the recorded settings differ (each message names what differs).
    """
    fix = f"delete {path.parent} to restart this stage"
    optimizers = _named_optimizers(optimizers)
    try:
        state = json.loads((path / "state.json").read_text())
        if not isinstance(state, dict):
            raise ValueError("state.json is not an object")
        hashes, step = state["sha256"], state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step={step!r}")
        # checkpoints written before several optimizers were supported hold one, at the top level
        opt_meta = state.get("optimizers") or {
            "optimizer": {"param_groups": state["param_groups"], "scalars": state["optimizer_scalars"]}
        }
        if not isinstance(opt_meta, dict) or set(opt_meta) != set(optimizers):
            raise ValueError(
                f"optimizers {sorted(opt_meta) if isinstance(opt_meta, dict) else opt_meta!r}, "
                f"expected {sorted(optimizers)}"
            )
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); {fix}") from None
    verify_hashes(path, hashes, fix)
    if settings is not None:
        recorded = state.get("settings", {})
        diff = [
            f"{k}: {recorded.get(k)!r} in the checkpoint vs {v!r} now"
            for k, v in settings.items()
            if recorded.get(k) != v
        ]
        if diff:
            raise ModelError(
                f"checkpoint {path} was written with other settings ({'; '.join(diff)}); restore them or {fix}"
            )
    for name, mod in modules.items():
        check_shapes(mod, path / f"{name}.safetensors", fix)
    try:
        for name, mod in modules.items():
            missing, unexpected = load_model(mod, str(path / f"{name}.safetensors"), strict=False)
            if missing or unexpected:
                raise ValueError(f"{name}: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}")
        for name, optimizer in optimizers.items():
            opt_state: dict = {}
            for key, v in list(load_file(path / f"{name}.safetensors").items()) + list(
                opt_meta[name]["scalars"].items()
            ):
                pid, k = key.split(".", 1)
                opt_state.setdefault(int(pid), {})[k] = v
            params = [p for g in optimizer.param_groups for p in g["params"]]
            for pid, st in opt_state.items():
                for k, v in st.items():
                    if torch.is_tensor(v) and v.dim() > 0 and tuple(v.shape) != tuple(params[pid].shape):
                        raise ValueError(
                            f"{name} state {pid}.{k} has shape {tuple(v.shape)}, "
                            f"the parameter {tuple(params[pid].shape)}"
                        )
            optimizer.load_state_dict({"state": opt_state, "param_groups": opt_meta[name]["param_groups"]})
        if "state.safetensors" in hashes:
            state["tensors"] = load_file(path / "state.safetensors")
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError, IndexError, SafetensorError) as e:
        raise ModelError(
            f"checkpoint {path} does not match the model or optimizer ({type(e).__name__}: {e}); {fix}"
        ) from None
    return state


class StageCheckpoints:
    """The checkpoints of one training stage in ``root`` (``run_dir/checkpoints/<stage>``), under
    one or several processes: the main process writes them between two barriers, every rank reads
    the same newest one to resume.

    ``accelerator``: anything with ``wait_for_everyone()`` and ``is_main_process`` (an accelerate
    ``Accelerator``). ``modules``, ``optimizers``: as for :func:`save_checkpoint`. ``settings``:
    JSON-ready values a resume must match (:func:`load_checkpoint`).
    """

    def __init__(
        self, root: Path, accelerator, modules: dict[str, torch.nn.Module], optimizers, settings: dict
    ) -> None:
        self.root, self.accelerator, self.modules, self.optimizers = Path(root), accelerator, modules, optimizers
        self.settings = json.loads(json.dumps(settings))  # tuples become lists, as they will be read back

    def save(self, step: int, extra: dict | None = None, tensors: dict[str, torch.Tensor] | None = None) -> None:
        """Write the checkpoint of ``step`` (with ``extra`` JSON and ``tensors``) on the main process."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            save_checkpoint(
                self.root,
                step,
                self.modules,
                self.optimizers,
                {"stage": self.root.name, "settings": self.settings, **(extra or {})},
                tensors,
            )
        self.accelerator.wait_for_everyone()

    def resume(self) -> dict | None:
        """Load the newest complete checkpoint into the modules and optimizers and return its
        state (:func:`load_checkpoint`), or ``None`` when there is none.

        Raises:
            ModelError: it is corrupt, altered or was written with other settings.
        """
        last = latest_checkpoint(self.root)
        if last is None:
            return None
        state = load_checkpoint(last, self.modules, self.optimizers, self.settings)
        log.info("%s: resuming from %s (step %d)", self.root.name, last, state["step"])
        return state


class MetricsLog:
    """Append-only JSON lines (``metrics.jsonl``), one record per step, tagged with the stage."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def truncate(self, stage: str, after_step: int) -> None:
        """Drop records of ``stage`` beyond ``after_step`` (a resumed stage rewrites them)."""
        if not (self.enabled and self.path.exists()):
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line torn by a killed process
                continue
            if not (rec.get("stage") == stage and rec.get("step", -1) > after_step):
                keep.append(line)
        atomic_write_text(self.path, "".join(k + "\n" for k in keep))

    def write(self, **rec) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


class Interrupt:
    """SIGINT/SIGTERM received: the loop finishes its step, saves a checkpoint and stops."""

    requested = False


@contextlib.contextmanager
def deferred_interrupt():
    """Defer SIGINT and SIGTERM to the end of the current step (a second signal stops at once).
    Only the main thread can install signal handlers; elsewhere signals keep their behaviour."""
    flag = Interrupt()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if flag.requested:
            raise KeyboardInterrupt
        flag.requested = True
        log.warning("signal %d: finishing this step and saving a checkpoint (send it again to stop at once)", signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
