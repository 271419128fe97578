"""Shared fixtures: tiny random HF models of every supported family."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = {
    # GQA (4 query heads in 2 groups) and tied embeddings, like SmolLM2
    "llama_gqa_tied": lambda: LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        max_position_embeddings=128,
    ),
    # Qwen2-style: q/k/v biases, untied
    "qwen2_bias": lambda: Qwen2Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=False,
        max_position_embeddings=128,
    ),
    # Qwen3-style: q/k norms over head_dim
    "qwen3_qknorm": lambda: Qwen3Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        max_position_embeddings=128,
    ),
    # Llama 3.x: rope_scaling of type llama3, sequences (16) beyond original_max_position_embeddings (8)
    "llama3_rope": lambda: LlamaConfig(
        vocab_size=97,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        max_position_embeddings=64,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8,
        },
    ),
    # Mistral: a sliding window (4) shorter than the test sequences
    "mistral_window": lambda: MistralConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    ),
    # Gemma 3: query_pre_attn_scalar != head_dim, mixed local/global layers, local RoPE base != global,
    # head_dim * heads (32) != hidden_size (40), gelu_pytorch_tanh, pre/post norms, scaled embedding
    "gemma3_mixed": lambda: Gemma3TextConfig(
        vocab_size=97,
        hidden_size=40,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_local_base_freq=10.0,
        rope_theta=10000.0,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Phi-3 with GQA: fused qkv_proj / gate_up_proj, partial rotary (half of head_dim), sliding window 6
    "phi3_gqa": lambda: Phi3Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        partial_rotary_factor=0.5,
        sliding_window=6,
        max_position_embeddings=128,
        original_max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
    # Phi-3-mini style multi-head attention: one query head per KV group
    "phi3_mha": lambda: Phi3Config(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        original_max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def make_tiny(name: str, dtype=torch.float64, seed: int = 0):
    """A tiny random model of family ``name`` with non-trivial weights (biases and norms random)."""
    torch.manual_seed(seed)
    cfg = FAMILIES[name]()
    cfg._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(cfg).to(dtype).eval()
    with torch.no_grad():
        for mod in model.modules():  # Gemma's embed_scale is built in float32; loading re-inits it exactly
            if hasattr(mod, "scalar_embed_scale"):
                mod.embed_scale.fill_(mod.scalar_embed_scale)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


# --------------------------------------------------------------------------- a tiny run on disk

_WORDS_A = "the river city old king north south war trade music art people land sea island year first great".split()
_WORDS_B = "thou thee hath doth lord lady sweet love night fair heart sword crown grave ghost".split()


def _docs(words, n_docs, n_words, seed):
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(n_words)) for _ in range(n_docs)]


def write_tiny_model_dir(path, seed: int = 0, intermediate_size: int = 64):
    """A tiny random Llama (GQA, tied embeddings) with a word-level tokenizer, saved as an HF dir
    (``intermediate_size`` 256 fits the default ``ElasticConfig``, whose widths are multiples of 64)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for w in _WORDS_A + _WORDS_B:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=48,
        intermediate_size=intermediate_size,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        max_position_embeddings=128,
        eos_token_id=1,
        bos_token_id=None,
        pad_token_id=None,
    )
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def write_tiny_run(tmp_path, name: str = "tiny", **overrides):
    """Model dir, text files and a YAML config for a complete run in seconds (parameter budget)."""
    import yaml

    model_dir = write_tiny_model_dir(tmp_path / "model")
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for i, d in enumerate(_docs(_WORDS_A, 40, 120, 0)):
        (data / f"doc{i:03d}.txt").write_text(d)
    ood = tmp_path / "ood.txt"
    ood.write_text("\n".join(_docs(_WORDS_B, 1, 600, 1)))
    cfg = {
        "name": name,
        "seed": 0,
        "out_dir": str(tmp_path / "runs"),
        "threads": 1,
        "model": {"source": str(model_dir)},
        "data": {"text_files": [str(data)], "ood_text_files": [str(ood)], "heldout_articles": 8},
        "elastic": {"mlp_fractions": [0.25, 0.5, 0.75, 1.0], "mlp_divisor": 8},
        "calibration": {"num_sequences": 4, "seq_len": 32, "batch_size": 2},
        "train": {"steps": 6, "batch_size": 2, "seq_len": 32, "checkpoint_every": 3, "warmup_steps": 1, "lr": 1e-3},
        "latency": {"budget": "params"},
        "routers": {
            "targets": [0.6, 0.8, 1.0],
            "steps": 4,
            "warmup_samples": 4,
            "heldout_configs": 4,
            "batch_size": 2,
            "seq_len": 32,
            "surrogate_updates": 5,
        },
        "joint": {"steps": 3, "batch_size": 2, "seq_len": 32, "checkpoint_every": 2},
        "eval": {
            "targets": [0.6, 1.0],
            "seq_len": 32,
            "heldout_blocks": 4,
            "ood_blocks": 4,
            "batch_size": 4,
            "latency_repeats": 5,
        },
    }
    for k, v in overrides.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gemma`` download the Gemma-3-270M asset: skipped (also by ``make test`` and
    ``pytest -m "not slow"``) unless the ``-m`` expression names the marker (``pytest -m gemma``)."""
    if "gemma" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="downloads the Gemma-3-270M asset; run with: pytest -m gemma")
    for item in items:
        if item.get_closest_marker("gemma") is not None:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    """State how many cases the fuzz tests (tests/test_untrusted.py, tests/test_traps.py) tried."""
    import sys
    from collections import Counter

    cases: Counter = Counter()
    for name in ("test_untrusted", "test_traps"):
        cases.update(getattr(sys.modules.get(name), "CASES", None) or {})
    if cases:
        parts = ", ".join(f"{name}: {n}" for name, n in sorted(cases.items()))
        terminalreporter.write_line(f"fuzz cases tried: {sum(cases.values())} ({parts})")
