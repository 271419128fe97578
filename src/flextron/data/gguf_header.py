"""The metadata header of a GGUF file, read without touching its tensors.

Stage: before any model loading (the fast refusal of an unsupported architecture, the BOS policy of
a GGUF source). Input: a ``.gguf`` path. Output: ``{key: value}`` of its key/value header
(``general.architecture``, ``tokenizer.ggml.add_bos_token`` ...) and the Hugging Face
``model_type`` its architecture becomes in transformers.

Why not ``gguf.GGUFReader``: it parses every field, including the token list, before returning
(8.5 s for Gemma 3's 262,144-token vocabulary on one CPU core), where the header keys needed here
take milliseconds. The layout and the value-type codes are the ``gguf`` package's own
(:class:`gguf.GGUFValueType`, :data:`gguf.GGUF_MAGIC`, versions 2 and 3).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from gguf import GGUF_MAGIC, GGUFValueType

from flextron.errors import ModelError

#: struct codes of the fixed-size value types (little-endian prefix added at read time)
_SCALAR = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}

#: GGUF ``general.architecture`` -> transformers ``model_type`` where the two differ, as
#: transformers' ``load_gguf_checkpoint`` renames them (Gemma 3/4 GGUFs hold the text model only)
GGUF_ARCH_TO_MODEL_TYPE = {
    "gemma3": "gemma3_text",
    "gemma4": "gemma4_text",
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
}


class _Cursor:
    """Sequential reads from the mapped file; a read past its end raises ``ModelError``."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos, self.order = buf, path, 0, "<"

    def unpack(self, code: str) -> Any:
        try:
            (value,) = struct.unpack_from(self.order + code, self.buf, self.pos)
        except struct.error:
            raise ModelError(
                f"{self.path} ends inside its GGUF header; the file is truncated: download it again"
            ) from None
        self.pos += struct.calcsize(code)
        return value

    def string(self) -> str:
        n = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise ModelError(f"{self.path} ends inside its GGUF header; the file is truncated: download it again")
        raw = self.buf[self.pos : self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, keep: bool) -> Any:
        """Read (``keep``) or skip one value of type ``vtype``; arrays come back as lists."""
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == GGUFValueType.STRING:
            if keep:
                return self.string()
            n = self.unpack("Q")  # read first: ``self.pos += self.unpack(...)`` would lose the advance
            self.pos += n
            return None
        if vtype == GGUFValueType.ARRAY:
            etype, count = self.unpack("I"), self.unpack("Q")
            if etype in _SCALAR and not keep:  # fixed size: jump over the whole array
                self.pos += count * struct.calcsize(_SCALAR[etype])
                return None
            items = [self.value(etype, keep) for _ in range(count)]
            return items if keep else None
        raise ModelError(f"{self.path} holds an unknown GGUF value type {vtype}; it is corrupt or from a newer format")


def read_gguf_metadata(path: str | Path, keys: Iterable[str] | None = None) -> dict[str, Any]:
    """The key/value header of the GGUF file ``path``, tensors untouched.

    Scalars and strings are returned for every key; arrays (token lists, merges) only for the
    keys named in ``keys``. With ``keys``, reading stops once all of them are found (the rest may
    be absent from the result).

    Raises:
        ModelError: the file is missing, not a GGUF file (bad magic), of an unsupported version,
            truncated inside the header, or holds an unknown value type.
    """
    path = Path(path)
    wanted = set(keys) if keys is not None else None
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            cur = _Cursor(buf, path)
            if len(buf) < 8 or cur.unpack("I") != GGUF_MAGIC:
                raise ModelError(f"{path} is not a GGUF file (no GGUF magic); give a complete .gguf model file")
            version = cur.unpack("I")
            if version & 0xFFFF == 0:  # written on a big-endian machine
                cur.order, version = ">", struct.unpack(">I", struct.pack("<I", version))[0]
            if version not in (2, 3):
                raise ModelError(f"{path} is GGUF version {version}; flextron reads versions 2 and 3: re-convert it")
            cur.unpack("Q")  # tensor count
            meta: dict[str, Any] = {}
            for _ in range(cur.unpack("Q")):
                key, vtype = cur.string(), cur.unpack("I")
                keep = vtype != GGUFValueType.ARRAY or (wanted is not None and key in wanted)
                value = cur.value(vtype, keep)
                if keep:
                    meta[key] = value
                if wanted is not None and wanted <= meta.keys():
                    break
            return meta
    except (OSError, ValueError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"cannot read {path} ({type(e).__name__}: {e}); give a complete .gguf model file") from None


def gguf_model_type(meta: dict[str, Any]) -> str:
    """The transformers ``model_type`` of a GGUF header (``gemma3`` -> ``gemma3_text``; a ``llama``
    file whose ``general.name`` is ``mistral`` -> ``mistral``, as transformers loads it).

    Raises:
        ModelError: the header has no ``general.architecture``.
    """
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelError("the GGUF header has no general.architecture; the file is corrupt: download it again")
    if arch == "llama" and meta.get("general.name") == "mistral":
        return "mistral"
    return GGUF_ARCH_TO_MODEL_TYPE.get(arch, arch)
