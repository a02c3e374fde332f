"""The native kernels of kernels.c: compiled at first use with the machine's C compiler, loaded with ctypes.

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
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
# -march=native: the vector width of this CPU; the plain build is the fallback for compilers without it
# -fopenmp: threads from the OpenMP runtime torch loaded; the last set runs single-threaded
FLAG_SETS = tuple([*base, "-fopenmp", "-ffp-contract=fast"] for base in (["-O3", "-march=native"], ["-O3"])) + (
    ["-O3"],
)
MIN_THREAD_MACS = 2e6  # below this much work a second thread costs more than it saves
MAX_RANK = 256  # lag_decode keeps one adapter's A*x on the stack

_lock = threading.Lock()
_state: dict = {}


def available() -> bool:
    """Whether the kernels are built and loaded (builds them on the first call)."""
    return _library() is not None


def applies_to(t: torch.Tensor) -> bool:
    """Whether the kernels can take this tensor's data (float32 on the CPU) and are built."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and available()


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
        flags = next(
            (line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(("flags", "Features"))),
            "",
        )
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
        key = hashlib.sha256(b"\0".join([source, " ".join([cc, *flags]).encode(), _cpu_key().encode()])).hexdigest()[
            :16
        ]
        so = _cache_dir() / f"kernels-{key}.so"
        if not so.exists():
            tmp = so.with_name(f"{so.name}.{os.getpid()}.tmp")
            try:
                so.parent.mkdir(parents=True, exist_ok=True)
                run = subprocess.run(
                    [cc, *flags, "-shared", "-fPIC", "-o", str(tmp), str(SOURCE), "-lm"], capture_output=True, text=True
                )
                if run.returncode != 0:
                    errors.append(f"{cc} {' '.join(flags)}: {run.stderr.strip()[-500:]}")
                    continue
                os.replace(tmp, so)  # atomic: a concurrent process sees the whole library or none
            except OSError as e:  # an unwritable cache folder, a compiler that cannot run
                errors.append(f"{cc} {' '.join(flags)} into {so.parent}: {e}")
                continue
        try:
            lib = ctypes.CDLL(str(so))
        except OSError as e:
            errors.append(f"loading {so}: {e}")
            continue
        ptr, i64 = ctypes.c_void_p, ctypes.c_int64
        lib.lag_project_pairs.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, ptr, i64]
        lib.lag_apply_pairs.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr, i64]
        lib.lag_project_pairs.restype = lib.lag_apply_pairs.restype = None
        lib.lag_decode.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, ptr, ptr]
        lib.lag_decode.restype = i64
        lib.lag_has_half.restype = ctypes.c_int
        return lib
    warnings.warn(
        "loralag: could not build kernels.c, so routing uses its slower torch paths:\n" + "\n".join(errors),
        stacklevel=3,
    )
    return None


def project_pairs(
    X: torch.Tensor,
    a_addr: torch.Tensor,
    a_rank: torch.Tensor,
    offs: torch.Tensor,
    pair: torch.Tensor,
    k: int,
    Z: torch.Tensor,
    first: torch.Tensor | None = None,
) -> None:
    """Z[p] = A*_g x_{p // k} (zero beyond the adapter's rank) for every pair p = pair[s] of every group g,
    s in offs[g]..offs[g + 1]; group g's A* is a_rank[g] rows of d floats at address a_addr[g].
    X (T, d) and Z (T·k, r): float32, contiguous. first (T·k,): Z[:, 0] when already known."""
    _check(X, Z, a_addr, a_rank, offs, pair)
    assert first is None or (first.dtype == torch.float32 and first.is_contiguous() and len(first) == len(Z))
    d, r = X.shape[1], Z.shape[1]
    bounds = _split(offs, len(pair) * r * d)
    _library().lag_project_pairs(
        X.data_ptr(),
        d,
        a_addr.data_ptr(),
        a_rank.data_ptr(),
        offs.data_ptr(),
        pair.data_ptr(),
        k,
        None if first is None else first.data_ptr(),
        Z.data_ptr(),
        r,
        bounds.data_ptr(),
        len(bounds) - 1,
    )


def apply_pairs(
    Z: torch.Tensor,
    b_addr: torch.Tensor,
    b_rank: torch.Tensor,
    offs: torch.Tensor,
    pair: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out[p] = B*_g Z[p, :b_rank[g]] for every pair p = pair[s] of every group g, s in offs[g]..offs[g + 1];
    group g's B* is d_out rows of b_rank[g] floats at address b_addr[g]. Z (P, r), out (P, d_out)."""
    _check(Z, out, b_addr, b_rank, offs, pair)
    r, d_out = Z.shape[1], out.shape[1]
    bounds = _split(offs, len(pair) * r * d_out)
    _library().lag_apply_pairs(
        Z.data_ptr(),
        r,
        b_addr.data_ptr(),
        b_rank.data_ptr(),
        offs.data_ptr(),
        pair.data_ptr(),
        out.data_ptr(),
        d_out,
        bounds.data_ptr(),
        len(bounds) - 1,
    )


def _check(src: torch.Tensor, dst: torch.Tensor, *index: torch.Tensor) -> None:
    assert src.dtype == dst.dtype == torch.float32 and src.is_contiguous() and dst.is_contiguous()
    assert all(t.dtype == torch.int64 and t.is_contiguous() for t in index)


def _split(offs: torch.Tensor, macs: float) -> torch.Tensor:
    """Group bounds of one run per torch thread with about equal pairs each (one run for small jobs)."""
    G = len(offs) - 1
    parts = min(torch.get_num_threads(), G) if macs >= MIN_THREAD_MACS else 1
    cuts = torch.searchsorted(offs, torch.linspace(0, int(offs[-1]), parts + 1)[1:-1].to(torch.int64))
    return torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), G)])


def half_arrows() -> bool:
    """Whether the build reads float16 arrows (x86 with F16C, the -march=native build)."""
    return bool(_library().lag_has_half())


def decode(
    x: torch.Tensor,
    arrows: torch.Tensor,
    arrows16: torch.Tensor | None,
    k: int,
    margin: int,
    a: tuple[torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor],
    d_out: int,
):
    """One token x (d,) through lag in one call: (winner, its ‖A*x‖, delta (d_out,)). a, b: every adapter's
    A* and B* (address, rank), as ModuleBank.addresses gives them; arrows16: score these first and re-rank
    the best `margin` with `arrows` (None: score `arrows` alone)."""
    n, d = arrows.shape
    assert x.dtype == arrows.dtype == torch.float32 and x.is_contiguous() and arrows.is_contiguous()
    assert arrows16 is None or (arrows16.dtype == torch.float16 and arrows16.is_contiguous())
    assert all(t.dtype == torch.int64 and t.is_contiguous() and len(t) == n for t in (*a, *b))
    delta = x.new_empty(d_out)
    score = x.new_empty(1)
    sval = x.new_empty(margin + k)
    sid = torch.empty(margin + k, dtype=torch.int64)
    w = _library().lag_decode(
        x.data_ptr(),
        d,
        n,
        arrows.data_ptr(),
        None if arrows16 is None else arrows16.data_ptr(),
        k,
        margin,
        a[0].data_ptr(),
        a[1].data_ptr(),
        b[0].data_ptr(),
        b[1].data_ptr(),
        d_out,
        delta.data_ptr(),
        score.data_ptr(),
        sval.data_ptr(),
        sid.data_ptr(),
    )
    return w, score, delta
