"""Low-level file handling for libraries: atomic writes and zero-copy safetensors memory maps.

We parse the safetensors header ourselves so that every tensor is a view on one read-only
(copy-on-write) memory map of its file: opening a library reads only the header, and a page is read
from disk only when a row of it is gathered.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import torch

_NP_DTYPES = {"F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.int16, torch.bfloat16), "I64": (np.int64, None)}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync it, then rename over the target."""
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def _header(f) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", f.read(8))
    return n, json.loads(f.read(n))


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """Read one tensor of a safetensors file into ordinary memory (no mapping stays resident)."""
    with open(path, "rb") as f:
        n, header = _header(f)
        info = header[name]
        np_dtype, torch_view = _NP_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        f.seek(8 + n + start)
        buf = np.empty((end - start) // np.dtype(np_dtype).itemsize, dtype=np_dtype)
        f.readinto(memoryview(buf).cast("B"))
    t = torch.from_numpy(buf).view(info["shape"])
    return t.view(torch_view) if torch_view is not None else t


def mmap_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Map a safetensors file without reading its data: returns (tensors, metadata)."""
    with open(path, "rb") as f:
        n, header = _header(f)
    metadata = header.pop("__metadata__", {}) or {}
    if not header:
        return {}, metadata
    # mode "c": copy-on-write, so torch gets writable arrays while the file is never modified.
    raw = np.memmap(path, dtype=np.uint8, mode="c")
    tensors = {}
    for name, info in header.items():
        np_dtype, torch_view = _NP_DTYPES[info["dtype"]]
        start, end = info["data_offsets"]
        arr = raw[8 + n + start : 8 + n + end].view(np_dtype).reshape(info["shape"])
        t = torch.from_numpy(arr)
        tensors[name] = t.view(torch_view) if torch_view is not None else t
    return tensors, metadata
