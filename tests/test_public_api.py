"""The public surface is small, importable and documented; deprecated names warn; modules stay small."""

import importlib
import pkgutil
import subprocess
import sys
import warnings
from pathlib import Path

import flextron

SRC = Path(flextron.__file__).parent


def test_all_names_resolve_and_have_docstrings():
    assert flextron.__all__ == sorted(flextron.__all__)
    for name in flextron.__all__:
        obj = getattr(flextron, name)
        assert obj.__doc__, f"{name} has no docstring"


def test_public_names_resolve_without_warning():
    assert len(flextron.__all__) <= 12, "the top-level API is at most 12 names"
    assert set(flextron.__all__) == set(flextron._PUBLIC) and not set(flextron._PUBLIC) & set(flextron._DEPRECATED)
    for name in flextron.__all__:
        module = importlib.import_module(flextron._PUBLIC[name])  # import-time warnings are not the API's
        vars(flextron).pop(name, None)  # resolve through the module __getattr__, not the cache
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = getattr(flextron, name)
        assert not caught, f"flextron.{name} warns: {[str(w.message) for w in caught]}"
        assert value is getattr(module, name)


def test_deprecated_names_resolve_with_a_warning_naming_their_new_home():
    assert flextron._DEPRECATED, "no deprecated names left: drop this test and _DEPRECATED"
    for name, where in sorted(flextron._DEPRECATED.items()):
        module = importlib.import_module(where)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            value = getattr(flextron, name)
        assert [w.category for w in caught] == [DeprecationWarning], f"flextron.{name}: {caught}"
        message = str(caught[0].message)
        assert f"from {where} import {name}" in message, message
        assert value is getattr(module, name), f"flextron.{name} is not {where}.{name}"
        assert name not in vars(flextron), f"flextron.{name} was cached: a second use would not warn"


def test_every_module_imports_and_has_a_docstring():
    """Every module and subpackage ``__init__`` of the package imports and is documented (import
    cycles and the layer order are checked by tests/test_layers.py)."""
    names = ["flextron"] + [
        m.name for m in pkgutil.walk_packages(flextron.__path__, "flextron.") if m.name != "flextron.__main__"
    ]
    assert {"flextron.model", "flextron.eval.deploy", "flextron.pipeline.runner"} <= set(names)
    undocumented = [n for n in names if not (importlib.import_module(n).__doc__ or "").strip()]
    assert not undocumented, f"modules without a docstring: {undocumented}"


# --------------------------------------------------------------------------- module size

MAX_LINES, MAX_COLUMNS = 500, 120

#: TEMPORARY: modules over a limit that are being changed on main concurrently; whoever edits them
#: next splits or wraps them and removes them here (the test fails once an entry is stale)
KNOWN_OVERSIZE: set[str] = set()  # modules allowed over the limits for now (none)


def _size_problems(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    problems = [f"{len(lines)} lines (at most {MAX_LINES})"] if len(lines) > MAX_LINES else []
    wide = [i for i, line in enumerate(lines, 1) if len(line) > MAX_COLUMNS]
    if wide:
        problems.append(f"lines over {MAX_COLUMNS} columns: {wide[:5]}{' ...' if len(wide) > 5 else ''}")
    return problems


def test_modules_are_small_and_narrow():
    root = SRC.parents[1]
    paths = sorted(SRC.rglob("*.py")) + sorted((root / "benchmarks").rglob("*.py"))
    found = {p.relative_to(root).as_posix(): _size_problems(p) for p in paths if "__pycache__" not in p.parts}
    assert "benchmarks/harness.py" in found, "benchmarks/ not found next to src/"
    bad = {f: why for f, why in found.items() if why and f not in KNOWN_OVERSIZE}
    assert not bad, "modules over the limits (split or wrap them):\n" + "\n".join(
        f"  {f}: {'; '.join(why)}" for f, why in sorted(bad.items())
    )
    stale = sorted(f for f in KNOWN_OVERSIZE if not found.get(f))
    assert not stale, f"now within the limits (or gone): remove them from KNOWN_OVERSIZE: {stale}"


def test_cli_help_does_not_import_torch():
    code = "import sys, flextron.cli; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_repository_tracks_no_large_or_generated_files():
    """A submission must stay small: no tracked file over 1 MB, and nothing from run directories,
    benchmark work folders or weights (those are outputs, written under ignored paths)."""
    root = SRC.parents[1]
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        import pytest

        pytest.skip("not a git checkout")
    files = [f for f in out.decode().split("\0") if f]
    assert files, "git lists no tracked files"
    big = [f for f in files if (root / f).is_file() and (root / f).stat().st_size > 1_000_000]
    assert not big, f"tracked files over 1 MB: {big}"
    generated = [
        f
        for f in files
        if f.startswith(("runs/", "bench/", ".venv/")) or f.endswith((".safetensors", ".bin", ".pt", ".gguf"))
    ]
    assert not generated, f"generated outputs are tracked: {generated}"
