"""The BOS policy (flextron.data.bos): resolved once from what the tokenizer declares (its
``tokenizer.json`` post-processor template, ``add_bos_token``, or a GGUF header's
``tokenizer.ggml.add_bos_token``), added by flextron itself to every document and block, and
recorded with the run. Tiny tokenizers built with the ``tokenizers`` library: a Llama-3-like one
whose template prepends ``<|begin_of_text|>``, and one that prepends nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_tiny_run
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from flextron.config import load_config
from flextron.data.bos import NO_BOS, TEMPLATE, BosPolicy, declare_bos, encode_text, resolve_bos_policy
from flextron.data.corpora import Document, tokenize_blocks
from flextron.data.gguf_header import gguf_model_type, read_gguf_metadata
from flextron.data.inputs import make_inputs
from flextron.errors import DataError, ModelError

WORDS = [f"w{i}" for i in range(40)]
BOT, EOT = 1, 2  # ids of <|begin_of_text|> and <|end_of_text|>


def _tokenizer(template: str | None, *, sequence: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer; ``template``: the TemplateProcessing ``single`` (None: no post-processor);
    ``sequence``: wrapped in a processors.Sequence after ByteLevel, as Llama 3's tokenizer.json."""
    vocab = {"<unk>": 0, "<|begin_of_text|>": BOT, "<|end_of_text|>": EOT, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if template is not None:
        proc = processors.TemplateProcessing(
            single=template, pair=f"{template} $B:1", special_tokens=[("<|begin_of_text|>", BOT)]
        )
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), proc]) if sequence else proc
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )


def _docs(n: int = 30, seed: int = 0) -> list[Document]:
    rng = np.random.default_rng(seed)
    return [Document(f"d{i}", " ".join(rng.choice(WORDS, size=rng.integers(3, 40))), "user") for i in range(n)]


# --------------------------------------------------------------------------- resolution


def test_llama3_like_template_declares_bos_and_survives_save_and_load(tmp_path):
    for sequence in (False, True):
        tok = _tokenizer("<|begin_of_text|> $A", sequence=sequence)
        assert resolve_bos_policy(tok) == BosPolicy(True, BOT, TEMPLATE)
        tok.save_pretrained(tmp_path / str(sequence))
        again = AutoTokenizer.from_pretrained(tmp_path / str(sequence))
        assert resolve_bos_policy(again) == BosPolicy(True, BOT, TEMPLATE)
        assert encode_text(again, "w1 w2") == [BOT, 4, 5]  # added by us, once


def test_template_without_special_token_declares_no_bos():
    for tok in (_tokenizer("$A"), _tokenizer(None)):  # transformers writes "$A" when there is none
        policy = resolve_bos_policy(tok)
        assert not policy.add_bos and policy.bos_token_id is None
        assert encode_text(tok, "w1 w2") == [4, 5]
    assert resolve_bos_policy(_tokenizer("$A")).to_dict() == {
        "add_bos": False,
        "bos_token_id": None,
        "declared_by": TEMPLATE,
    }


def test_add_bos_token_flag_without_template():
    class Slow:  # a tokenizer without tokenizer.json (no backend): its add_bos_token is the declaration
        add_bos_token, bos_token_id = True, 7

    assert resolve_bos_policy(Slow()) == BosPolicy(True, 7, "add_bos_token")
    Slow.bos_token_id = None
    with pytest.raises(DataError, match="no bos_token"):
        resolve_bos_policy(Slow())


def test_declare_bos_writes_a_gguf_policy_into_the_tokenizer(tmp_path):
    tok = _tokenizer("$A")
    assert declare_bos(tok, True) == BosPolicy(True, BOT, TEMPLATE)
    assert tok("w1")["input_ids"] == [BOT, 4]  # the tokenizer itself now prepends it too
    tok.save_pretrained(tmp_path)
    assert resolve_bos_policy(AutoTokenizer.from_pretrained(tmp_path)).add_bos
    assert not declare_bos(tok, False).add_bos


# --------------------------------------------------------------------------- token blocks


def test_blocks_start_with_bos_and_so_does_every_document():
    tok, docs = _tokenizer("<|begin_of_text|> $A"), _docs()
    blocks = tokenize_blocks(tok, docs, 16, None)
    assert blocks.shape[1] == 16 and (blocks[:, 0] == BOT).all()
    assert not ((blocks[:, 0] == BOT) & (blocks[:, 1] == BOT)).any()  # never BOS BOS
    flat = blocks.flatten().tolist()
    after_eos = [flat[i + 1] for i in range(len(flat) - 1) if flat[i] == EOT]
    assert after_eos and all(t == BOT for t in after_eos)  # EOS BOS between documents
    # the text between the BOS tokens is exactly the documents in order
    text_ids = [t for t in flat if t not in (BOT, EOT)]
    plain = [encode_text(tok, d.text, NO_BOS) for d in docs]
    joined = [t for ids in plain for t in ids]
    assert text_ids == joined[: len(text_ids)]
    assert tokenize_blocks(tok, docs, 16, 3).tolist() == blocks[:3].tolist()
    with pytest.raises(DataError, match="seq_len >= 2"):
        tokenize_blocks(tok, docs, 1, 2)
    with pytest.raises(DataError, match=r"blocks of seq_len=16\); only"):
        tokenize_blocks(tok, docs, 16, 10_000)


def test_no_bos_blocks_are_the_plain_cut():
    tok, docs = _tokenizer("$A"), _docs()
    blocks = tokenize_blocks(tok, docs, 16, None, seed=3)
    assert torch.equal(blocks, tokenize_blocks(tok, docs, 16, None, seed=3, bos=NO_BOS))
    assert not (blocks == BOT).any()


def test_make_inputs_resolves_the_policy_once_for_every_block_set(tmp_path, monkeypatch):
    cfg = load_config(write_tiny_run(tmp_path))
    words = " ".join(WORDS)
    tok = _tokenizer("<|begin_of_text|> $A")
    for f in (tmp_path / "data").iterdir():  # the tiny run's documents, in this tokenizer's words
        f.write_text(" ".join([words] * 4))
    (tmp_path / "ood.txt").write_text(" ".join([words] * 40))
    inp = make_inputs(cfg, tok)
    assert inp.bos == BosPolicy(True, BOT, TEMPLATE)
    for blocks in (inp.calibration, inp.train, inp.router, inp.heldout, inp.ood):
        assert (blocks[:, 0] == BOT).all()


# --------------------------------------------------------------------------- GGUF header


def _write_gguf(path, arch: str = "llama", add_bos: bool | None = True, n_tokens: int = 5000, name: str = "tiny"):
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(name)
    w.add_block_count(2)
    w.add_token_list([f"t{i}" for i in range(n_tokens)])
    w.add_token_scores([0.0] * n_tokens)
    w.add_bos_token_id(1)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_header_matches_the_gguf_library(tmp_path):
    import gguf

    path = _write_gguf(tmp_path / "m.gguf")
    meta = read_gguf_metadata(path)
    reader = gguf.GGUFReader(path)
    expected = {
        k: f.contents()
        for k, f in reader.fields.items()
        if not k.startswith("GGUF.") and f.types[0] != gguf.GGUFValueType.ARRAY
    }
    assert meta == expected
    assert meta["tokenizer.ggml.add_bos_token"] is True and meta["general.architecture"] == "llama"
    assert "tokenizer.ggml.tokens" not in meta  # arrays only when asked for
    tokens = read_gguf_metadata(path, ["tokenizer.ggml.tokens"])["tokenizer.ggml.tokens"]
    assert tokens == reader.fields["tokenizer.ggml.tokens"].contents()
    assert read_gguf_metadata(path, ["general.architecture"])["general.architecture"] == "llama"


def test_gguf_model_type_as_transformers_names_it():
    assert gguf_model_type({"general.architecture": "gemma3"}) == "gemma3_text"
    assert gguf_model_type({"general.architecture": "qwen2"}) == "qwen2"
    assert gguf_model_type({"general.architecture": "phi3"}) == "phi3"
    assert gguf_model_type({"general.architecture": "llama", "general.name": "mistral"}) == "mistral"
    with pytest.raises(ModelError, match="general.architecture"):
        gguf_model_type({})


def test_truncated_or_foreign_gguf_is_one_model_error(tmp_path):
    path = _write_gguf(tmp_path / "m.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ModelError, match="truncated"):
        read_gguf_metadata(cut)
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(ModelError, match="not a GGUF file"):
        read_gguf_metadata(tmp_path / "x.gguf")


def test_gguf_source_tokenizer_declares_the_header_policy(tmp_path):
    """transformers' GGUF conversion drops ``tokenizer.ggml.add_bos_token``; load_hf_model puts it back."""
    from flextron.model.export import load_hf_model

    for add_bos in (True, False):
        path = _write_tiny_llama_gguf(tmp_path / f"bos{add_bos}.gguf", add_bos)
        _, tok = load_hf_model(path)
        assert resolve_bos_policy(tok).add_bos is add_bos
        assert (encode_text(tok, "w1")[:1] == [1]) is add_bos


def _write_tiny_llama_gguf(path, add_bos: bool):
    """A complete (tiny, random, float32) Llama GGUF that transformers loads."""
    import gguf

    L, d, ff, H, KV = 2, 16, 32, 2, 1
    hd = d // H
    words = ["<unk>", "<s>", "</s>"] + [f"\u2581w{i}" for i in range(29)]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_block_count(L)
    w.add_feed_forward_length(ff)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hd)
    w.add_tokenizer_model("llama")
    w.add_token_list(words)
    w.add_token_scores([0.0] * len(words))
    w.add_token_types([2, 3, 3] + [1] * (len(words) - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(add_bos)
    rng = np.random.default_rng(0)

    def rand(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", rand(len(words), d))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    for i in range(L):
        for name, shape in (
            ("attn_q", (H * hd, d)),
            ("attn_k", (KV * hd, d)),
            ("attn_v", (KV * hd, d)),
            ("attn_output", (d, H * hd)),
            ("ffn_gate", (ff, d)),
            ("ffn_up", (ff, d)),
            ("ffn_down", (d, ff)),
        ):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(d, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(d, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_lm_eval_adapter_follows_the_policy():
    from conftest import make_tiny

    from flextron.config import ElasticConfig
    from flextron.eval.lm_eval_model import FlextronLM
    from flextron.model.elastic import convert

    fx = convert(
        make_tiny("llama_gqa_tied", dtype=torch.float32), ElasticConfig(mlp_fractions=(0.5, 1.0), mlp_divisor=8)
    )
    for template, add_bos in (("<|begin_of_text|> $A", True), ("$A", False)):
        lm = FlextronLM(fx=fx, tokenizer=_tokenizer(template), target=1.0, device="cpu", batch_size=2)
        assert lm.add_bos_token is add_bos
        assert lm.tok_encode("w1 w2") == ([BOT, 4, 5] if add_bos else [4, 5])
