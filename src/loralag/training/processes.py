"""Training on one machine's cores in worker processes: `train_adapters(..., workers=N)`.

Each worker holds the model (its weights shared with this process, not copied) and trains whole adapters with
threads // N torch threads, one adapter at a time as `train_adapter` does, writing each folder atomically.
Which adapters a worker takes changes nothing in them (each depends on its own seed and examples); the thread
count does change float rounding, as it does in one process. It is for machines with many cores, where one
process's threads scale worse over a small model's matmuls (not measured here); on 2 cores two one-thread
workers took 1.11x the time per adapter of one process of two threads (benchmarks/results/train-workers), whose
two threads a training step's matmuls already keep busy.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

from loralag.workers import spawn_pool

_WORKER: dict = {}


def train_in_processes(model, tokenizer, items, out_dir: Path, config, workers: int, progress: bool) -> list[Path]:
    """The folders of `items`, in order: the up-to-date ones found here, the others trained by `workers`
    spawned processes (fewer when fewer adapters are left to train)."""
    import torch
    from tqdm.auto import tqdm

    from loralag.training.train import _finished, _job, train_adapter

    out_dir = Path(out_dir)
    todo = [i for i, item in enumerate(items) if _finished(_job(model, tokenizer, item, out_dir, config)) is None]
    bar = tqdm(total=len(items), unit="adapter", disable=not progress)
    try:
        bar.update(len(items) - len(todo))
        if len(todo) < 2 or model.device.type != "cpu":  # nothing to share out, or one accelerator to feed
            for i in todo:
                bar.set_description(items[i].name)
                train_adapter(model, tokenizer, items[i], out_dir, config)
                bar.update(1)
            return [out_dir / item.name for item in items]
        n = min(workers, len(todo))
        threads = max(1, torch.get_num_threads() // n)
        model.share_memory()
        with spawn_pool(n, _start_worker, (model, tokenizer, threads)) as pool:
            futures = {pool.submit(_train_one, items[i], out_dir, config): i for i in todo}
            try:
                for future in concurrent.futures.as_completed(futures):
                    future.result()  # a worker's error (a bad item, a full disk) stops the run here
                    bar.set_description(items[futures[future]].name)
                    bar.update(1)
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    finally:
        bar.close()
    return [out_dir / item.name for item in items]


def _start_worker(model, tokenizer, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    _WORKER.update(model=model, tokenizer=tokenizer)


def _train_one(item, out_dir: Path, config) -> Path:
    from loralag.training.train import train_adapter

    return train_adapter(_WORKER["model"], _WORKER["tokenizer"], item, out_dir, config).path
