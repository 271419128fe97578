"""The sections of a run's configuration, one frozen dataclass per stage, each validated on
construction (:func:`check_field`: the message names the field, the value and what is allowed).
Every **[choice]** of ``METHOD.md`` is a field here, with the project default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from flextron.errors import ConfigError

log = logging.getLogger(__name__)

#: The paper's six downstream tasks, in the paper's order (defined in :mod:`flextron.eval.tasks`).
TASKS: tuple[str, ...] = ("arc_easy", "lambada", "piqa", "winogrande", "mmlu", "hellaswag")
ORDERINGS = ("importance", "none", "random")
HEAD_AXES = ("auto", "heads_per_group", "kv_groups")
MIXED_PRECISION = ("no", "bf16")
GUARD_ACTIONS = ("stop", "warn", "rollback")


def check_field(cond: bool, where: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{where}={value!r} is invalid: {allowed}")


@dataclass(frozen=True)
class ElasticConfig:
    """What is elastic and how units are ordered (METHOD §1, §2).

    ``mlp_fractions``: fractions of ``intermediate_size`` offered to every layer, rounded to a
    multiple of ``mlp_divisor`` (1.0 is always added). ``head_axis``: what the attention axis
    drops (METHOD §1, §2): ``heads_per_group`` (query heads inside every KV group, K/V kept),
    ``kv_groups`` (whole KV groups, least important first: their query heads and ``k_proj``/``v_proj``
    rows), or ``auto`` (``kv_groups`` for a model with one query head per group, i.e. multi-head
    attention such as Phi-3-mini or Llama-2-7B, which has no other head axis; else
    ``heads_per_group``). ``heads_per_group``: query heads kept per KV group (``None``: every value
    1 … ``num_attention_heads / num_key_value_heads``). ``kv_groups``: KV groups kept (``None``:
    every value 1 … ``num_key_value_heads``). ``ordering``: ``importance`` (activation-based, §2),
    ``none`` (identity) or ``random``.
    """

    mlp_fractions: tuple[float, ...] = (0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    mlp_divisor: int = 64
    heads_per_group: tuple[int, ...] | None = None
    ordering: str = "importance"
    head_axis: str = "auto"
    kv_groups: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        check_field(
            len(self.mlp_fractions) > 0, "elastic.mlp_fractions", self.mlp_fractions, "give at least one fraction"
        )
        for f in self.mlp_fractions:
            check_field(0 < f <= 1, "elastic.mlp_fractions", f, "each fraction must lie in (0, 1]")
        check_field(self.mlp_divisor >= 1, "elastic.mlp_divisor", self.mlp_divisor, "must be a positive integer")
        if self.heads_per_group is not None:
            check_field(
                len(self.heads_per_group) > 0,
                "elastic.heads_per_group",
                self.heads_per_group,
                "give at least one head count or null",
            )
            for a in self.heads_per_group:
                check_field(a >= 1, "elastic.heads_per_group", a, "each head count must be >= 1")
        check_field(self.ordering in ORDERINGS, "elastic.ordering", self.ordering, f"one of {ORDERINGS}")
        check_field(self.head_axis in HEAD_AXES, "elastic.head_axis", self.head_axis, f"one of {HEAD_AXES}")
        if self.kv_groups is not None:
            check_field(len(self.kv_groups) > 0, "elastic.kv_groups", self.kv_groups, "give at least one count or null")
            for g in self.kv_groups:
                check_field(g >= 1, "elastic.kv_groups", g, "each group count must be >= 1")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to convert: ``smollm2`` (the embedded SmolLM2-135M-Instruct), ``gemma3-270m``
    (the embedded Gemma-3-270M, Gemma Terms of Use), a local HF directory, or a local ``.gguf`` file."""

    source: str = "smollm2"

    def __post_init__(self) -> None:
        check_field(
            bool(self.source),
            "model.source",
            self.source,
            "'smollm2', 'gemma3-270m', an HF model directory or a .gguf file",
        )


@dataclass(frozen=True)
class DataConfig:
    """Corpora: Wikipedia lead sections (or ``text_files``: .txt/.jsonl files or folders), held-out
    articles, Shakespeare (or ``ood_text_files``) as the out-of-domain held-out set."""

    text_files: tuple[str, ...] = ()
    ood_text_files: tuple[str, ...] = ()
    heldout_articles: int = 300
    ood_plays: int = 4

    def __post_init__(self) -> None:
        check_field(self.heldout_articles >= 1, "data.heldout_articles", self.heldout_articles, "must be >= 1")
        check_field(self.ood_plays >= 1, "data.ood_plays", self.ood_plays, "must be >= 1")


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration set for importance ranking (METHOD §2): ``num_sequences`` × ``seq_len`` tokens."""

    num_sequences: int = 64
    seq_len: int = 512
    batch_size: int = 8

    def __post_init__(self) -> None:
        for k in ("num_sequences", "seq_len", "batch_size"):
            check_field(getattr(self, k) >= 1, f"calibration.{k}", getattr(self, k), "must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Elastic continued training (METHOD §4).

    ``p_full``: probability of the full model in a step; ``sampling``: ``budget`` (draw a target,
    then a per-layer configuration meeting it) or ``homogeneous`` (one of the deployable
    homogeneous configurations, uniformly: the MatFormer-style baseline); ``kd_alpha``: weight of the
    forward KL to the original model (``loss = (1 - kd_alpha) * CE + kd_alpha * KL``).
    ``batch_size`` is per process and micro-batch: a step trains on ``batch_size × processes ×
    grad_accum`` sequences. ``mixed_precision``: ``no`` or ``bf16`` (autocast; float32 weights).
    """

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 512
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    p_full: float = 0.33
    sampling: str = "budget"
    kd_alpha: float = 0.5
    checkpoint_every: int = 50
    log_every: int = 1
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        for k in ("steps", "batch_size", "grad_accum", "seq_len", "checkpoint_every", "log_every"):
            check_field(getattr(self, k) >= 1, f"train.{k}", getattr(self, k), "must be >= 1")
        check_field(self.lr > 0, "train.lr", self.lr, "must be > 0")
        check_field(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "must lie in [0, 1]")
        check_field(0 <= self.p_full <= 1, "train.p_full", self.p_full, "must lie in [0, 1]")
        check_field(0 <= self.kd_alpha <= 1, "train.kd_alpha", self.kd_alpha, "must lie in [0, 1]")
        check_field(
            self.sampling in ("budget", "homogeneous"), "train.sampling", self.sampling, "'budget' or 'homogeneous'"
        )
        check_field(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        check_field(
            self.mixed_precision in MIXED_PRECISION,
            "train.mixed_precision",
            self.mixed_precision,
            f"one of {MIXED_PRECISION}",
        )


@dataclass(frozen=True)
class LatencyConfig:
    """Latency lookup table (METHOD §5): workload ``batch_size`` × ``seq_len`` prefill, warm-up,
    trimmed mean over ``repeats``; ``validate_configs`` random whole configurations are timed to
    report the table's mean absolute percentage error. ``budget``: ``latency`` or ``params``.
    ``block_repeats``: rounds of the isolated per-width block timings. ``method``: ``fit`` scales
    the block timings by least squares over ``fit_configs`` + all homogeneous exported
    sub-models timed against the full model, ``block`` uses the block timings as they are
    (see :func:`flextron.cost.measure.measure_latency_table`). A measurement whose full-model
    time drifts, whose full-model timings spread, or whose fit residuals exceed ``busy_tolerance``
    (fractions of the full latency; :func:`flextron.cost.measure.busy_figures`) was taken on a
    busy machine: it is repeated up to ``busy_retries`` times, then refused unless
    ``allow_busy``."""

    seq_len: int = 256
    batch_size: int = 1
    warmup: int = 3
    repeats: int = 10
    block_repeats: int = 30
    trim: float = 0.2
    validate_configs: int = 20
    budget: str = "latency"
    method: str = "fit"
    fit_configs: int = 12
    busy_tolerance: float = 0.1
    busy_retries: int = 2
    allow_busy: bool = False

    def __post_init__(self) -> None:
        check_field(self.busy_tolerance > 0, "latency.busy_tolerance", self.busy_tolerance, "must be > 0")
        check_field(self.busy_retries >= 0, "latency.busy_retries", self.busy_retries, "must be >= 0")
        check_field(self.method in ("fit", "block"), "latency.method", self.method, "'fit' or 'block'")
        check_field(self.fit_configs >= 0, "latency.fit_configs", self.fit_configs, "must be >= 0")
        for k in ("seq_len", "batch_size", "repeats", "block_repeats"):
            check_field(getattr(self, k) >= 1, f"latency.{k}", getattr(self, k), "must be >= 1")
        check_field(self.warmup >= 0, "latency.warmup", self.warmup, "must be >= 0")
        check_field(0 <= self.trim < 0.5, "latency.trim", self.trim, "must lie in [0, 0.5)")
        check_field(self.validate_configs >= 0, "latency.validate_configs", self.validate_configs, "must be >= 0")
        check_field(self.budget in ("latency", "params"), "latency.budget", self.budget, "'latency' or 'params'")


@dataclass(frozen=True)
class RouterConfig:
    """Static routers trained through the surrogate model (METHOD §6, §7).

    ``targets``: trained targets (fraction of full latency). ``surrogate_gate_spearman`` and
    ``surrogate_gate_error``: the surrogate must reach both on held-out configurations before the
    routers get its gradient (the error is relative to a constant predictor's, so a constant
    surrogate never passes). ``warm_start``: measure every homogeneous configuration first and
    start the router from the best one that meets each target (then the surrogate refines it);
    ``sensitivity_mlp_levels`` > 0 also measures each layer reduced alone (that many MLP widths
    per layer, every head count) and offers the knapsack allocation of those sensitivities as a
    second start, kept where it measures better (0: homogeneous starts only).
    ``latency_weight`` is λ, ``latency_tol`` the tolerance of the latency loss. ``surrogate``:
    ``true`` trains through the surrogate, ``false`` is the direct ablation (gradient of the LM
    loss through soft masks). ``checkpoint_every``: steps between checkpoints (one is also
    written after the warm-up and at the last step).
    """

    targets: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
    hidden: int = 128
    surrogate_hidden: int = 256
    steps: int = 200
    warmup_samples: int = 32
    batch_size: int = 4
    seq_len: int = 256
    router_lr: float = 1e-2
    surrogate_lr: float = 1e-3
    surrogate_updates: int = 20
    tau_start: float = 1.0
    tau_end: float = 0.05
    latency_weight: float = 1.0
    latency_tol: float = 0.02
    surrogate_gate_spearman: float = 0.8
    surrogate_gate_error: float = 0.5
    heldout_configs: int = 12
    surrogate: bool = True
    warm_start: bool = True
    sensitivity_mlp_levels: int = 3
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        check_field(
            self.sensitivity_mlp_levels >= 0,
            "routers.sensitivity_mlp_levels",
            self.sensitivity_mlp_levels,
            "must be >= 0 (0: no allocation)",
        )
        check_field(len(self.targets) >= 1, "routers.targets", self.targets, "give at least one target")
        for t in self.targets:
            check_field(0 < t <= 1, "routers.targets", t, "each target must lie in (0, 1]")
        check_field(
            tuple(sorted(self.targets)) == tuple(self.targets),
            "routers.targets",
            self.targets,
            "must be sorted ascending",
        )
        for k in (
            "hidden",
            "surrogate_hidden",
            "batch_size",
            "seq_len",
            "surrogate_updates",
            "heldout_configs",
            "checkpoint_every",
        ):
            check_field(getattr(self, k) >= 1, f"routers.{k}", getattr(self, k), "must be >= 1")
        check_field(self.steps >= 0, "routers.steps", self.steps, "must be >= 0")
        check_field(self.warmup_samples >= 2, "routers.warmup_samples", self.warmup_samples, "must be >= 2")
        check_field(
            self.tau_start >= self.tau_end > 0, "routers.tau_end", self.tau_end, "need tau_start >= tau_end > 0"
        )
        check_field(self.latency_weight >= 0, "routers.latency_weight", self.latency_weight, "must be >= 0")
        check_field(0 <= self.latency_tol < 1, "routers.latency_tol", self.latency_tol, "must lie in [0, 1)")
        for k in ("router_lr", "surrogate_lr"):
            check_field(getattr(self, k) > 0, f"routers.{k}", getattr(self, k), "must be > 0")


@dataclass(frozen=True)
class JointConfig:
    """Joint fine-tuning of model and routers (METHOD §8); ``batch_size``, ``grad_accum`` and
    ``mixed_precision`` as in :class:`TrainConfig`. ``p_full``: share of the steps that train the
    full model alone (no router, no latency loss), as in elastic training (project choice: without
    them the full model drifts while only sub-networks are trained)."""

    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    seq_len: int = 256
    model_lr: float = 1e-4
    router_lr: float = 1e-2
    kd_alpha: float = 0.5
    p_full: float = 0.33
    checkpoint_every: int = 25
    mixed_precision: str = "no"

    def __post_init__(self) -> None:
        check_field(0 <= self.p_full < 1, "joint.p_full", self.p_full, "must lie in [0, 1)")
        for k in ("batch_size", "grad_accum", "seq_len", "checkpoint_every"):
            check_field(getattr(self, k) >= 1, f"joint.{k}", getattr(self, k), "must be >= 1")
        check_field(
            self.mixed_precision in MIXED_PRECISION,
            "joint.mixed_precision",
            self.mixed_precision,
            f"one of {MIXED_PRECISION}",
        )
        check_field(self.steps >= 0, "joint.steps", self.steps, "must be >= 0")
        for k in ("model_lr", "router_lr"):
            check_field(getattr(self, k) > 0, f"joint.{k}", getattr(self, k), "must be > 0")
        check_field(0 <= self.kd_alpha <= 1, "joint.kd_alpha", self.kd_alpha, "must lie in [0, 1]")


@dataclass(frozen=True)
class GuardConfig:
    """Guard of elastic training and joint fine-tuning against damage to the full model
    (:class:`flextron.train.guard.TrainingGuard`): every ``every`` steps (and at the start and the
    last step; 0 = off) the full model's mean loss on ``blocks`` fixed held-out blocks is measured;
    when it exceeds the stage's starting loss by more than ``tolerance`` (relative: 0.05 = 5 %),
    ``action``: ``stop`` (error, the last checkpoint kept), ``warn`` (log and go on) or ``rollback``
    (restore the best weights measured, keeping a copy in memory, and end the stage there)."""

    every: int = 10
    blocks: int = 4
    tolerance: float = 0.05
    action: str = "stop"

    def __post_init__(self) -> None:
        check_field(self.every >= 0, "guard.every", self.every, "must be >= 0 (0 = off)")
        check_field(self.blocks >= 1, "guard.blocks", self.blocks, "must be >= 1")
        check_field(self.tolerance > 0, "guard.tolerance", self.tolerance, "must be > 0")
        check_field(self.action in GUARD_ACTIONS, "guard.action", self.action, f"one of {GUARD_ACTIONS}")


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation: held-out perplexity (in-domain and out-of-domain) and timed latency per target."""

    targets: tuple[float, ...] = (0.6, 0.7, 0.85, 1.0)
    seq_len: int = 256
    heldout_blocks: int = 64
    ood_blocks: int = 32
    batch_size: int = 8
    latency_repeats: int = 7
    ablation_mlp_fraction: float = 0.5
    # downstream tasks (flextron.eval.tasks) scored with lm-eval during evaluation; () = none
    tasks: tuple[str, ...] = ()
    task_limit: int = 0  # items per task, a fixed seeded subset; 0 = every item
    task_targets: tuple[float, ...] = ()  # targets whose sub-models are scored; () = all of `targets`
    task_num_fewshot: int = -1  # -1 = each task's protocol (MMLU 5, HellaSwag 10, others 0)
    task_batch_size: int = 16

    def __post_init__(self) -> None:
        check_field(len(self.targets) >= 1, "eval.targets", self.targets, "give at least one target")
        for t in self.targets:
            check_field(0 < t <= 1, "eval.targets", t, "each target must lie in (0, 1]")
        for k in ("seq_len", "heldout_blocks", "ood_blocks", "batch_size"):
            check_field(getattr(self, k) >= 1, f"eval.{k}", getattr(self, k), "must be >= 1")
        check_field(self.latency_repeats >= 5, "eval.latency_repeats", self.latency_repeats, "must be >= 5")
        check_field(
            0 < self.ablation_mlp_fraction <= 1,
            "eval.ablation_mlp_fraction",
            self.ablation_mlp_fraction,
            "must lie in (0, 1]",
        )
        for name in self.tasks:
            check_field(name in TASKS, "eval.tasks", name, f"each task must be one of {', '.join(TASKS)}")
        check_field(self.task_limit >= 0, "eval.task_limit", self.task_limit, "must be >= 0 (0 = every item)")
        for t in self.task_targets:
            check_field(
                t in self.targets, "eval.task_targets", t, f"each must be one of eval.targets {list(self.targets)}"
            )
        check_field(
            self.task_num_fewshot >= -1,
            "eval.task_num_fewshot",
            self.task_num_fewshot,
            "must be >= 0, or -1 for each task's protocol",
        )
        check_field(self.task_batch_size >= 1, "eval.task_batch_size", self.task_batch_size, "must be >= 1")


@dataclass(frozen=True)
class DynamicConfig:
    """Dynamic (input-adaptive) routers (METHOD §6–§8), the ``dynamic:`` section of a run; absent,
    the run has no dynamic stage. ``targets``: the targets they serve (the price is calibrated at
    each; 1.0 is the full model). Data: ``train_blocks`` blocks per domain of ``seq_len`` tokens
    (0 = ``eval.seq_len``) to train on; ``batch_size`` inputs per step, whose *average* latency is
    constrained. ``latency_weight`` λ, ``latency_tol`` as in METHOD §7; the surrogate's gate
    (``gate_spearman``, ``gate_error``) and steps (``heldout_steps`` and ``warmup_steps`` batches
    before ``steps`` router steps; ``tau_start`` → ``tau_end``) as for static routers.
    ``surrogate=False``: the direct LM-loss ablation. ``joint_steps``: joint fine-tuning steps after
    router training (0 = none). ``per_token``: per-token MLP routing. ``calibrate_blocks``: blocks
    used to fit the price (and to validate against the warm start). ``route_every``: layers that
    share one read of the hidden state (at most the model's layer count). ``timing_repeats``: timed
    rounds per target of the timed calibration (0 = predicted latency only). Evaluation:
    ``eval_blocks`` held-out blocks per domain, ``timed_blocks`` of them timed in ``eval_repeats``
    rounds. ``checkpoint_every``: router steps between checkpoints."""

    targets: tuple[float, ...] = (0.6, 0.7, 0.85, 1.0)
    hidden: int = 64
    anchor_scale: float = 3.0
    route_every: int = 3
    train_blocks: int = 16
    seq_len: int = 0
    steps: int = 30
    batch_size: int = 8
    router_lr: float = 1e-2
    surrogate_hidden: int = 256
    surrogate_lr: float = 1e-3
    surrogate_updates: int = 20
    heldout_steps: int = 2
    warmup_steps: int = 4
    tau_start: float = 1.0
    tau_end: float = 0.1
    latency_weight: float = 10.0
    latency_tol: float = 0.02
    gate_spearman: float = 0.8
    gate_error: float = 0.5
    surrogate: bool = True
    per_token: bool = False
    joint_steps: int = 0
    model_lr: float = 1e-4
    calibrate_blocks: int = 16
    calibrate_iters: int = 8
    timing_repeats: int = 5
    eval_blocks: int = 8
    timed_blocks: int = 2
    eval_repeats: int = 3
    checkpoint_every: int = 10

    def __post_init__(self) -> None:
        check_field(
            len(self.targets) >= 1 and all(0 < t <= 1 for t in self.targets),
            "dynamic.targets",
            self.targets,
            "fractions in (0, 1]",
        )
        check_field(any(t < 1 for t in self.targets), "dynamic.targets", self.targets, "at least one target below 1.0")
        for k in (
            "hidden",
            "route_every",
            "batch_size",
            "surrogate_hidden",
            "surrogate_updates",
            "heldout_steps",
            "calibrate_blocks",
            "calibrate_iters",
            "train_blocks",
            "eval_blocks",
            "eval_repeats",
            "checkpoint_every",
        ):
            check_field(getattr(self, k) >= 1, f"dynamic.{k}", getattr(self, k), "must be >= 1")
        for k in ("steps", "warmup_steps", "joint_steps", "timing_repeats", "seq_len", "timed_blocks"):
            check_field(getattr(self, k) >= 0, f"dynamic.{k}", getattr(self, k), "must be >= 0")
        check_field(self.seq_len == 0 or self.seq_len >= 2, "dynamic.seq_len", self.seq_len, "0 (eval.seq_len) or >= 2")
        check_field(
            self.batch_size >= 2,
            "dynamic.batch_size",
            self.batch_size,
            "must be >= 2 (the constraint is on a batch average)",
        )
        check_field(
            self.tau_start >= self.tau_end > 0, "dynamic.tau_end", self.tau_end, "need tau_start >= tau_end > 0"
        )
        for k in ("router_lr", "surrogate_lr", "model_lr"):
            check_field(getattr(self, k) > 0, f"dynamic.{k}", getattr(self, k), "must be > 0")
        for k in ("latency_weight", "anchor_scale"):
            check_field(getattr(self, k) >= 0, f"dynamic.{k}", getattr(self, k), "must be >= 0")
        check_field(0 <= self.latency_tol < 1, "dynamic.latency_tol", self.latency_tol, "must lie in [0, 1)")
        check_field(
            self.timed_blocks <= self.eval_blocks,
            "dynamic.timed_blocks",
            self.timed_blocks,
            f"at most eval_blocks ({self.eval_blocks}): the timed blocks are held-out blocks",
        )
        check_field(
            not (self.per_token and (not self.surrogate or self.joint_steps)),
            "dynamic.per_token",
            self.per_token,
            "per-token routing trains through the surrogate only (no masked form): set surrogate=true, joint_steps=0",
        )
