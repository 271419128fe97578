"""The BOS policy of a model: whether every text it reads starts with a beginning-of-sequence token.

Stage: data preparation (token blocks), evaluation and generation. Input: a tokenizer with the
Hugging Face calling convention. Output: a :class:`BosPolicy` resolved from what the tokenizer
*declares*, in this order:

1. the ``tokenizer.json`` post-processor: a ``TemplateProcessing`` (alone or inside a
   ``Sequence``) whose ``single`` template starts with a special token (``<s>``,
   ``<|begin_of_text|>``, ``<bos>``) declares that token; one starting with the text (``$A``)
   declares none;
2. without such a template, ``add_bos_token`` (``tokenizer_config.json``, slow tokenizers);
3. otherwise: no BOS.

A GGUF model declares its policy in its header (``tokenizer.ggml.add_bos_token``), which
transformers' GGUF tokenizer conversion drops; :func:`declare_bos` writes it into the converted
tokenizer, so the tokenizer saved with a run carries it and resolves the same way later.

Text is always tokenized with ``add_special_tokens=False``; flextron adds the BOS itself
(:meth:`BosPolicy.prepend`), so the result does not depend on what a transformers version
prepends. SmolLM2 declares no BOS: its token blocks are unchanged.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

from flextron.errors import DataError

TEMPLATE = "tokenizer.json post-processor template"
CONFIG_FLAG = "add_bos_token"
NOTHING = "nothing declared"


@dataclass(frozen=True)
class BosPolicy:
    """``add_bos``: prepend ``bos_token_id`` to every document and block; ``declared_by``: where the
    tokenizer declares it (:data:`TEMPLATE`, :data:`CONFIG_FLAG` or :data:`NOTHING`)."""

    add_bos: bool
    bos_token_id: int | None
    declared_by: str

    def to_dict(self) -> dict:
        """``{"add_bos": bool, "bos_token_id": int | None, "declared_by": str}`` (the run's record)."""
        return asdict(self)

    def prepend(self, ids: list[int]) -> list[int]:
        """``ids`` with the BOS token in front when the policy adds one (never twice)."""
        if not self.add_bos or (ids and ids[0] == self.bos_token_id):
            return list(ids)
        return [int(self.bos_token_id), *ids]  # type: ignore[arg-type]  # add_bos implies an id


#: the policy that adds nothing (text ids only)
NO_BOS = BosPolicy(False, None, NOTHING)


def _leading_special(processor: dict) -> tuple[bool, int | None] | None:
    """From a post-processor's JSON: ``(True, id)`` when its single template starts with a special
    token, ``(False, None)`` when it starts with the text, ``None`` when it has no template."""
    kind = processor.get("type")
    if kind == "Sequence":
        for sub in processor.get("processors") or []:
            found = _leading_special(sub)
            if found is not None:
                return found
        return None
    if kind != "TemplateProcessing":
        return None
    single = processor.get("single") or []
    first = single[0] if single else {}
    if "SpecialToken" not in first:
        return False, None
    name = first["SpecialToken"]["id"]
    ids = (processor.get("special_tokens") or {}).get(name, {}).get("ids") or []
    if not ids:
        raise DataError(
            f"the tokenizer's post-processor template prepends {name!r} but gives it no id; fix tokenizer.json"
        )
    return True, int(ids[0])


def resolve_bos_policy(tokenizer: Any) -> BosPolicy:
    """The BOS policy ``tokenizer`` declares (see the module docstring for the order).

    Raises:
        DataError: the tokenizer declares a BOS but has no BOS token id.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    processor = getattr(backend, "post_processor", None)
    if processor is not None:
        found = _leading_special(json.loads(processor.__getstate__()))
        if found is not None:
            return BosPolicy(found[0], found[1], TEMPLATE)
    if getattr(tokenizer, "add_bos_token", False) is True:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            raise DataError("the tokenizer sets add_bos_token but has no bos_token; set tokenizer.bos_token first")
        return BosPolicy(True, int(bos), CONFIG_FLAG)
    return BosPolicy(False, None, NOTHING)


def declare_bos(tokenizer: Any, add_bos: bool) -> BosPolicy:
    """Make ``tokenizer`` declare ``add_bos`` (a GGUF header's ``tokenizer.ggml.add_bos_token``):
    transformers' tokenizers rewrite their post-processor template when ``add_bos_token`` is set.
    Returns the resolved policy; a tokenizer that already declares it is left as it is.

    Raises:
        DataError: the tokenizer cannot declare it (a BOS is asked for but it has no BOS token).
    """
    policy = resolve_bos_policy(tokenizer)
    if policy.add_bos == add_bos:
        return policy
    tokenizer.add_bos_token = add_bos
    policy = resolve_bos_policy(tokenizer)
    if policy.add_bos != add_bos:
        raise DataError(
            f"the model declares add_bos_token={add_bos} but its tokenizer "
            f"({type(tokenizer).__name__}, bos_token={getattr(tokenizer, 'bos_token', None)!r}) cannot; "
            "give a tokenizer with a BOS token"
        )
    return policy


def encode_text(tokenizer: Any, text: str, policy: BosPolicy | None = None) -> list[int]:
    """Token ids of ``text`` under ``policy`` (default: the tokenizer's own), BOS added by us."""
    policy = resolve_bos_policy(tokenizer) if policy is None else policy
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False, verbose=False)["input_ids"]
    return policy.prepend(ids)
