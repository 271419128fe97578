"""The family contract (issue 14): one test class, run for every supported family on a tiny random
config in float64 whose family features are *active* (sliding window shorter than the sequence,
Gemma 3's ``query_pre_attn_scalar`` and local/global RoPE, Phi-3's fused projections and partial
rotary, Llama 3 ``rope_scaling`` beyond ``original_max_position_embeddings``, MHA).

Invariants (DESIGN.md 1-4, plus the cache): permutation preserves the function; the full
configuration equals the original; sliced equals masked with one-hot probabilities; an export
equals the elastic model (homogeneous: the plain transformers class; per-layer: our modeling file,
fused projections re-fused), in memory and from disk; cached decoding equals uncached.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import FAMILIES, make_tiny
from transformers import AutoModelForCausalLM

from flextron.config import ElasticConfig
from flextron.errors import UnsupportedModelError
from flextron.model.elastic import convert
from flextron.model.export import export_subnetwork, save_subnetwork
from flextron.model.families import adapter_for, supported_model_types
from flextron.model.hf_modeling import FlextronForCausalLM
from flextron.model.space import nested_mask, sample_arch

CFG = ElasticConfig(mlp_fractions=(0.25, 0.5, 0.75, 1.0), mlp_divisor=8)
# every family on its default head axis, plus whole-KV-group elasticity on GQA models (with k/v biases)
CASES = [(name, "auto") for name in sorted(FAMILIES)] + [("llama_gqa_tied", "kv_groups"), ("qwen2_bias", "kv_groups")]
T = 16  # longer than every sliding window below (4 or 6)
TOL = 1e-9


def _ids(B=2, T=T, seed=1):
    return torch.randint(3, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def _one_hot_masks(sp, arch):
    mi, hi = sp.indices(arch)
    hot = torch.nn.functional.one_hot
    mlp = [
        nested_mask(hot(torch.tensor([i]), len(sp.mlp_choices)).double(), sp.mlp_choices, sp.intermediate_size)
        for i in mi
    ]
    heads = [sp.head_mask(hot(torch.tensor([i]), len(sp.head_choices)).double()) for i in hi]
    return mlp, heads


def test_every_supported_family_is_in_the_contract():
    types = {FAMILIES[name]().model_type for name in FAMILIES}
    assert set(supported_model_types()) <= types


def _convert(name, axis):
    fx = convert(make_tiny(name), dataclasses.replace(CFG, head_axis=axis))
    expected = "kv_groups" if axis == "kv_groups" or fx.space.heads_per_group == 1 else "heads_per_group"
    assert fx.space.head_axis == expected
    return fx


@pytest.mark.parametrize(("name", "axis"), CASES)
class TestFamilyContract:
    def test_features_are_active(self, name, axis):
        cfg = FAMILIES[name]()
        fx = _convert(name, axis)
        window = getattr(cfg, "sliding_window", None)
        if window is not None:
            assert window < T
            assert any(a.sliding_window == window for a in fx.attns)
        if cfg.model_type == "gemma3_text":
            assert cfg.query_pre_attn_scalar != cfg.head_dim
            assert {a.layer_type for a in fx.attns} == {"sliding_attention", "full_attention"}
            assert all(a.scaling == cfg.query_pre_attn_scalar**-0.5 for a in fx.attns)
            rp = cfg.rope_parameters
            assert rp["sliding_attention"]["rope_theta"] != rp["full_attention"]["rope_theta"]
            assert cfg.head_dim * cfg.num_attention_heads != cfg.hidden_size
        if cfg.model_type == "phi3":
            assert hasattr(fx.model.model.layers[0].self_attn, "qkv_proj")
            assert fx.attns[0].fused_qkv and fx.mlps[0].fused
        if name == "phi3_gqa":
            assert cfg.rope_parameters["partial_rotary_factor"] < 1
        if name == "llama3_rope":
            rp = cfg.rope_parameters
            assert rp["rope_type"] == "llama3" and T > rp["original_max_position_embeddings"]

    def test_permutation_and_full_configuration_preserve_the_function(self, name, axis):
        model = make_tiny(name)
        ref = copy.deepcopy(model)
        fx = convert(model, dataclasses.replace(CFG, head_axis=axis))
        ids = _ids()
        before = _logits(ref, ids)
        assert (_logits(fx, ids) - before).abs().max() < TOL  # full configuration = original
        fx.rank([_ids(2, T, seed=s) for s in range(3)], progress=False)
        assert (_logits(fx, ids) - before).abs().max() < TOL  # permutation preserves the function

    def test_sliced_equals_masked_one_hot(self, name, axis):
        fx = _convert(name, axis)
        fx.rank([_ids(2, T, seed=s) for s in range(2)], progress=False)
        sp, ids, gen = fx.space, _ids(), torch.Generator().manual_seed(0)
        for _ in range(3):
            arch = sample_arch(sp, gen)
            sliced = _logits(fx.set_arch(arch), ids)
            fx.set_arch(None)
            fx.set_masks(*_one_hot_masks(sp, arch))
            masked = _logits(fx, ids)
            fx.set_masks(None, None)
            assert (sliced - masked).abs().max() < TOL

    def test_exports_equal_the_elastic_model(self, name, axis, tmp_path):
        fx = _convert(name, axis)
        fx.rank([_ids(2, T, seed=s) for s in range(2)], progress=False)
        sp, ids = fx.space, _ids()
        homo = sp.homogeneous(sp.mlp_choices[1], sp.head_choices[0])
        gen = torch.Generator().manual_seed(5)
        hetero = next(a for a in iter(lambda: sample_arch(sp, gen), None) if not a.is_homogeneous)
        for arch, plain in ((homo, True), (hetero, False)):
            ref = _logits(fx.set_arch(arch), ids)
            sub = export_subnetwork(fx, arch)
            assert (type(sub) is type(fx.model)) == plain and isinstance(sub, FlextronForCausalLM) != plain
            assert (_logits(sub, ids) - ref).abs().max() < TOL
            assert sum(p.numel() for p in sub.parameters()) == sp.num_parameters(arch)
            out = save_subnetwork(sub, tmp_path / f"{name}-{plain}")
            re = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=not plain, dtype=torch.float64)
            assert type(re).__name__ == type(sub).__name__
            assert (_logits(re, ids) - ref).abs().max() < TOL
            if plain:
                assert "auto_map" not in re.config.to_dict()
            if hasattr(sub.model.layers[0].mlp, "gate_up_proj"):  # fused layout written back
                assert not hasattr(re.model.layers[0].mlp, "gate_proj")

    def test_cached_decoding_crosses_the_window(self, name, axis):
        fx = _convert(name, axis)
        fx.rank([_ids(2, T, seed=s) for s in range(2)], progress=False)
        arch = sample_arch(fx.space, torch.Generator().manual_seed(3))
        ids = _ids(1)
        for model in (fx.set_arch(arch), export_subnetwork(fx, arch)):
            full = _logits(model, ids)
            with torch.no_grad():
                out = model(input_ids=ids[:, :3], use_cache=True)
                cache = out.past_key_values
                for t in range(3, T):  # one token at a time, past every window
                    step = model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True)
                    cache = step.past_key_values
                    assert (step.logits[:, -1] - full[:, t]).abs().max() < TOL


def test_a_norm_over_the_whole_projection_is_refused():
    from transformers import Olmo2Config

    cfg = Olmo2Config(
        vocab_size=50,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    with pytest.raises(UnsupportedModelError, match="q/k norms normalise the whole q/k projection"):
        adapter_for(cfg)


def test_kv_groups_are_ranked_and_dropped_least_important_first():
    fx = convert(make_tiny("llama_gqa_tied"), dataclasses.replace(CFG, head_axis="kv_groups"))
    calib = [_ids(2, T, seed=s) for s in range(3)]
    fx.rank(calib, progress=False)
    again = fx.rank(calib, progress=False)  # scores measured after the first permutation
    G = fx.space.num_key_value_heads
    for s in again.heads:
        per_group = s.view(G, -1).sum(1)
        assert torch.all(per_group[:-1] >= per_group[1:] - 1e-9)
    sp = fx.space
    assert sp.head_choices == tuple(range(1, G + 1))
    small = sp.homogeneous(sp.mlp_choices[-1], 1)
    fx.set_arch(small)
    sub = export_subnetwork(fx, small)
    assert sub.config.num_key_value_heads == 1 and sub.config.num_attention_heads == sp.heads_per_group


def test_a_checkpoint_from_before_head_axis_keeps_its_axis(tmp_path):
    """An elastic checkpoint of a multi-head model saved before ``head_axis`` existed had the
    heads-per-group axis only; ``auto`` (now KV groups for such models) must not change it."""
    import json

    from flextron.model.export import load_elastic, save_elastic

    fx = convert(make_tiny("phi3_mha"), dataclasses.replace(CFG, head_axis="heads_per_group"))
    out = save_elastic(fx, tmp_path / "old")
    meta = json.loads((out / "flextron.json").read_text())
    del meta["elastic_config"]["head_axis"], meta["elastic_config"]["kv_groups"], meta["search_space"]["head_axis"]
    (out / "flextron.json").write_text(json.dumps(meta))
    again = load_elastic(out, dtype=torch.float64)
    assert again.space.head_axis == "heads_per_group" and again.space.head_choices == (1,)


def test_the_unused_axis_list_is_refused():
    """`kv_groups` with the heads-per-group axis (or the reverse) would be ignored: refused instead."""
    from flextron.errors import ConfigError

    with pytest.raises(ConfigError, match="elastic.kv_groups is set, but the attention axis is heads_per_group"):
        convert(make_tiny("llama_gqa_tied"), dataclasses.replace(CFG, kv_groups=(1, 2)))
    with pytest.raises(ConfigError, match="elastic.heads_per_group is set, but the attention axis is kv_groups"):
        convert(make_tiny("phi3_mha"), dataclasses.replace(CFG, heads_per_group=(1,)))
