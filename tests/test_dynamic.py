"""Dynamic (input-adaptive) routers on tiny random models: grouped execution, routed forward and
generation against the sliced sub-models, budget calibration, collapse statistics, training."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny

from flextron.config import DynamicConfig, ElasticConfig, config_from_overrides
from flextron.cost.table import CostTable
from flextron.errors import ConfigError, ModelError, TargetError
from flextron.eval.dynamic import compare_at_equal_latency
from flextron.model.elastic import convert
from flextron.routing.calibrate import calibrate_price, choice_statistics, measure_overhead, timed_budgets
from flextron.routing.deploy import TargetRouter
from flextron.routing.dynamic_router import DynamicRouter
from flextron.routing.router import StaticRouter
from flextron.routing.runtime import DynamicRouting, routed_fractions
from flextron.routing.store import load_dynamic
from flextron.train.dynamic import train_dynamic

TARGETS = (0.6, 0.8, 1.0)


def _setup(dtype=torch.float64, seed=0):
    fx = convert(
        make_tiny("llama_gqa_tied", dtype=dtype, seed=seed),
        ElasticConfig(mlp_fractions=(0.25, 0.5, 0.75, 1.0), mlp_divisor=8),
    )
    sp = fx.space
    table = CostTable.from_parameters(sp)
    torch.manual_seed(seed)
    static = TargetRouter(StaticRouter(TARGETS, sp.num_layers, len(sp.mlp_choices), len(sp.head_choices)), table, sp)
    router = DynamicRouter.from_static(static, TARGETS, hidden=16).to(dtype)
    return fx, table, static, router


def _scramble(router: DynamicRouter, std: float = 3.0, seed: int = 1) -> None:
    """Input-dependent choices: random second-layer weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.w2.copy_(torch.randn(router.w2.shape, generator=g, dtype=router.w2.dtype) * std)


def test_grouped_per_token_mlp_equals_each_token_at_its_width():
    fx, *_ = _setup()
    mlp, sp = fx.mlps[0], fx.space
    x = torch.randn(3, 7, sp.hidden_size, dtype=torch.float64)
    widths = torch.tensor(sp.mlp_choices)[torch.randint(len(sp.mlp_choices), (3, 7))]
    assert len(torch.unique(widths)) > 1
    mlp.token_widths = widths
    out = mlp(x)
    mlp.token_widths = None
    ref = torch.empty_like(out)
    for m in sp.mlp_choices:
        mlp.width = m
        full = mlp(x)  # every token at width m
        ref[widths == m] = full[widths == m]
    mlp.width = sp.intermediate_size
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)


def test_untrained_dynamic_router_is_the_static_router():
    fx, table, static, router = _setup()
    ids = torch.randint(0, 97, (4, 12))
    for t in (0.6, 0.8):
        with DynamicRouting(fx, router, t) as r:
            out = fx(input_ids=ids).logits
            mi, hi = r.indices()
        arch = static.route(t)
        assert all(fx.space.from_indices(a.tolist(), b.tolist()) == arch for a, b in zip(mi, hi))
        fx.set_arch(arch)
        assert torch.allclose(out, fx(input_ids=ids).logits, atol=1e-12, rtol=0)
        fx.set_arch(None)
    assert fx.arch == fx.space.full()  # the context restores the model


@pytest.mark.parametrize("route_every", [1, 2])
def test_fast_argmax_path_equals_the_router_logits(route_every):
    fx, table, static, _ = _setup()
    router = DynamicRouter.from_static(static, TARGETS, hidden=16, route_every=route_every).to(torch.float64)
    _scramble(router)
    h = torch.randn(5, fx.space.hidden_size, dtype=torch.float64)
    prep, fused = router.prepare(0.7), router.prepare(0.7, fused=True)
    groups = torch.cat([router.group_argmax(g, h, fused) for g in range(len(fused["g_w1"]))])  # (L, B, 2)
    assert groups.shape == (router.num_layers, 5, 2)
    for l in range(router.num_layers):
        m, a = router.layer_logits(l, h, prep)
        assert torch.equal(groups[l], torch.stack([m.argmax(-1), a.argmax(-1)], 1))
    # deployment routing (fast path) and the straight-through path (grad=True) choose alike
    ids = torch.randint(0, 97, (6, 10))
    picks = []
    for grad in (False, True):
        with DynamicRouting(fx, router, 0.7, grad=grad) as r:
            with torch.no_grad():
                out = fx(input_ids=ids).logits
            picks.append(tuple(t.tolist() for t in r.indices()))
            assert r.stacked()[0].shape == (6, router.num_layers, router.n_mlp)
    assert picks[0] == picks[1]
    # every sequence's output is its sliced sub-network's
    mi, hi = torch.tensor(picks[0][0]), torch.tensor(picks[0][1])
    for b in range(6):
        fx.set_arch(fx.space.from_indices(mi[b].tolist(), hi[b].tolist()))
        assert torch.allclose(out[b], fx(input_ids=ids[b : b + 1]).logits[0], atol=1e-10, rtol=0)
    fx.set_arch(None)
    with pytest.raises(ConfigError, match="route_every"):
        DynamicRouter(TARGETS, 2, 8, 3, 2, route_every=3)


def test_routed_batch_equals_each_sequence_sliced():
    fx, table, static, router = _setup()
    _scramble(router)
    ids = torch.randint(0, 97, (6, 10))
    with DynamicRouting(fx, router, 0.6) as r:
        out = fx(input_ids=ids).logits
        mi, hi = r.indices()
    archs = [fx.space.from_indices(a.tolist(), b.tolist()) for a, b in zip(mi, hi)]
    assert len(set(archs)) > 1, "the test needs sequences that chose differently"
    for b, arch in enumerate(archs):
        fx.set_arch(arch)
        assert torch.allclose(out[b], fx(input_ids=ids[b : b + 1]).logits[0], atol=1e-10, rtol=0)
    fx.set_arch(None)


def test_cached_generation_keeps_the_prefill_choice():
    fx, table, static, router = _setup()
    _scramble(router)
    prompt = torch.randint(2, 97, (1, 8))
    with DynamicRouting(fx, router, 0.6) as r:
        fx(input_ids=prompt)
        choice = r.indices()
        gen = fx.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
            min_new_tokens=6,
        )
        after = r.indices()
    assert torch.equal(choice[0], after[0]) and torch.equal(choice[1], after[1])  # decode steps did not re-route
    fx.set_arch(fx.space.from_indices(choice[0][0].tolist(), choice[1][0].tolist()))
    ref = fx.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        do_sample=False,
        pad_token_id=0,
        min_new_tokens=6,
    )
    fx.set_arch(None)
    assert torch.equal(gen, ref)
    # the cached decode equals recomputing the whole sequence at that sub-network
    fx.set_arch(fx.space.from_indices(choice[0][0].tolist(), choice[1][0].tolist()))
    full = fx(input_ids=gen[:, :-1]).logits.argmax(-1)[0, prompt.shape[1] - 1 :]
    fx.set_arch(None)
    assert torch.equal(full, gen[0, prompt.shape[1] :])


def test_per_token_routing_runs_grouped_and_padding_is_ignored():
    fx, table, static, router = _setup()
    _scramble(router)
    ids = torch.randint(2, 97, (2, 10))
    with DynamicRouting(fx, router, 0.8, per_token=True) as r:
        out = fx(input_ids=ids).logits
        mi, _ = r.indices()  # (B, L, T)
        shares, _ = r.stacked()
    assert mi.shape == (2, fx.space.num_layers, 10) and len(torch.unique(mi)) > 1
    assert torch.allclose(shares.sum(-1), torch.ones_like(shares.sum(-1)))
    # reference: the same per-token widths and per-sequence head counts, set by hand, one sequence at a time
    _, hi = r.indices()
    widths = torch.tensor(fx.space.mlp_choices)[mi]  # (B, L, T)
    for b in range(2):
        for l, (m, a) in enumerate(zip(fx.mlps, fx.attns)):
            m.token_widths = widths[b : b + 1, l]
            a.heads_per_group = fx.space.head_choices[int(hi[b, l])]
        assert torch.allclose(out[b], fx(input_ids=ids[b : b + 1]).logits[0], atol=1e-10, rtol=0)
    for m in fx.mlps:
        m.token_widths = None
    fx.set_arch(None)
    # left padding: the pooled features (heads) ignore padded positions
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids[:1]], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 10, dtype=torch.long)], 1)
    with DynamicRouting(fx, router, 0.8) as r:
        fx(input_ids=ids[:1])
        plain = r.indices()[1]
        fx(input_ids=padded, attention_mask=mask)
        assert torch.equal(r.indices()[1][:, 0], plain[:, 0])  # layer 0 sees identical unpadded inputs


def test_masked_routing_equals_sliced_and_passes_gradients():
    fx, table, static, router = _setup()
    _scramble(router)
    ids = torch.randint(0, 97, (3, 9))
    with DynamicRouting(fx, router, 0.6) as r:
        sliced = fx(input_ids=ids).logits
    with DynamicRouting(fx, router, 0.6, masked=True, grad=True) as r:
        masked = fx(input_ids=ids).logits
        m, h = r.stacked()
    assert torch.allclose(sliced, masked, atol=1e-10, rtol=0)
    assert m.requires_grad and h.requires_grad
    with DynamicRouting(fx, router, 0.6, masked=True) as r2:  # hard masks without a gradient: the same outputs
        assert torch.allclose(sliced, fx(input_ids=ids).logits, atol=1e-10, rtol=0)
        assert not r2.stacked()[0].requires_grad
    masked.square().mean().backward()
    assert router.w2.grad is not None and router.w2.grad.abs().sum() > 0


def test_calibrated_price_meets_the_average_target():
    fx, table, static, router = _setup()
    _scramble(router)
    blocks = torch.randint(0, 97, (16, 12))
    with torch.no_grad():
        router.price.fill_(-20.0)  # a price that buys far too much latency
    before = routed_fractions(fx, router, 0.6, blocks, table)[0].mean().item()
    assert before > 0.6 * 1.05
    cal = calibrate_price(fx, router, table, blocks, iters=12)
    for t in (0.6, 0.8):
        frac = routed_fractions(fx, router, t, blocks, table)[0]
        assert cal[f"{t:g}"]["mean_fraction"] == pytest.approx(frac.mean().item())
        assert -0.05 <= frac.mean().item() / t - 1 <= 0, (t, frac.mean().item())
        assert frac.max() > frac.min()  # inputs got different budgets around the average


def test_router_overhead_is_measured_and_budgets_follow_the_timing():
    fx, table, static, router = _setup()
    _scramble(router)
    ids = torch.randint(0, 97, (1, 12))
    ov = measure_overhead(fx, router, 0.6, ids, repeats=3, table=table)
    assert (
        ov["routed_s"] > 0
        and ov["sliced_s"] > 0
        and ov["full_s"] > 0
        and ov["timed_fraction"] > 0
        and ov["repeats"] == 3
    )
    assert fx.space.validate(ov["config"]) == ov["config"] and ov["predicted_fraction"] == table.fraction(ov["config"])
    assert fx.arch == fx.space.full()  # the measurement leaves the model as it was
    with pytest.raises(ConfigError, match="one sequence"):
        measure_overhead(fx, router, 0.6, torch.randint(0, 97, (2, 12)))
    timing, budgets = timed_budgets(fx, router, table, ids, 3)
    for t in (0.6, 0.8):  # budget = t · predicted / timed, within ±15 % of t
        m = timing[f"{t:g}"]
        assert budgets[t] == pytest.approx(min(max(t / m["timed_over_predicted"], 0.85 * t), 1.15 * t))
    blocks = torch.randint(0, 97, (16, 12))
    cal = calibrate_price(fx, router, table, blocks, iters=12, budgets={0.6: 0.5, 0.8: 0.7})
    for t, b in ((0.6, 0.5), (0.8, 0.7)):
        assert cal[f"{t:g}"]["budget"] == b and routed_fractions(fx, router, t, blocks, table)[0].mean().item() <= b
    for bad in (-0.01, 1.2, float("nan")):
        with pytest.raises(ConfigError, match="budget"):
            calibrate_price(fx, router, table, blocks, budgets={0.6: bad})


def test_choice_statistics_detect_collapse():
    same = torch.zeros(5, 4, dtype=torch.long)
    st = choice_statistics(same, same, 3, 2)
    assert st["collapsed"] and st["entropy_nats"] == 0 and st["input_independent_layers"] == 1
    varied = torch.tensor([[0, 1], [1, 1], [2, 1]])
    st = choice_statistics(varied, torch.zeros(3, 2, dtype=torch.long), 3, 2)
    assert not st["collapsed"] and st["input_independent_layers"] == 0.5
    assert st["entropy_nats"] == pytest.approx(0.5 * (torch.log(torch.tensor(3.0)).item() + 0) / 2)
    assert st["mlp_share"][0] == pytest.approx([1 / 3] * 3)


def test_compare_at_equal_latency_interpolates_per_block():
    n = 40
    g = torch.Generator().manual_seed(0)
    noise = (torch.randn(n, generator=g) * 0.01).tolist()
    static = [(0.5, [2.0 + e for e in noise]), (0.7, [1.0 + e for e in noise])]
    res = compare_at_equal_latency(static, 0.6, [1.4 + e for e in noise])  # static at 0.6 interpolates to 1.5
    assert res["delta_nll"] == pytest.approx(-0.1) and res["verdict"] == "dynamic better"
    assert res["static_ppl"] == pytest.approx(torch.tensor(1.5 + sum(noise) / n).exp().item())
    assert compare_at_equal_latency(static, 0.6, [1.6 + e for e in noise])["verdict"] == "static better"
    assert compare_at_equal_latency(static, 0.8, [1.0] * n)["verdict"] == "outside the static curve"


def test_bad_inputs_raise_clear_errors(tmp_path):
    fx, table, static, router = _setup()
    with pytest.raises(TargetError, match="outside the trained range"):
        DynamicRouting(fx, router, 0.3)
    with pytest.raises(ConfigError, match="per-token"):
        DynamicRouting(fx, router, 0.6, per_token=True, masked=True)
    other = DynamicRouter(TARGETS, 5, fx.space.hidden_size, 4, 3)
    with pytest.raises(ConfigError, match="5 layers"):
        DynamicRouting(fx, other, 0.6)
    with pytest.raises(ConfigError, match="dynamic.batch_size"):
        DynamicConfig(batch_size=1)
    with pytest.raises(ConfigError, match="dynamic.targets"):
        DynamicConfig(targets=(1.0,))
    with pytest.raises(ConfigError):
        config_from_overrides(no_such_field=1)
    with pytest.raises(ModelError, match="no readable dynamic router"):
        load_dynamic(tmp_path, fx)
    with DynamicRouting(fx, router, 0.6) as r, pytest.raises(ConfigError, match="no routed forward"):
        r.stacked()


@pytest.mark.parametrize("variant", ["surrogate", "per_token", "direct_joint", "gate_closed"])
def test_train_dynamic_meets_budget_logs_and_round_trips(tmp_path, variant):
    fx, table, static, _ = _setup(dtype=torch.float32)
    kw = {
        "surrogate": {},
        "per_token": {"per_token": True},
        "direct_joint": {"surrogate": False, "joint_steps": 2},
        "gate_closed": {"gate_spearman": 2.0},
    }[variant]  # a gate that cannot open: the router learns from the latency term only
    cfg = DynamicConfig(
        targets=TARGETS,
        steps=4,
        batch_size=4,
        warmup_steps=1,
        heldout_steps=1,
        calibrate_blocks=12,
        timing_repeats=0,
        **{"gate_spearman": -1.0, "gate_error": 100.0, **kw},
    )
    pool = torch.randint(0, 97, (24, 12), generator=torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in fx.parameters()]
    router, summary = train_dynamic(fx, static, table, pool, cfg, tmp_path, progress=False)
    for t, c in summary["calibration"].items():
        assert -0.05 <= c["error"] <= 0, (t, c)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    stages = {r["stage"] for r in recs}
    val = summary["validation"]  # the trained router against its warm start, both calibrated
    assert val["kept"] == min(val["nll"], key=val["nll"].get) and val["blocks"] == 12
    if val["kept"] == "warm_start":  # the warm start is the static router: no input-dependent part
        assert float(router.w2.detach().abs().max()) == 0
    if variant == "gate_closed":
        assert stages == {"dynamic_routers"} and summary["routers"]["router_steps_with_surrogate_grad"] == 0
    elif variant == "direct_joint":
        assert stages == {"dynamic_routers", "dynamic_joint"}
        assert (tmp_path / "model" / "flextron.json").exists()
        assert any(not torch.equal(a, b) for a, b in zip(before, fx.parameters()))  # joint fine-tuning moved the model
    else:
        assert stages == {"dynamic_routers"}
        assert summary["routers"]["router_steps_with_surrogate_grad"] > 0
        assert all(torch.equal(a, b) for a, b in zip(before, fx.parameters()))  # the LLM stays frozen
    routed = [r for r in recs if r["stage"] == "dynamic_routers"]
    assert routed and all({"latency_error", "choice_entropy_nats", "mean_fraction"} <= set(r) for r in routed)
    joint = [r for r in recs if r["stage"] == "dynamic_joint"]  # the joint loop of static routers (lm_loop)
    assert all("lm_loss" in r and (r["full_model"] or "latency_error" in r) for r in joint)
    assert len(joint) == cfg.joint_steps
    loaded, meta = load_dynamic(tmp_path, fx)
    assert meta["per_token"] == (variant == "per_token")
    assert all(
        torch.equal(a, b.to(a.dtype)) for a, b in zip(router.state_dict().values(), loaded.state_dict().values())
    )
    (tmp_path / "router" / "router.safetensors").write_bytes(b"altered")
    with pytest.raises(ModelError):
        load_dynamic(tmp_path, fx)


def test_prepared_target_part_is_cached_until_the_router_changes():
    fx, table, static, router = _setup()
    a = router.prepared(0.7)
    assert router.prepared(0.7) is a  # deployment prepares a target once
    with torch.no_grad():
        router.price[0] += 1.0  # calibration changes a buffer in place
    b = router.prepared(0.7)
    assert b is not a and torch.equal(b["g_b2p"][0], router.prepare(0.7, fused=True)["g_b2p"][0])
    router.float()  # new tensors: never the cached float64 ones
    assert router.prepared(0.7)["g_w1"][0].dtype == torch.float32


def test_timed_budgets_are_capped_and_warn_when_the_timing_cannot_be_met(caplog, monkeypatch):
    fx, table, static, router = _setup()
    import flextron.routing.calibrate as dt

    def slow(fx_, router_, t, ids, **kw):  # the routed model times twice the table's prediction
        return {"config": static.route(t), "timed_fraction": 2 * t, "predicted_fraction": t, "overhead_fraction": 0.5}

    monkeypatch.setattr(dt, "measure_overhead", slow)
    with caplog.at_level("WARNING", logger="flextron.routing.calibrate"):
        timing, budgets = timed_budgets(fx, router, table, torch.randint(0, 97, (1, 12)), 3)
    assert budgets == {0.6: pytest.approx(0.51), 0.8: pytest.approx(0.68)}  # −15 %, no further
    assert timing["0.6"]["timed_over_predicted"] == 2 and "will miss this target" in caplog.text
