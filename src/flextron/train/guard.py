"""The training guard (``guard:`` section): the full model's loss on a few fixed held-out blocks,
measured during elastic training and joint fine-tuning, against the loss at the stage's start.

A conversion that damages the full model (a learning rate too high for the model, too small a
batch) would otherwise show only in the report, after the whole run. The measurement runs under
``torch.no_grad`` in eval mode with the global RNG forked, so it changes neither the weights nor the
random draws of training: a guarded run trains exactly as an unguarded one until the guard acts.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from flextron.config import GuardConfig
from flextron.errors import TrainingError

log = logging.getLogger(__name__)


@torch.no_grad()
def full_model_loss(fx, blocks: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token cross-entropy (nats per token) of the elastic model ``fx`` as the full model
    on ``blocks`` ``(N, T)`` token ids; ``fx``'s configuration, masks and train flag are restored."""
    arch, training = fx.arch, fx.training
    device = next(fx.parameters()).device
    total, count = 0.0, 0
    with torch.random.fork_rng(devices=[]):
        fx.eval()
        fx.set_arch(None)
        try:
            for batch in blocks.split(batch_size):
                batch = batch.to(device)
                logits = fx(input_ids=batch, use_cache=False).logits[:, :-1].float()
                total += float(F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
                count += batch[:, 1:].numel()
        finally:
            fx.set_arch(arch)
            fx.train(training)
    return total / count


class TrainingGuard:
    """Watches one training stage (``stage``, for the messages) of the elastic model ``fx``: the
    full model's loss on ``blocks`` (held-out blocks not used for reporting) at the stage's start
    and every ``cfg.every`` steps; see :class:`~flextron.config.GuardConfig` for the actions.
    ``fix``: what to change when it fires (e.g. ``"lower train.lr (now 0.0001)"``).

    ``start`` is the loss the stage started from; a resumed stage gets it back from its checkpoint
    (:meth:`state` / :meth:`load`), so a resume is judged against the same reference. ``also``:
    modules trained with ``fx`` (the joint stage's router), kept and restored with it by
    ``rollback``.
    """

    def __init__(self, fx, blocks: torch.Tensor, cfg: GuardConfig, stage: str, fix: str, also=None) -> None:
        self.fx, self.blocks, self.cfg, self.stage, self.fix = fx, blocks, cfg, stage, fix
        self.modules = {"model": fx, **(also or {})}
        self.start: float | None = None
        self.best: tuple[int, float] | None = None  # (step, loss)
        self.best_weights: dict[str, dict[str, torch.Tensor]] | None = None
        self.history: list[tuple[int, float]] = []
        self.fired: dict | None = None

    @property
    def active(self) -> bool:
        return self.cfg.every > 0 and self.blocks.shape[0] > 0

    def state(self) -> dict:
        """JSON-ready state for the stage's checkpoint."""
        return {"start": self.start, "history": self.history}

    def load(self, state: dict | None) -> None:
        if isinstance(state, dict) and isinstance(state.get("start"), float):
            self.start = state["start"]
            self.history = [tuple(h) for h in state.get("history") or []]

    def due(self, step: int, steps: int) -> bool:
        """Whether to measure after ``step`` steps of ``steps``."""
        return self.active and (step % self.cfg.every == 0 or step == steps)

    def begin(self, step: int) -> None:
        """Measure the starting loss at ``step`` (unless a resumed checkpoint gave it; then, for
        ``rollback``, the loss of the resumed weights, the first candidate for the best)."""
        if not self.active:
            return
        loss = None
        if self.start is None:
            self.start = loss = full_model_loss(self.fx, self.blocks)
            self.history.append((step, loss))
            log.info("%s guard: full model's validation loss at the start %.4f", self.stage, loss)
        elif self.cfg.action == "rollback":
            loss = full_model_loss(self.fx, self.blocks)
        if loss is not None:
            self._keep(step, loss)

    def _keep(self, step: int, loss: float) -> None:
        if self.best is None or loss <= self.best[1]:
            self.best = (step, loss)
            if self.cfg.action == "rollback":
                self.best_weights = {
                    name: {k: v.detach().to("cpu", copy=True) for k, v in mod.state_dict().items()}
                    for name, mod in self.modules.items()
                }

    def measure(self, step: int) -> float:
        """Measure after ``step`` steps; returns the loss (:meth:`exceeded` says whether to act)."""
        loss = full_model_loss(self.fx, self.blocks)
        self.history.append((step, loss))
        self._keep(step, loss)
        return loss

    def exceeded(self, loss: float) -> bool:
        return self.start is not None and loss > self.start * (1 + self.cfg.tolerance)

    def message(self, step: int, loss: float) -> str:
        rise = loss / self.start - 1
        return (
            f"{self.stage} training damaged the full model: its loss on {self.blocks.shape[0]} held-out "
            f"validation blocks rose from {self.start:.4f} at the stage's start to {loss:.4f} after step {step} "
            f"(+{100 * rise:.1f}%, guard.tolerance {100 * self.cfg.tolerance:g}%); {self.fix}"
        )

    def act(self, step: int, loss: float) -> bool:
        """Apply ``cfg.action`` after the guard fired at ``step``; returns True when the stage must
        end now (rollback: the best weights are restored).

        Raises:
            TrainingError: ``action: stop``.
        """
        msg = self.message(step, loss)
        if self.fired is None:  # the first time it fired (``warn`` goes on and may fire again)
            self.fired = {"step": step, "loss": loss, "start": self.start, "action": self.cfg.action, "times": 0}
        self.fired["times"] += 1
        if self.cfg.action == "stop":
            raise TrainingError(
                msg + "; checkpoints written so far are kept; a changed config reruns with --overwrite "
                "(or set guard.action: warn to continue, rollback to keep the best weights)"
            )
        if self.cfg.action == "warn":
            log.warning("%s (guard.action: warn; training goes on)", msg)
            print(f"[flextron] warning: {msg}", flush=True)
            return False
        assert self.best is not None and self.best_weights is not None
        for name, mod in self.modules.items():
            mod.load_state_dict(self.best_weights[name])
        self.fired["rolled_back_to_step"] = self.best[0]
        note = f"{msg}; rolled back to the weights after step {self.best[0]} (loss {self.best[1]:.4f}), stage ended"
        log.warning(note)
        print(f"[flextron] warning: {note}", flush=True)
        return True

    def summary(self) -> dict:
        """What the guard saw, for the stage's summary."""
        if not self.active:
            return {"active": False}
        last = self.history[-1][1] if self.history else None
        return {
            "active": True,
            "blocks": int(self.blocks.shape[0]),
            "start_loss": self.start,
            "last_loss": last,
            "best": list(self.best) if self.best else None,
            "fired": self.fired,
        }
