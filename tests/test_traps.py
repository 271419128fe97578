"""Traps a new user falls into (issue 21), each reproduced on a tiny run through the CLI: an export
that would replace a run, a failed run that blocks its own rerun, leftovers of killed writes,
recovery advice that must work when followed, over-long prompts, homogeneous exports that need
remote code, the source dtype, short errors, and an evaluation that must not erase results."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_tiny_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from flextron.cli import main
from flextron.config import ElasticConfig, load_config
from flextron.errors import ConfigError, OutputExistsError, UnsupportedModelError
from flextron.eval.deploy import check_export_path, fit_prompt
from flextron.eval.static import merge_results
from flextron.files import atomic_write_dir, remove_stale_temps
from flextron.model.elastic import convert
from flextron.model.export import export_subnetwork, load_hf_model, save_subnetwork
from flextron.model.hf_modeling import FlextronForCausalLM
from flextron.pipeline import runner as pipeline


@pytest.fixture(scope="module", autouse=True)
def _quiet_loading():
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _error_line(code: int, err: str, *needles: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not re.match(r"^\d{4}-\d\d-\d\d ", ln)]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def _tree_hash(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones included) → sha256; directories → ``dir``."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def dead_pid() -> int:
    """The id of a process that has exited (reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


DEAD_PID = dead_pid()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run, started the way item 2 describes: the first try fails on a bad model
    source and leaves config.yaml; the corrected config then runs without --overwrite."""
    root = tmp_path_factory.mktemp("traps")
    cfg_path = write_tiny_run(root)
    good = yaml.safe_load(cfg_path.read_text())
    bad = {**good, "model": {"source": str(root / "no_such_model")}}
    cfg_path.write_text(yaml.safe_dump(bad))
    code, _, err = _cli(["run", str(cfg_path), "-q"])
    _error_line(code, err, "no_such_model")
    run = root / "runs" / "tiny"
    assert (run / "config.yaml").is_file()  # the trap: a run directory that finished nothing
    cfg_path.write_text(yaml.safe_dump(good))
    code, _, err = _cli(["run", str(cfg_path), "-q"])
    assert code == 0, err
    assert "finished no stage; starting it again with this config" in err
    return {"root": root, "cfg": cfg_path, "run": run}


def _copy_run(finished, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run (``tmp_path/runs/tiny``) and its config pointing there."""
    from flextron.config import dump_config

    run = tmp_path / "runs" / "tiny"
    shutil.copytree(finished["run"], run)
    cfg = yaml.safe_load(finished["cfg"].read_text())
    cfg["out_dir"] = str(tmp_path / "runs")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    (run / "config.yaml").write_text(dump_config(load_config(path)))
    return run, path


# --------------------------------------------------------------------------- item 2


def test_run_dir_with_finished_stages_still_needs_overwrite(finished, tmp_path):
    run, cfg = _copy_run(finished, tmp_path)
    before = _tree_hash(run)
    other = yaml.safe_load(cfg.read_text())
    other["seed"] = 1
    cfg.write_text(yaml.safe_dump(other))
    code, _, err = _cli(["run", str(cfg), "-q"])
    _error_line(code, err, "holds a different run", "pass --overwrite")
    assert _tree_hash(run) == before


# --------------------------------------------------------------------------- item 1


def test_export_never_replaces_a_run(finished, tmp_path):
    run, _ = _copy_run(finished, tmp_path)
    other = tmp_path / "runs" / "other"
    shutil.copytree(run, other)
    (tmp_path / "afile").write_text("x")
    before = {d: _tree_hash(d) for d in (run, other)}
    for out, needle in (
        (run, "is the run directory"),
        (run / "final", "lies inside it"),
        (run / "new" / "deeper", "lies inside it"),
        (run.parent, "contains the run directory"),
        (tmp_path, "contains the run directory"),
        (other, "flextron run directory"),
        (other / "final", "flextron run directory"),
        (tmp_path / "afile" / "x", "is a file"),
        (tmp_path / "afile", "is a file"),
    ):
        code, _, err = _cli(["export", str(run), "--target", "0.6", "--out", str(out), "--overwrite"])
        _error_line(code, err, needle)
    assert {d: _tree_hash(d) for d in (run, other)} == before  # byte for byte
    code, _, err = _cli(["export", str(run), "--target", "0.6", "--out", str(tmp_path / "sub"), "--overwrite"])
    assert code == 0, err
    assert (tmp_path / "sub" / "config.json").is_file()


# --------------------------------------------------------------------------- item 4


def test_leftovers_of_killed_writes_are_removed(finished, tmp_path):
    run, cfg = _copy_run(finished, tmp_path)
    dead, alive = dead_pid(), os.getpid()
    left = {
        "export": tmp_path / f".sub-tmp-{dead}-abcd1234",
        "legacy": tmp_path / ".sub-tmp-zz9_abcd",  # flextron 0.2.0 names carry no pid
        "old": tmp_path / f".sub-old-{dead}-abcd1234",
        "ranked": run / f".ranked-tmp-{dead}-abcd1234",
        "results": run / f".results.json.tmp{dead}",
        "trash": run / f".trash_elastic_{dead}",
    }
    live = tmp_path / f".sub-tmp-{alive}-abcd1234"  # a writer still at work: kept
    for p in (*left.values(), live):
        if p.name.startswith(".results"):
            p.write_text("{")
        else:
            p.mkdir()
            (p / "model.safetensors").write_bytes(b"\0" * 1000)  # a partial weight file
    unrelated = tmp_path / ".subway-tmp-1-abcd1234"
    unrelated.mkdir()
    code, _, err = _cli(["export", str(run), "--target", "0.6", "--out", str(tmp_path / "sub")])
    assert code == 0, err
    assert not left["export"].exists() and not left["legacy"].exists() and not left["old"].exists()
    assert live.exists() and unrelated.exists()
    code, out, err = _cli(["run", str(cfg)])  # complete: nothing to do, but the run's leftovers go
    assert code == 0 and "nothing to do" in out, err
    assert not any(left[k].exists() for k in ("ranked", "results", "trash"))
    # a refused export also clears its destination's leftovers
    left["export"].mkdir()
    code, _, err = _cli(["export", str(run), "--target", "0.6", "--out", str(tmp_path / "sub")])
    _error_line(code, err, "pass --overwrite")
    assert not left["export"].exists()


def test_atomic_write_dir_names_carry_the_pid(tmp_path):
    seen = []
    atomic_write_dir(tmp_path / "d", lambda tmp: seen.append(tmp.name) or (tmp / "f").write_text("1"))
    assert re.fullmatch(rf"\.d-tmp-{os.getpid()}-[a-z0-9_]{{8}}", seen[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    (tmp_path / f".d-tmp-{dead_pid()}-abcdefgh").mkdir()
    (tmp_path / f".e-tmp-{dead_pid()}-abcdefgh").mkdir()  # another destination: left to its own writer
    removed = remove_stale_temps(tmp_path, "d")
    assert len(removed) == 1 and removed[0].name.startswith(".d-tmp-")
    assert min(p.name for p in tmp_path.iterdir()).startswith(".e-tmp-")


# --------------------------------------------------------------------------- item 5


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _advice_path(line: str, pattern: str) -> Path:
    m = re.search(pattern, line)
    assert m, line
    return Path(m.group(1))


def test_advice_delete_final_and_rerun_works(finished, tmp_path):
    """'delete …/final and rerun' (corrupt weights), and 'delete …/checkpoints/joint to restart
    this stage' (a corrupt checkpoint met on the way), followed literally, give a working run."""
    run, cfg = _copy_run(finished, tmp_path)
    _corrupt(run / "final" / "model.safetensors")
    code, _, err = _cli(["export", str(run), "--target", "0.6", "--out", str(tmp_path / "sub")])
    line = _error_line(code, err, "corrupt or altered", "delete")
    shutil.rmtree(_advice_path(line, r"delete (\S+) and rerun"))
    assert not (run / "final").exists()
    code, _, err = _cli(["export", str(run), "--target", "0.6", "--out", str(tmp_path / "sub")])
    _error_line(code, err, "final does not exist", "flextron run")
    # finished stages' checkpoints are tidied away: keep them from now on (the run's stored config
    # and the user's, alike), rerun, then lose final/ again with a corrupt joint checkpoint left
    for path in (cfg, run / "config.yaml"):
        text = path.read_text()
        text = re.sub(r"keep_checkpoints: false", "keep_checkpoints: true", text)
        path.write_text(text if "keep_checkpoints: true" in text else text + "keep_checkpoints: true\n")
    code, _, err = _cli(["run", str(cfg), "-q"])
    assert code == 0, err
    shutil.rmtree(run / "final")
    ckpts = sorted((run / "checkpoints" / "joint").glob("step_*"))
    _corrupt(ckpts[-1] / "model.safetensors")
    code, _, err = _cli(["run", str(cfg), "-q"])
    line = _error_line(code, err, "corrupt or altered", "to restart this stage")
    shutil.rmtree(_advice_path(line, r"delete (\S+) to restart this stage"))
    code, _, err = _cli(["run", str(cfg), "-q"])
    assert code == 0, err
    stages = json.loads((run / "stages.json").read_text())
    assert {"joint", "evaluate"} <= set(stages)
    code, _, err = _cli(["export", str(run), "--target", "0.6", "--out", str(tmp_path / "sub")])
    assert code == 0, err


def test_advice_for_routers_stages_and_run_format_works(finished, tmp_path):
    run, cfg = _copy_run(finished, tmp_path)
    # corrupt final routers: delete the directory and rerun
    _corrupt(run / "final_routers" / "router.safetensors")
    code, _, err = _cli(["export", str(run), "--target", "0.6", "--out", str(tmp_path / "sub")])
    line = _error_line(code, err, "router.safetensors is corrupt or altered", "delete")
    shutil.rmtree(_advice_path(line, r"delete (\S+) and rerun"))
    code, _, err = _cli(["run", str(cfg), "-q"])
    assert code == 0, err
    # corrupt stages.json: delete it to rerun every stage
    (run / "stages.json").write_text("{not json")
    code, _, err = _cli(["run", str(cfg), "-q"])
    line = _error_line(code, err, "stages.json is unreadable", "delete it")
    (run / "stages.json").unlink()
    code, _, err = _cli(["run", str(cfg), "-q"])
    assert code == 0, err
    assert set(json.loads((run / "stages.json").read_text())) >= {"rank", "joint", "evaluate"}
    # corrupt flextron_run.json: delete it (the run reads as format 1)
    (run / "flextron_run.json").write_text("[")
    code, _, err = _cli(["export", str(run), "--target", "0.6", "--out", str(tmp_path / "sub")])
    _error_line(code, err, "flextron_run.json is corrupt", "delete it")
    (run / "flextron_run.json").unlink()
    code, _, err = _cli(["export", str(run), "--target", "0.6", "--out", str(tmp_path / "sub")])
    assert code == 0, err
    # an existing export: pass --overwrite
    code, _, err = _cli(["export", str(run), "--target", "0.6", "--out", str(tmp_path / "sub")])
    _error_line(code, err, "pass --overwrite")
    code, _, err = _cli(["export", str(run), "--target", "0.6", "--out", str(tmp_path / "sub"), "--overwrite"])
    assert code == 0, err
    # a run whose training is unrecorded: rerun `flextron run` to resume it
    stages = json.loads((run / "stages.json").read_text())
    del stages["joint"]
    (run / "stages.json").write_text(json.dumps(stages))
    code, _, err = _cli(["export", str(run), "--target", "0.6", "--out", str(tmp_path / "sub2")])
    _error_line(code, err, "has not finished training", "rerun `flextron run`")
    code, _, err = _cli(["run", str(cfg), "-q"])
    assert code == 0, err
    code, _, err = _cli(["export", str(run), "--target", "0.6", "--out", str(tmp_path / "sub2")])
    assert code == 0, err


def test_advice_pass_overwrite_to_run_works(finished, tmp_path):
    run, cfg = _copy_run(finished, tmp_path)
    other = yaml.safe_load(cfg.read_text())
    other["joint"]["steps"] = 2
    cfg.write_text(yaml.safe_dump(other))
    code, _, err = _cli(["run", str(cfg), "-q"])
    _error_line(code, err, "pass --overwrite")
    code, _, err = _cli(["run", str(cfg), "--overwrite", "-q"])
    assert code == 0, err
    assert load_config(run / "config.yaml").joint.steps == 2


# --------------------------------------------------------------------------- item 6


def test_generate_refuses_a_prompt_longer_than_the_context(finished, caplog):
    run = finished["run"]
    prompt = " ".join(["the river city"] * 60)  # 180 tokens; context 128
    code, _, err = _cli(["generate", str(run), "--target", "0.6", prompt])
    _error_line(code, err, "180 tokens", "at most 64 fit", "context 128", "--truncate")
    code, _, err = _cli(["generate", str(run), "--target", "0.6", "--max-new-tokens", "200", "the river"])
    _error_line(code, err, "--max-new-tokens 200", "128")
    with caplog.at_level("WARNING", logger="flextron.eval.deploy"):  # stderr, through the CLI's logging
        code, out, err = _cli(["generate", str(run), "--target", "0.6", "--truncate", "--max-new-tokens", "8", prompt])
    assert code == 0, err
    assert "the prompt is 180 tokens; only its last 120 are used (--truncate)" in caplog.text
    code, out, err = _cli(["generate", str(run), "--target", "0.6", "--max-new-tokens", "8", "the river city"])
    assert code == 0 and out.startswith("the river city"), err


# --------------------------------------------------------------------------- item 7


def _kept_heads_not_dividing_hidden(config_cls):
    """hidden 54, 2 KV groups of 3 query heads, head_dim 8: keeping 2 heads per group gives 4 heads,
    which do not divide 54 (as Llama-3.x geometries do)."""
    torch.manual_seed(0)
    cfg = config_cls(
        vocab_size=97,
        hidden_size=54,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    cfg._attn_implementation = "sdpa"
    fx = convert(AutoModelForCausalLM.from_config(cfg).eval(), ElasticConfig(mlp_fractions=(0.5, 1.0), mlp_divisor=8))
    return fx, fx.space.homogeneous(16, 2)


def test_homogeneous_export_with_explicit_head_dim(tmp_path, caplog):
    ids = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    # Qwen2's config accepts an explicit head_dim: a plain checkpoint, no remote code
    fx, arch = _kept_heads_not_dividing_hidden(Qwen2Config)
    sub = export_subnetwork(fx, arch)
    out = save_subnetwork(sub, tmp_path / "qwen2")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["head_dim"] == 8 and cfg["num_attention_heads"] == 4 and "auto_map" not in cfg
    re_ = AutoModelForCausalLM.from_pretrained(out)  # no trust_remote_code
    assert type(re_) is type(fx.model)
    with torch.no_grad():
        assert torch.allclose(re_(input_ids=ids).logits, fx.set_arch(arch)(input_ids=ids).logits, atol=1e-5)
    # transformers' LlamaConfig refuses hidden % heads != 0 even with head_dim: remote code, said so
    fx, arch = _kept_heads_not_dividing_hidden(LlamaConfig)
    with caplog.at_level("WARNING", logger="flextron.model.export"):
        sub = export_subnetwork(fx, arch)
    assert isinstance(sub, FlextronForCausalLM)
    assert "LlamaConfig rejects 4 query heads at hidden size 54" in caplog.text
    assert "trust_remote_code=True" in caplog.text
    out = save_subnetwork(sub, tmp_path / "llama")
    re_ = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    with torch.no_grad():
        assert torch.allclose(re_(input_ids=ids).logits, fx.set_arch(arch)(input_ids=ids).logits, atol=1e-5)
    with pytest.raises(Exception):  # noqa: B017 -- the plain class cannot read it (transformers' own error)
        LlamaConfig.from_pretrained(out)


# --------------------------------------------------------------------------- item 8


def test_unknown_model_type_is_one_short_line(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "made_up_family", "hidden_size": 8}))
    (d / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError) as e:
        load_hf_model(d)
    msg = str(e.value)
    assert "made_up_family" in msg and "llama" in msg and "qwen2" in msg and len(msg) < 250 and "\n" not in msg


def test_export_keeps_the_source_dtype(finished, tmp_path):
    run = finished["run"]
    src = Path(load_config(run / "config.yaml").model.source) / "config.json"
    original = src.read_text()
    try:
        src.write_text(json.dumps({**json.loads(original), "dtype": "bfloat16"}))
        code, out, err = _cli(["export", str(run), "--target", "0.6", "--out", str(tmp_path / "bf16")])
        assert code == 0, err
        assert "dtype: bfloat16 (source model" in out
        assert {t.dtype for t in load_file(tmp_path / "bf16" / "model.safetensors").values()} == {torch.bfloat16}
        code, out, err = _cli(
            ["export", str(run), "--target", "0.6", "--out", str(tmp_path / "f32"), "--dtype", "float32"]
        )
        assert code == 0 and "dtype: float32 (asked for" in out, err
        assert {t.dtype for t in load_file(tmp_path / "f32" / "model.safetensors").values()} == {torch.float32}
        assert json.loads((tmp_path / "f32" / "flextron_subnetwork.json").read_text())["dtype"] == "float32"
    finally:
        src.write_text(original)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n", "~\n", "null\n"])
def test_empty_yaml_is_refused(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="is empty; copy configs/smollm2.yaml"):
        load_config(path)
    code, _, err = _cli(["run", str(path)])
    _error_line(code, err, "is empty")


# --------------------------------------------------------------------------- item 12


def test_eval_keeps_the_other_rows(finished, tmp_path, monkeypatch):
    from test_tasks import write_fake_olmo_eval

    run, _ = _copy_run(finished, tmp_path)
    write_fake_olmo_eval(tmp_path / "cache" / "olmo_eval", mmlu=False)
    monkeypatch.setenv("FLEXTRON_CACHE", str(tmp_path / "cache"))
    code, _, err = _cli(["eval", str(run), "--targets", "0.6,1.0", "--tasks", "piqa", "--limit", "4", "-q"])
    assert code == 0, err
    before = json.loads((run / "results.json").read_text())
    code, out, err = _cli(["eval", str(run), "--targets", "1.0", "--tasks", "arc_easy", "--limit", "6", "-q"])
    assert code == 0, err
    assert "target 0.6" not in out and "target 1:" in out
    after = json.loads((run / "results.json").read_text())
    rows = {(r["mode"], r["target"]): r for r in after["rows"]}
    assert set(rows) == {("static", 0.6), ("static", 1.0)}
    old = {r["target"]: r for r in before["rows"]}
    assert rows[("static", 0.6)] == {**old[0.6], "tasks_protocols": rows[("static", 0.6)]["tasks_protocols"]}
    assert set(rows[("static", 1.0)]["tasks"]) == {"piqa", "arc_easy"}  # piqa kept, arc_easy added
    protos = rows[("static", 1.0)]["tasks_protocols"]
    assert protos["piqa"]["limit"] == 4 and protos["arc_easy"]["limit"] == 6
    assert rows[("static", 1.0)]["tasks"]["piqa"] == old[1.0]["tasks"]["piqa"]
    assert after["exported_check"] == before["exported_check"]  # of target 0.6, kept
    report = (run / "report.md").read_text()
    assert "| 0.6" in report and "other settings" in report
    assert (run / "latency_perplexity.png").exists()


# --------------------------------------------------------------------------- fuzz

CASES: Counter = Counter()  # cases tried per fuzz test, printed by conftest's terminal summary
FUZZ = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory) -> dict[str, Path]:
    """Two run directories (marker files only), a plain folder, and a file, for path fuzzing."""
    root = tmp_path_factory.mktemp("fuzz_paths")
    for name in ("run", "other"):
        d = root / "runs" / name
        (d / "final").mkdir(parents=True)
        (d / "config.yaml").write_text("name: x\n")
        (d / "stages.json").write_text("{}")
    (root / "plain" / "sub").mkdir(parents=True)
    (root / "plain" / "afile").write_text("x")
    return {"root": root, "run": root / "runs" / "run"}


_PARTS = st.sampled_from(["..", ".", "runs", "run", "other", "final", "plain", "sub", "afile", "new", "exported"])


@FUZZ
@given(st.lists(_PARTS, min_size=0, max_size=5))
def test_fuzz_export_destinations(fake_runs, parts):
    """Any --out relative to a run directory: refused with one line when it is, contains or lies in
    a run directory or under a file; accepted otherwise. Nothing is ever written or removed."""
    CASES["export destinations"] += 1
    run = fake_runs["run"]
    out = (run.joinpath(*parts) if parts else run).resolve()
    before = _tree_hash(fake_runs["root"])
    try:
        check_export_path(run, run.joinpath(*parts))
        refused = None
    except OutputExistsError as e:
        refused = str(e)
        assert "\n" not in refused and "--out" in refused
    runs = [fake_runs["root"] / "runs" / n for n in ("run", "other")]
    bad = any(r == out or r in out.parents or out in r.parents for r in runs) or any(
        p.is_file() for p in (out, *out.parents)
    )
    assert (refused is not None) == bad, (parts, refused)
    assert _tree_hash(fake_runs["root"]) == before


@settings(FUZZ, max_examples=300)
@given(st.integers(0, 400), st.one_of(st.none(), st.integers(1, 300)), st.integers(1, 400), st.booleans())
def test_fuzz_prompt_lengths(n, max_positions, max_new_tokens, truncate):
    """Any prompt length against any context: the prompt and the new tokens fit, or one ConfigError
    names the limit; truncation keeps the prompt's last tokens."""
    CASES["prompt lengths"] += 1
    ids = torch.arange(n).unsqueeze(0)
    try:
        got = fit_prompt(ids, max_positions, max_new_tokens, truncate)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg
        if n == 0:
            assert "empty" in msg
        else:
            assert max_positions is not None and str(max_positions) in msg
            room = max_positions - max_new_tokens
            assert room < 1 or (n > room and not truncate and f"at most {room} fit" in msg)
        return
    assert n > 0 and got.shape[1] <= n
    if max_positions is not None:
        assert got.shape[1] + max_new_tokens <= max_positions
        assert torch.equal(got[0], ids[0, n - got.shape[1] :])  # the last tokens
        assert got.shape[1] == n or truncate
    else:
        assert torch.equal(got, ids)


_YAML_BITS = st.sampled_from(
    ["", "\n", "  ", "# a comment\n", "---\n", "...\n", "~\n", "null\n", "name: x\n", "seed: 1\n", "{}\n", "[]\n"]
    + ["name:\n", "model: {source: x}\n", "train: {steps: 2}\n", "'\n", "\t\n", "- 1\n", "true\n", "3\n"]
)


@FUZZ
@given(st.lists(_YAML_BITS, max_size=4))
def test_fuzz_empty_and_tiny_yaml(tmp_path_factory, bits):
    """Empty, comment-only and tiny YAML documents: one ``error:`` line (an empty one says so) or a
    valid config; never a default run started silently from an empty file."""
    CASES["empty and tiny YAML"] += 1
    text = "".join(bits)
    path = tmp_path_factory.getbasetemp() / "fuzz_empty.yaml"
    path.write_text(text)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        data = "invalid"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "run", lambda cfg, overwrite=False: Path(cfg.out_dir) / cfg.name)  # no real run
        code, _, err = _cli(["run", str(path), "-q"])
    if data is None:
        _error_line(code, err, "is empty")
    elif code != 0:
        _error_line(code, err)


_ROW_TASKS = st.dictionaries(st.sampled_from(["piqa", "arc_easy", "lambada"]), st.integers(1, 50), max_size=2)
_ROWS = st.lists(
    st.tuples(st.sampled_from([0.5, 0.6, 0.85, 1.0]), st.sampled_from(["static", "dynamic"]), _ROW_TASKS),
    max_size=6,
    unique_by=lambda r: (r[0], r[1]),
)


def _rows(spec, tag):
    return [
        {
            "target": t,
            "mode": m,
            "perplexity": tag,
            **({"tasks": {k: {"acc": 0.5, "n": n} for k, n in tasks.items()}} if tasks else {}),
            **({"tasks_protocol": {"limit": tag}} if tasks else {}),
        }
        for t, m, tasks in spec
    ]


@FUZZ
@given(_ROWS, _ROWS, st.booleans())
def test_fuzz_results_merge(old_spec, new_spec, old_exists):
    """Merging an evaluation into results.json: every (mode, target) row of either survives, the
    new one's measurements win, and no task score measured before is lost unless scored again."""
    CASES["results merge"] += 1
    old = {"rows": _rows(old_spec, 1), "exported_check": {"target": 0.5}} if old_exists else None
    new = {"rows": _rows(new_spec, 2), "original_perplexity": 3.0}
    merged = merge_results(old, new)
    keys = [(r["mode"], r["target"]) for r in merged["rows"]]
    assert len(keys) == len(set(keys))
    assert set(keys) == {(m, t) for t, m, _ in new_spec} | ({(m, t) for t, m, _ in old_spec} if old_exists else set())
    by_key = {(r["mode"], r["target"]): r for r in merged["rows"]}
    for t, m, tasks in new_spec:
        assert by_key[(m, t)]["perplexity"] == 2
        for k in tasks:
            assert by_key[(m, t)]["tasks_protocols"][k] == {"limit": 2}
    for t, m, tasks in old_spec if old_exists else []:
        row = by_key[(m, t)]
        for k in tasks:
            assert k in row["tasks"] and row["tasks_protocols"][k] in ({"limit": 1}, {"limit": 2})
    assert merged["original_perplexity"] == 3.0
    assert (merged.get("exported_check") == {"target": 0.5}) == old_exists


@settings(FUZZ, max_examples=100)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["sub", "ranked", "final", "sub.x"]),
            st.sampled_from(["tmp", "old", "file", "trash", "none"]),
            st.sampled_from(["dead", "alive", "legacy"]),
        ),
        max_size=5,
        unique=True,
    ),
    st.sampled_from(["sub", "ranked", None]),
)
def test_fuzz_stale_temps(tmp_path_factory, entries, name):
    """Only leftovers of dead writers (of the destination asked for, or of any) are removed."""
    CASES["stale temporary siblings"] += 1
    folder = tmp_path_factory.getbasetemp() / "fuzz_temps"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    pids = {"dead": DEAD_PID, "alive": os.getpid()}
    expect_gone = set()
    for dest, kind, who in entries:
        pid = pids.get(who)
        if kind == "none" or (who == "legacy" and kind != "tmp"):
            entry, stale = f".{dest}-cache-{who}", False
        elif kind in ("tmp", "old"):
            entry = f".{dest}-{kind}-" + (f"{pid}-" if pid else "") + "abcd_123"
            stale = who != "alive"
        elif kind == "file":
            entry, stale = f".{dest}.tmp{pid}", who == "dead"
        else:
            entry, stale = f".trash_{dest}_{pid}", who == "dead"
        (folder / entry).mkdir(exist_ok=True)
        if stale and (name is None or dest == name):
            expect_gone.add(entry)
    before = {p.name for p in folder.iterdir()}
    removed = {p.name for p in remove_stale_temps(folder, name)}
    assert removed == expect_gone
    assert {p.name for p in folder.iterdir()} == before - expect_gone


def test_paths_under_a_file_get_one_line(finished, tmp_path):
    (tmp_path / "afile").write_text("x")
    cfg = yaml.safe_load(finished["cfg"].read_text())
    for out_dir in (tmp_path / "afile", tmp_path / "afile" / "deeper"):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump({**cfg, "out_dir": str(out_dir)}))
        code, _, err = _cli(["run", str(path), "-q"])
        _error_line(code, err, "afile is a file", "not under a file")
    for dest in (tmp_path / "afile" / "d", tmp_path / "afile" / "d" / "e"):  # routers, weights, files
        with pytest.raises(OutputExistsError, match="afile is a file"):
            atomic_write_dir(dest, lambda tmp: None)


def test_advice_about_tokenizer_files_works(tmp_path):
    """A corrupt tokenizer: 'replace its tokenizer files with the model's own' (done: the run
    starts); none at all: one line saying a run needs them (before: a traceback)."""
    cfg = write_tiny_run(tmp_path)
    model = tmp_path / "model"
    good = (model / "tokenizer.json").read_bytes()
    (model / "tokenizer.json").write_text("{not json")
    code, _, err = _cli(["run", str(cfg), "-q"])
    _error_line(code, err, "cannot read the tokenizer", "replace its tokenizer files")
    saved = {p.name: p.read_bytes() for p in model.glob("tokenizer*")}
    for name in saved:
        (model / name).unlink()
    code, _, err = _cli(["run", str(cfg), "-q"])
    _error_line(code, err, "has no tokenizer files", "copy them")
    for name, data in saved.items():
        (model / name).write_bytes(good if name == "tokenizer.json" else data)
    code, _, err = _cli(["run", str(cfg), "-q"])  # the run directory finished nothing: no --overwrite needed
    assert code == 0, err


def test_advice_about_a_corrupt_asset_works(tmp_path, monkeypatch):
    """A damaged corpus in the cache: 'delete … and run again', followed, re-extracts it."""
    import zipfile

    from flextron.data import assets
    from flextron.data.corpora import WIKIPEDIA_FILE, load_wikipedia
    from flextron.errors import AssetError

    archives = tmp_path / "archives"
    archives.mkdir()
    wheel = archives / "fakewiki-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"fakewiki/data/{WIKIPEDIA_FILE}", json.dumps({"A": {"extract": "an article"}}))
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    spec = assets.AssetSpec("fakewiki==1.0", wheel.name, sha, (f"fakewiki/data/{WIKIPEDIA_FILE}",))
    monkeypatch.setitem(assets.ASSETS, "wikipedia", spec)
    monkeypatch.setenv("FLEXTRON_ASSET_DIR", str(archives))
    cache = tmp_path / "cache"
    assert [d.title for d in load_wikipedia(cache)] == ["A"]
    (cache / "wikipedia" / WIKIPEDIA_FILE).write_text("{truncated")
    with pytest.raises(AssetError) as e:
        load_wikipedia(cache)
    shutil.rmtree(_advice_path(str(e.value), r"delete (\S+) and run again"))
    assert [d.title for d in load_wikipedia(cache)] == ["A"]


def test_dynamic_rows_of_other_targets_are_kept(tmp_path):
    from flextron.eval.dynamic import append_dynamic_rows

    rows = [
        {"target": 0.6, "mode": "static", "perplexity": 1.0},
        {"target": 0.6, "mode": "dynamic", "perplexity": 2.0},
        {"target": 0.85, "mode": "dynamic", "perplexity": 3.0},
    ]
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    new = {
        "target": 0.6,
        "predicted_fraction": 0.58,
        "perplexity": 4.0,
        "perplexity_ci": [3.5, 4.5],
        "per_domain": {"wikipedia": {"mean_fraction": 0.5}},
    }
    append_dynamic_rows(tmp_path, {"dynamic": [new]})
    got = {
        (r["mode"], r["target"]): r["perplexity"] for r in json.loads((tmp_path / "results.json").read_text())["rows"]
    }
    assert got == {("static", 0.6): 1.0, ("dynamic", 0.6): 4.0, ("dynamic", 0.85): 3.0}


def test_a_write_killed_mid_swap_puts_the_old_copy_back(tmp_path):
    """Killed after the old directory was moved aside and before the new one was renamed in: the
    next write (or run start) restores the old complete copy instead of deleting it."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process id that has exited
    aside = tmp_path / f".final-old-{pid}-abcd1234"
    (aside / "x").mkdir(parents=True)
    (aside / "x" / "model.safetensors").write_bytes(b"weights")
    removed = remove_stale_temps(tmp_path, "final")
    assert removed == [aside] and not aside.exists()
    assert (tmp_path / "final" / "model.safetensors").read_bytes() == b"weights"


def test_advice_about_a_corrupt_download_works(tmp_path, monkeypatch):
    """A damaged archive in the download cache: 'sha256 mismatch ... delete … and run again',
    followed, downloads it again (pip stood in for by a copy of the good archive)."""
    import sys
    import zipfile

    from flextron.data import assets
    from flextron.data.corpora import WIKIPEDIA_FILE, load_wikipedia
    from flextron.errors import AssetError

    good = tmp_path / "index" / "fakewiki-1.0-py3-none-any.whl"
    good.parent.mkdir()
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr(f"fakewiki/data/{WIKIPEDIA_FILE}", json.dumps({"A": {"extract": "an article"}}))
    sha = hashlib.sha256(good.read_bytes()).hexdigest()
    monkeypatch.setitem(
        assets.ASSETS,
        "wikipedia",
        assets.AssetSpec("fakewiki==1.0", good.name, sha, (f"fakewiki/data/{WIKIPEDIA_FILE}",)),
    )
    monkeypatch.delenv("FLEXTRON_ASSET_DIR", raising=False)
    copy = "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])"
    monkeypatch.setattr(assets, "_pip_command", lambda spec, dest: [sys.executable, "-c", copy, str(good), str(dest)])
    cache = tmp_path / "cache"
    (cache / "downloads").mkdir(parents=True)
    (cache / "downloads" / good.name).write_bytes(good.read_bytes()[:-10])  # a truncated download
    with pytest.raises(AssetError, match="sha256 mismatch") as e:
        load_wikipedia(cache)
    _advice_path(str(e.value), r"delete (\S+) and run again").unlink()
    assert [d.title for d in load_wikipedia(cache)] == ["A"]


def test_exports_carry_the_source_models_licence_files(finished, tmp_path):
    """A model whose terms require a copy of them and a NOTICE with every derivative (Gemma):
    the source directory's licence, terms and NOTICE files go into every export."""
    run, _ = _copy_run(finished, tmp_path)
    source = Path(yaml.safe_load((run / "config.yaml").read_text())["model"]["source"])
    added = [source / "LICENSE", source / "NOTICE.md", source / "GEMMA_TERMS.html"]
    other = source / "README.upstream.md"
    try:
        other.write_text("not a licence")
        for f in added:
            f.write_text(f"{f.name} text")
        code, _, err = _cli(["export", str(run), "--target", "0.6", "--out", str(tmp_path / "sub")])
        assert code == 0, err
        for f in added:
            assert (tmp_path / "sub" / f.name).read_text() == f"{f.name} text"
        assert not (tmp_path / "sub" / other.name).exists()  # only licence-like names are copied
    finally:
        for f in [*added, other]:
            f.unlink(missing_ok=True)


def test_targets_in_milliseconds(finished, tmp_path):
    """`--target 250ms`: milliseconds of the run's lookup-table workload; a table priced in
    parameters refuses it with one line, and so do malformed values."""
    from flextron.eval.deploy import load_run, resolve_target

    run, _ = _copy_run(finished, tmp_path)
    loaded = load_run(run)
    if loaded.table.unit == "s":
        full_ms = 1000 * loaded.table.full
        assert resolve_target(loaded, f"{0.5 * full_ms}ms") == pytest.approx(0.5)
        assert resolve_target(loaded, f"{2 * full_ms}ms") == 1.0
    else:  # the tiny run prices parameters
        code, _, err = _cli(["export", str(run), "--target", "250ms", "--out", str(tmp_path / "sub")])
        _error_line(code, err, "is in milliseconds", "latency.budget: params")
    for bad in ("0ms", "-3ms", "fastms", "250 s"):
        code, _, err = _cli(["export", str(run), "--target", bad, "--out", str(tmp_path / "sub")])
        assert code == 2 and "Traceback" not in err and "target" in err, err
    loaded.table.unit, loaded.table.full = "s", 0.2  # a latency table: 100 ms is half of 200 ms
    assert resolve_target(loaded, "100ms") == pytest.approx(0.5) and resolve_target(loaded, 0.7) == 0.7


def test_a_parameter_budget_is_not_shown_as_time(finished, tmp_path):
    """With latency.budget: params the table prices parameters: the report and the export say so."""
    run, _ = _copy_run(finished, tmp_path)
    assert json.loads((run / "latency_table.json").read_text())["unit"] == "params"
    report = (run / "report.md").read_text()
    assert "predicted (M params)" in report and "predicted (ms)" not in report
    code, _, err = _cli(["export", str(run), "--target", "0.8", "--out", str(tmp_path / "sub")])
    assert code == 0, err
    info = json.loads((tmp_path / "sub" / "flextron_subnetwork.json").read_text())
    assert "predicted_params" in info and "predicted_latency_s" not in info
