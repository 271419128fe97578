"""Untrusted input: files are loaded from safetensors only, checked against their recorded sha256
and against the shapes their config implies; configs, targets and JSON are validated. Fuzzed with
hypothesis: every malformed input gets a FlextronError (through the CLI: one ``error:`` line and
exit status 2), never a traceback or a silently wrong result. The number of cases tried is
printed in pytest's terminal summary."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny, write_tiny_run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from flextron.cli import main, parse_target
from flextron.config import ElasticConfig, RouterConfig, RunConfig, dump_config, from_dict, load_config
from flextron.cost.table import CostTable
from flextron.errors import ConfigError, ModelError, TargetError
from flextron.eval.deploy import load_run
from flextron.files import sha256_file
from flextron.model.elastic import convert
from flextron.model.export import load_elastic, load_hf_model, save_elastic
from flextron.pipeline import runner as pipeline
from flextron.routing.deploy import TargetRouter
from flextron.routing.router import StaticRouter
from flextron.routing.store import new_router, save_routers
from flextron.routing.surrogate import Surrogate
from flextron.train.checkpoint import load_checkpoint, save_checkpoint
from flextron.train.routers import train_routers

CASES: Counter = Counter()  # cases tried per fuzz test, printed by conftest's terminal summary
FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CFG = ElasticConfig(mlp_fractions=(0.25, 0.5, 1.0), mlp_divisor=8)
SRC = Path(__file__).parents[1] / "src" / "flextron"


# --------------------------------------------------------------------------- fixtures: files to damage


def _tiny_fx():
    return convert(make_tiny("llama_gqa_tied", dtype=torch.float32), CFG)


def _checkpoint(root: Path) -> Path:
    fx = _tiny_fx()
    opt = torch.optim.AdamW(fx.parameters(), lr=1e-3)
    fx(input_ids=torch.randint(0, 97, (1, 8))).logits.sum().backward()
    opt.step()
    return save_checkpoint(root, 2, {"model": fx}, opt, {"stage": "elastic", "settings": {"global_batch": 4}})


ROUTER_CFG = RouterConfig(
    targets=(0.6, 1.0), steps=1, warmup_samples=2, heldout_configs=2, batch_size=2, seq_len=8, surrogate_updates=2
)
ROUTER_BLOCKS = torch.randint(0, 97, (4, 8), generator=torch.Generator().manual_seed(0))


def _train_routers(run_dir: Path, cfg: RouterConfig = ROUTER_CFG) -> dict:
    """One step of router training on a tiny model (resuming from ``run_dir``'s checkpoint if any)."""
    fx = _tiny_fx()
    sp = fx.space
    torch.manual_seed(0)
    router = StaticRouter(cfg.targets, sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), 8)
    sm = Surrogate(sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), 8)
    return train_routers(fx, router, sm, CostTable.from_parameters(sp), ROUTER_BLOCKS, cfg, run_dir, progress=False)


def _load_ckpt(path: Path, settings: dict | None = None) -> dict:
    fx = _tiny_fx()
    return load_checkpoint(path, {"model": fx}, torch.optim.AdamW(fx.parameters(), lr=1e-3), settings)


@pytest.fixture(scope="module", autouse=True)
def _quiet_loading():
    """transformers draws a progress bar on stderr while loading weights; the CLI checks below
    read stderr for the single ``error:`` line."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A training checkpoint and a finished run directory (elastic weights, routers, cost table)."""
    root = tmp_path_factory.mktemp("untrusted")
    cfg = load_config(write_tiny_run(root))
    model, tok = load_hf_model(cfg.model.source)
    fx = convert(model, cfg.elastic)
    run = cfg.run_dir
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    (run / "stages.json").write_text(
        json.dumps({s: {"wall_s": 0, "tokens": 0, "summary": {}} for s in pipeline.STAGES[:-1]})
    )
    save_elastic(fx, run / "final", tokenizer=tok)
    CostTable.from_parameters(fx.space).save(run / "latency_table.json")
    save_routers(run / "final_routers", *new_router(cfg, fx))
    _train_routers(root / "router_run")
    return {"checkpoint": _checkpoint(root / "ckpt"), "run": run, "router_run": root / "router_run"}


def _copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    return dst


def _cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def _assert_cli_error(code: int, err: str, *needles: str) -> None:
    lines = [
        line for line in err.splitlines() if line.strip() and not re.match(r"^\d{4}-\d\d-\d\d ", line)
    ]  # log lines aside
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# --------------------------------------------------------------------------- explicit cases


def test_no_unpickling_anywhere():
    """Weights, routers and checkpoints are read with safetensors only: no torch.load / pickle."""
    for path in SRC.glob("*.py"):
        text = path.read_text()
        assert not re.search(r"torch\.load\b|\bpickle\b|weights_only", text), path.name


def test_checkpoint_refuses_truncated_altered_reshaped_and_other_settings(files, tmp_path):
    src = files["checkpoint"]
    assert _load_ckpt(src, {"global_batch": 4})["step"] == 2  # the intact one loads
    # truncated
    ck = _copy(src, tmp_path / "a" / src.name)
    data = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"model\.safetensors is corrupt or altered: sha256"):
        _load_ckpt(ck)
    # one byte altered in the optimizer state
    ck = _copy(src, tmp_path / "b" / src.name)
    data = bytearray((ck / "optimizer.safetensors").read_bytes())
    data[-3] ^= 0x10
    (ck / "optimizer.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"optimizer\.safetensors is corrupt or altered"):
        _load_ckpt(ck)
    # consistent hashes, but a tensor of another shape (e.g. a checkpoint of another config)
    ck = _copy(src, tmp_path / "c" / src.name)
    tensors = load_file(ck / "model.safetensors")
    key = next(k for k in tensors if k.endswith("mlp.up_proj.weight"))
    tensors[key] = tensors[key].t().contiguous()  # (64, 48) -> (48, 64)
    save_file(tensors, ck / "model.safetensors")
    state = json.loads((ck / "state.json").read_text())
    state["sha256"]["model.safetensors"] = sha256_file(ck / "model.safetensors")
    (ck / "state.json").write_text(json.dumps(state))
    with pytest.raises(ModelError, match=re.escape(f"tensor {key} has shape (48, 64) but the model expects (64, 48)")):
        _load_ckpt(ck)
    # written by a run with another global batch
    with pytest.raises(ModelError, match=r"global_batch: 4 in the checkpoint vs 8 now"):
        _load_ckpt(src, {"global_batch": 8})
    # no hash manifest
    ck = _copy(src, tmp_path / "d" / src.name)
    state = json.loads((ck / "state.json").read_text())
    del state["sha256"]
    (ck / "state.json").write_text(json.dumps(state))
    with pytest.raises(ModelError, match="unreadable"):
        _load_ckpt(ck)


def test_router_checkpoint_refuses_other_settings_and_missing_state(files, tmp_path):
    """The router stage resumes only from a checkpoint of the same settings holding its whole state."""
    run = _copy(files["router_run"], tmp_path / "run")
    assert _train_routers(run)["resumed_from"] == 1  # the intact one resumes (at its last step)
    with pytest.raises(ModelError, match=r"router_lr: 0\.01 in the checkpoint vs 0\.02 now"):
        _train_routers(run, dataclasses.replace(ROUTER_CFG, router_lr=0.02))
    ck = run / "checkpoints" / "routers" / "step_000001"
    state = json.loads((ck / "state.json").read_text())
    del state["sha256"]["state.safetensors"]  # consistent manifest, but the buffer and generator are gone
    (ck / "state.json").write_text(json.dumps(state))
    (ck / "state.safetensors").unlink()
    with pytest.raises(ModelError, match="lacks the router stage's state"):
        _train_routers(run)


def test_run_files_refuse_altered_weights_routers_and_shapes(files, tmp_path):
    run = _copy(files["run"], tmp_path / "run")
    assert load_elastic(run / "final").space.num_layers == 3
    # the elastic weights: one byte altered (a silent change of a weight without the hash)
    data = bytearray((run / "final" / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    (run / "final" / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelError, match=r"final/model\.safetensors is corrupt or altered"):
        load_elastic(run / "final")
    # config.json promises other shapes than the weights hold
    run = _copy(files["run"], tmp_path / "run2")
    cfg = json.loads((run / "final" / "config.json").read_text())
    cfg["intermediate_size"] = 72
    (run / "final" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=r"do not match .*config\.json.*\(64, 48\) in the file vs \(72, 48\)"):
        load_elastic(run / "final")
    # flextron.json describes another search space than the weights give
    run = _copy(files["run"], tmp_path / "run3")
    meta = json.loads((run / "final" / "flextron.json").read_text())
    meta["search_space"]["intermediate_size"] = 128
    (run / "final" / "flextron.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match=r"intermediate_size: 128 recorded vs 64 from the weights"):
        load_elastic(run / "final")
    # routers: altered, then a router of another shape with a consistent manifest
    run = _copy(files["run"], tmp_path / "run4")
    (run / "final_routers" / "router.safetensors").write_bytes(b"\0" * 64)
    code, err = _cli(["export", str(run), "--target", "0.8", "--out", str(tmp_path / "out")])
    _assert_cli_error(code, err, "router.safetensors is corrupt or altered")
    cfg = load_config(run / "config.yaml")
    fx = load_elastic(run / "final")
    other = StaticRouter(
        (0.5, 0.6, 0.8, 1.0),
        fx.space.num_layers,
        len(fx.space.mlp_choices),
        len(fx.space.head_choices),
        cfg.routers.hidden,
    )
    save_routers(run / "final_routers", other, new_router(cfg, fx)[1])
    with pytest.raises(
        ModelError, match=r"tensor net\.0\.weight has shape \(\d+, 4\) but the model expects \(\d+, 3\)"
    ):
        load_run(run)


# --------------------------------------------------------------------------- fuzz: configs


_VALID_YAML = dump_config(RunConfig())
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.lists(st.integers(-3, 200), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@st.composite
def yaml_texts(draw) -> str:
    """Valid configs damaged at random places, or random text with YAML syntax characters."""
    if draw(st.booleans()):
        return draw(st.text(alphabet=st.sampled_from(list(":-[]{}&*!|>'\"#%@` \n\tabc019.,")), max_size=60))
    text = _VALID_YAML
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text)))
        j = min(len(text), i + draw(st.integers(0, 6)))
        text = text[:i] + draw(st.text(alphabet=st.sampled_from(list(":-[]{}\n 01.-eaxnul")), max_size=5)) + text[j:]
    return text


@FUZZ
@given(yaml_texts())
def test_fuzz_yaml_through_the_cli(tmp_path_factory, text):
    """Every damaged config file gives one ``error:`` line and exit 2, or a valid config."""
    CASES["yaml through the CLI"] += 1
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(text)
    try:
        load_config(path)
        valid = True
    except ConfigError:
        valid = False
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "run", lambda cfg, overwrite=False: Path(cfg.out_dir) / cfg.name)  # no real run
        code, err = _cli(["run", str(path), "-q"])
    if valid:
        assert code == 0, err
    else:
        _assert_cli_error(code, err)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from(["name", "seed", "threads", "model", "train", "elastic", "routers", "joint", "eval", "typo"]),
        st.one_of(
            _SCALARS,
            st.dictionaries(
                st.sampled_from(
                    [
                        "steps",
                        "lr",
                        "targets",
                        "batch_size",
                        "grad_accum",
                        "mixed_precision",
                        "mlp_fractions",
                        "kd_alpha",
                        "x",
                    ]
                ),
                _SCALARS,
                max_size=3,
            ),
        ),
        max_size=4,
    )
)
def test_fuzz_wrong_types_and_values(data):
    """Any mapping either builds a config whose fields have their declared types, or raises a
    ConfigError that names a field."""
    CASES["config types and values"] += 1
    try:
        cfg = from_dict(RunConfig, data)
    except ConfigError as e:
        assert any(k in str(e) for k in data) or "config" in str(e), str(e)
        return
    assert isinstance(cfg.train.steps, int) and cfg.train.steps >= 1 and math.isfinite(cfg.train.lr)
    assert from_dict(RunConfig, yaml.safe_load(dump_config(cfg))) == cfg  # what is accepted round-trips


_MODEL = make_tiny("llama_gqa_tied", dtype=torch.float32)  # intermediate 64, 3 query heads per KV group


@FUZZ
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=32), max_size=4),
    st.integers(-2, 80),
    st.one_of(st.none(), st.lists(st.integers(-1, 6), max_size=4)),
)
def test_fuzz_candidate_lists(fractions, divisor, heads):
    """Impossible candidates (non-divisible widths, more heads than exist, zero neurons) raise a
    ConfigError; possible ones give a search space that really fits the model."""
    CASES["candidate lists"] += 1
    try:
        space = convert(
            _MODEL,
            ElasticConfig(
                mlp_fractions=tuple(fractions),
                mlp_divisor=divisor,
                heads_per_group=None if heads is None else tuple(heads),
            ),
        ).space
    except ConfigError as e:
        assert "elastic." in str(e)
        return
    assert 64 % divisor == 0 and space.mlp_choices[-1] == 64 and space.head_choices[-1] == 3
    assert all(m % divisor == 0 and 0 < m <= 64 for m in space.mlp_choices)
    assert all(1 <= a <= 3 for a in space.head_choices)


_FX = convert(make_tiny("llama_gqa_tied", dtype=torch.float32), CFG)
_TABLE = CostTable.from_parameters(_FX.space)
_ROUTER = TargetRouter(
    StaticRouter((0.6, 1.0), 3, len(_FX.space.mlp_choices), len(_FX.space.head_choices), 8), _TABLE, _FX.space
)


@settings(FUZZ, max_examples=200)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-5, 5), st.text(max_size=6)))
def test_fuzz_targets(target):
    """Out-of-range targets are refused (router: TargetError; CLI: argument error); accepted ones
    give a configuration that meets them."""
    CASES["targets"] += 1
    try:
        arch = _ROUTER.route(target)
    except TargetError as e:
        assert "target" in str(e)
    else:
        assert isinstance(target, (int, float)) and _TABLE.fraction(arch) <= target + 1e-9
    try:
        t = parse_target(str(target))
    except Exception as e:  # argparse turns this into one ``error:`` line (tests/test_report_cli.py)
        assert type(e).__name__ == "ArgumentTypeError"
    else:
        assert 0 < t <= 1


@settings(FUZZ, max_examples=100)
@given(
    st.recursive(
        _SCALARS,
        lambda inner: st.dictionaries(
            st.sampled_from(["unit", "mlp", "attn", "const", "num_layers", "full", "device", "validation", "8", "x"]),
            inner,
            max_size=6,
        ),
        max_leaves=12,
    )
)
def test_fuzz_cost_table_json(tmp_path_factory, obj):
    """A cost table JSON of any shape loads as a valid table or raises a ConfigError naming the file."""
    CASES["cost table JSON"] += 1
    path = tmp_path_factory.getbasetemp() / "table.json"
    path.write_text(json.dumps(obj))
    try:
        table = CostTable.load(path)
    except ConfigError as e:
        assert str(path) in str(e)
        return
    assert table.full > 0 and table.mlp and table.attn


# --------------------------------------------------------------------------- fuzz: damaged safetensors


@st.composite
def damage(draw):
    """(kind, position fraction, byte): truncate, flip one byte, or append bytes."""
    return (
        draw(st.sampled_from(["truncate", "flip", "append"])),
        draw(st.floats(0, 1, exclude_max=True)),
        draw(st.integers(1, 255)),
    )


def _damage(path: Path, kind: str, where: float, byte: int) -> None:
    data = bytearray(path.read_bytes())
    i = int(where * len(data))
    if kind == "truncate":
        data = data[:i]
    elif kind == "flip":
        data[i] ^= byte
    else:
        data += bytes([byte]) * (1 + i % 9)
    path.write_bytes(bytes(data))


@FUZZ
@given(st.sampled_from(["model.safetensors", "optimizer.safetensors"]), damage())
def test_fuzz_damaged_checkpoint(files, tmp_path_factory, name, dmg):
    CASES["damaged training checkpoint"] += 1
    ck = _copy(files["checkpoint"], tmp_path_factory.getbasetemp() / "fuzz_ck" / files["checkpoint"].name)
    _damage(ck / name, *dmg)
    with pytest.raises(ModelError, match=re.escape(name)):
        _load_ckpt(ck)


@settings(FUZZ, max_examples=40)
@given(
    st.sampled_from(
        [
            "router.safetensors",
            "surrogate.safetensors",
            "router_optimizer.safetensors",
            "surrogate_optimizer.safetensors",
            "state.safetensors",
        ]
    ),
    damage(),
)
def test_fuzz_damaged_router_checkpoint(files, tmp_path_factory, name, dmg):
    """Resuming router training from a damaged checkpoint is refused, naming the damaged file."""
    CASES["damaged router checkpoint"] += 1
    run = _copy(files["router_run"], tmp_path_factory.getbasetemp() / "fuzz_router_run")
    _damage(run / "checkpoints" / "routers" / "step_000001" / name, *dmg)
    with pytest.raises(ModelError, match=re.escape(name)):
        _train_routers(run)


@settings(FUZZ, max_examples=60)
@given(
    st.sampled_from(
        ["final/model.safetensors", "final_routers/router.safetensors", "final_routers/surrogate.safetensors"]
    ),
    damage(),
)
def test_fuzz_damaged_run_through_the_cli(files, tmp_path_factory, name, dmg):
    """``flextron export`` on a run with a damaged weight file: one ``error:`` line naming it, exit 2."""
    CASES["damaged run files through the CLI"] += 1
    base = tmp_path_factory.getbasetemp()
    run = _copy(files["run"], base / "fuzz_run" / files["run"].name)
    _damage(run / name, *dmg)
    code, err = _cli(["export", str(run), "--target", "0.8", "--out", str(base / "fuzz_out")])
    _assert_cli_error(code, err, Path(name).name, "corrupt or altered")
    assert not (base / "fuzz_out").exists()
