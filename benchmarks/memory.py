"""Peak resident memory of each stage that holds a model (elastic, routers, joint, evaluate),
against the budget weights + gradients + optimizer state + teacher + measured activations.

Each stage runs in a fresh process (so the peak is that stage's): after the imports and the token
blocks exist, the resident set size is the baseline; the stage then builds its models and runs a
few steps through the library's own functions (``train_elastic``, ``train_routers``,
``train_joint``, ``perplexity``). The peak (VmHWM) is restarted once the models are built; the
stage's memory is the peak of its computation minus the baseline. The peak while building the
models is reported separately ("load"): loading safetensors maps the file while the weights are
copied, so it briefly holds about twice the weights. Activations are measured, not estimated: the
unique storages that autograd saves for the backward pass of one micro-batch
(``saved_tensors_hooks``; the weights it saves are already counted as weights and left out), the
logits (student and teacher) and the gradient buffer the chunked loss fills (the logits' size) — for the joint stage
on the masked forward it runs (router choices as soft masks); for stages without a backward
pass, the largest output of a module (the logits) of one no-grad forward. They are measured
after the stage: measured first, their freed memory would stay resident in the allocator's heap
(glibc) under the stage's peak.

Usage::

    python benchmarks/memory.py                       # tiny random Llama with a 49,152-token vocabulary
    python benchmarks/memory.py --model smollm2       # the embedded SmolLM2-135M (cached assets)
    python benchmarks/memory.py --model PATH --batch 4 --seq 256 --out memory.json

Prints a table (MB = 10^6 bytes) and writes the JSON atomically (default ``benchmarks/memory.json``).
Exit status 1 when a stage exceeds ``--max-ratio`` (1.2) times its budget.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

STAGES = ("elastic", "routers", "joint", "evaluate")
MB = 1e6


def _rss() -> int:
    """Current resident set size (bytes), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    """Peak resident set size (bytes) since the start or the last :func:`_reset_peak` (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak() -> None:
    """Restart the peak at the current resident set size (Linux: ``5`` to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _bytes(tensors, exclude=()) -> int:
    """Bytes of the unique storages behind ``tensors`` (tied or viewed tensors counted once),
    leaving out those behind ``exclude`` (e.g. the weights, which autograd saves for backward)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen = {}
    for t in tensors:
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def _model(args):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from flextron.model.export import load_hf_model

    if args.model == "tiny":
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=49152,
            hidden_size=192,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=32,
            tie_word_embeddings=True,
            max_position_embeddings=512,
        )
        return AutoModelForCausalLM.from_config(cfg).float().eval()
    if args.model == "smollm2":
        from flextron.data.assets import smollm2_model_dir

        return load_hf_model(smollm2_model_dir())[0]
    return load_hf_model(Path(args.model))[0]


def _activations(fx, teacher, batch, with_grad: bool) -> int:
    """Measured activation bytes of one micro-batch: what autograd saves for backward (with the
    chunked loss), or the largest module output of a no-grad forward."""
    import torch

    from flextron.train.losses import lm_kd_loss

    if with_grad:
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            t_logits = None if teacher is None else teacher(input_ids=batch).logits.detach()
            out = fx(input_ids=batch, use_cache=False)
            lm_kd_loss(out.logits, batch, t_logits, 0.5)
        extra = [] if t_logits is None else [t_logits]
        # the weights autograd saves are counted once, as weights; + the loss's gradient buffer (logits' size)
        return _bytes(saved + [out.logits] + extra, exclude=list(fx.parameters())) + out.logits.nbytes
    largest = [0]
    hooks = [
        m.register_forward_hook(lambda m, i, o: largest.__setitem__(0, max(largest[0], getattr(o, "nbytes", 0))))
        for m in fx.modules()
    ]
    with torch.no_grad():
        fx(input_ids=batch, use_cache=False)
    for h in hooks:
        h.remove()
    return largest[0]


def run_stage(stage: str, args) -> dict:
    """Run one stage in this process and return its measurements (bytes)."""
    import torch

    from flextron.config import ElasticConfig, JointConfig, RouterConfig, TrainConfig
    from flextron.model.elastic import convert
    from flextron.eval.perplexity import perplexity
    from flextron.cost.table import CostTable
    from flextron.routing.router import StaticRouter
    from flextron.routing.surrogate import Surrogate
    from flextron.train.routers import train_routers
    from flextron.train.elastic import train_elastic
    from flextron.train.joint import train_joint

    torch.set_num_threads(args.threads)
    blocks = torch.randint(
        0, 49152, (args.batch * (args.steps + 1), args.seq), generator=torch.Generator().manual_seed(0)
    )
    base = _rss()
    fx = convert(_model(args), ElasticConfig(mlp_divisor=8))
    blocks = blocks % fx.config.vocab_size
    training = stage in ("elastic", "joint")
    teacher = copy.deepcopy(fx.model).requires_grad_(False).eval() if training else None
    table = CostTable.from_parameters(fx.space)
    sp = fx.space
    router = StaticRouter((0.6, 0.8, 1.0), sp.num_layers, len(sp.mlp_choices), len(sp.head_choices))
    sm = Surrogate(sp.num_layers, len(sp.mlp_choices), len(sp.head_choices))
    load_peak = _peak()  # building the models (safetensors maps the file while copying it)
    _reset_peak()
    params = [p for p in fx.parameters()]
    weights = _bytes(params) + _bytes(list(router.parameters()) + list(sm.parameters()))
    parts = {"weights": weights, "gradients": 0, "optimizer": 0, "teacher": 0, "activations": 0}
    if training:
        parts["gradients"] = _bytes(params)
        parts["optimizer"] = 2 * _bytes(params)  # AdamW: exp_avg, exp_avg_sq
        parts["teacher"] = _bytes(list(teacher.parameters()))
    fx.train(training)
    with tempfile.TemporaryDirectory() as run_dir:
        if stage == "elastic":
            cfg = TrainConfig(
                steps=args.steps, batch_size=args.batch, seq_len=args.seq, checkpoint_every=10**6, warmup_steps=1
            )
            train_elastic(fx, teacher, blocks, cfg, table, Path(run_dir), progress=False)
        elif stage == "joint":
            # p_full=0: every measured step is a routed (masked) step, the stage's largest
            jcfg = JointConfig(
                steps=args.steps, batch_size=args.batch, seq_len=args.seq, checkpoint_every=10**6, p_full=0.0
            )
            train_joint(
                fx,
                teacher,
                router,
                table,
                blocks,
                jcfg,
                RouterConfig(targets=(0.6, 0.8, 1.0)),
                Path(run_dir),
                progress=False,
            )
        elif stage == "routers":
            rcfg = RouterConfig(
                targets=(0.6, 0.8, 1.0),
                steps=args.steps,
                warmup_samples=2,
                heldout_configs=2,
                batch_size=args.batch,
                seq_len=args.seq,
                surrogate_updates=2,
                warm_start=False,
            )
            train_routers(fx, router, sm, table, blocks, rcfg, Path(run_dir), progress=False)
        else:
            perplexity(fx, blocks, batch_size=args.batch, progress=False)
    peak = _peak()
    # activations last: measuring them first would leave their freed memory to the allocator's
    # heap, resident, under the stage's peak
    batch = blocks[: args.batch]
    fx.train(training)
    if stage == "joint":  # the joint stage runs the masked forward (router choices as soft masks): measure that one
        from flextron.routing.router import choices_to_masks, gumbel_choice

        g = torch.Generator().manual_seed(0)
        mlp_logits, head_logits = router(torch.full((args.batch,), 0.6))
        fx.set_masks(*choices_to_masks(sp, gumbel_choice(mlp_logits, 1.0, g), gumbel_choice(head_logits, 1.0, g)))
    parts["activations"] = _activations(fx, teacher, batch, with_grad=training)
    fx.set_masks(None, None)
    return {"baseline": base, "load_peak": load_peak, "peak": peak, "parts": parts}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny (default), smollm2, or an HF model directory")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-ratio", type=float, default=1.2)
    p.add_argument("--out", default=str(Path(__file__).with_name("memory.json")))
    p.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)  # internal: run one stage, print JSON
    args = p.parse_args(argv)
    if args.stage:
        print(json.dumps(run_stage(args.stage, args)))
        return 0
    results = {}
    common = [
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
    ]
    print(f"model {args.model}, batch {args.batch} x {args.seq} tokens, {args.steps} steps per stage (MB = 1e6 bytes)")
    print(
        f"{'stage':<9} {'weights':>8} {'grads':>8} {'optim':>8} {'teacher':>8} {'activ':>8} {'budget':>8} "
        f"{'measured':>9} {'ratio':>6} {'load':>8}"
    )
    worst = 0.0
    for stage in STAGES:
        r = subprocess.run(
            [sys.executable, __file__, "--stage", stage, *common], capture_output=True, text=True, check=True
        )
        m = json.loads(r.stdout.strip().splitlines()[-1])
        budget = sum(m["parts"].values())
        used = m["peak"] - m["baseline"]
        ratio = used / budget
        worst = max(worst, ratio)
        results[stage] = {**m, "budget": budget, "stage_peak": used, "ratio": ratio}
        q = m["parts"]
        print(
            f"{stage:<9} {q['weights'] / MB:>8.1f} {q['gradients'] / MB:>8.1f} {q['optimizer'] / MB:>8.1f} "
            f"{q['teacher'] / MB:>8.1f} {q['activations'] / MB:>8.1f} {budget / MB:>8.1f} {used / MB:>9.1f} "
            f"{ratio:>5.2f}x {(m['load_peak'] - m['baseline']) / MB:>8.1f}"
        )
    out = Path(args.out)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(
        json.dumps(
            {
                "model": args.model,
                "batch": args.batch,
                "seq": args.seq,
                "steps": args.steps,
                "max_ratio": args.max_ratio,
                "stages": results,
            },
            indent=2,
        )
        + "\n"
    )
    os.replace(tmp, out)
    print(f"worst ratio {worst:.2f}x (limit {args.max_ratio}x); written to {out}")
    return 0 if worst <= args.max_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
