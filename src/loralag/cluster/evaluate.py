"""Answering questions on a Ray cluster: `loralag eval --model ... --ray` (a dataset's batches over a pool of
workers; the LAMA bench's shares as Ray tasks are experiments.lama.answering.bench_shares).

eval: each worker actor takes the model from the object store once, opens the libraries itself (by memory
map, from the same paths: a shared filesystem) and attaches them with the driver's routers. A dataset's
examples are put in the order `generate_predictions` answers them (by prompt length) and cut into spans of
whole batches; a span answered on a worker is answered in the very batches a local run forms, so the
predictions are a local run's.

bench: `answer_questions` already splits the work into shares (every n-th batch of every method); here each
share is a Ray task that takes the model from the object store, opens the libraries and answers its share.
"""

from __future__ import annotations

import dataclasses
import math
import os

from loralag.cluster.connect import connect, setup_worker, worker_count
from loralag.cluster.pool import ActorPool


class EvalWorker:
    """A Ray actor: the model with the libraries attached as the driver attaches them."""

    def __init__(self, model_and_tokenizer, library_paths: dict, routers: dict, k: int, nprobe, threads: int):
        setup_worker(threads)
        from loralag.library.store import open_library
        from loralag.routing.state import attach

        self.model, self.tokenizer = model_and_tokenizer
        if library_paths:
            libs = {name: open_library(path) for name, path in library_paths.items()}
            attach(self.model, libs, router=routers, k=k, nprobe=nprobe)

    def pid(self) -> int:
        return os.getpid()

    def answer(self, dataset, options: dict) -> dict:
        from loralag.evaluation.evaluate import generate_predictions

        return generate_predictions(self.model, self.tokenizer, dataset, **options)


class RayAnswerer:
    """`generate_predictions` for `loralag eval` on the Ray cluster at `address`: `workers` actors (default: as
    many as the cluster's CPUs hold at `threads` each), started once and used for every dataset. Give it the
    model before the libraries are attached to it; `libraries`: {name: Library or folder}, `routers`: {name:
    router} as `attach` takes them."""

    def __init__(
        self,
        model,
        tokenizer,
        libraries: dict,
        routers: dict | str = "lag",
        k: int = 20,
        nprobe: int | None = None,
        *,
        address: str | bool | None = True,
        workers: int | None = None,
        threads: int = 1,
        batches_per_task: int | None = None,
    ):
        ray = connect(address)
        self.workers = worker_count(workers, threads)
        self.batches_per_task = batches_per_task
        paths = {name: str(getattr(lib, "path", lib)) for name, lib in libraries.items()}
        self._model = ray.put((model, tokenizer))
        self.pool = ActorPool(
            EvalWorker, (self._model, paths, routers, k, nprobe, threads), self.workers, threads, "eval"
        )
        self.pids = self.pool.wait_ready()  # started: a constructor's error (a library path) is raised here

    def close(self) -> None:
        self.pool.close()
        self._model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def generate_predictions(self, dataset, batch_size: int = 8, progress=None, **options) -> dict[str, str]:
        """What `loralag.evaluation.evaluate.generate_predictions(model, tokenizer, dataset, ...)` returns."""
        from loralag.errors import LoralagError
        from loralag.evaluation.evaluate import build_prompt

        if batch_size < 1:
            raise LoralagError(f"batch size must be at least 1, got {batch_size}")
        template, max_chars = options.get("template"), options.get("max_input_chars", 2000)
        prompts = [build_prompt(ex, dataset, template, max_chars) for ex in dataset.examples]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # as generate_predictions orders them
        n_batches = math.ceil(len(order) / batch_size)
        per_task = self.batches_per_task or max(1, math.ceil(n_batches / (4 * self.workers)))
        span = per_task * batch_size
        pieces = [
            dataclasses.replace(dataset, examples=[dataset.examples[i] for i in order[s : s + span]])
            for s in range(0, len(order), span)
        ]
        options = dict(options, batch_size=batch_size)
        answers: dict[str, str] = {}

        def done(_, result: dict) -> None:
            answers.update(result)
            if progress is not None:
                progress(len(answers))

        self.pool.run(pieces, lambda actor, piece: actor.answer.remote(piece, options), done)
        return {ex.id: answers[ex.id] for ex in dataset.examples}
