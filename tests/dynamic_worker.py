"""Worker for test_dynamic_resume: ``flextron run CONFIG`` of a tiny run with a ``dynamic:``
section, in a process the test kills with SIGKILL.

``python dynamic_worker.py CONFIG MODE``: MODE ``plain`` runs as is; ``slow_steps`` sleeps 0.3 s
after every dynamic router update (so the kill lands between the surrogate phase's checkpoints);
``slow_calibration`` creates ``RUN/in_calibration`` when the final price calibration starts (after
the stage's post-validation checkpoint) and sleeps there (so the kill lands inside it).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import flextron.train.dynamic as dynamic_training
from flextron.cli import main
from flextron.config import load_config


def _slow_steps() -> None:
    real = dynamic_training.router_update

    def slow(*args, **kwargs):
        out = real(*args, **kwargs)
        time.sleep(0.3)
        return out

    dynamic_training.router_update = slow


def _slow_calibration(run_dir: Path, steps: int) -> None:
    real = dynamic_training.calibrate_price
    validated = run_dir / "dynamic" / "checkpoints" / "dynamic_routers" / f"step_{steps + 1:06d}"

    def slow(*args, **kwargs):
        if validated.exists():
            (run_dir / "in_calibration").touch()
            time.sleep(30)
        return real(*args, **kwargs)

    dynamic_training.calibrate_price = slow


if __name__ == "__main__":
    cfg_path, mode = sys.argv[1], sys.argv[2]
    cfg = load_config(cfg_path)
    if mode == "slow_steps":
        _slow_steps()
    elif mode == "slow_calibration":
        _slow_calibration(cfg.run_dir, cfg.dynamic.steps)
    sys.exit(main(["run", cfg_path, "-q"]))
