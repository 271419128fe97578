"""Stage: export and persistence — slice a configuration into a plain HF model; save and load.

Inputs: an :class:`~flextron.model.elastic.ElasticModel` (permuted weights) and an
:class:`~flextron.model.elastic.ArchConfig`. Outputs:

- :func:`export_subnetwork`: a *new* ``PreTrainedModel`` holding cloned, sliced weights (never
  zero-padded). A homogeneous configuration becomes a model of the same family class
  (``LlamaForCausalLM`` ...) that reloads in plain transformers; a heterogeneous one (or one whose
  homogeneous config transformers would reject, e.g. ``hidden_size % num_attention_heads != 0``)
  becomes a :class:`~flextron.model.hf_modeling.FlextronForCausalLM`, whose self-contained modeling file
  is saved next to the weights (``trust_remote_code=True``).
- :func:`save_subnetwork` / :func:`save_elastic`: atomic directory writes (temp sibling + rename),
  safetensors only; :func:`load_elastic` and :func:`load_hf_model` read them back, turning every
  missing or corrupt file into a :class:`~flextron.errors.ModelError` that names the file and the fix.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from flextron.config import RunConfig
from flextron.data.assets import MODEL_ASSETS
from flextron.data.bos import declare_bos
from flextron.data.gguf_header import read_gguf_metadata
from flextron.errors import ConfigError, FlextronError, ModelError, OutputExistsError
from flextron.files import atomic_write_dir, check_format, file_hashes, remove_stale_temps, verify_hashes
from flextron.model.elastic import ElasticModel, convert, elastic_config_from_metadata
from flextron.model.families import adapter_for
from flextron.model.sources import check_model_source, model_source
from flextron.model.space import ArchConfig, SearchSpace
from flextron.version import CHECKPOINT_FORMAT, CHECKPOINT_FORMATS_READ

log = logging.getLogger(__name__)

HF_MODELING_FILE = "hf_modeling.py"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
SUBNETWORK_INFO_FILE = "flextron_subnetwork.json"
ELASTIC_INFO_FILE = "flextron.json"
AUTO_MAP = {"AutoConfig": "hf_modeling.FlextronConfig", "AutoModelForCausalLM": "hf_modeling.FlextronForCausalLM"}


# -- slicing ----------------------------------------------------------------------------------
def _cut_rows(sd: dict, key_of: dict[int, str], parts: list) -> None:
    """Write into ``sd`` every owning ``nn.Linear`` of ``parts`` (``(Rows, row index)`` pairs) cut
    to the selected rows, its row blocks re-fused in order (Phi-3's ``qkv_proj``/``gate_up_proj``)."""
    owners: dict[int, list] = {}
    for rows, sel in parts:
        owners.setdefault(id(rows.linear), []).append((rows, sel))
    for blocks in owners.values():
        blocks.sort(key=lambda b: b[0].start)
        linear = blocks[0][0].linear
        key = key_of[id(linear)]
        sd[f"{key}.weight"] = torch.cat([r.weight.detach()[sel] for r, sel in blocks])  # (rows kept, d)
        if linear.bias is not None:
            sd[f"{key}.bias"] = torch.cat([r.bias.detach()[sel] for r, sel in blocks])


def _sliced_state_dict(fx: ElasticModel, arch: ArchConfig) -> dict[str, torch.Tensor]:
    """The wrapped model's state dict with q/o and MLP projections cut to ``arch``.

    Projections are found through the family adapter (by module identity), never by name; fused
    projections are written back in the family's fused layout.
    """
    sd = fx.model.state_dict()
    key_of: dict[int, str] = {}
    for n, mod in fx.model.named_modules(remove_duplicate=False):
        key_of.setdefault(id(mod), n)
    for mlp, attn, m, a in zip(fx.mlps, fx.attns, arch.mlp, arch.heads):
        p = fx.adapter.mlp_projections(mlp)
        _cut_rows(sd, key_of, [(p["gate"], slice(0, m)), (p["up"], slice(0, m))])  # (m, d) each
        sd[f"{key_of[id(p['down'])]}.weight"] = p["down"].weight.detach()[:, :m]  # (d, m)
        proj = fx.adapter.attention_projections(attn)
        idx, kv = attn.query_rows(a), attn.kv_rows(a)  # the rows the elastic forward keeps
        _cut_rows(sd, key_of, [(proj["q"], idx), (proj["k"], kv), (proj["v"], kv)])
        sd[f"{key_of[id(proj['o'])]}.weight"] = proj["o"].weight.detach()[:, idx]  # (d, kept query heads·hd)
    return sd


try:  # transformers 5 configs are huggingface_hub strict dataclasses; this is not a ValueError
    from huggingface_hub.errors import StrictDataclassClassValidationError

    _STRICT_ERRORS: tuple[type[Exception], ...] = (StrictDataclassClassValidationError,)
except ImportError:  # pragma: no cover - older huggingface_hub
    _STRICT_ERRORS = ()


def _homogeneous_config(fx: ElasticModel, arch: ArchConfig):
    """The family config at ``arch`` (homogeneous), or None when transformers rejects it."""
    base = fx.model.config
    d = base.to_dict()
    for k in ("transformers_version", "auto_map"):
        d.pop(k, None)
    sp = fx.space
    d.update(
        intermediate_size=arch.mlp[0],
        num_attention_heads=sp.query_heads(arch.heads[0]),
        num_key_value_heads=sp.kv_heads(arch.heads[0]),
        head_dim=sp.head_dim,
    )
    if sp.groups_axis:
        d["flextron_head_axis"] = sp.head_axis
    try:
        cfg = type(base).from_dict(d)
    except (ValueError, TypeError, *_STRICT_ERRORS):  # e.g. hidden_size % num_attention_heads != 0
        return None
    return cfg


def export_subnetwork(fx: ElasticModel, arch: ArchConfig | None = None):
    """A new, plain ``PreTrainedModel`` computing ``fx`` at ``arch`` (default: the active one).

    Weights are copied (the elastic model is untouched), same dtype and device, eval mode.
    Homogeneous ``arch``: the family class with ``intermediate_size``/``num_attention_heads``
    changed and ``head_dim`` explicit. Heterogeneous: :class:`flextron.model.hf_modeling.FlextronForCausalLM`.

    Raises:
        ConfigError: ``arch`` is not in the search space.
    """
    arch = fx.arch if arch is None else fx.space.validate(arch)
    ref = next(fx.model.parameters())
    base = fx.model.config
    attn_impl = getattr(base, "_attn_implementation", None)
    cfg = _homogeneous_config(fx, arch) if arch.is_homogeneous else None
    if cfg is not None:
        model_cls = type(fx.model)
    else:
        if arch.is_homogeneous:
            log.warning(
                "%s rejects %d query heads at hidden size %d (it requires hidden_size %% num_attention_heads == 0 "
                "although head_dim is explicit); the export loads with trust_remote_code=True",
                type(base).__name__,
                fx.space.query_heads(arch.heads[0]),
                base.hidden_size,
            )
        from flextron.model.hf_modeling import FlextronConfig, FlextronForCausalLM

        sp = fx.space
        cfg = FlextronConfig.from_base(
            base, list(arch.mlp), [sp.query_heads(a) for a in arch.heads], [sp.kv_heads(a) for a in arch.heads]
        )
        if sp.groups_axis:
            cfg.flextron_head_axis = sp.head_axis
        cfg.auto_map = dict(AUTO_MAP)
        model_cls = FlextronForCausalLM
    if attn_impl in ("sdpa", "eager"):
        cfg._attn_implementation = attn_impl
    with torch.device(ref.device):
        model = model_cls(cfg)
    model.to(dtype=ref.dtype)
    result = model.load_state_dict(_sliced_state_dict(fx, arch), strict=True)
    assert not result.missing_keys and not result.unexpected_keys  # strict=True raises otherwise
    source_buffers = dict(fx.model.named_buffers())
    with torch.no_grad():  # non-persistent buffers (RoPE tables, Gemma's embed_scale): the source's values
        for name, buf in model.named_buffers():
            src = source_buffers.get(name)
            if src is not None and src.shape == buf.shape:
                buf.copy_(src)
    if getattr(fx.model, "generation_config", None) is not None:
        model.generation_config = copy.deepcopy(fx.model.generation_config)
    return model.eval()


def subnetwork_arch(model: nn.Module) -> ArchConfig:
    """The per-layer (MLP width, attention units) of an exported model, from its config: query
    heads per KV group, or KV groups kept when the export records ``flextron_head_axis: kv_groups``."""
    c = model.config
    L = int(c.num_hidden_layers)
    groups = getattr(c, "flextron_head_axis", None) == "kv_groups"
    if getattr(c, "model_type", None) == "flextron_elastic":
        kv = c.num_key_value_heads_per_layer or [int(c.num_key_value_heads)] * L
        q = c.num_attention_heads_per_layer
        return ArchConfig(mlp=tuple(c.intermediate_sizes), heads=tuple(g if groups else h // g for h, g in zip(q, kv)))
    kv = int(c.num_key_value_heads)
    units = kv if groups else int(c.num_attention_heads) // kv
    return ArchConfig(mlp=(int(c.intermediate_size),) * L, heads=(units,) * L)


# -- atomic directory writes ------------------------------------------------------------------
def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    for p in (out_dir, *out_dir.parents):
        if p.exists() and not p.is_dir():
            raise OutputExistsError(
                f"{p} is a file, so {out_dir} cannot be written as a directory; choose a path that is not under a file"
            )
    if out_dir.exists() and not overwrite and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputExistsError(
            f"{out_dir} already exists and is not empty; nothing was written. "
            f"Pass --overwrite (overwrite=True) to replace it, or choose another path"
        )


def _atomic_write(out_dir, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Refuse a non-empty ``out_dir`` unless ``overwrite``, then :func:`atomic_write_dir`."""
    out_dir = Path(out_dir).expanduser().resolve()
    remove_stale_temps(out_dir.parent, out_dir.name)  # also when the write is refused below
    _check_out_dir(out_dir, overwrite)
    return atomic_write_dir(out_dir, write)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_subnetwork(
    model, out_dir, *, tokenizer=None, metadata: dict | None = None, overwrite: bool = False, extra_files=()
) -> Path:
    """Save an exported sub-network as a HF checkpoint (safetensors) into ``out_dir``.

    Also writes ``flextron_subnetwork.json`` (``arch``, ``params`` and ``metadata``) and, for a
    heterogeneous model, its modeling file ``hf_modeling.py`` (``auto_map`` in ``config.json``);
    ``extra_files`` (paths, e.g. the source model's licence and NOTICE) are copied in as they are.

    Raises:
        OutputExistsError: ``out_dir`` exists and is not empty (and ``overwrite`` is False).
    """
    hetero = getattr(model.config, "model_type", None) == "flextron_elastic"
    info = {
        "arch": subnetwork_arch(model).to_dict(),
        "params": sum(p.numel() for p in model.parameters()),
        "heterogeneous": hetero,
        **(metadata or {}),
    }

    def write(tmp: Path) -> None:
        if hetero:
            model.config.auto_map = dict(AUTO_MAP)
        model.save_pretrained(tmp)
        if hetero:
            shutil.copyfile(Path(__file__).with_name(HF_MODELING_FILE), tmp / HF_MODELING_FILE)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for f in extra_files:
            shutil.copyfile(f, tmp / Path(f).name)
        _write_json(tmp / SUBNETWORK_INFO_FILE, info)

    return _atomic_write(out_dir, overwrite, write)


def save_elastic(
    fx: ElasticModel, out_dir, *, tokenizer=None, extra: dict | None = None, overwrite: bool = False
) -> Path:
    """Save the whole (permuted) elastic model: a plain HF checkpoint (safetensors, HF keys) plus
    ``flextron.json`` (its ``format``, :data:`~flextron.version.CHECKPOINT_FORMAT`; ``fx.metadata()``,
    with ``extra`` merged in at the top level; and the sha256 of every weight file under
    ``weights_sha256``, checked by :func:`load_elastic`).

    Raises:
        OutputExistsError: ``out_dir`` exists and is not empty (and ``overwrite`` is False).
    """
    meta = fx.metadata()
    meta.update(extra or {})

    def write(tmp: Path) -> None:
        fx.model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        weights = sorted(p.name for p in tmp.glob("*.safetensors"))
        info = {**meta, "format": CHECKPOINT_FORMAT, "weights_sha256": file_hashes(tmp, weights)}
        _write_json(tmp / ELASTIC_INFO_FILE, info)

    return _atomic_write(out_dir, overwrite, write)


# -- loading ----------------------------------------------------------------------------------
def _require_hf_dir(path: Path, what: str) -> None:
    if not path.exists():
        bare = len(path.parts) == 1 and not path.suffix  # a name, perhaps of an embedded model
        embedded = f" (embedded models: {', '.join(sorted(MODEL_ASSETS))})" if bare else ""
        raise ModelError(f"{what} {path} does not exist; check the path{embedded}")
    if not path.is_dir():
        raise ModelError(f"{what} {path} is not a directory; give a Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise ModelError(f"{path / 'config.json'} is missing; {path} is not a Hugging Face model directory")


def _load_causal_lm(path: Path, dtype: torch.dtype, fix: str, **kwargs):
    """``AutoModelForCausalLM.from_pretrained`` with safetensors only; any failure, missing or
    mismatched weight becomes a one-line :class:`ModelError`."""
    from transformers import AutoModelForCausalLM

    weights = sorted(p.name for p in path.glob("*.safetensors"))
    if not weights:
        raise ModelError(f"no *.safetensors weights in {path} (pickled .bin files are not read); {fix}")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            # mismatches are reported by us below (one line) instead of transformers' table + raise
            path,
            dtype=dtype,
            use_safetensors=True,
            output_loading_info=True,
            ignore_mismatched_sizes=True,
            **kwargs,
        )
    except FlextronError:
        raise
    except Exception as e:  # safetensors/json/torch errors of many types; all mean "bad checkpoint"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelError(f"cannot load {path / weights[0]} ({type(e).__name__}: {first}); {fix}") from None
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:

        def show(item) -> str:  # mismatched entries are (key, checkpoint shape, config shape)
            if isinstance(item, tuple) and len(item) == 3:
                return f"{item[0]} {tuple(item[1])} in the file vs {tuple(item[2])} from the config"
            return str(item)

        detail = "; ".join(
            f"{k.replace('_keys', '')}: {', '.join(sorted(map(show, v))[:3])}{' ...' if len(v) > 3 else ''}"
            for k, v in bad.items()
        )
        raise ModelError(f"weights in {path} do not match {path / 'config.json'} ({detail}); {fix}")
    return model.eval()


def load_elastic(path, *, dtype: torch.dtype = torch.float32) -> ElasticModel:
    """Load a directory written by :func:`save_elastic` as an :class:`ElasticModel`.

    Raises:
        ModelError: missing directory, ``config.json`` or ``flextron.json``; a ``format`` this
            version does not read (a file without one is version 1); a weight file whose
            sha256 differs from the one recorded at save (truncated or altered); corrupt
            safetensors; weights whose shapes do not match the config.
    """
    path = Path(path).expanduser()
    _require_hf_dir(path, "elastic checkpoint")
    meta_file = path / ELASTIC_INFO_FILE
    fix = (
        f"save it again with flextron.model.export.save_elastic, or, in a run directory, delete {path} and rerun "
        "`flextron run` on the run's config (the stage that writes it runs again)"
    )
    if not meta_file.is_file():
        raise ModelError(f"{meta_file} is missing; {path} is not a flextron elastic checkpoint ({fix})")
    corrupt = (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError, ConfigError)
    try:
        meta = json.loads(meta_file.read_text())
        found = meta.get("format")  # checked before the rest: a newer format may be laid out differently
    except corrupt as e:
        raise ModelError(f"{meta_file} is corrupt ({type(e).__name__}: {e}); {fix}") from None
    check_format(
        meta_file,
        found,
        CHECKPOINT_FORMATS_READ,
        "upgrade flextron to load it, or save it again with a flextron that writes one of these formats",
    )
    try:
        elastic_config = elastic_config_from_metadata(meta)
    except corrupt as e:
        raise ModelError(f"{meta_file} is corrupt ({type(e).__name__}: {e}); {fix}") from None
    if "weights_sha256" in meta:
        verify_hashes(path, meta["weights_sha256"], fix)
    else:  # written before hashes were recorded
        log.warning("%s records no weight hashes; corruption of its weights cannot be detected", meta_file)
    model = _load_causal_lm(path, dtype, fix)
    try:
        fx = convert(model, elastic_config)
    except ConfigError as e:
        raise ModelError(f"{meta_file}: its elastic_config does not fit the model in {path} ({e}); {fix}") from None
    recorded = meta.get("search_space")
    if isinstance(recorded, dict):
        now = fx.space.to_dict()
        diff = [
            f"{k}: {recorded.get(k)!r} recorded vs {v!r} from the weights"
            for k, v in now.items()
            if recorded.get(k, SearchSpace.__dataclass_fields__[k].default) != v  # fields added later: defaults
        ]
        if diff:
            raise ModelError(f"{meta_file} does not match the model in {path} ({'; '.join(diff[:3])}); {fix}")
    fx.ranking = dict(meta.get("ranking", fx.ranking))
    return fx


def _plain_from_gguf(path: Path, dtype: torch.dtype):
    """Load a GGUF file (dequantized) as a plain model that ``save_pretrained`` accepts.

    Same trick as :func:`flextron.data.assets._convert_gguf` (DESIGN: trap (a)): the GGUF model is
    flagged quantized although its weights are plain, so rebuild it from its config without
    ``quantization_config`` and copy the weights in.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # transformers' GGUF tokenizer conversion drops the header's BOS policy; write it back
    declared = read_gguf_metadata(path).get("tokenizer.ggml.add_bos_token")
    if declared is not None:
        declare_bos(tokenizer, bool(declared))
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    adapter_for(config)  # fail early on an unsupported family
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    return plain.eval(), tokenizer


def load_hf_model(path_or_dir, *, dtype: torch.dtype = torch.float32):
    """A user model source → ``(model, tokenizer or None)``.

    ``path_or_dir``: a Hugging Face directory (safetensors only) or a local ``.gguf`` file. The
    family is checked first, from the GGUF header or ``config.json``
    (:func:`~flextron.model.sources.check_model_source`), before any weight is read. A GGUF's
    tokenizer declares the header's ``tokenizer.ggml.add_bos_token``
    (:func:`~flextron.data.bos.declare_bos`).

    Raises:
        ModelError: missing or corrupt path; UnsupportedModelError: a family without adapter.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(path_or_dir).expanduser()
    check_model_source(path)  # UnsupportedModelError in milliseconds, nothing loaded
    if path.is_file() and path.suffix.lower() == ".gguf":
        try:
            return _plain_from_gguf(path, dtype)
        except FlextronError:
            raise
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelError(
                f"cannot load GGUF file {path} ({type(e).__name__}: {first}); check that it is a complete GGUF model"
            ) from None
    if path.is_file():
        raise ModelError(f"{path} is a file but not a .gguf model; give a Hugging Face directory or a .gguf file")
    _require_hf_dir(path, "model path")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ModelError(
            f"cannot read {path / 'config.json'} ({type(e).__name__}: {e}); fix or replace the file"
        ) from None
    adapter_for(config)  # UnsupportedModelError before loading any weights
    model = _load_causal_lm(path, dtype, "re-download or re-convert the model")
    # transformers 5 builds an *empty* tokenizer (vocab_size 1) from a directory without tokenizer
    # files instead of failing, so only try when the directory has some.
    tokenizer = None
    if any((path / f).is_file() for f in _TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as e:
            raise ModelError(
                f"cannot read the tokenizer in {path} ({type(e).__name__}: {e}); "
                "replace its tokenizer files with the model's own"
            ) from None
    return model, tokenizer


def load_original(cfg: RunConfig):
    """The run's source model and tokenizer (:func:`load_hf_model`).

    Raises:
        ModelError: as :func:`load_hf_model`, or the source has no tokenizer (a run needs one)."""
    path = model_source(cfg)
    model, tok = load_hf_model(path)
    if tok is None:
        raise ModelError(
            f"{path} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); a run needs the model's tokenizer: "
            "copy them from the model's release into that directory"
        )
    return model, tok
