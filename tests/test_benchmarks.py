"""The benchmark scripts under benchmarks/ at tiny scale: each runs end to end on a tiny random
model and writes JSON of the documented structure with sane values. No timing thresholds."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
from conftest import write_tiny_run

import flextron
from benchmarks.measure import forward_flops
from flextron.eval.stats import paired_comparison, pareto_frontier
from flextron.model.space import SearchSpace
from flextron.pipeline.runner import STAGES

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    cfg = write_tiny_run(tmp)
    run_dir = flextron.run(flextron.load_config(cfg))
    return tmp, cfg, run_dir


def test_pareto_rows_comparisons_and_checks(tiny, capsys):
    tmp, cfg, run_dir = tiny
    out = tmp / "pareto"
    assert _script("pareto")([str(cfg), "--run-dir", str(run_dir), "--out", str(out), "--scale", "tiny", "-q"]) == 0
    res = json.loads((out / "pareto.json").read_text())
    targets = res["settings"]["targets"]
    methods = res["settings"]["methods"]
    assert {(r["method"], r["target"]) for r in res["rows"]} == {(m, t) for m in methods for t in targets}
    for r in res["rows"]:
        for k in ("method", "target", "latency_s", "perplexity", "params", "train_tokens", "perplexity_ci"):
            assert k in r
        assert r["latency_s"] > 0 and r["latency_ratio"] > 0 and r["perplexity"] > 1
        assert r["perplexity_ci"][0] <= r["perplexity"] <= r["perplexity_ci"][1]
        assert len(r["nll_per_block"]) == res["heldout"]["blocks"]
    rows = {(r["method"], r["target"]): r for r in res["rows"]}
    budget = res["token_budget"]
    # same total training tokens: MatFormer gets Flextron's budget, Minitron splits it over the targets
    assert rows[("flextron", 1.0)]["train_tokens"] == budget["flextron_train_tokens"]
    assert (
        abs(rows[("matformer", 0.6)]["train_tokens"] - budget["flextron_train_tokens"]) <= budget["tokens_per_step"] / 2
    )
    minitron_total = sum(rows[("minitron", t)]["train_tokens"] for t in targets)
    assert abs(minitron_total - budget["flextron_train_tokens"]) <= len(targets) * budget["tokens_per_step"] / 2
    assert rows[("untrained", 0.6)]["train_tokens"] == 0
    # MatFormer is deployed homogeneous; Minitron and the untrained cuts at Flextron's configuration
    assert all(rows[("matformer", t)]["homogeneous"] for t in targets)
    for t in targets:  # deployed: the least-loss trained homogeneous candidate within the target
        sel = rows[("matformer", t)]["selection"]
        losses = [c["search_loss"] for c in sel["candidates"]]
        assert rows[("matformer", t)]["config"] == sel["candidates"][0]["config"] and losses == sorted(losses)
        assert all(c["predicted_fraction"] <= t * 1.02 + 1e-9 for c in sel["candidates"])
    assert rows[("minitron", 0.6)]["config"] == rows[("flextron", 0.6)]["config"]
    assert rows[("flextron", 0.6)]["params"] < rows[("flextron", 1.0)]["params"]
    # the full configuration of the untrained cuts is the original model, whatever the order of units
    assert rows[("untrained", 1.0)]["perplexity"] == pytest.approx(
        rows[("untrained_unpermuted", 1.0)]["perplexity"], rel=1e-4
    )
    assert len(res["comparisons"]) == (len(methods) - 1) * len(targets)
    assert all(c["verdict"] in ("better", "worse", "tie") and c["ci95"][0] <= c["ci95"][1] for c in res["comparisons"])
    assert [c["target"] for c in res["router_checks"]] == [t for t in targets if t < 1]
    for c in res["router_checks"]:
        assert c["random_search"]["candidates"] == res["settings"]["random_search"]
        assert c["random_search"]["router_vs"]["verdict"] in ("better", "worse", "tie")
        assert c["random_search"]["predicted_fraction"] <= c["router"]["predicted_fraction"] + 1e-9
    assert "skipped" in res["lut_check"]  # the tiny run prices parameters, not latency
    assert (out / "pareto.png").stat().st_size > 0
    assert "vs Flextron" in capsys.readouterr().out.strip().splitlines()[-len(res["rows"]) - 2]


def test_speed_ratios_and_profile(tiny):
    tmp, _, run_dir = tiny
    out = tmp / "speed"
    argv = [
        str(run_dir),
        "--out",
        str(out),
        "--repeats",
        "3",
        "--prompt-len",
        "4",
        "--new-tokens",
        "3",
        "--threshold",
        "100",
        "-q",
    ]
    assert _script("speed")(argv) == 0
    res = json.loads((out / "speed.json").read_text())
    assert [r["target"] for r in res["rows"]] == [0.6, 1.0]
    for r in res["rows"]:
        for kind in ("prefill", "decode"):
            assert r[f"{kind}_speedup"] > 0 and r[f"{kind}_ideal_speedup"] >= 1 and r[f"{kind}_real_over_ideal"] > 0
            assert r[f"{kind}_profile"] and all(
                "op" in p and "excess_s" in p for p in r[f"{kind}_profile"]
            )  # forced by --threshold 100
    full = {r["target"]: r for r in res["rows"]}[1.0]
    assert full["prefill_ideal_speedup"] == pytest.approx(1.0)
    assert {r["target"]: r for r in res["rows"]}[0.6]["prefill_ideal_speedup"] > 1


def test_training_cost_phases(tiny):
    tmp, _, run_dir = tiny
    out = tmp / "cost"
    assert _script("training_cost")([str(run_dir), "--out", str(out), "--steps", "2", "-q"]) == 0
    res = json.loads((out / "training_cost.json").read_text())
    assert set(res["elastic"]) == {"sample", "teacher_forward", "forward_loss", "backward", "optimizer"}
    assert set(res["dense"]) == set(res["full"]) == {"forward_loss", "backward", "optimizer"}
    assert len(res["configs"]) == 2 and all(len(v) == 2 for v in res["per_step_s"].values())
    s = res["summary"]
    for k in (
        "elastic_tokens_per_s",
        "dense_same_mix_tokens_per_s",
        "full_finetune_tokens_per_s",
        "ratio_elastic_vs_dense_same_mix",
        "ratio_elastic_vs_full_finetune",
    ):
        assert s[k] > 0
    assert s["elastic_with_teacher_tokens_per_s"] < s["elastic_tokens_per_s"]
    assert 0 < s["teacher_forward_share_of_elastic_step"] < 1


def test_conversion_scaling_two_sizes(tiny):
    tmp, cfg, _ = tiny
    out = tmp / "scaling"
    assert (
        _script("conversion_scaling")([str(cfg), "--out", str(out), "--depth-mult", "2", "--width-mult", "1.5", "-q"])
        == 0
    )
    res = json.loads((out / "conversion_scaling.json").read_text())
    a, b = res["sizes"]
    assert b["model"]["num_hidden_layers"] == 2 * a["model"]["num_hidden_layers"]
    assert b["model"]["num_key_value_heads"] == 3 and b["model"]["params"] > a["model"]["params"]
    assert res["param_ratio"] > 1
    assert set(res["scaling"]) == set(STAGES) | {"total"}
    for v in res["scaling"].values():
        assert v["base_s"] >= 0 and v["larger_s"] >= 0 and set(v["extrapolated_s"]) == {"1e+09", "8e+09"}


def test_serving_memory(tiny):
    tmp, _, run_dir = tiny
    out = tmp / "serve"
    assert _script("serving_memory")([str(run_dir), "--out", str(out), "--new-tokens", "2", "-q"]) == 0
    res = json.loads((out / "serving_memory.json").read_text())
    d = res["disk"]
    assert (
        0 < d["flextron_weight_bytes"] <= d["flextron_bytes"] and 0 < d["separate_weight_bytes"] <= d["separate_bytes"]
    )
    for kind in ("flextron", "separate"):
        m = res["memory"][kind]
        assert m["generated"] == [16 + 2] * len(res["targets"])
        assert m["loaded_rss_bytes"] > 0 and m["peak_rss_bytes"] > 0
    assert all(v > 0 for v in res["ratios"].values())


def test_memory_per_stage(tmp_path):
    """benchmarks/memory.py: every stage's peak against its budget, from a fresh process each,
    with the documented parts (the ratio itself is the script's exit status, not asserted here)."""
    out = tmp_path / "memory.json"
    _script("memory")(["--batch", "2", "--seq", "32", "--steps", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert set(res["stages"]) == {"elastic", "routers", "joint", "evaluate"}
    for stage, r in res["stages"].items():
        parts = r["parts"]
        assert set(parts) == {"weights", "gradients", "optimizer", "teacher", "activations"}
        assert r["budget"] == sum(parts.values()) and r["stage_peak"] > 0 and r["ratio"] > 0
        assert parts["activations"] > 0 and (parts["gradients"] > 0) == (stage in ("elastic", "joint"))
    # the weights autograd saves for backward are counted once, as weights: with 2 × 32 tokens
    # the training stages' activations are far below the weights (the logits alone are 2·32·49,152·4 B)
    assert res["stages"]["elastic"]["parts"]["activations"] < res["stages"]["elastic"]["parts"]["weights"]


def test_bench_helpers():
    # a tie when the paired interval holds 0; better/worse from the first model's side
    assert paired_comparison([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])["verdict"] == "tie"
    assert paired_comparison([1.0, 1.1, 0.9, 1.0], [2.0, 2.1, 1.9, 2.0])["verdict"] == "better"
    assert paired_comparison([2.0, 2.1], [1.0, 1.1])["verdict"] == "worse"
    assert pareto_frontier([(3, 1.0), (1, 5.0), (2, 6.0), (2, 2.0)]) == [(1, 5.0), (2, 2.0), (3, 1.0)]
    sp = SearchSpace(
        num_layers=2,
        hidden_size=8,
        intermediate_size=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=2,
        mlp_choices=(8, 16),
        head_choices=(1, 2),
        total_params=1,
        q_bias=False,
        mlp_bias=False,
    )
    f_full = forward_flops(sp, sp.full(), 10, batch=1, new_tokens=4, context=0, lm_head_tokens=1)
    f_half = forward_flops(sp, sp.smallest(), 10, batch=1, new_tokens=4, context=0, lm_head_tokens=1)
    # per layer: q,k,v,o 2·4·(8·8 + 2·8·2·2 + 8·8) = 1536; scores 2·2·10 pairs·8 = 320; MLP 2·4·3·8·16 = 3072
    assert f_full == 2 * (1536 + 320 + 3072) + 2 * 8 * 10
    assert f_full / f_half > 1 and not math.isnan(f_half)
