"""Gloo process groups of spawned ranks on 127.0.0.1: the multi-process benchmarks and tests.

``launch`` runs ``fn(rank, *args)`` in ``world`` fresh processes and joins them with a deadline;
inside ``fn``, ``gloo_group`` joins the group and leaves it with ``grass.distributed.shutdown``
(every rank waits for the others before the group is torn down).
"""

from __future__ import annotations

import socket
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grass import distributed


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gloo_group(rank: int, world: int, port: int, timeout_s: float = 60) -> Iterator[None]:
    """Rank ``rank`` of a gloo group of ``world`` ranks for the block, one CPU thread each,
    left through ``grass.distributed.leaving_group``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=timedelta(seconds=timeout_s))
    with distributed.leaving_group():
        yield


def launch(fn: Callable[..., None], world: int, args: tuple, timeout_s: float = 300) -> None:
    """Run ``fn(rank, *args)`` on ``world`` spawned ranks and wait for all of them; raises
    ProcessExitedException when one dies and TimeoutError when they are not done within
    ``timeout_s`` (every rank still alive is then killed)."""
    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
