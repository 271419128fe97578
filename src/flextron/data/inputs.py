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


def make_inputs(cfg: RunConfig, tokenizer, processes: int = 1) -> Inputs:
    """The token blocks of a run; ``processes``: how many train it (each takes ``train.batch_size``
    sequences per micro-batch, so the training blocks cover the global batch of every step).

    Raises:
        DataError: as :func:`~flextron.data.corpora.tokenize_blocks` and
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
    t = cfg.train
    n_train = t.steps * t.batch_size * processes * t.grad_accum
    bos = resolve_bos_policy(tokenizer)
    return Inputs(
        tokenizer=tokenizer,
        calibration=tokenize_blocks(
            tokenizer, corp.train, cfg.calibration.seq_len, cfg.calibration.num_sequences, seed=cfg.seed + 1, bos=bos
        ),
        train=tokenize_blocks(tokenizer, corp.train, t.seq_len, min(n_train, 4096), seed=cfg.seed + 2, bos=bos),
        router=tokenize_blocks(
            tokenizer, corp.train, cfg.routers.seq_len, 4 * cfg.routers.batch_size, seed=cfg.seed + 3, bos=bos
        ),
        heldout=tokenize_blocks(tokenizer, corp.heldout, cfg.eval.seq_len, cfg.eval.heldout_blocks, bos=bos),
        ood=tokenize_blocks(tokenizer, corp.ood_heldout, cfg.eval.seq_len, cfg.eval.ood_blocks, bos=bos),
        bos=bos,
    )
