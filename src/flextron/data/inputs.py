"""The token blocks of a run (data stage): calibration, training, router, held-out and
out-of-domain sets, rebuilt deterministically from the config and the tokenizer on every invocation,
under the BOS policy the tokenizer declares (resolved once here, :mod:`flextron.data.bos`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from flextron.config import RunConfig
from flextron.data.bos import BosPolicy, resolve_bos_policy
from flextron.data.corpora import Corpora, build_corpora, load_text_files, tokenize_blocks
from flextron.errors import DataError

# --------------------------------------------------------------------------- inputs


@dataclass
class Inputs:
    """Tokenizer and token blocks of a run (rebuilt deterministically on every invocation)."""

    tokenizer: object
    calibration: torch.Tensor  # (N_cal, T_cal)
    train: torch.Tensor  # (N_train, T)
    router: torch.Tensor  # (N_r, T_r)
    heldout: torch.Tensor  # (N_eval, T_eval)
    ood: torch.Tensor  # (N_ood, T_eval)
    bos: BosPolicy  # every block and document starts with the BOS token when bos.add_bos
    guard: torch.Tensor  # (N_guard, T_eval), N_guard <= guard.blocks (0 when the held-out text has no more)


def _guard_blocks(tokenizer, docs, seq_len: int, skip: int, wanted: int, bos: BosPolicy) -> torch.Tensor:
    """The training guard's validation blocks ``(≤ wanted, seq_len)``: the held-out stream's
    blocks after the first ``skip`` (the reported held-out blocks), as many as there are up to
    ``wanted`` (none when ``wanted`` is 0 or the held-out text holds no more)."""
    if wanted == 0:
        return torch.empty(0, seq_len, dtype=torch.long)
    try:
        return tokenize_blocks(tokenizer, docs, seq_len, skip + wanted, bos=bos)[skip:]
    except DataError:  # fewer blocks than wanted: take what follows the reported ones
        return tokenize_blocks(tokenizer, docs, seq_len, None, bos=bos)[skip : skip + wanted]


def make_inputs(cfg: RunConfig, tokenizer, processes: int = 1) -> Inputs:
    """The token blocks of a run; ``processes``: how many train it (each takes ``train.batch_size``
    sequences per micro-batch, so the training blocks cover the global batch of every step).

    Calibration, training and router blocks come from the training documents, the held-out and
    guard blocks from the in-domain held-out documents (the guard's follow the reported held-out
    blocks in the same stream, so they are disjoint from them), the out-of-domain blocks from the
    out-of-domain documents.

    Raises:
        DataError: the text is too short for a set (the message names the set, the tokens it needs
            and those available, and the fields to change); as
            :func:`~flextron.data.bos.resolve_bos_policy`. AssetError: a corpus cannot be fetched.
    """
    ood_files = list(cfg.data.ood_text_files)
    corp: Corpora = build_corpora(
        heldout_articles=cfg.data.heldout_articles,
        ood_plays=0 if ood_files else cfg.data.ood_plays,
        seed=cfg.seed,
        text_files=list(cfg.data.text_files) or None,
    )
    if ood_files:
        corp = Corpora(train=corp.train, heldout=corp.heldout, ood_heldout=load_text_files(ood_files))
    t, e = cfg.train, cfg.eval
    n_train = min(t.steps * t.batch_size * processes * t.grad_accum, 4096)
    bos = resolve_bos_policy(tokenizer)

    def blocks(docs, seq_len: int, n: int, what: str, fields: str, seed: int | None = None) -> torch.Tensor:
        fix = f"add text or lower {fields}"
        return tokenize_blocks(tokenizer, docs, seq_len, n, seed=seed, what=what, fix=fix, bos=bos)

    cal, r = cfg.calibration, cfg.routers
    return Inputs(
        tokenizer=tokenizer,
        calibration=blocks(
            corp.train,
            cal.seq_len,
            cal.num_sequences,
            "the calibration set (calibration.num_sequences x seq_len)",
            "calibration.num_sequences or calibration.seq_len",
            seed=cfg.seed + 1,
        ),
        train=blocks(
            corp.train,
            t.seq_len,
            n_train,
            "elastic training (train.steps x batch_size x processes x grad_accum sequences, at most 4096)",
            "train.steps, train.batch_size or train.seq_len",
            seed=cfg.seed + 2,
        ),
        router=blocks(
            corp.train,
            r.seq_len,
            4 * r.batch_size,
            "router training (4 x routers.batch_size sequences)",
            "routers.batch_size or routers.seq_len",
            seed=cfg.seed + 3,
        ),
        heldout=blocks(
            corp.heldout,
            e.seq_len,
            e.heldout_blocks,
            "the held-out set (eval.heldout_blocks)",
            "eval.heldout_blocks or eval.seq_len",
        ),
        ood=blocks(
            corp.ood_heldout,
            e.seq_len,
            e.ood_blocks,
            "the out-of-domain set (eval.ood_blocks)",
            "eval.ood_blocks or eval.seq_len",
        ),
        guard=_guard_blocks(tokenizer, corp.heldout, e.seq_len, e.heldout_blocks, cfg.guard.blocks, bos),
        bos=bos,
    )
