"""Sub-network sampling, routers, surrogate, checkpoints and resume on tiny models."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import make_tiny

from flextron.config import ElasticConfig, TrainConfig
from flextron.cost.table import CostTable
from flextron.errors import ConfigError, TargetError
from flextron.model.elastic import convert
from flextron.model.space import ArchConfig, archs_from_json, archs_to_json
from flextron.routing.deploy import TargetRouter
from flextron.routing.router import StaticRouter, gumbel_choice, latency_loss
from flextron.routing.surrogate import Surrogate, SurrogateFit, encode_arch, spearman
from flextron.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from flextron.train.elastic import train_elastic
from flextron.train.loop import BudgetSampler, homogeneous_for_target

CFG = ElasticConfig(mlp_fractions=(0.25, 0.5, 0.75, 1.0), mlp_divisor=8)


def _fx(dtype=torch.float32):
    return convert(make_tiny("llama_gqa_tied", dtype=dtype), CFG)


def test_budget_sampler_meets_budget_and_spans_range():
    fx = _fx()
    table = CostTable.from_parameters(fx.space)
    sampler = BudgetSampler(fx.space, table, p_full=0.25)
    gen = torch.Generator().manual_seed(0)
    fracs, fulls = [], 0
    for _ in range(300):
        arch, frac = sampler.sample(gen)
        if frac is None:
            fulls += 1
            assert arch == fx.space.full()
            continue
        assert table.fraction(arch) <= frac + 1e-9
        fracs.append(frac)
    assert 40 < fulls < 110  # p_full = 0.25 of 300
    assert min(fracs) < sampler.floor + 0.1 and max(fracs) > 0.9  # the whole range is trained
    # min_fraction raises the floor: no budget below the lowest deployed target is sampled
    high = BudgetSampler(fx.space, table, p_full=0.0, min_fraction=0.8)
    assert high.floor == 0.8
    for _ in range(50):
        arch, frac = high.sample(gen)
        assert 0.8 <= frac <= 1.0 and table.fraction(arch) <= frac + 1e-9


def test_homogeneous_sampling_trains_every_deployable_homogeneous_width_uniformly():
    """MatFormer-style sampling: uniform over the homogeneous sub-networks that some target in
    [floor, 1] deploys (and the larger ones), so each deployed configuration is trained."""
    fx = _fx()
    table = CostTable.from_parameters(fx.space)
    sampler = BudgetSampler(fx.space, table, p_full=0.2, mode="homogeneous", min_fraction=0.5)
    pool = sampler.homogeneous_pool()
    assert fx.space.full() not in pool and all(a.is_homogeneous for a in pool)
    gen = torch.Generator().manual_seed(0)
    counts, fulls, n = {a: 0 for a in pool}, 0, 2000
    for _ in range(n):
        arch, frac = sampler.sample(gen)
        if frac is None:
            fulls += 1
            continue
        assert frac == pytest.approx(table.fraction(arch))
        counts[arch] += 1
    assert 0.15 < fulls / n < 0.25
    expected = (n - fulls) / len(pool)
    assert all(0.7 * expected < c < 1.3 * expected for c in counts.values()), counts
    # every configuration deployed at a target in [0.5, 1) is in the pool, and none below the floor's
    for t in (0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 0.95):
        deployed = homogeneous_for_target(fx.space, table, t)
        assert deployed in pool or deployed == fx.space.full()
    lowest = homogeneous_for_target(fx.space, table, 0.5)
    assert min(table.predict(a) for a in pool) == table.predict(lowest)


def test_gumbel_straight_through():
    logits = torch.randn(2, 3, 4, requires_grad=True)
    y = gumbel_choice(logits, 0.5, torch.Generator().manual_seed(0))
    assert torch.allclose(y.detach().sum(-1), torch.ones(2, 3))
    assert torch.allclose(y.detach(), y.detach().round(), atol=1e-6)  # hard one-hot forward
    (y * torch.arange(4.0)).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_router_target_encoding_interpolates():
    r = StaticRouter((0.5, 0.7, 1.0), num_layers=2, n_mlp=3, n_heads=2)
    enc = r.encode(torch.tensor([0.5, 0.6, 1.0, 0.2]))
    assert torch.allclose(enc[0], torch.tensor([1.0, 0, 0]))
    assert torch.allclose(enc[1], torch.tensor([0.5, 0.5, 0]))
    assert torch.allclose(enc[2], torch.tensor([0, 0, 1.0]))
    assert torch.allclose(enc[3], torch.tensor([1.0, 0, 0]))  # clamped
    m, h = r(torch.tensor([0.6]))
    assert m.shape == (1, 2, 3) and h.shape == (1, 2, 2)


def test_latency_loss_tolerance_and_gradient():
    frac = torch.tensor([0.61, 0.70], requires_grad=True)
    loss = latency_loss(frac, torch.tensor([0.6, 0.6]), tol=0.02)
    assert loss[0] == 0 and loss[1] > 0
    loss.sum().backward()
    assert frac.grad[1] > 0


def test_target_router_fits_budget_and_refuses_bad_targets():
    fx = _fx()
    sp = fx.space
    table = CostTable.from_parameters(sp)
    router = StaticRouter((0.5, 1.0), sp.num_layers, len(sp.mlp_choices), len(sp.head_choices))
    tr = TargetRouter(router, table, sp, Surrogate(sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), 16))
    assert tr.route(1.0) == sp.full()
    for t in (0.6, 0.75, 0.9):
        arch = tr.route(t)
        assert table.fraction(arch) <= t + 1e-9
        # greedy fill: no single upgrade still fits the budget
        mi, hi = sp.indices(arch)
        for l in range(sp.num_layers):
            if mi[l] + 1 < len(sp.mlp_choices):
                up = list(mi)
                up[l] += 1
                assert table.fraction(sp.from_indices(up, hi)) > t
    with pytest.raises(TargetError, match="below the smallest"):
        tr.route(tr.floor / 2)
    for bad in (0.0, 1.5, float("nan"), -0.3):
        with pytest.raises(TargetError, match=r"outside \(0, 1\]"):
            tr.route(bad)


def test_surrogate_learns_a_ranking():
    fx = _fx()
    sp = fx.space
    table = CostTable.from_parameters(sp)
    sampler = BudgetSampler(sp, table, p_full=0.0)
    gen = torch.Generator().manual_seed(1)
    truth = lambda a: 1.0 - table.fraction(a)  # noqa: E731  a smooth loss-like function of size
    fit = SurrogateFit(Surrogate(sp.num_layers, len(sp.mlp_choices), len(sp.head_choices), 32), lr=1e-2)
    held = [sampler.sample(gen)[0] for _ in range(20)]
    enc = [encode_arch(sp, a) for a in held]
    fit.set_heldout(
        torch.stack([e[0] for e in enc]), torch.stack([e[1] for e in enc]), torch.tensor([truth(a) for a in held])
    )
    for _ in range(80):
        a = sampler.sample(gen)[0]
        fit.add(*encode_arch(sp, a), truth(a))
    fit.fit(400, gen=gen)
    ev = fit.evaluate()
    assert ev["heldout_spearman"] > 0.8 and ev["heldout_mae"] < 0.1 and ev["heldout_relative_error"] < 0.5
    # a constant predictor at the mean scores a relative error of 1: the gate cannot pass it
    y = fit.heldout[2]
    torch.nn.init.zeros_(fit.model.net[2].weight)
    torch.nn.init.constant_(fit.model.net[2].bias, float(y.mean()))
    assert fit.evaluate()["heldout_relative_error"] >= 0.99
    assert spearman(torch.tensor([1.0, 2, 3]), torch.tensor([3.0, 2, 1])) == pytest.approx(-1.0)


def test_checkpoint_round_trip_and_ignores_partial(tmp_path):
    fx = _fx()
    opt = torch.optim.AdamW(fx.parameters(), lr=1e-3)
    fx(input_ids=torch.randint(0, 97, (1, 8))).logits.sum().backward()
    opt.step()
    (tmp_path / "ck" / ".tmp_step_000009_1").mkdir(parents=True)  # a half-written checkpoint
    save_checkpoint(tmp_path / "ck", 3, {"model": fx}, opt, {"stage": "x"})
    assert latest_checkpoint(tmp_path / "ck").name == "step_000003"
    fx2 = _fx()
    opt2 = torch.optim.AdamW(fx2.parameters(), lr=1e-3)
    st = load_checkpoint(latest_checkpoint(tmp_path / "ck"), {"model": fx2}, opt2)
    assert st["step"] == 3
    for a, b in zip(fx.parameters(), fx2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)


def _train(run_dir, steps=4, fail_at=None):
    fx = _fx()
    teacher = copy.deepcopy(fx.model).requires_grad_(False)
    table = CostTable.from_parameters(fx.space)
    blocks = torch.randint(0, 97, (16, 12), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(steps=steps, batch_size=2, seq_len=12, checkpoint_every=2, warmup_steps=1, lr=1e-2)
    if fail_at is not None:
        orig = fx.set_arch
        calls = {"n": 0}

        def flaky(arch):
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise KeyboardInterrupt("simulated kill")
            return orig(arch)

        fx.set_arch = flaky
    summary = train_elastic(fx, teacher, blocks, cfg, table, run_dir, seed=0, progress=False)
    return fx, summary


def test_interrupted_training_resumes_to_same_weights(tmp_path):
    ref, _ = _train(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", fail_at=4)  # dies during step 3, after the step-2 checkpoint
    resumed, summary = _train(tmp_path / "b")
    assert summary["resumed_from"] == 2 and summary["steps_run_now"] == 2
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    steps = [r for r in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 4  # no duplicated step records after the resume


def _elastic_and_joint(run_dir, batch_size, grad_accum):
    """Elastic training then joint fine-tuning of a float64 model; returns the trained weights."""
    from flextron.config import JointConfig, RouterConfig
    from flextron.train.joint import train_joint

    fx = _fx(torch.float64)
    teacher = copy.deepcopy(fx.model).requires_grad_(False)
    table = CostTable.from_parameters(fx.space)
    blocks = torch.randint(0, 97, (32, 12), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(
        steps=3, batch_size=batch_size, grad_accum=grad_accum, seq_len=12, checkpoint_every=100, warmup_steps=1, lr=1e-2
    )
    train_elastic(fx, teacher, blocks, cfg, table, run_dir, seed=0, progress=False)
    rcfg = RouterConfig(targets=(0.6, 1.0), tau_end=1.0)
    torch.manual_seed(0)
    router = StaticRouter(
        rcfg.targets, fx.space.num_layers, len(fx.space.mlp_choices), len(fx.space.head_choices), 16
    ).double()
    jcfg = JointConfig(steps=2, batch_size=batch_size, grad_accum=grad_accum, seq_len=12, checkpoint_every=100)
    train_joint(fx, teacher, router, table, blocks, jcfg, rcfg, run_dir, seed=0, progress=False)
    return {**fx.state_dict(), **{f"router.{k}": v for k, v in router.state_dict().items()}}


def test_grad_accum_from_config_equals_the_larger_batch(tmp_path):
    """grad_accum=2 × batch 2 trains exactly what batch 4 trains (same sub-network and targets per
    step, loss averaged over the step), for elastic training and joint fine-tuning."""
    big = _elastic_and_joint(tmp_path / "big", 4, 1)
    accum = _elastic_and_joint(tmp_path / "accum", 2, 2)
    init = _fx(torch.float64).state_dict()
    assert any(not torch.allclose(big[k], init[k]) for k in init)
    for k in big:
        assert torch.allclose(big[k], accum[k], atol=1e-10, rtol=0), k


def test_mixed_precision_bf16_from_config(tmp_path):
    """train.mixed_precision=bf16 runs the trained model's forward under bf16 autocast, keeps
    float32 weights, and leaves the model's own forward in float32 afterwards."""
    blocks = torch.randint(0, 97, (16, 12), generator=torch.Generator().manual_seed(0))
    dtypes = {}
    for mp in ("no", "bf16"):
        fx = _fx()
        seen = []
        fx.model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        cfg = TrainConfig(steps=2, batch_size=2, seq_len=12, checkpoint_every=100, warmup_steps=1, mixed_precision=mp)
        summary = train_elastic(
            fx, None, blocks, cfg, CostTable.from_parameters(fx.space), tmp_path / mp, progress=False
        )
        dtypes[mp] = set(seen)
        assert summary["steps_run_now"] == 2 and all(p.dtype == torch.float32 for p in fx.parameters())
        seen.clear()
        fx(input_ids=blocks[:1])
        assert seen == [torch.float32]
    assert dtypes == {"no": {torch.float32}, "bf16": {torch.bfloat16}}


def test_chunked_loss_equals_direct_and_keeps_no_vocab_sized_activations():
    """lm_kd_loss in chunks equals the one-shot formula (value and gradient), and nothing of
    vocabulary size is kept for the backward pass beyond the logits themselves."""
    import torch.nn.functional as F

    from flextron.train.losses import lm_kd_loss

    B, T, V = 3, 11, 500
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    ids = torch.randint(0, V, (B, T), generator=g)
    saved = []
    inputs = {x.untyped_storage().data_ptr() for x in (logits, teacher)}

    def pack(t):  # bytes kept for backward that are not views of the logits
        if t.untyped_storage().data_ptr() not in inputs:
            saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, ce, kd = lm_kd_loss(logits, ids, teacher, 0.3, chunk_tokens=4)
    assert sum(saved) < B * T * V * 8 / 10  # the direct formula keeps several (B·T, V) tensors
    (grad,) = torch.autograd.grad(loss, logits)
    s, t, y = logits[:, :-1].reshape(-1, V), teacher[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1)
    ce_ref = F.cross_entropy(s, y)
    kd_ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    ref = 0.7 * ce_ref + 0.3 * kd_ref
    (grad_ref,) = torch.autograd.grad(ref, logits)
    assert (
        torch.allclose(loss, ref, atol=1e-12)
        and torch.allclose(ce, ce_ref, atol=1e-12)
        and torch.allclose(kd, kd_ref, atol=1e-12)
    )
    assert torch.allclose(grad, grad_ref, atol=1e-14)


def test_archs_json_round_trip_is_exact():
    """What a stage saves in a checkpoint without knowing its layout (the router's warm start:
    float targets → configurations, possibly with a summary) comes back equal, types included."""
    a, b = ArchConfig((8, 16, 32), (1, 2, 3)), ArchConfig((64,) * 3, (3,) * 3)
    warm = ({0.6: a, 0.1 + 0.2: b, 1.0: a}, {"measured": [0.25, float("inf")], "order": (2, 0, 1), "note": None})
    back = archs_from_json(json.loads(json.dumps(archs_to_json(warm))))
    assert back == warm and type(back) is tuple and list(back[0]) == [0.6, 0.1 + 0.2, 1.0]
    assert type(back[1]["order"]) is tuple and isinstance(next(iter(back[0].values())), ArchConfig)
    for bad in ({"arch": {"mlp": [1]}}, {"dict": 3}, {"x": 1, "y": 2}, {"tuple": [{"dict": [[1]]}]}):
        with pytest.raises(ConfigError):
            archs_from_json(bad)


def _brute_force(sp, table, mlp_sens, head_sens, budget):
    """Least summed sensitivity over every configuration within ``budget`` (tiny spaces only)."""
    import itertools

    L, nm, nh = sp.num_layers, len(sp.mlp_choices), len(sp.head_choices)
    best = (float("inf"), None)
    for combo in itertools.product(range(nm * nh), repeat=L):
        arch = sp.from_indices([k // nh for k in combo], [k % nh for k in combo])
        if table.predict(arch) <= budget:
            v = sum(mlp_sens[l, k // nh] + head_sens[l, k % nh] for l, k in enumerate(combo))
            best = min(best, (v, arch), key=lambda x: x[0])
    return best


def test_allocate_by_sensitivity_is_the_knapsack_optimum_within_budget():
    """The dynamic programme's configuration fits the budget and its summed sensitivity is no
    worse than the brute-force optimum (up to the cost rounding, which only lowers the budget by
    at most one grid step per layer); a budget below the smallest configuration gives None."""
    import numpy as np

    from flextron.errors import ConfigError
    from flextron.routing.deploy import allocate_by_sensitivity

    fx = _fx()
    sp, table = fx.space, CostTable.from_parameters(fx.space)
    rng = np.random.default_rng(0)
    L = sp.num_layers
    for trial in range(6):
        # sensitivities: decreasing in width, 0 at the full width; one layer far more sensitive
        mlp_sens = np.sort(rng.exponential(0.1, (L, len(sp.mlp_choices))), axis=1)[:, ::-1].copy()
        mlp_sens[:, -1] = 0
        head_sens = np.sort(rng.exponential(0.1, (L, len(sp.head_choices))), axis=1)[:, ::-1].copy()
        head_sens[:, -1] = 0
        mlp_sens[trial % L] *= 50
        value = lambda a: sum(
            mlp_sens[l, sp.mlp_choices.index(m)] + head_sens[l, sp.head_choices.index(h)]  # noqa: E731
            for l, (m, h) in enumerate(zip(a.mlp, a.heads))
        )
        for frac in (0.55, 0.7, 0.85, 0.95):
            budget = frac * table.full
            arch = allocate_by_sensitivity(sp, table, mlp_sens, head_sens, budget, resolution=2000)
            assert arch is not None and table.predict(arch) <= budget
            unit = (budget - table.const) / 2000
            opt_v, opt_arch = _brute_force(sp, table, mlp_sens, head_sens, budget - L * unit)
            assert value(arch) <= opt_v + 1e-12
            # the very sensitive layer keeps its full MLP width whenever the optimum affords it
            if opt_arch.mlp[trial % L] == sp.mlp_choices[-1]:
                assert arch.mlp[trial % L] == sp.mlp_choices[-1]
    floor = table.predict(sp.smallest())
    assert allocate_by_sensitivity(sp, table, mlp_sens, head_sens, floor * 0.99) is None
    assert allocate_by_sensitivity(sp, table, mlp_sens, head_sens, table.full) == sp.full()
    with pytest.raises(ConfigError, match="do not match the search space"):
        allocate_by_sensitivity(sp, table, mlp_sens[:, :2], head_sens, table.full)


def test_layer_sensitivity_measures_one_layer_at_a_time_and_interpolates():
    """With an additive loss the one-layer measurements recover each layer's sensitivity exactly
    at the measured widths and every head count, linearly interpolated between measured widths;
    every measured configuration reduces exactly one layer."""
    import numpy as np

    from flextron.train.routers import layer_sensitivity

    fx = _fx()
    sp = fx.space
    L, mc, hc = sp.num_layers, sp.mlp_choices, sp.head_choices
    true_mlp = np.array([[(mc[-1] - m) * (l + 1) * 1e-3 for m in mc] for l in range(L)])  # linear in width
    true_heads = np.array([[(hc[-1] - a) * 0.1 * (l + 2) for a in hc] for l in range(L)])
    seen = []

    def measure(archs, desc=""):
        seen.extend(archs)
        return [
            sum(true_mlp[l, mc.index(m)] + true_heads[l, hc.index(a)] for l, (m, a) in enumerate(zip(x.mlp, x.heads)))
            for x in archs
        ]

    mlp_sens, head_sens, archs, deltas = layer_sensitivity(measure, sp, mlp_levels=2)
    assert len(seen) == L * (2 + len(hc) - 1) and archs == seen
    full = sp.full()
    for a in archs:
        assert sum((m != fm) + (h != fh) for m, h, fm, fh in zip(a.mlp, a.heads, full.mlp, full.heads)) == 1
    assert np.allclose(mlp_sens, true_mlp) and np.allclose(head_sens, true_heads)
    assert np.all(mlp_sens[:, -1] == 0) and np.all(head_sens[:, -1] == 0)


def test_joint_full_model_steps(tmp_path):
    """joint.p_full: the full-model steps train the model alone (the router is not run, so it does
    not change); with p_full = 0 every step trains the router."""
    from flextron.config import JointConfig, RouterConfig
    from flextron.train.joint import train_joint

    blocks = torch.randint(0, 97, (16, 12), generator=torch.Generator().manual_seed(0))
    rcfg = RouterConfig(targets=(0.6, 1.0), tau_end=1.0)
    out = {}
    for p_full in (0.0, 0.95):
        fx = _fx()
        table = CostTable.from_parameters(fx.space)
        torch.manual_seed(0)
        router = StaticRouter(
            rcfg.targets, fx.space.num_layers, len(fx.space.mlp_choices), len(fx.space.head_choices), 16
        )
        r0 = copy.deepcopy(router.state_dict())
        m0 = copy.deepcopy(fx.state_dict())
        jcfg = JointConfig(steps=4, batch_size=2, seq_len=12, checkpoint_every=100, p_full=p_full)
        summary = train_joint(
            fx, None, router, table, blocks, jcfg, rcfg, tmp_path / str(p_full), seed=0, progress=False
        )
        recs = [
            r
            for r in map(__import__("json").loads, (tmp_path / str(p_full) / "metrics.jsonl").read_text().splitlines())
        ]
        assert summary["full_model_steps"] == sum(r["full_model"] for r in recs)
        router_moved = any(not torch.equal(r0[k], v) for k, v in router.state_dict().items())
        model_moved = any(not torch.equal(m0[k], v) for k, v in fx.state_dict().items())
        out[p_full] = (summary["full_model_steps"], router_moved, model_moved)
    assert out[0.0] == (0, True, True)
    steps, router_moved, model_moved = out[0.95]
    assert model_moved
    assert router_moved == (steps < 4)
    assert steps >= 3  # 4 draws at p = 0.95
