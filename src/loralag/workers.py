"""Spawned worker processes on this machine (training's and the benchmark's answering pools) that end with
their parent.

A parent killed by a signal runs no cleanup, and a worker busy with a long task (a whole share of the
benchmark's answers) would only notice at the end, minutes later, while holding the cores. Each worker
therefore watches its parent from a daemon thread and exits as soon as it is gone (it is then re-parented,
so os.getppid() changes).
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import time

PARENT_POLL_S = 0.5


def spawn_pool(workers: int, initializer=None, initargs: tuple = ()) -> concurrent.futures.ProcessPoolExecutor:
    """A ProcessPoolExecutor of `workers` spawned processes (fork would copy a process whose OpenMP threads
    run) that exit when this process dies; initializer(*initargs) runs in each as usual. An executor, not a
    Pool: a worker that dies raises in the caller instead of being replaced while the run waits."""
    import torch.multiprocessing

    return concurrent.futures.ProcessPoolExecutor(
        workers,
        mp_context=torch.multiprocessing.get_context("spawn"),
        initializer=_start,
        initargs=(os.getpid(), initializer, initargs),
    )


def _start(parent: int, initializer, initargs: tuple) -> None:
    threading.Thread(target=_exit_with, args=(parent,), name="loralag-parent-watch", daemon=True).start()
    if initializer is not None:
        initializer(*initargs)


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)  # no cleanup: the parent that would take the results is gone
