"""The native kernel of kernels.c: compiled at first use with the machine's C compiler, loaded with ctypes.

It needs no torch headers, so a build takes about a second; the library is cached under
~/.cache/loralag/kernels (LORALAG_KERNEL_CACHE), keyed by the source, the compiler flags and the CPU.
Without a C compiler, or with LORALAG_KERNELS=0, `available()` is False and the routers use their torch
paths instead: the same results (up to float rounding), slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
# -march=native: the vector width of this CPU; the plain build is the fallback for compilers without it
FLAG_SETS = (["-O3", "-march=native", "-ffp-contract=fast"], ["-O3", "-ffp-contract=fast"])
MIN_THREAD_MACS = 2e6  # below this much work a second thread costs more than it saves

_lock = threading.Lock()
_state: dict = {}


def available() -> bool:
    """Whether the kernel is built and loaded (builds it on the first call)."""
    return _library() is not None


def _library():
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                _state["lib"] = None if os.environ.get("LORALAG_KERNELS", "1") == "0" else _build()
    return _state["lib"]


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "loralag" / "kernels"
    return Path(os.environ.get("LORALAG_KERNEL_CACHE", default)).expanduser()


def _cpu_key() -> str:
    """-march=native code is only valid on this CPU: its flags go into the cache key."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags


def _build():
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        warnings.warn(f"loralag: no C compiler ('{cc}'), so routing uses its slower torch paths", stacklevel=3)
        return None
    source = SOURCE.read_bytes()
    errors = []
    for flags in FLAG_SETS:
        key = hashlib.sha256(b"\0".join([source, " ".join([cc, *flags]).encode(), _cpu_key().encode()])).hexdigest()[:16]
        so = _cache_dir() / f"kernels-{key}.so"
        if not so.exists():
            so.parent.mkdir(parents=True, exist_ok=True)
            tmp = so.with_name(f"{so.name}.{os.getpid()}.tmp")
            run = subprocess.run([cc, *flags, "-shared", "-fPIC", "-o", str(tmp), str(SOURCE)], capture_output=True, text=True)
            if run.returncode != 0:
                errors.append(f"{cc} {' '.join(flags)}: {run.stderr.strip()[-500:]}")
                continue
            os.replace(tmp, so)  # atomic: a concurrent process sees the whole library or none
        try:
            lib = ctypes.CDLL(str(so))
        except OSError as e:
            errors.append(f"loading {so}: {e}")
            continue
        fn = lib.lag_project_pairs
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
        return lib
    warnings.warn("loralag: could not build kernels.c, so routing uses its slower torch paths:\n" + "\n".join(errors), stacklevel=3)
    return None


def _pool(n: int) -> ThreadPoolExecutor:
    pool = _state.get("pool")
    if pool is None or pool._max_workers < n:
        pool = _state["pool"] = ThreadPoolExecutor(n, thread_name_prefix="loralag-kernel")
    return pool


def project_pairs(X: torch.Tensor, a_addr: torch.Tensor, a_rank: torch.Tensor, offs: torch.Tensor,
                  pair: torch.Tensor, k: int, Z: torch.Tensor) -> None:
    """Z[p] = A*_g x_{p // k} (zero beyond the adapter's rank) for every pair p = pair[s] of every group g,
    s in offs[g]..offs[g + 1]; group g's A* is a_rank[g] rows of d floats at address a_addr[g].

    X (T, d) and Z (T·k, r) float32, contiguous; the int64 tensors contiguous. ctypes releases the GIL,
    so the groups are split over torch's thread count, balanced by pairs."""
    lib = _library()
    T, d = X.shape
    r = Z.shape[1]
    G = len(a_addr)
    assert X.dtype == Z.dtype == torch.float32 and X.is_contiguous() and Z.is_contiguous()
    assert all(t.dtype == torch.int64 and t.is_contiguous() for t in (a_addr, a_rank, offs, pair))
    args = (X.data_ptr(), d, a_addr.data_ptr(), a_rank.data_ptr(), offs.data_ptr(), pair.data_ptr(), k, Z.data_ptr(), r)
    P = len(pair)
    threads = min(torch.get_num_threads(), G) if P * r * d >= MIN_THREAD_MACS else 1
    if threads <= 1:
        lib.lag_project_pairs(*args, 0, G)
        return
    cuts = torch.searchsorted(offs, torch.linspace(0, P, threads + 1)[1:-1].to(torch.int64)).tolist()
    bounds = [0, *cuts, G]
    jobs = [_pool(threads).submit(lib.lag_project_pairs, *args, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
    for job in jobs:
        job.result()
