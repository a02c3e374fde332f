"""The adapter library on disk: a JSON manifest plus safetensors segments of aligned, stacked tensors.

    LIB/manifest.json                  format version, base model and module shapes, every adapter
    LIB/segments/<id>.safetensors      per module: <module>.A (n, r, d_in), <module>.B (n, d_out, r),
                                       <module>.arrow (n, d_in); metadata "rows" names each row

Adding adapters writes new segments and never touches the aligned tensors of the others; removing
one only drops it from the manifest (a segment with no live row is deleted; `compact` rewrites the
rest). Every change is a segment written beside the old ones and then one atomic rename of the
manifest, so a write killed at any moment leaves the previous library readable (what it left behind is
swept at the next open or write), and a rerun of the same build skips the adapters already committed.

Nothing on disk is trusted: the manifest's structure and adapter names are checked at open, every file
it names must lie inside the library, and a segment's header and row table are checked against its
file size and tensor shapes before any bank (or native kernel) reads from it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import re
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from loralag.errors import AdapterError, LibraryError
from loralag.library.adapters import (
    CONFIG_FILE,
    LoraAdapter,
    adapter_checksum,
    check_fits,
    find_adapter_folders,
    name_problem,
    read_adapter,
)
from loralag.library.alignment import align
from loralag.library.arrow_index import ArrowIndex, build_index
from loralag.library.bank import ModuleBank
from loralag.library.storage import (
    TMP_PREFIX,
    atomic_save_safetensors,
    atomic_write_json,
    fsync_dir,
    mmap_safetensors,
    read_tensor,
)

FORMAT = "loralag-library"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SEGMENTS = "segments"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOCK = ".lock"
_SEGMENT_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
_INDEX_FILE = re.compile(r"arrow-index-[0-9A-Za-z_-]{1,64}\.safetensors")
MODULE_KINDS = ("linear", "conv1d")


def module_shapes(model: torch.nn.Module) -> dict[str, list]:
    """Every module LAG can adapt: name -> [d_in, d_out, kind] for nn.Linear and GPT-2's Conv1D."""
    from transformers.pytorch_utils import Conv1D

    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            shapes[name] = [m.in_features, m.out_features, "linear"]
        elif isinstance(m, Conv1D):  # weight is (d_in, d_out): PEFT's fan_in_fan_out
            shapes[name] = [m.weight.shape[0], m.weight.shape[1], "conv1d"]
    return shapes


def shapes_for_model(spec: str) -> dict[str, list]:
    """Module shapes of a model named by spec, built on the meta device so no weights are read."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from loralag.errors import ModelError
    from loralag.models import model_source

    try:
        config = AutoConfig.from_pretrained(model_source(spec))
    except OSError as e:  # neither a local folder with config.json nor reachable on the hub
        raise ModelError(f"cannot read the config of base model '{spec}': {e}") from e
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return module_shapes(model)


class Library:
    """An opened library. Module banks are built on first use and map their tensors from disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._load()
        self._sweep_if_idle()

    def _load(self) -> None:
        """Read and check the manifest: its structure, adapter names, and that every file it names is inside the
        library. One-line LibraryError naming the manifest when anything is off."""
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise LibraryError(f"{self.path} is not a loralag library: no {MANIFEST}")
        try:
            self.manifest = json.loads(manifest_path.read_bytes())
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise LibraryError(f"{manifest_path} is not valid JSON: {e}") from None
        except OSError as e:
            raise LibraryError(f"cannot read {manifest_path}: {e.strerror or e}") from None
        m = self.manifest
        if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("format_version") != FORMAT_VERSION:
            got = (m.get("format"), m.get("format_version")) if isinstance(m, dict) else (type(m).__name__, None)
            raise LibraryError(
                f"{manifest_path}: format {got[0]!r} version {got[1]!r}, expected {FORMAT!r} version {FORMAT_VERSION}"
            )
        problem = self._manifest_problem(m)
        if problem:
            raise LibraryError(f"{manifest_path} is corrupt: {problem}")
        self._banks: dict[str, ModuleBank] = {}
        self._segments: dict[str, tuple[dict, dict]] = {}

    def _manifest_problem(self, m: dict) -> str | None:
        base = m.get("base_model")
        if (
            not isinstance(base, dict)
            or not isinstance(base.get("name"), str)
            or not isinstance(base.get("modules"), dict)
        ):
            return "'base_model' must hold a 'name' and a map of 'modules'"
        for module, shape in base["modules"].items():
            if not (
                isinstance(shape, list)
                and len(shape) == 3
                and all(_count(d) for d in shape[:2])
                and shape[2] in MODULE_KINDS
            ):
                return f"module '{module}' must have a shape [d_in, d_out, kind], got {shape!r}"
        if not isinstance(m.get("dtype"), str) or m["dtype"] not in DTYPES:
            return f"dtype {m.get('dtype')!r} is not one of {sorted(DTYPES)}"
        adapters = m.get("adapters")
        if not isinstance(adapters, list):
            return "'adapters' must be a list"
        seen, segments = set(), set()
        for i, a in enumerate(adapters):
            if not isinstance(a, dict):
                return f"adapter {i} is not an object"
            problem = name_problem(a.get("name"))
            if problem:
                return f"adapter {i}: {problem}, got {a.get('name')!r}"
            name = a["name"]
            if name in seen:
                return f"adapter '{name}' appears twice"
            seen.add(name)
            seg = a.get("segment")
            if not isinstance(seg, str) or not _SEGMENT_ID.fullmatch(seg):
                return f"adapter '{name}' names segment {seg!r}, which is not a segment id"
            segments.add(seg)
            targets = a.get("target_modules")
            if (
                not isinstance(targets, list)
                or not targets
                or not all(isinstance(t, str) and t in base["modules"] for t in targets)
            ):
                return f"adapter '{name}' must target a non-empty list of the base model's modules, got {targets!r}"
            if not _count(a.get("rank")):
                return f"adapter '{name}' has rank {a.get('rank')!r}, not a positive integer"
        for seg in segments:  # a segment id is a plain name; a link may still lead out of the library
            if not self._inside(self._segment_path(seg)):
                return f"segment {seg!r} lies outside the library"
        index = m.get("arrow_index")
        if index is not None:
            if (
                not isinstance(index, dict)
                or not isinstance(index.get("file"), str)
                or not _INDEX_FILE.fullmatch(index["file"])
                or not self._inside(self.path / index["file"])
            ):
                return f"'arrow_index' must name an arrow-index-*.safetensors file inside the library, got {index!r}"
        return None

    def _inside(self, path: Path) -> bool:
        """Whether `path`, links followed, is within the library's folder."""
        return path.resolve().is_relative_to(self.path.resolve())

    def _segment_path(self, seg: str) -> Path:
        return self.path / SEGMENTS / f"{seg}.safetensors"

    def _sweep_if_idle(self) -> None:
        """Remove what killed writes left behind (temporary files, segments no manifest names), unless a writer
        holds the library (it sweeps when done) or it cannot be written (a read-only copy)."""
        try:
            lock = open(self.path / LOCK, "a")
        except OSError:
            return
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return
            try:
                self._sweep()
            except OSError:
                pass

    # -- what it holds -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.path.resolve().name

    @property
    def adapters(self) -> list[dict]:
        return self.manifest["adapters"]

    @property
    def names(self) -> list[str]:
        return [a["name"] for a in self.adapters]

    def __len__(self) -> int:
        return len(self.adapters)

    @property
    def base_model(self) -> str:
        return self.manifest["base_model"]["name"]

    @property
    def shapes(self) -> dict[str, list]:
        return self.manifest["base_model"]["modules"]

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.manifest["dtype"]]

    @property
    def target_modules(self) -> list[str]:
        return sorted({m for a in self.adapters for m in a["target_modules"]})

    def entry(self, name: str) -> dict:
        for a in self.adapters:
            if a["name"] == name:
                return a
        raise LibraryError(f"library {self.path} holds no adapter named '{name}'")

    # -- reading tensors -----------------------------------------------------------------------
    def _segment(self, seg: str) -> tuple[Path, dict, dict]:
        if seg not in self._segments:
            path = self._segment_path(seg)
            if not path.is_file():
                raise LibraryError(f"library {self.path}: segment file {path} is missing")
            tensors, meta = mmap_safetensors(path)
            try:
                rows = json.loads(meta["rows"])
            except (KeyError, ValueError, RecursionError):
                raise LibraryError(f"{path} is corrupt: its metadata holds no valid 'rows' table") from None
            problem = self._rows_problem(tensors, rows)
            if problem:
                raise LibraryError(f"{path} is corrupt: {problem}")
            self._segments[seg] = (path, tensors, rows)
        return self._segments[seg]

    def _rows_problem(self, tensors: dict, rows) -> str | None:
        """Check a segment's row table against its tensors' shapes: every row a router may address (and the
        native kernels read in place) lies inside its stack."""
        if not isinstance(rows, dict):
            return "its 'rows' table is not a map of modules"
        dtype = self.dtype
        for module, table in rows.items():
            if module not in self.shapes:
                return f"module '{module}' is not a module of the base model"
            d_in, d_out, _ = self.shapes[module]
            A, B, arrow = (tensors.get(f"{module}.{t}") for t in ("A", "B", "arrow"))
            if A is None or B is None or arrow is None:
                return f"module '{module}' lacks one of its A, B and arrow tensors"
            if not isinstance(table, list) or not all(
                isinstance(r, list) and len(r) == 2 and isinstance(r[0], str) and _count(r[1]) for r in table
            ):
                return f"module '{module}': rows must be [name, rank] pairs"
            n = len(table)
            if A.dtype != dtype or B.dtype != dtype or arrow.dtype != dtype:
                return f"module '{module}' is stored as {A.dtype}/{B.dtype}/{arrow.dtype}, the library as {dtype}"
            if (
                A.ndim != 3
                or B.ndim != 3
                or arrow.ndim != 2
                or A.shape[0] != n
                or B.shape[0] != n
                or arrow.shape[0] != n
                or A.shape[2] != d_in
                or B.shape[1] != d_out
                or arrow.shape[1] != d_in
                or A.shape[1] != B.shape[2]
            ):
                return (
                    f"module '{module}' lists {n} rows of {d_in}->{d_out} but holds A {tuple(A.shape)}, "
                    f"B {tuple(B.shape)}, arrow {tuple(arrow.shape)}"
                )
            rank = max((r for _, r in table), default=0)
            if rank > A.shape[1]:
                return f"module '{module}' lists a rank of {rank} in a stack of rank {A.shape[1]}"
        return None

    def bank(self, module: str) -> ModuleBank:
        """The stacked aligned weights of every adapter that targets `module`, in manifest order."""
        if module not in self._banks:
            d_in, d_out, _ = self.shapes[module]
            parts = {}  # segment -> (A, B, read_arrows, {name: (row, rank)})
            names, where = [], []
            for a in self.adapters:
                if module not in a["target_modules"]:
                    continue
                seg = a["segment"]
                if seg not in parts:
                    path, tensors, rows = self._segment(seg)
                    index = {n: (i, r) for i, (n, r) in enumerate(rows.get(module, []))}
                    read = functools.partial(read_tensor, path, f"{module}.arrow")
                    parts[seg] = (tensors.get(f"{module}.A"), tensors.get(f"{module}.B"), read, index)
                if a["name"] not in parts[seg][3]:
                    raise LibraryError(
                        f"library {self.path}: segment {seg} has no row for adapter '{a['name']}' at '{module}'"
                    )
                names.append(a["name"])
                where.append((seg, *parts[seg][3][a["name"]]))
            bank = ModuleBank.from_segments(module, d_in, d_out, names, where, parts, self.dtype)
            bank.ivf = self._arrow_index(module, names)
            self._banks[module] = bank
        return self._banks[module]

    def _arrow_index(self, module: str, names: list[str]) -> ArrowIndex | None:
        info = self.manifest.get("arrow_index")
        if not info:
            return None
        path = self.path / info["file"]
        if not path.is_file():
            raise LibraryError(f"library {self.path}: arrow index file {path} is missing")
        tensors, meta = mmap_safetensors(path)
        try:
            prints = json.loads(meta["fingerprints"])
            if not isinstance(prints, dict):
                raise ValueError
        except (KeyError, ValueError, RecursionError):
            raise LibraryError(f"{path} is corrupt: its metadata holds no valid 'fingerprints'") from None
        if prints.get(module) != _fingerprint(names):
            return None  # written for other adapters; `add`/`remove` drop the index, so only a foreign file gets here
        try:
            index = ArrowIndex.from_tensors(tensors, module)
        except KeyError:
            raise LibraryError(f"{path} is corrupt: no index for module '{module}'") from None
        n, d_in = len(names), self.shapes[module][0]
        c, order, offsets = index.centroids, index.order, index.offsets
        if (
            c.ndim != 2
            or c.shape[1] != d_in
            or order.dtype != torch.long
            or offsets.dtype != torch.long
            or order.shape != (n,)
            or offsets.shape != (len(c) + 1,)
            or not torch.equal(order.sort().values, torch.arange(n))
            or int(offsets[0]) != 0
            or int(offsets[-1]) != n
            or bool((offsets[1:] < offsets[:-1]).any())
        ):
            raise LibraryError(f"{path} is corrupt: the index of module '{module}' does not fit its {n} adapters")
        return index

    def adapter_factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(A*, B*) of one adapter per module, cut to its own rank."""
        entry = self.entry(name)
        out = {}
        for module in entry["target_modules"]:
            bank = self.bank(module)
            i = bank.index[name]
            A, B = bank.gather(torch.tensor([i]))
            r = int(bank.ranks[i])
            out[module] = (A[0, :r].float(), B[0, :, :r].float())
        return out

    # -- writing -------------------------------------------------------------------------------
    @contextmanager
    def _writing(self):
        """One writer at a time; orphans of killed writes are swept first."""
        with open(self.path / LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._load()  # re-read: another writer may have committed
            self._sweep()
            yield
            self._sweep()  # files the new manifest no longer names
            self._load()

    def _sweep(self) -> None:
        """Delete temporary files and the segments and index files the manifest does not name. Holds the lock."""
        live = {a["segment"] for a in self.adapters}
        segments = self.path / SEGMENTS
        for f in segments.iterdir() if segments.is_dir() else ():
            if f.name.startswith(TMP_PREFIX) or (f.suffix == ".safetensors" and f.stem not in live):
                f.unlink(missing_ok=True)
        index = (self.manifest.get("arrow_index") or {}).get("file")
        for f in self.path.iterdir():
            if (
                f.name.startswith(TMP_PREFIX)
                and f.is_file()
                or f.name.startswith("arrow-index-")
                and f.suffix == ".safetensors"
                and f.name != index
            ):
                f.unlink(missing_ok=True)

    def build_index(self, nlist: int | None = None, iters: int = 12, progress: bool = True) -> dict:
        """Cluster every module's arrows (arrow_index.py) and store the index in the library."""
        with self._writing():
            tensors, prints, sizes = {}, {}, {}
            for module in tqdm(self.target_modules, desc="arrow index", unit="module", disable=not progress):
                bank = self.bank(module)
                index = build_index(bank.arrows, nlist, iters)
                tensors.update(index.tensors(module))
                prints[module], sizes[module] = _fingerprint(bank.names), index.nlist
            name = f"arrow-index-{uuid.uuid4().hex[:12]}.safetensors"
            atomic_save_safetensors(self.path / name, tensors, {"fingerprints": json.dumps(prints)})
            info = {"file": name, "nlist": max(sizes.values(), default=0), "iters": iters}
            self._commit(self.adapters, arrow_index=info)
        return info

    def _commit(self, adapters: list[dict], arrow_index: dict | None = None) -> None:
        """Atomically replace the manifest. Changing the adapters drops the arrow index: its clusters
        list adapters by position, so an index built for other adapters would route to wrong ones."""
        manifest = dict(self.manifest, adapters=adapters)
        manifest.pop("arrow_index", None)
        if arrow_index is not None:
            manifest["arrow_index"] = arrow_index
        atomic_write_json(self.path / MANIFEST, manifest)
        self.manifest = manifest

    def add(
        self, paths, replace: bool = False, chunk_size: int = 128, progress: bool = True, map_chunks=map
    ) -> list[str]:
        """Align and add adapter folders; returns the names added. Already-present identical ones are skipped.

        map_chunks(fn, chunks): how the chunks are read and aligned, `map` by default; any map that yields
        fn(chunk) in order works (loralag.cluster.build aligns them on Ray workers). This process alone writes
        each chunk's segment and commits it, in order."""
        folders = find_adapter_folders(paths)
        added = []
        with self._writing():
            present = {a["name"]: a for a in self.adapters}
            todo = []
            for folder in folders:
                old = present.get(folder.name)
                if old is not None and old["checksum"] == adapter_checksum(folder):
                    continue  # committed by an earlier (maybe interrupted) run
                if old is not None and not replace:
                    raise AdapterError(
                        f"adapter '{folder.name}' ({folder}) differs from the one of that name already in library "
                        f"{self.path}; remove it first or pass replace=True (--replace)"
                    )
                todo.append(folder)
            bar = tqdm(total=len(todo), desc=f"aligning into {self.path.name}", unit="adapter", disable=not progress)
            chunks = [todo[start : start + chunk_size] for start in range(0, len(todo), chunk_size)]
            try:  # tqdm: adapters/s and an ETA, moved on per chunk (each aligned whole, maybe on another machine)
                for chunk, aligned in map_chunks(functools.partial(align_chunk, shapes=self.shapes), chunks):
                    seg = self._write_segment(aligned)
                    names = {a.name for a in chunk}
                    kept = [a for a in self.adapters if a["name"] not in names]
                    self._commit(kept + [_entry(a, seg) for a in chunk])
                    added += [a.name for a in chunk]
                    bar.update(len(chunk))
            finally:
                bar.close()
        return added

    def add_segment(self, file: str | Path, source: str = "segment") -> list[str]:
        """Add the adapters of a segment file written outside the library, as they are (no alignment): factors
        already aligned and scaled (A* with orthonormal rows, B* = U·S, arrow = A*[0]), in the segment format of
        this module's docstring. For adapters made at scale without PEFT folders, e.g. a file streamed tensor by
        tensor, beside the library (not in its segments/, where a file the manifest does not name is swept). The
        file is checked like every segment (header, rows table, shapes and dtype against the library), then moved
        in (a rename on the library's file system) and committed. Each adapter targets the modules whose rows name
        it; its rank is its largest there, its alpha that rank (the scale is in B*), its checksum the file's sha256.
        Returns the names added, in the file's order; a name the library already holds is refused."""
        file = Path(file)
        with self._writing():
            tensors, meta = mmap_safetensors(file)
            try:
                rows = json.loads(meta["rows"])
            except (KeyError, ValueError, RecursionError):
                raise LibraryError(f"{file} is not a segment: its metadata holds no valid 'rows' table") from None
            problem = self._rows_problem(tensors, rows)
            del tensors  # the map: only its header was read
            if problem:
                raise LibraryError(f"{file} does not fit library {self.path}: {problem}")
            ranks: dict[str, int] = {}
            targets: dict[str, list[str]] = {}
            for module, table in rows.items():
                names = [name for name, _ in table]
                if len(set(names)) != len(names):
                    raise LibraryError(f"{file}: module '{module}' names an adapter twice")
                for name, rank in table:
                    problem = name_problem(name)
                    if problem:
                        raise LibraryError(f"{file}: adapter {name!r}: {problem}")
                    ranks[name] = max(ranks.get(name, 0), rank)
                    targets.setdefault(name, []).append(module)
            taken = sorted(set(ranks) & set(self.names))
            if taken:
                raise LibraryError(f"library {self.path} already holds {taken[:5]}; remove them first")
            with open(file, "rb") as f:  # the bytes it came in: what a key over checksums (train --under-library) sees
                checksum = "segment:" + hashlib.file_digest(f, "sha256").hexdigest()
            seg = uuid.uuid4().hex[:16]
            shutil.move(file, self._segment_path(seg))
            fsync_dir(self.path / SEGMENTS)
            entry = {"source": source, "checksum": checksum, "use_rslora": False, "segment": seg}
            new = [dict(name=n, rank=r, alpha=r, target_modules=sorted(targets[n]), **entry) for n, r in ranks.items()]
            self._commit(self.adapters + new)
        return list(ranks)

    def _write_segment(self, aligned: dict[str, list]) -> str:
        tensors, rows = {}, {}
        for module, items in aligned.items():
            for name, a, b in items:  # e.g. a huge alpha: finite factors whose product overflows float32 / float16
                if not (torch.isfinite(a.to(self.dtype)).all() and torch.isfinite(b.to(self.dtype)).all()):
                    raise AdapterError(
                        f"adapter '{name}': module '{module}' aligns to non-finite {self.manifest['dtype']} "
                        "factors (its lora_alpha / rank scaling is too large)"
                    )
            A, B = _stack_padded([a for _, a, _ in items], [b for _, _, b in items])
            tensors[f"{module}.A"] = A.to(self.dtype)
            tensors[f"{module}.B"] = B.to(self.dtype)
            tensors[f"{module}.arrow"] = A[:, 0].to(self.dtype).clone()  # own storage: safetensors refuses shared
            rows[module] = [[name, a.shape[0]] for name, a, _ in items]
        return self._save_segment(tensors, rows)

    def _save_segment(self, tensors: dict, rows: dict) -> str:
        seg = uuid.uuid4().hex[:16]
        atomic_save_safetensors(self.path / SEGMENTS / f"{seg}.safetensors", tensors, {"rows": json.dumps(rows)})
        return seg

    def remove(self, names) -> None:
        names = [names] if isinstance(names, str) else list(names)
        with self._writing():
            for n in names:
                self.entry(n)  # error on an unknown name before anything changes
            self._commit([a for a in self.adapters if a["name"] not in set(names)])

    def compact(self, chunk_size: int = 1024) -> None:
        """Rewrite live rows into fresh segments, dropping space held by removed adapters (no re-alignment)."""
        with self._writing():
            entries = list(self.adapters)
            new = []
            for start in range(0, len(entries), chunk_size):
                chunk = entries[start : start + chunk_size]
                tensors, rows = {}, {}
                for module in sorted({m for a in chunk for m in a["target_modules"]}):
                    members = [a["name"] for a in chunk if module in a["target_modules"]]
                    bank = self.bank(module)
                    idx = torch.tensor([bank.index[n] for n in members])
                    A, B = bank.gather(idx)
                    tensors.update({f"{module}.A": A, f"{module}.B": B, f"{module}.arrow": A[:, 0].clone()})
                    rows[module] = [[n, int(bank.ranks[i])] for n, i in zip(members, idx.tolist())]
                seg = self._save_segment(tensors, rows)
                new += [dict(a, segment=seg) for a in chunk]
            self._commit(new)

    def export(self, out_dir: str | Path, names=None) -> list[Path]:
        """Write adapters back out as PEFT LoRA folders (A*, B* with scale 1) that PEFT loads as is."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        if out_dir.exists() and not out_dir.is_dir():
            raise LibraryError(f"cannot export into {out_dir}: it is a file, not a folder")
        paths = []
        for name in names or self.names:
            factors = self.adapter_factors(name)
            folder = out_dir / name
            if name_problem(name) or not folder.resolve().is_relative_to(out_dir.resolve()):
                raise LibraryError(f"library {self.path}: adapter {name!r} cannot name a folder inside {out_dir}")
            folder.mkdir(parents=True, exist_ok=True)
            ranks = {m: A.shape[0] for m, (A, _) in factors.items()}
            r = max(ranks.values())
            conv = any(self.shapes[m][2] == "conv1d" for m in factors)
            config = {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": self.base_model,
                "r": r,
                "lora_alpha": r,
                "target_modules": sorted(factors),
                # B* carries the scale, so every module uses alpha = its rank (scale 1).
                "rank_pattern": {m: k for m, k in ranks.items() if k != r},
                "alpha_pattern": {m: k for m, k in ranks.items() if k != r},
                "lora_dropout": 0.0,
                "bias": "none",
                "fan_in_fan_out": conv,
                "inference_mode": True,
            }
            tensors = {}
            for m, (A, B) in factors.items():
                tensors[f"base_model.model.{m}.lora_A.weight"] = A.contiguous()
                tensors[f"base_model.model.{m}.lora_B.weight"] = B.contiguous()
            save_file(tensors, str(folder / "adapter_model.safetensors"))
            (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1))
            paths.append(folder)
        return paths

    def summary(self) -> dict:
        segs = {a["segment"] for a in self.adapters}
        size = sum((self.path / SEGMENTS / f"{s}.safetensors").stat().st_size for s in segs)
        ranks = [a["rank"] for a in self.adapters]
        return {
            "path": str(self.path),
            "base_model": self.base_model,
            "adapters": len(self),
            "modules": len(self.target_modules),
            "segments": len(segs),
            "dtype": self.manifest["dtype"],
            "ranks": sorted(set(ranks)),
            "bytes_on_disk": size,
            "arrow_index": self.manifest.get("arrow_index"),
        }


def _count(value) -> bool:
    """A positive integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def align_chunk(folders: list[Path], shapes: dict[str, list]) -> tuple[list[LoraAdapter], dict[str, list]]:
    """Read adapter folders, check they fit `shapes` and align them: (the adapters, and per module
    [(name, A*, B*)] in folder order). What a chunk of `Library.add` needs before its segment."""
    adapters = [read_adapter(f) for f in folders]
    for adapter in adapters:
        check_fits(adapter, shapes)
    aligned: dict[str, list] = {}
    for adapter in adapters:
        for module, lm in adapter.modules.items():
            aligned.setdefault(module, []).append((adapter.name, *align(lm.A, lm.B, lm.scale)))
    return adapters, aligned


def _fingerprint(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]


def _entry(adapter: LoraAdapter, segment: str) -> dict:
    cfg = adapter.config
    return {
        "name": adapter.name,
        "source": adapter.source,
        "checksum": adapter.checksum,
        "rank": adapter.rank,
        "alpha": cfg.get("lora_alpha"),
        "use_rslora": bool(cfg.get("use_rslora", False)),
        "target_modules": adapter.target_modules,
        "segment": segment,
    }


def _stack_padded(As: list[torch.Tensor], Bs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack mixed-rank factors by padding with zero rows of A* and zero columns of B* (no effect on outputs)."""
    r = max(a.shape[0] for a in As)
    A = torch.zeros(len(As), r, As[0].shape[1])
    B = torch.zeros(len(Bs), Bs[0].shape[0], r)
    for i, (a, b) in enumerate(zip(As, Bs)):
        A[i, : a.shape[0]] = a
        B[i, :, : b.shape[1]] = b
    return A, B


def create_library(path: str | Path, base_model: str, shapes: dict[str, list], dtype: str = "float32") -> Library:
    """Create an empty library; an existing one for the same base model is opened instead (resume)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LibraryError(f"{path} is a file, not a folder: cannot make a library there")
    if dtype not in DTYPES:
        raise LibraryError(f"unknown library dtype '{dtype}'; choose one of {sorted(DTYPES)}")
    if (path / MANIFEST).is_file():
        lib = Library(path)
        if len(lib) == 0 and (lib.base_model != base_model or lib.shapes != shapes or lib.manifest["dtype"] != dtype):
            pass  # an empty library (a first build that failed) is not bound to its model: made again below
        elif lib.shapes and any(lib.shapes.get(m, s) != s for m, s in shapes.items() if m in lib.shapes):
            raise LibraryError(f"library {path} was built for base model '{lib.base_model}' with other module shapes")
        else:
            return lib
    elif path.exists() and any(not _leftover(f) for f in path.iterdir()):
        raise LibraryError(f"{path} exists, is not empty and holds no {MANIFEST}: refusing to write a library there")
    (path / SEGMENTS).mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "base_model": {"name": base_model, "modules": shapes},
        "dtype": dtype,
        "adapters": [],
    }
    atomic_write_json(path / MANIFEST, manifest)
    return Library(path)


def _leftover(f: Path) -> bool:
    """What a first build killed before its first manifest leaves: the lock, temporary files, an empty segments/."""
    if f.name == LOCK or f.name.startswith(TMP_PREFIX):
        return True
    return f.name == SEGMENTS and f.is_dir() and all(g.name.startswith(TMP_PREFIX) for g in f.iterdir())


def build_library(
    out,
    adapters,
    base_model: str = "default",
    shapes: dict | None = None,
    dtype: str = "float32",
    replace: bool = False,
    chunk_size: int = 128,
    progress: bool = True,
    map_chunks=map,
) -> Library:
    """Build (or resume, or extend) the library at `out` from adapter folders for one base model.
    map_chunks: how chunks are aligned (see Library.add).

    A build that fails before storing any adapter leaves nothing behind: no library bound to the model."""
    shapes = shapes if shapes is not None else shapes_for_model(base_model)
    out = Path(out)
    existed = out.exists()
    fresh = not (out / MANIFEST).is_file()
    lib = create_library(out, base_model, shapes, dtype)
    try:
        lib.add(adapters, replace=replace, chunk_size=chunk_size, progress=progress, map_chunks=map_chunks)
    except BaseException:
        try:
            if fresh and len(Library(out)) == 0:
                _unmake(out, existed)
        except LibraryError:
            pass
        raise
    return lib


def _unmake(path: Path, keep_folder: bool) -> None:
    """Remove an empty library made by this build (the folder too unless it was there before)."""
    if not keep_folder:
        shutil.rmtree(path, ignore_errors=True)
        return
    for name in (MANIFEST, LOCK):
        (path / name).unlink(missing_ok=True)
    shutil.rmtree(path / SEGMENTS, ignore_errors=True)


def open_library(path: str | Path) -> Library:
    return Library(path)
