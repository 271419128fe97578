"""Invariant 4 of DESIGN.md and the save/load contract, on tiny random models of every family (float64)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny
from transformers import AutoModelForCausalLM, LlamaConfig

from flextron.config import ElasticConfig
from flextron.errors import ModelError, OutputExistsError, UnsupportedModelError
from flextron.model.elastic import convert
from flextron.model.export import (
    export_subnetwork,
    load_elastic,
    load_hf_model,
    save_elastic,
    save_subnetwork,
    subnetwork_arch,
)
from flextron.model.hf_modeling import FlextronForCausalLM
from flextron.model.space import ArchConfig, sample_arch

CFG = ElasticConfig(mlp_fractions=(0.25, 0.5, 0.75, 1.0), mlp_divisor=8)


def _ids(B=2, T=12, seed=1):
    return torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(seed))


def _ranked(family):
    fx = convert(make_tiny(family), CFG)
    fx.rank([_ids(2, 16, seed=s) for s in range(3)], progress=False)
    return fx


def _hetero_arch(space, gen):
    while True:  # a really heterogeneous, non-full architecture
        arch = sample_arch(space, gen)
        if not arch.is_homogeneous:
            return arch


def _homo_arch(space):
    return space.homogeneous(space.mlp_choices[1], space.head_choices[0])


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_sliced(sub, fx, arch):
    """No zero padding: every projection has exactly the kept size; the count matches the space."""
    assert sum(p.numel() for p in sub.parameters()) == fx.space.num_parameters(arch)
    sp, hd = fx.space, fx.space.head_dim
    for layer, m, a in zip(sub.model.layers, arch.mlp, arch.heads):
        mlp, attn = layer.mlp, layer.self_attn
        q, kv = sp.query_heads(a) * hd, sp.kv_heads(a) * hd
        if hasattr(mlp, "gate_up_proj"):  # Phi-3: fused layout written back
            assert mlp.gate_up_proj.weight.shape[0] == 2 * m
            assert attn.qkv_proj.weight.shape[0] == q + 2 * kv
        else:
            assert mlp.gate_proj.weight.shape[0] == m
            assert attn.q_proj.weight.shape[0] == q
            assert attn.k_proj.weight.shape[0] == kv
        assert mlp.down_proj.weight.shape[1] == m
        assert attn.o_proj.weight.shape[1] == q
    assert subnetwork_arch(sub) == arch


def test_heterogeneous_export_equals_elastic(family, tmp_path):
    fx = _ranked(family)
    ids = _ids()
    gen = torch.Generator().manual_seed(0)
    for i in range(2):
        arch = _hetero_arch(fx.space, gen)
        before = {k: v.clone() for k, v in fx.state_dict().items()}
        sub = export_subnetwork(fx, arch)
        assert isinstance(sub, FlextronForCausalLM) and not sub.training
        assert next(sub.parameters()).dtype == torch.float64
        assert all(torch.equal(v, fx.state_dict()[k]) for k, v in before.items())  # fx untouched
        _assert_sliced(sub, fx, arch)
        ref = _logits(fx.set_arch(arch), ids)
        assert (_logits(sub, ids) - ref).abs().max() < 1e-9  # invariant 4, in memory
        out = save_subnetwork(sub, tmp_path / f"sub{i}", metadata={"target": 0.5})
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["auto_map"]["AutoModelForCausalLM"] == "hf_modeling.FlextronForCausalLM"
        assert cfg["head_dim"] == fx.space.head_dim
        assert (out / "hf_modeling.py").is_file() and (out / "model.safetensors").is_file()
        assert not list(out.glob("*.bin"))
        info = json.loads((out / "flextron_subnetwork.json").read_text())
        assert info["arch"] == arch.to_dict() and info["params"] == fx.space.num_parameters(arch)
        assert info["target"] == 0.5
        re = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float64)
        assert type(re).__name__ == "FlextronForCausalLM"
        assert (_logits(re, ids) - ref).abs().max() < 1e-9  # invariant 4, from disk
        if fx.config.tie_word_embeddings:
            assert re.lm_head.weight.data_ptr() == re.model.embed_tokens.weight.data_ptr()


def test_homogeneous_export_is_plain_family_model(family, tmp_path):
    fx = _ranked(family)
    ids = _ids()
    for arch in (_homo_arch(fx.space), sample_arch(fx.space, torch.Generator().manual_seed(5), homogeneous=True)):
        sub = export_subnetwork(fx, arch)
        assert type(sub) is type(fx.model)
        _assert_sliced(sub, fx, arch)
        ref = _logits(fx.set_arch(arch), ids)
        assert (_logits(sub, ids) - ref).abs().max() < 1e-9
        out = save_subnetwork(sub, tmp_path / "sub", overwrite=True)
        cfg = json.loads((out / "config.json").read_text())
        assert "auto_map" not in cfg and not (out / "hf_modeling.py").exists()
        assert cfg["head_dim"] == fx.space.head_dim
        assert cfg["num_attention_heads"] == fx.space.query_heads(arch.heads[0])
        re = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)  # no trust_remote_code
        assert type(re) is type(fx.model)
        assert (_logits(re, ids) - ref).abs().max() < 1e-9


def test_default_arch_is_the_active_one():
    fx = _ranked("llama_gqa_tied")
    arch = _hetero_arch(fx.space, torch.Generator().manual_seed(1))
    fx.set_arch(arch)
    assert subnetwork_arch(export_subnetwork(fx)) == arch


def test_homogeneous_config_rejected_by_transformers_falls_back():
    # hidden 30 with 2 KV groups: 4 query heads (2 per group) fail hidden_size % heads in LlamaConfig
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=30,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=64,
    )
    cfg._attn_implementation = "sdpa"
    fx = convert(AutoModelForCausalLM.from_config(cfg).double().eval(), CFG)
    arch = fx.space.homogeneous(16, 2)
    sub = export_subnetwork(fx, arch)
    assert isinstance(sub, FlextronForCausalLM)
    ids = _ids()
    assert (_logits(sub, ids) - _logits(fx.set_arch(arch), ids)).abs().max() < 1e-9


def _check_cache(model, ids):
    full = _logits(model, ids)
    with torch.no_grad():
        out = model(input_ids=ids[:, :7], use_cache=True)
        step = model(input_ids=ids[:, 7:8], past_key_values=out.past_key_values, use_cache=True)
    assert (step.logits[:, -1] - full[:, 7]).abs().max() < 1e-9


def test_cached_decoding(family, tmp_path):
    fx = _ranked(family)
    ids = _ids(1, 10)
    arch = _hetero_arch(fx.space, torch.Generator().manual_seed(2))
    hetero = export_subnetwork(fx, arch)
    homo = export_subnetwork(fx, _homo_arch(fx.space))
    reloaded = AutoModelForCausalLM.from_pretrained(
        save_subnetwork(hetero, tmp_path / "h"), trust_remote_code=True, dtype=torch.float64
    )
    fx.set_arch(arch)
    for model in (hetero, homo, reloaded, fx):
        _check_cache(model, ids)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            a = model.generate(ids[:, :4], use_cache=True, **kw)
            b = model.generate(ids[:, :4], use_cache=False, **kw)
        assert a.shape[1] == 10 and torch.equal(a, b)
    with torch.no_grad():  # the sub-network generates what the elastic model generates
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert torch.equal(hetero.generate(ids[:, :4], **kw), fx.generate(ids[:, :4], **kw))


def test_save_subnetwork_refuses_non_empty_dir(tmp_path):
    fx = _ranked("qwen2_bias")
    sub = export_subnetwork(fx, fx.space.smallest())
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_subnetwork(sub, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temp dir left behind
    (tmp_path / "empty").mkdir()
    assert (save_subnetwork(sub, tmp_path / "empty") / "model.safetensors").is_file()  # an empty dir is fine
    save_subnetwork(sub, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    with pytest.raises(OutputExistsError):
        save_elastic(fx, out)


def test_save_load_elastic_round_trip(family, tmp_path):
    fx = _ranked(family)
    out = save_elastic(fx, tmp_path / "elastic", extra={"stage": "ranking"})
    meta = json.loads((out / "flextron.json").read_text())
    assert meta["stage"] == "ranking" and meta["search_space"] == fx.space.to_dict()
    assert not list(out.glob("*.bin"))
    fx2 = load_elastic(out, dtype=torch.float64)
    assert fx2.ranking == fx.ranking and fx2.space == fx.space
    ids = _ids()
    for arch in (None, _hetero_arch(fx.space, torch.Generator().manual_seed(3))):
        assert torch.equal(_logits(fx.set_arch(arch), ids), _logits(fx2.set_arch(arch), ids))


def test_load_errors_are_model_errors(tmp_path):
    fx = _ranked("llama_gqa_tied")
    with pytest.raises(ModelError, match="does not exist"):
        load_elastic(tmp_path / "nope")
    out = save_elastic(fx, tmp_path / "elastic")
    data = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ModelError, match="model.safetensors"):
        load_elastic(out)
    (out / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelError, match="model.safetensors"):
        load_elastic(out)
    (out / "config.json").unlink()
    with pytest.raises(ModelError, match="config.json"):
        load_elastic(out)
    # weights that do not fit the config
    out2 = save_elastic(fx, tmp_path / "elastic2")
    cfg = json.loads((out2 / "config.json").read_text())
    cfg["intermediate_size"] = 72
    (out2 / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="do not match|cannot load"):
        load_elastic(out2)
    (out2 / "flextron.json").unlink()
    with pytest.raises(ModelError, match="flextron.json"):
        load_elastic(out2)


def test_load_hf_model(tmp_path):
    model = make_tiny("qwen3_qknorm")
    model.save_pretrained(tmp_path / "m")
    loaded, tok = load_hf_model(tmp_path / "m", dtype=torch.float64)
    assert tok is None
    ids = _ids()
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    with pytest.raises(ModelError, match="does not exist"):
        load_hf_model(tmp_path / "missing")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(ModelError, match="not a .gguf"):
        load_hf_model(tmp_path / "w.txt")
    (tmp_path / "broken.gguf").write_bytes(b"not a gguf")
    with pytest.raises(ModelError, match="broken.gguf"):
        load_hf_model(tmp_path / "broken.gguf")
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedModelError, match="supports"):
        load_hf_model(tmp_path / "gpt2")


def test_bad_arch_is_refused():
    fx = _ranked("llama_gqa_tied")
    from flextron.errors import ConfigError

    with pytest.raises(ConfigError):
        export_subnetwork(fx, ArchConfig(mlp=(5,) * 3, heads=(1,) * 3))
