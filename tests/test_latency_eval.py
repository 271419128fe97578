"""Latency / parameter cost tables (invariant 5) and evaluation helpers, on tiny random models.

No assertion depends on measured times: those are noisy on a shared 2-core machine.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from conftest import make_tiny

from flextron.config import ElasticConfig, LatencyConfig
from flextron.cost.measure import measure_latency_table, validate_latency_table
from flextron.cost.table import CostTable
from flextron.cost.timing import time_models
from flextron.errors import ConfigError
from flextron.eval.perplexity import decode_tokens_per_s, perplexity
from flextron.eval.stats import bootstrap_ci
from flextron.model.elastic import convert
from flextron.model.space import ArchConfig, sample_arch

CFG = ElasticConfig(mlp_fractions=(0.25, 0.5, 0.75, 1.0), mlp_divisor=8)
# timings on a shared 2-core machine are busy by nature: accepted here (the busy check itself is
# tested with a fake clock in tests/test_traps.py)
LAT = LatencyConfig(seq_len=16, batch_size=1, warmup=1, repeats=3, trim=0.2, busy_retries=0, allow_busy=True)


def _random_archs(space, n=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [sample_arch(space, gen, homogeneous=(i % 3 == 0)) for i in range(n)]


def test_parameter_table_matches_space(family):
    fx = convert(make_tiny(family), CFG)
    table = CostTable.from_parameters(fx.space)
    assert table.unit == "params"
    assert table.predict(fx.space.full()) == fx.space.total_params == table.full
    for arch in _random_archs(fx.space) + [fx.space.smallest()]:
        assert table.predict(arch) == fx.space.num_parameters(arch)
    # a really sliced model has that many parameters: compare with the full minus the sliced-off rows
    assert table.fraction(fx.space.smallest()) < 1.0
    assert table.is_monotone()


def test_predict_monotone_and_expected_differentiable():
    fx = convert(make_tiny("llama_gqa_tied"), CFG)
    space = fx.space
    table = CostTable.from_parameters(space)
    L = space.num_layers
    # monotone: widening any single layer never lowers the cost
    for arch in _random_archs(space, 10, seed=3):
        mi, hi = space.indices(arch)
        base = table.predict(arch)
        for l in range(L):
            if mi[l] + 1 < len(space.mlp_choices):
                wider = list(mi)
                wider[l] += 1
                assert table.predict(space.from_indices(wider, hi)) >= base
            if hi[l] + 1 < len(space.head_choices):
                wider = list(hi)
                wider[l] += 1
                assert table.predict(space.from_indices(mi, wider)) >= base
    # expected() with one-hot probabilities equals predict(); gradients flow to the probabilities
    archs = _random_archs(space, 4, seed=5)
    Km, Kh = len(space.mlp_choices), len(space.head_choices)
    mp = torch.zeros(len(archs), L, Km, dtype=torch.float64)
    hp = torch.zeros(len(archs), L, Kh, dtype=torch.float64)
    for b, arch in enumerate(archs):
        mi, hi = space.indices(arch)
        mp[b, torch.arange(L), torch.tensor(mi)] = 1
        hp[b, torch.arange(L), torch.tensor(hi)] = 1
    mp.requires_grad_(True)
    hp.requires_grad_(True)
    exp = table.expected(mp, hp, space.mlp_choices, space.head_choices)
    assert exp.shape == (len(archs),)
    for b, arch in enumerate(archs):
        assert exp[b].item() == pytest.approx(table.predict(arch), rel=1e-12)
    exp.sum().backward()
    assert mp.grad is not None and hp.grad is not None
    assert torch.all(mp.grad[..., 1:] >= mp.grad[..., :-1])  # wider candidates cost more
    assert mp.grad.abs().sum() > 0 and hp.grad.abs().sum() > 0
    # unbatched form gives a scalar
    single = table.expected(mp[0].detach(), hp[0].detach(), space.mlp_choices, space.head_choices)
    assert single.dim() == 0 and single.item() == pytest.approx(table.predict(archs[0]))
    with pytest.raises(ConfigError):
        table.expected(mp[0, :, :-1], hp[0], space.mlp_choices, space.head_choices)


def test_measure_latency_table_roundtrip(tmp_path):
    fx = convert(make_tiny("llama_gqa_tied", dtype=torch.float32), CFG)
    fx.set_arch(fx.space.smallest())
    before = fx.arch
    table = measure_latency_table(fx, LAT, progress=False)
    assert fx.arch == before  # configuration restored
    assert table.unit == "s" and table.num_layers == fx.space.num_layers
    assert sorted(table.mlp) == list(fx.space.mlp_choices)
    assert sorted(table.attn) == list(fx.space.head_choices)
    assert all(v >= 0 for v in list(table.mlp.values()) + list(table.attn.values())) and table.full > 0
    assert table.is_monotone()
    assert table.workload == {**table.workload, "batch_size": 1, "seq_len": 16, "kind": "prefill", "logits_to_keep": 1}
    assert table.dtype == "float32" and table.torch_version == torch.__version__ and table.measured_at
    assert table.predict(fx.space.full()) == pytest.approx(table.full)
    for arch in _random_archs(fx.space, 10):
        assert table.predict(arch) <= table.full + 1e-12

    val = validate_latency_table(fx, table, LAT, n=3, seed=0, progress=False)
    assert fx.arch == before
    assert len(val["configs"]) == 3 and math.isfinite(val["mape"]) and val["mape"] >= 0
    held = [ArchConfig.from_dict(c["arch"]) for c in val["configs"]]  # out of sample: the fit uses every
    assert len(set(held)) == 3 and not any(a.is_homogeneous for a in held)  # homogeneous configuration
    assert math.isfinite(val["mape_fraction"]) and val["n"] == 3
    assert table.workload["fit"]["configs"] == len(fx.space.homogeneous_configs()) - 1 + LAT.fit_configs
    # the block timings' shape is scaled by two least-squares factors fitted on whole sub-models
    assert set(table.workload["fit"]["scale"]) == {"mlp", "attn"} and all(
        v > 0 for v in table.workload["fit"]["scale"].values()
    )
    assert all(c["measured_s"] > 0 for c in val["configs"])
    table.validation = val

    path = table.save(tmp_path / "lut.json")
    assert not [p for p in tmp_path.iterdir() if p.name != "lut.json"]  # no temp file left behind
    again = CostTable.load(path)
    assert again == table

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json"):
        CostTable.load(bad)
    d = table.to_json()
    d["mlp"] = {"x": 1.0}
    bad.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="mlp"):
        CostTable.load(bad)
    d = table.to_json()
    del d["full"]
    bad.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="full"):
        CostTable.load(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        CostTable.load(tmp_path / "missing.json")


def test_monotone_enforced_and_recorded(monkeypatch):
    import flextron.cost.measure as lat

    fx = convert(make_tiny("llama_gqa_tied", dtype=torch.float32), CFG)
    real = lat.time_models

    def fake(fns, **kw):  # noisy timings: the widest MLP measured as the cheapest
        res = real(fns, **kw)
        m0 = f"mlp:{fx.space.mlp_choices[-1]}"
        if m0 in res:
            res[m0]["trimmed_mean_s"] = 0.0
        return res

    monkeypatch.setattr(lat, "time_models", fake)
    table = lat.measure_latency_table(fx, dataclasses.replace(LAT, method="block"), progress=False)
    assert table.is_monotone()
    assert any(a["table"] == "mlp" and a["width"] == fx.space.mlp_choices[-1] for a in table.adjusted)


def test_time_models_interleaves():
    calls = []
    res = time_models({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=4, warmup=1)
    assert len(calls) == 10 and calls.count("a") == 5
    assert calls[:4] == ["a", "b", "b", "a"]  # round-robin, starting point rotating
    assert set(res) == {"a", "b"} and len(res["a"]["times_s"]) == 4 and res["a"]["median_s"] >= 0


def test_perplexity_matches_hf_loss(family):
    model = make_tiny(family, dtype=torch.float32)
    blocks = torch.randint(0, 97, (5, 12), generator=torch.Generator().manual_seed(2))
    model.train()
    res = perplexity(model, blocks, batch_size=2, progress=False)
    assert model.training  # mode restored
    with torch.no_grad():
        ref = model.eval()(input_ids=blocks, labels=blocks).loss.item()
    assert res["tokens"] == 5 * 11 and len(res["nll_per_block"]) == 5
    assert abs(res["perplexity"] - math.exp(ref)) <= 1e-6 * math.exp(ref)
    # the same through the elastic wrapper (full configuration)
    fx = convert(model, CFG)
    res2 = perplexity(fx, blocks, batch_size=3, progress=False)
    assert res2["perplexity"] == pytest.approx(res["perplexity"], rel=1e-6)
    lo, hi = bootstrap_ci(res["nll_per_block"])
    mean = sum(res["nll_per_block"]) / 5
    assert lo <= mean <= hi
    plo, phi = res["ci95"]
    assert plo <= res["perplexity"] <= phi


def test_decode_tokens_per_s_runs():
    fx = convert(make_tiny("llama_gqa_tied", dtype=torch.float32), CFG)
    fx.set_arch(fx.space.smallest())
    tps = decode_tokens_per_s(fx, prompt_len=4, new_tokens=4, repeats=1)
    assert tps > 0 and math.isfinite(tps)


def test_paired_ratio_is_the_median_of_per_round_ratios():
    from flextron.cost.timing import paired_ratio

    res = {"a": {"times_s": [1.0, 2.0, 9.0]}, "b": {"times_s": [2.0, 4.0, 10.0]}}
    assert paired_ratio(res, "a", "b") == pytest.approx(0.5)


def test_layer_types_are_priced_apart(tmp_path, caplog):
    """Gemma 3's sliding-window and global layers: timed each on its own first layer, with the mask
    the model gives it, at a workload longer than the window (issue 14, item 6)."""
    from flextron.cost.blocks import attention_inputs

    fx = convert(make_tiny("gemma3_mixed", dtype=torch.float32), CFG)
    types = [a.layer_type for a in fx.attns]
    assert len(set(types)) == 2
    window = fx.attns[0].sliding_window
    assert LAT.seq_len > window  # the workload crosses the window
    ids = torch.randint(3, 97, (1, LAT.seq_len), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = attention_inputs(fx, ids, [types.index("sliding_attention"), types.index("full_attention")])
    (h_loc, kw_loc), (h_glob, kw_glob) = got.values()
    allowed = [
        None if kw["attention_mask"] is None else (kw["attention_mask"] == 0).sum().item() for kw in (kw_loc, kw_glob)
    ]
    # the local layer's mask lets each token see at most the window; the global one sees the whole prefix
    assert allowed[0] is not None and (allowed[1] is None or allowed[0] < allowed[1])
    assert not torch.equal(kw_loc["position_embeddings"][0], kw_glob["position_embeddings"][0])  # own RoPE bases

    table = measure_latency_table(fx, LAT, progress=False)
    assert table.layer_types == types and set(table.attn_by_type) == set(types)
    assert table.attn == table.attn_by_type[types[0]] and table.is_monotone()
    assert table.predict(fx.space.full()) == pytest.approx(table.full)
    cm, ca = table.cost_vectors(fx.space.mlp_choices, fx.space.head_choices)
    assert ca.shape == (fx.space.num_layers, len(fx.space.head_choices))
    for arch in _random_archs(fx.space, 5):  # the differentiable cost agrees with the per-layer sum
        mi, hi = fx.space.indices(arch)
        mp = torch.nn.functional.one_hot(torch.tensor(mi), len(fx.space.mlp_choices)).double()
        hp = torch.nn.functional.one_hot(torch.tensor(hi), len(fx.space.head_choices)).double()
        exp = table.expected(mp, hp, fx.space.mlp_choices, fx.space.head_choices)
        assert exp.item() == pytest.approx(table.predict(arch))
    assert CostTable.load(table.save(tmp_path / "lut.json")) == table
    broken = table.to_json() | {"layer_types": types[:-1]}
    with pytest.raises(ConfigError, match="layer_types must list"):
        CostTable.from_json(broken)

    short = dataclasses.replace(LAT, seq_len=window, fit_configs=1)
    with caplog.at_level("WARNING"):
        measure_latency_table(fx, short, progress=False)
    assert "not longer than the sliding window" in caplog.text


def test_layer_types_json_is_validated():
    base = CostTable(unit="params", mlp={1: 1.0}, attn={1: 1.0}, const=0.0, num_layers=2, full=4.0).to_json()
    for bad in (
        {"layer_types": [[1], "a"], "attn_by_type": {"a": {"1": 1.0}}},
        {"layer_types": ["a", "a"], "attn_by_type": [1]},
        {"layer_types": ["a", "a"]},
    ):
        with pytest.raises(ConfigError, match="layer_types|attn_by_type"):
            CostTable.from_json(base | bad)
    ok = CostTable.from_json(base | {"layer_types": ["a", "b"], "attn_by_type": {"a": {"1": 1.0}, "b": {"1": 2.0}}})
    assert ok.predict(ArchConfig(mlp=(1, 1), heads=(1, 1))) == 0.0 + 1 + 1 + 1 + 2
