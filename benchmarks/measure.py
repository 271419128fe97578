"""Measurements shared by the benchmark scripts: FLOPs of a configuration, prefill/decode timing,
per-op profiles, training-step costs, resident memory while serving, scaled random models.
"""

from __future__ import annotations
import multiprocessing
import os
import platform
import resource
import time
from pathlib import Path
from typing import Callable, Sequence
import torch
from tqdm.auto import tqdm
from flextron.model.space import ArchConfig, SearchSpace
from flextron.model.elastic import ElasticModel
from flextron.errors import ConfigError
from flextron.cost.timing import time_models
from flextron.eval.perplexity import generate_fn
from benchmarks.harness import load_exported, sync_device


# --------------------------------------------------------------------------- FLOPs and speed


def forward_flops(
    space: SearchSpace,
    arch: ArchConfig,
    vocab_size: int,
    *,
    batch: int,
    new_tokens: int,
    context: int,
    lm_head_tokens: int,
) -> float:
    """Multiply-add FLOPs (2 per MAC) of one forward of ``batch`` sequences, each computing
    ``new_tokens`` new positions that attend causally to ``context`` earlier cached positions,
    with the LM head on ``lm_head_tokens`` positions per sequence.

    Prefill of T tokens: ``new_tokens=T, context=0``; one decode step after P tokens:
    ``new_tokens=1, context=P``. Counts the q/k/v/o and MLP projections, the attention scores and
    weighted sum (causal pairs only) and the LM head; embeddings, norms, RoPE and softmax are
    left out (a few per cent of the total at these sizes).
    """
    d, hd, G = space.hidden_size, space.head_dim, space.num_key_value_heads
    t = new_tokens
    pairs = t * context + t * (t + 1) / 2  # causal (query, key) pairs per sequence
    total = 0.0
    for m, a in zip(arch.mlp, arch.heads):
        q = G * a * hd
        total += 2 * t * (d * q + 2 * d * G * hd + q * d)  # q, k, v, o projections
        total += 2 * 2 * pairs * G * a * hd  # scores and weighted sum
        total += 2 * t * 3 * d * m  # gate, up, down
    total += 2 * lm_head_tokens * d * vocab_size
    return batch * total


def time_prefill_decode(
    models: dict[str, torch.nn.Module],
    reference: str,
    prefill_ids: torch.Tensor,
    *,
    prompt_len: int,
    new_tokens: int,
    repeats: int,
    warmup: int = 2,
    progress: bool = False,
) -> dict[str, dict]:
    """Interleaved timing of every model's prefill and per-token decode, as ratios to ``reference``.

    Prefill: a no-grad forward of ``prefill_ids (B, T)`` (``logits_to_keep=1``). Decode: greedy
    ``generate`` of ``new_tokens`` and of 1 token from the same random prompt of ``prompt_len``
    tokens; the per-token decode time of a round is ``(t_N − t_1) / (N − 1)`` (prefill cancels).
    All calls of all models run round-robin in one :func:`~flextron.cost.measure.time_models` session,
    so a slow phase of a shared machine hits every model alike; speed-ups are medians over rounds
    of the paired per-round ratio ``reference / model``.

    Returns:
        per name ``{"prefill_s", "decode_s_per_token", "prefill_speedup", "decode_speedup"}``
        (medians; speed-ups relative to ``reference``).
    Raises:
        ConfigError: ``new_tokens < 2`` or ``reference`` not among ``models``.
    """
    from flextron.cost.timing import paired_ratio, prefill_fn

    if new_tokens < 2:
        raise ConfigError(f"decode timing needs new_tokens >= 2, got {new_tokens}")
    if reference not in models:
        raise ConfigError(f"reference {reference!r} is not one of the timed models {sorted(models)}")
    vocab = next(iter(models.values())).config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=torch.Generator().manual_seed(1)).to(prefill_ids.device)
    fns: dict[str, Callable[[], object]] = {}
    for name, m in models.items():
        fns[f"{name}|prefill"] = prefill_fn(m, prefill_ids)
        fns[f"{name}|gen{new_tokens}"] = generate_fn(m, prompt, new_tokens)
        fns[f"{name}|gen1"] = generate_fn(m, prompt, 1)
    res = time_models(fns, repeats=repeats, warmup=warmup, progress=progress, desc="timing prefill/decode")

    def per_token(name: str) -> list[float]:
        return [
            (a - b) / (new_tokens - 1)
            for a, b in zip(res[f"{name}|gen{new_tokens}"]["times_s"], res[f"{name}|gen1"]["times_s"])
        ]

    def median(xs: list[float]) -> float:
        xs = sorted(xs)
        n = len(xs)
        return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])

    ref_dec = per_token(reference)
    out = {}
    for name in models:
        dec = per_token(name)
        ratios = [r / s for r, s in zip(ref_dec, dec) if s > 0 and r > 0]
        out[name] = {
            "prefill_s": res[f"{name}|prefill"]["median_s"],
            "decode_s_per_token": median(dec),
            "prefill_speedup": 1.0 / paired_ratio(res, f"{name}|prefill", f"{reference}|prefill"),
            "decode_speedup": median(ratios) if ratios else float("nan"),
        }
    return out


def profile_ops(fn: Callable[[], object], *, repeats: int = 3, device: torch.device | None = None) -> dict[str, float]:
    """Self time per operator (seconds per call of ``fn``, averaged over ``repeats`` profiled
    calls after one warm-up call), from :mod:`torch.profiler` — device time on CUDA, CPU time
    otherwise."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device is not None and device.type == "cuda"
    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(repeats):
            fn()
        if cuda:
            torch.cuda.synchronize(device)
    out = {}
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", 0.0) if cuda else ev.self_cpu_time_total
        if us > 0:
            out[ev.key] = us * 1e-6 / repeats
    return out


# --------------------------------------------------------------------------- training cost


def training_step_costs(
    fx: ElasticModel,
    teacher: torch.nn.Module | None,
    sampler,
    blocks: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    kd_alpha: float,
    max_grad_norm: float,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Per-phase wall time of ``steps`` elastic training steps against plain fine-tuning, on the
    same batches.

    Each step draws a configuration from ``sampler`` (as :func:`~flextron.train.elastic.train_elastic`
    does) and one batch of ``batch_size`` blocks, then times, one after the other:

    - **elastic**: sampling + ``set_arch``; the teacher's forward (reported separately); the
      student's sliced forward and loss (``(1 − α)·CE + α·KL``); backward; gradient clipping and
      the AdamW step over all parameters — the phases of a ``train_elastic`` step;
    - **dense**: plain fine-tuning (CE, AdamW) of the *exported* dense model at the same
      configuration: the same width mix without elasticity (its optimizer state is created by one
      untimed step on the same batch first);
    - **full**: plain fine-tuning of the full dense model.

    The elastic model's weights change (work on a copy). Returns ``{"steps", "tokens_per_step",
    "elastic": {phase: mean s}, "dense": {...}, "full": {...}, "configs": [budget fraction per
    step, None for the full model], "per_step_s": {"elastic" (teacher excluded), "dense", "full":
    [total s per step]}}``.
    """
    from flextron.model.export import export_subnetwork
    from flextron.train.losses import lm_kd_loss
    from flextron.train.loop import step_generator

    device = next(fx.parameters()).device
    sync = lambda: sync_device(device)  # noqa: E731
    for p in fx.parameters():
        p.requires_grad_(True)
    fx.train()
    opt = torch.optim.AdamW(fx.parameters(), lr=lr, betas=(0.9, 0.95))
    full_model = export_subnetwork(fx, fx.space.full()).train()
    full_opt = torch.optim.AdamW(full_model.parameters(), lr=lr, betas=(0.9, 0.95))
    phases = {"elastic": {}, "dense": {}, "full": {}}
    fractions = []

    per_step: dict[str, list[float]] = {
        "elastic": [],
        "dense": [],
        "full": [],
    }  # step totals (elastic: without the teacher)

    def add(kind: str, phase: str, dt: float) -> None:
        phases[kind][phase] = phases[kind].get(phase, 0.0) + dt
        if phase != "teacher_forward":
            if len(per_step[kind]) < len(fractions):
                per_step[kind].append(0.0)
            per_step[kind][-1] += dt

    def timed(kind: str, phase: str, fn: Callable[[], object]):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        add(kind, phase, time.perf_counter() - t0)
        return out

    def plain_step(model, optim, batch, kind: str | None) -> None:
        def fwd():
            return lm_kd_loss(model(input_ids=batch, use_cache=False).logits, batch, None, 0.0)[0]

        def opt_step():
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optim.step()
            optim.zero_grad(set_to_none=True)

        if kind is None:
            fwd().backward()
            opt_step()
            return
        loss = timed(kind, "forward_loss", fwd)
        timed(kind, "backward", loss.backward)
        timed(kind, "optimizer", opt_step)

    gen_data = torch.Generator().manual_seed(seed)
    for step in tqdm(range(steps + 1), desc="training cost", disable=not progress):
        record = step > 0  # step 0 warms every path up (allocator, optimizer state) untimed
        batch = blocks[torch.randint(len(blocks), (batch_size,), generator=gen_data)].to(device)
        t0 = time.perf_counter()
        arch, frac = sampler.sample(step_generator(seed, step))
        fx.set_arch(arch)
        t_sample = time.perf_counter() - t0
        with torch.no_grad():
            sync()
            t0 = time.perf_counter()
            t_logits = None if teacher is None or kd_alpha == 0 else teacher(input_ids=batch, use_cache=False).logits
            sync()
            t_teacher = time.perf_counter() - t0
        if record:
            fractions.append(frac)
            add("elastic", "sample", t_sample)
            add("elastic", "teacher_forward", t_teacher)

        def fwd():
            return lm_kd_loss(fx(input_ids=batch, use_cache=False).logits, batch, t_logits, kd_alpha)[0]

        def opt_step():
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(fx.parameters(), max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)

        if record:
            loss = timed("elastic", "forward_loss", fwd)
            timed("elastic", "backward", loss.backward)
            timed("elastic", "optimizer", opt_step)
        else:
            fwd().backward()
            opt_step()
        with torch.no_grad():
            dense = export_subnetwork(fx, arch).train()
        for p in dense.parameters():
            p.requires_grad_(True)
        dense_opt = torch.optim.AdamW(dense.parameters(), lr=lr, betas=(0.9, 0.95))
        plain_step(dense, dense_opt, batch, None)  # creates the optimizer state
        plain_step(dense, dense_opt, batch, "dense" if record else None)
        del dense, dense_opt
        plain_step(full_model, full_opt, batch, "full" if record else None)
    fx.set_arch(None)
    fx.eval()
    mean = {k: {ph: v / steps for ph, v in d.items()} for k, d in phases.items()}
    return {
        "steps": steps,
        "tokens_per_step": int(batch_size * blocks.shape[1]),
        **mean,
        "configs": fractions,
        "per_step_s": per_step,
    }


# --------------------------------------------------------------------------- memory


def dir_bytes(path: str | Path, pattern: str = "*") -> int:
    """Total size of the files under ``path`` matching ``pattern`` (recursive)."""
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


def _rss_bytes() -> int:
    """Current resident set size of this process (Linux ``/proc``; peak RSS elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return _peak_rss_bytes()


def _peak_rss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if platform.system() == "Darwin" else r * 1024)


def _serve_worker(
    queue, kind: str, paths: list[str], targets: list[float], device: str, new_tokens: int, threads: int
) -> None:
    """Child process of :func:`serving_memory` (spawned, so its memory starts clean)."""
    try:
        if threads > 0:
            torch.set_num_threads(threads)
        import transformers  # noqa: F401  (counted in the baseline, like torch)

        from flextron.eval.deploy import load_run

        dev = torch.device(device)
        base = _rss_bytes()
        outputs = []

        def prompt(vocab: int) -> torch.Tensor:
            return torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0)).to(dev)

        if kind == "flextron":
            run = load_run(paths[0])
            fx = run.fx.to(dev)
            loaded = _rss_bytes()
            for t in targets:
                fx.set_target(t)
                outputs.append(generate_fn(fx, prompt(fx.config.vocab_size), new_tokens)())
        else:
            models = [load_exported(p, dev) for p in paths]
            loaded = _rss_bytes()
            for m in models:
                outputs.append(generate_fn(m, prompt(m.config.vocab_size), new_tokens)())
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        queue.put(
            {
                "baseline_rss_bytes": base,
                "loaded_rss_bytes": loaded - base,
                "serving_rss_bytes": _rss_bytes() - base,
                "peak_rss_bytes": _peak_rss_bytes() - base,
                "cuda_peak_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
                "generated": [int(o.shape[1]) for o in outputs],
            }
        )
    except BaseException as e:  # reported to the parent, which raises
        queue.put({"error": f"{type(e).__name__}: {e}"})


def serving_memory(
    scenarios: dict[str, tuple[str, Sequence[str | Path]]],
    targets: Sequence[float],
    *,
    device: str = "cpu",
    new_tokens: int = 4,
    threads: int = 0,
) -> dict[str, dict]:
    """Resident memory of fresh processes that each load and serve every target once (greedy
    generation of ``new_tokens`` tokens per target). The processes run concurrently; each
    measures only itself.

    ``scenarios``: name → ``(kind, paths)``. ``kind="flextron"``: ``paths = [run_dir]``, one
    elastic model switched between ``targets`` with ``set_target``; ``kind="separate"``: one
    exported checkpoint per path, all loaded at once. Memory is counted above the process's
    baseline after importing torch and transformers.

    Returns:
        name → ``{"baseline_rss_bytes", "loaded_rss_bytes", "serving_rss_bytes",
        "peak_rss_bytes", "cuda_peak_bytes", "generated"}``.
    Raises:
        ConfigError: unknown kind; RuntimeError: a child process failed (its error named).
    """
    for kind, _ in scenarios.values():
        if kind not in ("flextron", "separate"):
            raise ConfigError(f"serving kind must be 'flextron' or 'separate', got {kind!r}")
    ctx = multiprocessing.get_context("spawn")
    procs = {}
    for name, (kind, paths) in scenarios.items():
        queue = ctx.Queue()
        proc = ctx.Process(
            target=_serve_worker,
            args=(queue, kind, [str(p) for p in paths], list(targets), device, new_tokens, threads),
        )
        proc.start()
        procs[name] = (proc, queue)
    out = {}
    try:
        for name, (proc, queue) in procs.items():
            out[name] = queue.get(timeout=3600)
    finally:
        for proc, _ in procs.values():
            proc.join(timeout=60)
    for name, res in out.items():
        if "error" in res:
            raise RuntimeError(f"serving-memory child {name!r} failed: {res['error']}")
    return out


# --------------------------------------------------------------------------- model sizes


def scaled_random_model(
    base_dir: str | Path,
    out_dir: str | Path,
    *,
    depth_mult: float = 1.0,
    width_mult: float = 1.0,
    divisor: int = 64,
    seed: int = 0,
) -> dict:
    """Write a randomly initialised model of ``base_dir``'s family and tokenizer, with
    ``round(layers · depth_mult)`` layers and ``round(G · width_mult)`` KV groups (query heads per
    group and ``head_dim`` kept, hidden size = query heads · head_dim when the base has that
    relation, else scaled and rounded to ``head_dim``), intermediate size scaled and rounded to a
    multiple of ``divisor``. Multipliers of 1 give the base geometry with random weights.

    Returns:
        ``{"path", "params", "num_hidden_layers", "hidden_size", "intermediate_size",
        "num_attention_heads", "num_key_value_heads"}``.
    Raises:
        ConfigError: a multiplier below 1 would remove every layer or group.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if depth_mult <= 0 or width_mult <= 0:
        raise ConfigError(f"depth and width multipliers must be > 0, got {depth_mult}, {width_mult}")
    cfg = AutoConfig.from_pretrained(base_dir)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    H, G = int(cfg.num_attention_heads), int(cfg.num_key_value_heads or cfg.num_attention_heads)
    hd = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // H)
    L = max(1, round(cfg.num_hidden_layers * depth_mult))
    G2 = max(1, round(G * width_mult))
    H2 = G2 * (H // G)
    hidden = H2 * hd if cfg.hidden_size == H * hd else max(hd, round(cfg.hidden_size * width_mult / hd) * hd)
    inter = max(divisor, round(cfg.intermediate_size * width_mult / divisor) * divisor)
    cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads = L, H2, G2
    cfg.hidden_size, cfg.intermediate_size, cfg.head_dim = hidden, inter, hd
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[0]] * L
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    out = Path(out_dir)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return {
        "path": str(out),
        "params": sum(p.numel() for p in model.parameters()),
        "num_hidden_layers": L,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_attention_heads": H2,
        "num_key_value_heads": G2,
    }
