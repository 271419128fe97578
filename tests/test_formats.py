"""Versioned formats: an elastic checkpoint (``flextron.json``) and a run directory
(``flextron_run.json``) record the format they were written in; a reader loads the versions it
knows (a file without the key is version 1) and refuses any other with one line that names the
file, the version found, the versions read and the fix."""

from __future__ import annotations

import json

import pytest
import torch

from flextron.cli import main
from flextron.config import ElasticConfig
from flextron.errors import ModelError
from flextron.eval.deploy import RUN_INFO_FILE, check_run_format, load_run
from flextron.model.elastic import convert
from flextron.model.export import load_elastic, save_elastic
from flextron.version import CHECKPOINT_FORMAT, CHECKPOINT_FORMATS_READ, RUN_FORMAT, RUN_FORMATS_READ

from conftest import make_tiny, write_tiny_run


def _edit_json(path, **changes):
    """Rewrite the JSON object in ``path`` with ``changes`` applied (a value None drops the key)."""
    data = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data))


def _refused(excinfo, path, found, readable) -> None:
    """One line naming the file, the version found, the versions read and the fix."""
    msg = str(excinfo.value)
    assert "\n" not in msg
    assert str(path) in msg and f"format {found}" in msg and "upgrade flextron" in msg
    assert "reads format " + ", ".join(map(str, readable)) in msg


def test_current_formats_are_readable():
    assert CHECKPOINT_FORMAT in CHECKPOINT_FORMATS_READ and 1 in CHECKPOINT_FORMATS_READ
    assert RUN_FORMAT in RUN_FORMATS_READ and 1 in RUN_FORMATS_READ


# --------------------------------------------------------------------------- elastic checkpoint


def test_elastic_checkpoint_format(tmp_path):
    fx = convert(make_tiny("qwen2_bias", dtype=torch.float32), ElasticConfig(mlp_fractions=(0.5, 1.0), mlp_divisor=8))
    out = save_elastic(fx, tmp_path / "elastic", extra={"format": 7})  # ``extra`` cannot override it
    meta_file = out / "flextron.json"
    assert json.loads(meta_file.read_text())["format"] == CHECKPOINT_FORMAT
    assert load_elastic(out).space == fx.space  # written by this version: loads

    _edit_json(meta_file, format=99)
    with pytest.raises(ModelError) as e:
        load_elastic(out)
    _refused(e, meta_file, 99, CHECKPOINT_FORMATS_READ)
    assert "newer flextron" in str(e.value)

    _edit_json(meta_file, format="one")
    with pytest.raises(ModelError, match="format 'one'"):
        load_elastic(out)

    _edit_json(meta_file, format=None)  # written before formats were recorded: version 1
    assert load_elastic(out).space == fx.space


# --------------------------------------------------------------------------- run directory


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("formats")
    cfg = write_tiny_run(tmp)
    assert main(["run", str(cfg), "-q"]) == 0
    return cfg, tmp / "runs" / "tiny"


def test_run_directory_format(tiny_run, capsys):
    cfg, run_dir = tiny_run
    info = run_dir / RUN_INFO_FILE
    assert json.loads(info.read_text())["format"] == RUN_FORMAT
    assert "format" not in json.loads((run_dir / "stages.json").read_text())  # stage records only
    load_run(run_dir)  # written by this version: loads

    _edit_json(info, format=99)
    with pytest.raises(ModelError) as e:
        load_run(run_dir)
    _refused(e, info, 99, RUN_FORMATS_READ)
    with pytest.raises(ModelError, match="format 99"):
        check_run_format(run_dir)
    # resuming the run refuses it too, through the CLI: one error line, status 2, nothing run
    capsys.readouterr()
    assert main(["run", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err
    assert "format 99" in err and "upgrade flextron" in err

    info.write_text("{not json")
    with pytest.raises(ModelError, match="corrupt"):
        load_run(run_dir)

    info.unlink()  # written before formats were recorded: version 1
    check_run_format(run_dir)
    load_run(run_dir)
    assert main(["run", str(cfg), "-q"]) == 0  # resumes (complete: nothing to do)
    assert not info.exists()  # an existing run is not rewritten


def test_a_corrupt_stage_record_is_one_clear_error(tmp_path, capsys):
    from flextron.cli import main

    from conftest import write_tiny_run

    cfg = write_tiny_run(tmp_path)
    assert main(["run", str(cfg), "-q"]) == 0
    (tmp_path / "runs" / "tiny" / "stages.json").write_text("{not json")
    capsys.readouterr()
    assert main(["run", str(cfg), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stages.json is unreadable" in err[0] and "delete it" in err[0]
