"""Held-out text by domain, for input-adaptive routing (METHOD §6, dynamic routers).

Domains: ``wikipedia`` (the run's held-out articles, or its own text files), ``shakespeare`` (the
run's out-of-domain plays; the router trains on the other plays) and ``python`` (source files of this
Python's standard library, shipped with the interpreter; a seeded file split). Gives per-domain
training and evaluation token blocks ``(N, T)``.
"""

from __future__ import annotations

import logging
import sysconfig
from pathlib import Path

import torch

from flextron.data.corpora import (
    Document,
    build_corpora,
    load_shakespeare,
    load_text_files,
    split_documents,
    tokenize_blocks,
)
from flextron.errors import DataError

log = logging.getLogger(__name__)

DOMAINS = ("wikipedia", "shakespeare", "python")


def _python_stdlib_documents() -> list[Document]:
    """Top-level ``*.py`` files of this interpreter's standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = [
        Document(title=p.name, text=p.read_text(encoding="utf-8", errors="replace"), domain="python")
        for p in sorted(root.glob("*.py"))
        if p.is_file()
    ]
    if len(docs) < 4:
        raise DataError(
            f"found only {len(docs)} Python source files in {root}; "
            "the python domain needs the standard library sources"
        )
    return docs


def _halves(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """First half of every document for training, second half held out (a split without a leak
    for a domain given as a few long texts)."""
    first = [Document(d.title, d.text[: len(d.text) // 2], d.domain) for d in docs]
    second = [Document(d.title, d.text[len(d.text) // 2 :], d.domain) for d in docs]
    return first, second


def domain_documents(cfg) -> dict[str, tuple[list[Document], list[Document]]]:
    """``{domain: (train documents, held-out documents)}`` for a run config (see the module
    docstring); held-out documents are the run's own held-out sets where it has them.

    Raises:
        DataError / AssetError: text cannot be read.
    """
    ood_files = list(cfg.data.ood_text_files)
    corp = build_corpora(
        heldout_articles=cfg.data.heldout_articles,
        ood_plays=0 if ood_files else cfg.data.ood_plays,
        seed=cfg.seed,
        text_files=list(cfg.data.text_files) or None,
    )
    out = {"wikipedia": (corp.train, corp.heldout)}
    if ood_files:
        out["shakespeare"] = _halves(load_text_files(ood_files))
    elif cfg.data.ood_plays:
        held = {d.title for d in corp.ood_heldout}
        out["shakespeare"] = ([d for d in load_shakespeare() if d.title not in held], corp.ood_heldout)
    code = _python_stdlib_documents()
    n_held = max(2, len(code) // 5)
    held_code, train_code = split_documents(code, n_held, cfg.seed)
    out["python"] = (train_code, held_code)
    return out


def domain_blocks(
    tokenizer,
    docs: dict[str, tuple[list[Document], list[Document]]],
    seq_len: int,
    n_train: int,
    n_eval: int,
    seed: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token blocks per domain: a shuffled training pool ``(n_train · n_domains, seq_len)`` (equal
    share per domain) and ``{domain: held-out blocks (n_eval, seq_len)}``."""
    train, held = [], {}
    for i, (name, (tr, he)) in enumerate(docs.items()):
        train.append(tokenize_blocks(tokenizer, tr, seq_len, n_train, seed=seed + 11 + i))
        held[name] = tokenize_blocks(tokenizer, he, seq_len, n_eval, seed=seed + 23 + i)
    pool = torch.cat(train)
    return pool[torch.randperm(pool.shape[0], generator=torch.Generator().manual_seed(seed))], held
