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

from loralag.errors import LibraryError

_NP_DTYPES = {
    "F32": (np.float32, None),
    "F16": (np.float16, None),
    "BF16": (np.int16, torch.bfloat16),
    "I64": (np.int64, None),
}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TMP_PREFIX = ".tmp-"  # temporary files of atomic writes; a library sweeps its own strays


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync it, then rename over the target. A failed write (a full
    disk, a file size limit) removes the temporary file, leaves the target as it was and raises LibraryError."""
    tmp = path.with_name(f"{TMP_PREFIX}{os.getpid()}-{path.name}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise LibraryError(f"could not write {path}: {e.strerror or e}") from e


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def _header(f, path: Path) -> tuple[int, dict, dict]:
    """(header length, {name: (dtype, shape, start, end)}, metadata) of an open safetensors file, every entry
    checked against the file's size: LibraryError naming the file when anything does not fit."""

    def bad(why: str) -> LibraryError:
        return LibraryError(f"{path} is not a valid safetensors file (truncated or corrupt?): {why}")

    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise bad(f"{size} bytes, too short for a header")
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER, size - 8):
        raise bad(f"its header claims {n} bytes, the file holds {size}")
    try:
        header = json.loads(f.read(n))
    except (ValueError, RecursionError) as e:
        raise bad(f"its header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("its metadata is not a map of strings")
    data = size - 8 - n
    entries = {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
            if dtype not in _NP_DTYPES:
                raise bad(f"tensor '{name}' has dtype {dtype!r}; expected one of {sorted(_NP_DTYPES)}")
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in [*shape, start, end]):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor '{name}' has no valid dtype, shape and data_offsets") from None
        nbytes = int(np.prod(shape, dtype=np.float64)) * np.dtype(_NP_DTYPES[dtype][0]).itemsize
        if not start <= end <= data or end - start != nbytes:
            raise bad(
                f"tensor '{name}' of shape {shape} needs {nbytes} bytes at [{start}, {end}), "
                f"the file holds {data} bytes of data"
            )
        entries[name] = (dtype, shape, start, end)
    return n, entries, metadata


def read_tensor(path: Path, name: str) -> torch.Tensor:
    """Read one tensor of a safetensors file into ordinary memory (no mapping stays resident)."""
    with open(path, "rb") as f:
        n, entries, _ = _header(f, path)
        if name not in entries:
            raise LibraryError(f"{path} holds no tensor '{name}'")
        dtype, shape, start, end = entries[name]
        np_dtype, torch_view = _NP_DTYPES[dtype]
        f.seek(8 + n + start)
        buf = np.empty((end - start) // np.dtype(np_dtype).itemsize, dtype=np_dtype)
        if f.readinto(memoryview(buf).cast("B")) != end - start:
            raise LibraryError(f"{path} was truncated while tensor '{name}' was read")
    t = torch.from_numpy(buf).view(shape)
    return t.view(torch_view) if torch_view is not None else t


def mmap_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Map a safetensors file without reading its data: returns (tensors, metadata). Every tensor's place is
    checked against the file's size first, so no view reaches past the mapping."""
    try:
        with open(path, "rb") as f:
            n, entries, metadata = _header(f, path)
    except OSError as e:
        raise LibraryError(f"cannot read {path}: {e.strerror or e}") from e
    if not entries:
        return {}, metadata
    # mode "c": copy-on-write, so torch gets writable arrays while the file is never modified.
    raw = np.memmap(path, dtype=np.uint8, mode="c")
    tensors = {}
    for name, (dtype, shape, start, end) in entries.items():
        np_dtype, torch_view = _NP_DTYPES[dtype]
        arr = raw[8 + n + start : 8 + n + end].view(np_dtype).reshape(shape)
        t = torch.from_numpy(arr)
        tensors[name] = t.view(torch_view) if torch_view is not None else t
    return tensors, metadata
