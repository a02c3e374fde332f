"""Training adapters on a Ray cluster: the same adapters as `loralag.training.train.train_adapters`, trained by
a pool of worker actors.

The driver (this process) holds the model and tokenizer: it reads every input, computes each adapter's cache
key exactly as a local run does and leaves out the adapters already finished in `out_dir` (so a run killed
anywhere resumes). The model goes into Ray's object store once; each worker actor takes it from there once, at
its start, and trains the tasks it is given (`group_size` inputs each, grouped as a local run groups them)
into a folder of its own. It returns the finished PEFT folders as bytes, and the driver writes each one into
`out_dir/<name>/` atomically, as a local run does: so the output need not be on a filesystem the workers see
(inputs with `under` adapters or a routed `library` need those folders readable on the workers). Each adapter's
seed is its own (`adapter_seed`), so which worker trains it, and in which order, does not change it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loralag.cluster.connect import connect, setup_worker, worker_count
from loralag.cluster.pool import ActorPool
from loralag.errors import LoralagError
from loralag.training import train as lt


@dataclass
class TrainRun:
    """What a cluster training run did: every adapter's folder (in input order), how many were trained and how
    many were found finished, the workers, the worker processes that trained something (a restarted worker
    has a new one), tasks moved to another worker, and the seconds the training took."""

    paths: list[Path]
    trained: int = 0
    cached: int = 0
    workers: int = 0
    pids: set = field(default_factory=set)
    moved: int = 0
    seconds: float = 0.0


class TrainWorker:
    """A Ray actor: the model and tokenizer, loaded once from the object store, and `train` for a task."""

    def __init__(self, model_and_tokenizer, threads: int):
        setup_worker(threads)
        self.model, self.tokenizer = model_and_tokenizer

    def pid(self) -> int:
        return os.getpid()

    def train(self, items: list, config: lt.TrainConfig, group_size: int) -> tuple[int, list[dict[str, bytes]]]:
        """Train `items` into a scratch folder; return this process's id and each adapter folder's files."""
        with tempfile.TemporaryDirectory(prefix="loralag-ray-train-") as tmp:
            paths = lt.train_adapters(
                self.model, self.tokenizer, items, tmp, config, progress=False, group_size=min(group_size, len(items))
            )
            return os.getpid(), [{f.name: f.read_bytes() for f in sorted(p.iterdir()) if f.is_file()} for p in paths]


def train_on_ray(
    model,
    tokenizer,
    items: Sequence[lt.TrainItem],
    out_dir: str | os.PathLike,
    config: lt.TrainConfig | None = None,
    *,
    address: str | bool | None = True,
    workers: int | None = None,
    cpus_per_worker: int = 1,
    group_size: int = 1,
    progress: bool = True,
) -> TrainRun:
    """Train (or find finished in `out_dir`) one adapter per item on the Ray cluster at `address` (see
    cluster.connect); `workers` actors (default: as many as the cluster's CPUs hold), each on `cpus_per_worker`
    CPUs and torch threads. The folders are those `train_adapters` writes, tensor for tensor."""
    config = config or lt.TrainConfig()
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise LoralagError(f"group_size must be a positive integer, got {group_size!r}")
    names = [item.name for item in items]
    if len(set(names)) != len(names):
        raise LoralagError(f"adapter names must be unique, got duplicates in {names}")
    for item in items:
        lt._check_name(item.name, "training item")
    lt._check_targets(model, config.target_modules)
    out = Path(out_dir)
    jobs = [lt._job(model, tokenizer, item, out, config) for item in items]  # the keys a local run computes
    todo = [(item, job) for item, job in zip(items, jobs) if lt._finished(job) is None]
    run = TrainRun([job.target for job in jobs], cached=len(items) - len(todo))
    bar = _bar(len(items), progress)
    bar.update(run.cached)
    if not todo:
        bar.close()
        return run
    todo = [(_absolute_under(item), job) for item, job in todo]  # a worker's working folder is not ours
    todo.sort(key=lambda ij: max(len(ids) for ids, _ in ij[1].examples))  # groups of similar lengths pad little
    tasks = [todo[s : s + group_size] for s in range(0, len(todo), group_size)]
    ray = connect(address)
    run.workers = min(worker_count(workers, cpus_per_worker), len(tasks))
    bar.set_description(f"training on Ray ({run.workers} workers)")
    start = time.perf_counter()
    model_ref = ray.put((model, tokenizer))
    out.mkdir(parents=True, exist_ok=True)

    def done(t: int, result) -> None:
        pid, folders = result
        run.pids.add(pid)
        for (_, job), files in zip(tasks[t], folders):
            _write_folder(job, files)
            run.trained += 1
            bar.update(1)
        bar.set_postfix(trained=run.trained, cached=run.cached)

    try:
        with ActorPool(TrainWorker, (model_ref, cpus_per_worker), run.workers, cpus_per_worker, "train") as pool:
            run.moved = pool.run(
                tasks,
                lambda actor, task: actor.train.remote([item for item, _ in task], config, group_size),
                done,
            )
    finally:
        bar.close()
        del model_ref
    run.seconds = time.perf_counter() - start
    return run


def train_adapters(
    model,
    tokenizer,
    items,
    out_dir,
    config=None,
    progress: bool = True,
    group_size: int = 1,
    *,
    address: str | bool | None = True,
    workers: int | None = None,
) -> list[Path]:
    """loralag.training.train.train_adapters on the Ray cluster at `address` (True: the one this process is
    connected to, $RAY_ADDRESS or a local one): the same arguments, the same folders, tensor for tensor."""
    run = train_on_ray(
        model,
        tokenizer,
        items,
        out_dir,
        config,
        address=address,
        workers=workers,
        group_size=group_size,
        progress=progress,
    )
    return run.paths


def _absolute_under(item):
    """The item with its frozen adapters' folders and routed library made absolute (the cache key holds their
    checksums, not paths)."""
    import dataclasses

    under = getattr(item, "under", None)
    if under:
        item = dataclasses.replace(item, under=[None if u is None else str(Path(u).resolve()) for u in under])
    library = getattr(item, "library", None)
    if library is not None:
        item = dataclasses.replace(item, library=dataclasses.replace(library, path=str(Path(library.path).resolve())))
    return item


def _write_folder(job: lt._Job, files: dict[str, bytes]) -> None:
    """Write a worker's adapter folder into job.target the way a local run does (a temp folder moved in whole),
    after checking the worker trained what the driver asked for (same cache key: same model, inputs, config)."""
    import json

    marker = json.loads(files.get(lt.MARKER_FILE, b"{}") or b"{}")
    if marker.get("key") != job.key or any(f not in files for f in lt._ADAPTER_FILES):
        raise LoralagError(
            f"a Ray worker returned adapter '{job.name}' under another cache key than this process computes: "
            "the workers' loralag, transformers or model differ from the driver's"
        )
    job.target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{job.name}.tmp-", dir=job.target.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        tmp.chmod(0o755)
        lt._replace_dir(tmp, job.target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bar(total: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="adapter", desc="training on Ray", disable=not progress, smoothing=0.1)
