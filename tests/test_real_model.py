"""A few end-to-end checks on the real SmolLM2-135M-Instruct (fp32, loose tolerances, METHOD §2)."""

from __future__ import annotations

import pytest
import torch

from flextron.config import ElasticConfig
from flextron.data.assets import smollm2_model_dir
from flextron.data.corpora import load_wikipedia, tokenize_blocks
from flextron.model.elastic import convert
from flextron.model.export import export_subnetwork, load_hf_model
from flextron.model.space import sample_arch

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def real():
    model, tok = load_hf_model(smollm2_model_dir())
    docs = load_wikipedia()[:200]
    calib = tokenize_blocks(tok, docs, 128, 8, seed=0)
    ids = tokenize_blocks(tok, docs[100:], 64, 2)
    return model, tok, calib, ids


def test_real_permutation_preserves_function_and_export_matches(real):
    model, _, calib, ids = real
    with torch.no_grad():
        before = model(input_ids=ids).logits
    fx = convert(model, ElasticConfig())
    assert fx.space.mlp_choices == (384, 576, 768, 960, 1152, 1344, 1536) and fx.space.head_choices == (1, 2, 3)
    imp = fx.rank(list(calib.split(4)), progress=False)
    with torch.no_grad():
        after = fx(input_ids=ids).logits
    assert (after - before).abs().max() < 1e-3
    assert torch.equal(after.argmax(-1), before.argmax(-1))
    assert any(not torch.equal(torch.argsort(s, descending=True), torch.arange(s.numel())) for s in imp.mlp)
    # invariant 4 on the real model: a per-layer configuration exported as a plain model
    arch = sample_arch(fx.space, torch.Generator().manual_seed(0))
    sub = export_subnetwork(fx, arch)
    with torch.no_grad():
        elastic = fx.set_arch(arch)(input_ids=ids).logits
        exported = sub(input_ids=ids).logits
    assert (elastic - exported).abs().max() < 2e-3  # fp32: contiguous copy vs strided slice summation order
    assert sum(p.numel() for p in sub.parameters()) == fx.space.num_parameters(arch) < fx.space.total_params


def test_real_smollm2_declares_no_bos(real):
    """SmolLM2's tokenizer and its GGUF header both declare no BOS, so its token blocks (and every
    result built on them) are the plain cut they were before the BOS policy existed."""
    from flextron.data.assets import fetch_asset
    from flextron.data.bos import NO_BOS, resolve_bos_policy
    from flextron.data.gguf_header import read_gguf_metadata

    _, tok, calib, _ = real
    policy = resolve_bos_policy(tok)
    assert not policy.add_bos and policy.bos_token_id is None
    gguf = fetch_asset("smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert read_gguf_metadata(gguf)["tokenizer.ggml.add_bos_token"] is False
    docs = load_wikipedia()[:200]
    assert torch.equal(calib, tokenize_blocks(tok, docs, 128, 8, seed=0, bos=NO_BOS))
