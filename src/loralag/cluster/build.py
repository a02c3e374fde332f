"""Building a library on a Ray cluster: the workers read and align the adapters, this process alone writes and
commits every segment (`Library.add`'s one writer, its lock, atomic files and resumability are unchanged).

Each chunk of `Library.add` is cut into pieces aligned as Ray tasks (retried by Ray when a worker dies); the
pieces come back in order and are joined into the chunk's result, so the library holds what a local build
writes, row for row. The adapter folders must be readable by the workers at the same paths (a shared
filesystem); the library need only be on this machine.
"""

from __future__ import annotations

import math
from collections import deque

from loralag.cluster.connect import connect, get, setup_worker, worker_count


def _align_piece(fn, folders: list, threads: int):
    setup_worker(threads)
    return fn(folders)


class RayChunkMap:
    """A `map_chunks` for Library.add / build_library: fn(chunk) for each chunk, in order, computed on the
    cluster's workers in pieces of at most `piece` adapters, at most `window` pieces in flight."""

    def __init__(self, address: str | bool | None = True, workers: int | None = None, cpus_per_task: int = 1):
        self.ray = connect(address)
        self.workers = worker_count(workers, cpus_per_task)
        self.cpus = cpus_per_task
        self.pieces = 0  # how many pieces the last call sent

    def __call__(self, fn, chunks):
        remote = self.ray.remote(num_cpus=self.cpus, max_retries=3)(_align_piece)
        fn_ref = self.ray.put(fn)
        plans = []  # per chunk: its pieces
        for chunk in chunks:
            size = max(1, math.ceil(len(chunk) / self.workers))
            plans.append([chunk[s : s + size] for s in range(0, len(chunk), size)])
        flat = deque((c, piece) for c, pieces in enumerate(plans) for piece in pieces)
        self.pieces = len(flat)
        window = 2 * self.workers
        in_flight: deque = deque()  # (chunk index, ObjectRef), in submission order
        for c in range(len(plans)):
            while flat and len(in_flight) < window:
                chunk_index, piece = flat.popleft()
                in_flight.append((chunk_index, remote.remote(fn_ref, piece, self.cpus)))
            parts = []
            while in_flight and in_flight[0][0] == c:
                parts.append(get(in_flight.popleft()[1]))
                if flat:
                    chunk_index, piece = flat.popleft()
                    in_flight.append((chunk_index, remote.remote(fn_ref, piece, self.cpus)))
            yield _join(parts)


def _join(parts: list[tuple[list, dict]]) -> tuple[list, dict]:
    """One chunk's (adapters, {module: rows}) from its pieces' results, in order: what align_chunk gives for the
    whole chunk (a module first met in a later piece comes after, as it would there)."""
    adapters, aligned = [], {}
    for piece_adapters, piece_aligned in parts:
        adapters += piece_adapters
        for module, rows in piece_aligned.items():
            aligned.setdefault(module, []).extend(rows)
    return adapters, aligned


def build_on_ray(out, adapters, *, address: str | bool | None = True, workers: int | None = None, **build_options):
    """`loralag.library.store.build_library` with the alignment on the Ray cluster at `address`."""
    from loralag.library.store import build_library

    return build_library(out, adapters, map_chunks=RayChunkMap(address, workers), **build_options)


def chunk_map(address: str | bool | None):
    """The `map_chunks` for `--ray [ADDRESS]`: the builtin map (a local build) when address is None."""
    return map if address is None or address is False else RayChunkMap(address)
