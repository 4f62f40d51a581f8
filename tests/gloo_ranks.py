"""Several ranks of one machine (forked CPU processes, gloo) for the tests that compare W ranks with one process."""
from __future__ import annotations

import socket
import time
from typing import Callable

import torch


def free_port() -> int:
    """A TCP port nothing listens on now, for the ranks' rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_forked_ranks(target: Callable, world: int, *args, timeout: float = 120.0) -> None:
    """``target(rank, world, port, *args)`` in ``world`` forked processes (they share the parent's objects: a trained
    model, a DataModule), joined; ``port`` is free for their process group. A rank that raises fails the call; ranks
    still running after ``timeout`` seconds (a collective that one rank never joins) are killed and fail it."""
    ranks = torch.multiprocessing.start_processes(target, args=(world, free_port(), *args), nprocs=world, join=False,
                                                  start_method="fork")
    deadline = time.monotonic() + timeout
    while not ranks.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in ranks.processes:
                process.kill()
            raise AssertionError(f"{world} ranks still running after {timeout:g} s: one waits in a collective that "
                                 "another never joins")
