"""Connecting to a Ray cluster, and the helpers every distributed path shares: how many workers the cluster holds,
a worker's thread setup, and getting results with a remote user error raised as itself (one line, not a traceback).

`address`: True (or "auto"/"local"/"") joins the cluster in $RAY_ADDRESS or one started on this machine by
`ray start`, else starts a local one; any other string is a cluster address ("HOST:PORT" or "ray://HOST:10001").
"""

from __future__ import annotations

import logging
import os

from loralag.errors import LoralagError

INSTALL = 'pip install "loralag[ray]"'
_LOCAL = {"", "auto", "local"}


def require_ray():
    """The ray module, or a one-line error saying what to install."""
    try:
        import ray
    except ImportError as exc:
        raise LoralagError(f"--ray needs Ray, which is not installed: {INSTALL}") from exc
    return ray


def connect(address: str | bool | None = True):
    """Join (or start) the Ray cluster at `address` unless this process is connected already; returns ray."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    where = None if address is True or address is None or str(address).strip().lower() in _LOCAL else str(address)
    if where is not None:
        _reachable(where)
    try:
        ray.init(address=where, log_to_driver=False, logging_level=logging.WARNING, configure_logging=False)
    except Exception as exc:  # ConnectionError, ValueError, RuntimeError, timeouts: all mean "no cluster there"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LoralagError(f"cannot connect to the Ray cluster at {where or 'this machine'}: {first}") from exc
    return ray


def _reachable(address: str) -> None:
    """Refuse at once an address nothing listens on (Ray itself retries it for minutes)."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        raise LoralagError(f"Ray address {address!r} is not HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise LoralagError(f"cannot connect to the Ray cluster at {address}: {exc.strerror or exc}") from exc


def worker_count(workers: int | None, cpus_per_worker: float) -> int:
    """`workers`, or as many as the cluster's CPUs hold at `cpus_per_worker` each (at least one)."""
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise LoralagError(f"workers must be a positive integer, got {workers!r}")
        return workers
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_worker))


def setup_worker(threads: int) -> None:
    """In a worker process: torch on `threads` threads, waiting passively, no warnings or download bars."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import warnings

    import torch

    torch.set_num_threads(max(1, int(threads)))
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("transformers").setLevel(logging.ERROR)


def get(refs):
    """ray.get, a worker's LoralagError raised as itself (its one-line message, not Ray's traceback)."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, LoralagError):
            raise cause from None
        raise


def unwrap(exc: BaseException) -> BaseException:
    """A worker's LoralagError out of Ray's wrapper, else the exception itself."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, LoralagError) else exc
