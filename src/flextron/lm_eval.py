"""``python -m flextron.lm_eval`` (or ``flextron-lm-eval``): the ``lm_eval`` command line with
flextron's model and tasks available.

lm-eval 0.4.13 finds models only through its registry (no plugin entry points), so the plain
``lm_eval`` command cannot know ``--model flextron`` unless flextron is imported first. This
wrapper imports :mod:`flextron.eval.lm_eval_model` (which registers ``flextron``), adds
``--include_path`` for flextron's local task definitions (:data:`flextron.eval.tasks.TASK_DIR`; they
take precedence over lm-eval's built-in tasks of the same names, which would read the hub), and
runs lm-eval's own CLI with the remaining arguments unchanged::

    python -m flextron.lm_eval --model flextron --model_args run=runs/smollm2,target=0.6 \\
        --tasks arc_easy,piqa --batch_size 16 --device cpu
"""

from __future__ import annotations

import sys
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run lm-eval's CLI on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    from lm_eval.__main__ import cli_evaluate

    from flextron.eval import lm_eval_model as lm_eval_model
    from flextron.eval.tasks import TASK_DIR

    args = list(sys.argv[1:] if argv is None else argv)
    commands = {"run", "ls", "validate"}
    if args and args[0] not in commands and not args[0].startswith("-h"):
        args.insert(0, "run")  # lm-eval's own legacy form: no sub-command means 'run'
    if args and args[0] in ("run", "ls", "validate") and not any(a.startswith("--include_path") for a in args):
        args[1:1] = ["--include_path", str(TASK_DIR)]
    old = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return 0


if __name__ == "__main__":
    sys.exit(main())
