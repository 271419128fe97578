"""Persistence that survives interruptions and refuses bad files (base layer): atomic writes of
text, JSON and whole folders (temporary sibling + rename), sha256 of files and manifests, and shape
checks of safetensors against a module; the format check of versioned files (:func:`check_format`).

Temporary siblings carry the writer's process id (``.NAME-tmp-PID-XXXXXXXX``,
``.NAME-old-PID-XXXXXXXX``, ``.NAME.tmpPID``, ``.trash_NAME_PID``). A process killed during a write
(``kill -9``) leaves one behind; the next write to the same destination removes the leftovers of
writers that are no longer alive (:func:`remove_stale_temps`), and so does the start of a run for
its run directory. Writes to one destination are never concurrent in flextron, but a leftover of
a live process is kept all the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open

from flextron.errors import ModelError, OutputExistsError
from flextron.version import __version__

log = logging.getLogger(__name__)


# the temporary names of the writers below; group "pid" is the writer's process id (absent in
# directories written by flextron 0.2.0 and earlier, which are then always stale)
_TEMP_PATTERNS = (
    r"\.(?P<name>.+)-(?:tmp|old)-(?:(?P<pid>\d+)-)?[a-z0-9_]{8}",
    r"\.(?P<name>.+)\.tmp(?P<pid>\d+)",
    r"\.trash_(?P<name>.+)_(?P<pid>\d+)",
)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:  # exists, owned by another user
        return True
    except (ProcessLookupError, OverflowError):
        return False
    return True


def remove_stale_temps(folder: Path, name: str | None = None) -> list[Path]:
    """Delete the temporary siblings that a killed writer left in ``folder`` (of the destination
    ``name`` only, or of every destination when ``name`` is None): those whose writer process is
    no longer alive. A moved-aside old copy whose destination is missing (killed mid-swap) is put
    back first. Returns what was removed (nothing when ``folder`` does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for entry in folder.iterdir():
        if not entry.name.startswith("."):
            continue
        for pat in _TEMP_PATTERNS:
            m = re.fullmatch(pat, entry.name)
            if m is None or (name is not None and m["name"] != name):
                continue
            if m["pid"] is not None and _alive(int(m["pid"])):
                break
            dest = folder / m["name"]
            if "-old-" in entry.name and (entry / "x").is_dir() and not dest.exists():
                # killed between moving the old copy aside and renaming the new one in: the old
                # complete copy is all there is, so it goes back into place
                os.replace(entry / "x", dest)
                log.info("restored %s from %s, left by an interrupted write", dest, entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted write", entry)
            removed.append(entry)
            break
    return removed


def check_not_under_file(path: Path) -> None:
    """Refuse a destination ``path`` when it or a folder on its way is an existing file (instead of
    ``[Errno 17] File exists`` or ``[Errno 20] Not a directory`` from the write).

    Raises:
        OutputExistsError: names the file.
    """
    path = Path(path).expanduser().absolute()
    for p in (path.parent, *path.parent.parents):
        if p.exists() and not p.is_dir():
            raise OutputExistsError(
                f"{p} is a file, so {path} cannot be written; choose a path that is not under a file"
            )


def atomic_write_file(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, then ``os.replace`` it onto ``path``
    (atomic on POSIX); the parent folder is created, and the temporary file removed if the write
    fails. Leftovers of earlier, killed writes to ``path`` are removed first (:func:`remove_stale_temps`)."""
    path = Path(path)
    check_not_under_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent, path.name)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_write_file`)."""
    return atomic_write_file(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, obj) -> Path:
    """:func:`atomic_write_text` of ``obj`` as indented JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def atomic_write_dir(out_dir: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` in a temporary sibling of ``out_dir``, then rename it into place. An
    existing ``out_dir`` is moved aside first and deleted after the swap, so ``out_dir`` is at
    every moment absent, the old complete directory or the new complete one. Leftovers of earlier,
    killed writes to ``out_dir`` are removed first (:func:`remove_stale_temps`)."""
    out_dir = Path(out_dir)
    check_not_under_file(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir.parent, out_dir.name)
    pid = os.getpid()
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-tmp-{pid}-"))
    old = None
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out_dir.exists():
            if out_dir.is_dir() and not any(out_dir.iterdir()):
                out_dir.rmdir()
            else:
                old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-old-{pid}-"))
                os.replace(out_dir, old / "x")
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(folder: Path, names: list[str]) -> dict[str, str]:
    """``{name: sha256}`` of the files ``names`` in ``folder``."""
    return {n: sha256_file(Path(folder) / n) for n in names}


def verify_hashes(folder: Path, expected: dict, fix: str) -> None:
    """Check that every file in ``expected`` (``{name: sha256}``) exists in ``folder`` with that hash.

    Raises:
        ModelError: the manifest is malformed, a file is missing, or its bytes differ (the message
            names the file and both hash prefixes).
    """
    folder = Path(folder)
    if not isinstance(expected, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in expected.items()
    ):
        raise ModelError(f"the sha256 manifest of {folder} is malformed; {fix}")
    for name, want in expected.items():
        p = folder / name
        if Path(name).name != name or not p.is_file():
            raise ModelError(f"{p} is missing (listed in the sha256 manifest of {folder}); {fix}")
        got = sha256_file(p)
        if got != want:
            raise ModelError(
                f"{p} is corrupt or altered: sha256 {got[:12]}… differs from the recorded {want[:12]}…; {fix}"
            )


def check_shapes(module: torch.nn.Module, path: Path, fix: str) -> None:
    """Compare the tensor shapes in the safetensors ``path`` with ``module``'s state dict (reads only
    the header). Keys absent on either side are left to the loader (tied weights are stored once).

    Raises:
        ModelError: unreadable header, or a tensor whose shape differs (named, with both shapes).
    """
    want = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                got = tuple(f.get_slice(key).get_shape())
                if key in want and got != want[key]:
                    raise ModelError(f"{path}: tensor {key} has shape {got} but the model expects {want[key]}; {fix}")
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path} is not a readable safetensors file ({e}); {fix}") from None


def remove_path(path: Path) -> None:
    """Delete a directory without ever exposing it half-deleted under its own name."""
    trash = path.with_name(f".trash_{path.name}_{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def check_format(path: Path, found, readable: tuple[int, ...], fix: str) -> None:
    """Refuse a file whose recorded format version this flextron does not read.

    ``found`` is the file's ``"format"`` value, None when it records none (written before formats
    were recorded: version 1); ``readable`` the versions this flextron reads (``*_FORMATS_READ`` of
    :mod:`flextron.version`); ``fix`` ends the message.

    Raises:
        ModelError: one line naming ``path``, the version found, the versions read and ``fix``.
    """
    version = 1 if found is None else found
    known = isinstance(version, int) and not isinstance(version, bool)
    if known and version in readable:
        return
    if not known:
        why = "not a format flextron writes"
    else:
        why = "written by a newer flextron" if version > max(readable) else "a format this flextron no longer reads"
    reads = ", ".join(str(v) for v in readable)
    raise ModelError(
        f"{path} has format {version!r} ({why}); this flextron ({__version__}) reads format {reads}; {fix}"
    )
