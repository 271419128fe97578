"""The whole pipeline through the CLI on a tiny model: run, resume no-op, export, generate, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import write_tiny_run
from transformers import AutoModelForCausalLM

from flextron.cli import main
from flextron.model.space import ArchConfig


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = write_tiny_run(tmp)
    assert main(["run", str(cfg), "-q"]) == 0
    return tmp, cfg, tmp / "runs" / "tiny"


def test_run_writes_results_report_and_metrics(tiny_run):
    _, _, run_dir = tiny_run
    res = json.loads((run_dir / "results.json").read_text())
    for key in ("original_perplexity", "original_ood_perplexity", "rows", "ablation", "provenance"):
        assert key in res
    # the tiny tokenizer declares no BOS (its template is "$A"); the policy is recorded where it was resolved
    policy = {"add_bos": False, "bos_token_id": None, "declared_by": "tokenizer.json post-processor template"}
    assert res["bos"] == policy
    assert json.loads((run_dir / "stages.json").read_text())["rank"]["summary"]["bos"] == policy
    row = {r["target"]: r for r in res["rows"]}
    for k in (
        "target",
        "latency_s",
        "predicted_latency_s",
        "full_latency_s",
        "perplexity",
        "untrained_perplexity",
        "ood_perplexity",
        "params",
        "config",
    ):
        assert k in row[0.6]
    # target 1.0 is the full model: same parameters, and perplexity equal to the original before any training
    assert row[1.0]["params"] == row[1.0]["full_params"]
    assert row[0.6]["params"] < row[1.0]["params"]
    # the homogeneous baseline is the best of one rival per head count
    h = row[0.6]["homogeneous"]
    assert len(h["candidates"]) == len(res["search_space"]["head_choices"])
    assert h["perplexity"] == min(c["perplexity"] for c in h["candidates"])
    # the interpolated baseline lies between the two bracketing homogeneous widths' perplexities
    it = h["interpolated"]
    if len(it["between"]) == 2:
        lo_lat, hi_lat = it["between_predicted_latency_s"]
        assert lo_lat <= row[0.6]["predicted_latency_s"] <= hi_lat
        assert min(it["between_perplexity"]) - 1e-9 <= it["perplexity"] <= max(it["between_perplexity"]) + 1e-9
    assert 0 < row[0.6]["latency_ratio"]
    assert set(res["ablation"]["perplexity"]) == {"importance", "none", "random"}
    assert set(res["provenance"]["stages"]) >= {"rank", "latency", "elastic", "routers", "joint", "evaluate"}
    assert (run_dir / "report.md").exists() and (run_dir / "latency_perplexity.png").exists()
    stages = {json.loads(l)["stage"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()}
    assert stages == {"elastic", "routers", "joint"}
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rtr = [r for r in recs if r["stage"] == "routers"]
    assert all("surrogate_spearman" in r and "router_steps_with_surrogate_grad" in r for r in rtr)
    assert all("budget" in r and "kd_loss" in r for r in recs if r["stage"] == "elastic")
    # the router started, at every target of the grid (trained targets and their midpoints), from
    # the better of the best homogeneous configuration and the sensitivity allocation, both within
    # the target; its refinement was validated against that start
    rs = res["training"]["routers"]
    start = rs["warm_start"]
    assert set(start) == {"0.6", "0.7", "0.8", "0.9", "1"} and start["1"]["homogeneous"] == [64, 3]
    from flextron.cost.table import CostTable

    table = CostTable.load(run_dir / "latency_table.json")
    smallest = ArchConfig(
        mlp=(min(res["search_space"]["mlp_choices"]),) * res["search_space"]["num_layers"],
        heads=(min(res["search_space"]["head_choices"]),) * res["search_space"]["num_layers"],
    )
    for t, v in start.items():  # the warm start lies within its target (the budget fit only grows it)
        arch = ArchConfig.from_dict(v["config"])
        assert table.fraction(arch) <= float(t) + 1e-9 or arch == smallest
        assert v["allocated_fraction"] is None or v["allocated_fraction"] <= float(t) + 1e-9
        chosen_delta = v["allocated_delta"] if v["chosen"] == "allocated" else v["homogeneous_delta"]
        assert v["allocated_delta"] is None or chosen_delta == min(v["allocated_delta"], v["homogeneous_delta"])
    verdicts = rs["validation"]["targets"]
    assert verdicts and all(v["kept"] in ("router", "warm start") for v in verdicts.values())
    assert all((v["kept"] == "router") == (v["routed_loss"] < v["warm_start_loss"]) for v in verdicts.values())
    assert rs["validation"]["refit_mismatched_targets"] == []


def test_rerun_is_a_no_op(tiny_run, capsys):
    _, cfg, run_dir = tiny_run
    before = (run_dir / "results.json").read_bytes()
    assert main(["run", str(cfg)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert (run_dir / "results.json").read_bytes() == before


def test_run_dir_of_an_older_config_resumes(tiny_run, capsys):
    """A run directory whose config.yaml predates a field (written without it) is the same run."""
    _, cfg, run_dir = tiny_run
    saved = run_dir / "config.yaml"
    text = saved.read_text()
    older = "".join(
        line for line in text.splitlines(keepends=True) if "checkpoint_every: 25" not in line
    )  # routers' default
    assert older != text
    saved.write_text(older)
    try:
        assert main(["run", str(cfg)]) == 0
        assert "nothing to do" in capsys.readouterr().out
    finally:
        saved.write_text(text)


def test_export_loads_with_plain_transformers(tiny_run, tmp_path):
    _, _, run_dir = tiny_run
    out = tmp_path / "sub"
    assert main(["export", str(run_dir), "--target", "0.6", "--out", str(out), "-q"]) == 0
    meta = json.loads((out / "flextron_subnetwork.json").read_text())
    sub = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert sum(p.numel() for p in sub.parameters()) == meta["params"]
    ids = torch.randint(0, 30, (1, 10))
    from flextron.eval.deploy import load_run

    run = load_run(run_dir)
    run.fx.set_target(0.6)
    assert torch.allclose(sub(ids).logits, run.fx(input_ids=ids).logits, atol=1e-4)
    # an existing non-empty output directory is refused and left alone
    marker = out / "keep.txt"
    marker.write_text("mine")
    assert main(["export", str(run_dir), "--target", "0.6", "--out", str(out)]) == 2
    assert marker.read_text() == "mine"


def test_generate_and_bad_targets(tiny_run, capsys):
    _, _, run_dir = tiny_run
    assert main(["generate", str(run_dir), "--target", "0.8", "--max-new-tokens", "5", "the old king"]) == 0
    assert capsys.readouterr().out.strip()
    assert main(["generate", str(run_dir), "--target", "0.05", "the"]) == 2
    err = capsys.readouterr().err
    assert "below the smallest" in err and "Traceback" not in err
    assert main(["eval", str(run_dir), "--targets", "1.5"]) == 2


def test_changed_config_is_refused_without_overwrite(tiny_run, tmp_path):
    tmp, cfg, run_dir = tiny_run
    changed = cfg.read_text().replace("seed: 0", "seed: 1")
    other = tmp / "changed.yaml"
    other.write_text(changed)
    before = (run_dir / "results.json").read_bytes()
    assert main(["run", str(other)]) == 2
    assert (run_dir / "results.json").read_bytes() == before


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda t, tmp: t.replace("source: " + str(tmp / "model"), "source: " + str(tmp / "missing")), "missing"),
        (lambda t, tmp: t + "\nbogus_key: 1\n", "unknown config key"),
        (lambda t, tmp: t.replace("heldout_articles: 8", "heldout_articles: 0"), "data.heldout_articles"),
        (lambda t, tmp: t + "\nguard: {action: retry}\n", "guard.action"),
    ],
)
def test_bad_input_one_line_error(tmp_path, capsys, mutate, message):
    cfg = write_tiny_run(tmp_path, name="bad")
    cfg.write_text(mutate(cfg.read_text(), tmp_path))
    capsys.readouterr()
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip()
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
    assert err.splitlines()[-1] == errors[0]


def test_corrupt_model_and_unsupported_family(tmp_path, capsys):
    cfg = write_tiny_run(tmp_path, name="corrupt")
    st = tmp_path / "model" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    capsys.readouterr()
    assert main(["run", str(cfg)]) == 2
    assert "error:" in capsys.readouterr().err
    shutil.rmtree(tmp_path / "model")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "model")
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "not supported" in err and "llama" in err


def test_empty_dataset(tmp_path, capsys):
    cfg = write_tiny_run(tmp_path, name="empty")
    for f in (tmp_path / "data").iterdir():
        f.write_text("")
    capsys.readouterr()
    assert main(["run", str(cfg)]) == 2
    assert "error:" in capsys.readouterr().err
