"""Several processes: the accelerator every training stage uses and the few collectives flextron
needs on top of it (used by :mod:`flextron.train.loop`, :mod:`flextron.train.routers` and :mod:`flextron.pipeline`).

One process (a plain ``flextron run``) is the special case: every helper then runs its work
directly. Under ``accelerate launch`` (DDP; on CPU ``--multi_gpu --num_processes N`` with the gloo
backend) every process runs the same code. Stages that train run on every process; work that
must happen once (ranking, the latency table, evaluation, run files) runs on the main process
while the others wait (:func:`on_main`), and a decision such as "is this stage finished?" is
taken by the main process and sent to the others (:func:`main_says`), so no process acts on a
file the main process is about to change. Values travel as JSON bytes: nothing is unpickled.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Callable

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, broadcast
from tqdm.auto import tqdm

from flextron.errors import FlextronError


def make_accelerator(grad_accum: int = 1) -> Accelerator:
    """One ``Accelerator`` for every training stage; unused-parameter detection is on because a
    sub-network may leave parameters out of the graph. Mixed precision is not set here:
    accelerate fixes it once per process, while each stage has its own (see
    :func:`flextron.train.loop.lm_loop`)."""
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=grad_accum,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )


WAIT_TIMEOUT = timedelta(hours=12)  # how long a process may wait for the main one (evaluation can take hours)


def process_state() -> PartialState:
    """The process group as accelerate set it up (started on first use; one process when not
    launched), on the device :func:`make_accelerator` trains on. When this starts the group, its
    collectives wait up to :data:`WAIT_TIMEOUT` (torch's default of 30 minutes is shorter than a
    main-process stage on a real model)."""
    return PartialState(cpu=not torch.cuda.is_available(), timeout=WAIT_TIMEOUT)


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any rank (all ranks then stop at the same step)."""
    return bool(accelerator.reduce(torch.tensor([float(flag)], device=accelerator.device), "sum").item() > 0)


def split_over_ranks(accelerator, n: int, fn: Callable[[int], float], desc: str, progress: bool) -> list[float]:
    """``[fn(i) for i in range(n)]`` with rank ``r`` evaluating the ``i ≡ r (mod world)``; the
    shares are summed over ranks, which is exact (each entry is one value plus zeros)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    out = torch.zeros(n, dtype=torch.float64, device=accelerator.device)
    for i in tqdm(
        range(rank, n, world), desc=desc, disable=not (progress and accelerator.is_main_process), leave=False
    ):
        out[i] = fn(i)
    return accelerator.reduce(out, "sum").tolist()


def main_says(state, value):
    """The main process's ``value`` (JSON-ready), returned on every process; the others' ``value``
    is ignored. Sent as JSON bytes (length first), so nothing is unpickled."""
    if state.num_processes == 1:
        return value
    data = json.dumps(value).encode() if state.is_main_process else b""
    n = int(broadcast(torch.tensor([len(data)], dtype=torch.int64, device=state.device), from_process=0).item())
    buf = torch.tensor(list(data), dtype=torch.uint8) if state.is_main_process else torch.zeros(n, dtype=torch.uint8)
    return json.loads(bytes(broadcast(buf.to(state.device), from_process=0).cpu().tolist()).decode())


def on_main(state, fn: Callable[[], object]):
    """Run ``fn`` on the main process while the others wait; its result (JSON-ready) is returned
    on every process.

    Raises:
        whatever ``fn`` raised, on the main process; on the others :class:`KeyboardInterrupt` when
        the main process was interrupted, else :class:`~flextron.errors.FlextronError` naming the
        main process's error (so no process is left waiting for it).
    """
    result, error = None, None
    if state.is_main_process:
        try:
            result = json.loads(json.dumps(fn()))  # fails here, not half-way through main_says
        except BaseException as e:  # noqa: BLE001 -- re-raised below, after the others are told
            error = e
    told = main_says(
        state,
        {
            "result": result if error is None else None,
            "error": None if error is None else [type(error).__name__, str(error)],
        },
    )
    if error is not None:
        raise error
    if told["error"] is not None:
        kind, message = told["error"]
        if kind == "KeyboardInterrupt":
            raise KeyboardInterrupt(f"the main process was interrupted: {message}")
        raise FlextronError(f"the main process stopped with {kind}: {message}")
    return told["result"]
