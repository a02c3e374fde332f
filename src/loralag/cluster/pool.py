"""A pool of Ray actors that each hold what a task needs (a model, libraries) and the loop that keeps them busy.

Each actor is started with Ray's own fault tolerance: a worker process that dies is restarted (its constructor
runs again, loading the model again) and the tasks it held are retried on it (`max_restarts`,
`max_task_retries`). An actor that cannot come back (restarts spent, its node gone for good) is dropped and its
tasks go to the others; only when every actor is gone does the run fail, keeping whatever was finished.
"""

from __future__ import annotations

import uuid
from collections import deque
from collections.abc import Callable, Sequence

from loralag.cluster.connect import unwrap
from loralag.errors import LoralagError

NAME_PREFIX = "loralag-"


class ActorPool:
    """`n` actors of class `cls`, started with `args`, each reserving `cpus` CPUs. Names: loralag-<kind>-<run>-<i>
    (ray.util.list_named_actors lists them, e.g. to watch or kill one)."""

    def __init__(self, cls, args: tuple, n: int, cpus: float, kind: str, restarts: int = 3):
        import ray

        self.kind = kind
        self.run_id = uuid.uuid4().hex[:8]
        remote = ray.remote(num_cpus=cpus, max_restarts=restarts, max_task_retries=restarts)(cls)
        self.actors = [remote.options(name=f"{NAME_PREFIX}{kind}-{self.run_id}-{i}").remote(*args) for i in range(n)]

    def __enter__(self):
        return self

    def wait_ready(self) -> list[int]:
        """Wait until every actor has started (its constructor ran: model and libraries loaded); their pids."""
        from loralag.cluster.connect import get

        return get([actor.pid.remote() for actor in self.actors])

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        import ray

        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already gone
                pass
        self.actors = []

    def run(
        self,
        tasks: Sequence,
        call: Callable,
        on_result: Callable[[int, object], None],
        in_flight: int = 2,
        retries: int = 2,
    ) -> int:
        """Run `call(actor, task)` (returning an ObjectRef) for every task, at most `in_flight` per actor, and
        `on_result(task index, result)` on the driver as each one finishes, in completion order. Returns the
        number of tasks moved to another actor after theirs was lost. A task's own error (a bad input) ends
        the run, raised as itself."""
        import ray
        from ray.exceptions import RayActorError, WorkerCrashedError

        lost = (RayActorError, WorkerCrashedError)
        queue = deque(range(len(tasks)))
        attempts = [0] * len(tasks)
        pending: dict = {}  # ObjectRef -> (actor index, task index)
        load = dict.fromkeys(range(len(self.actors)), 0)
        moved = 0

        def fill() -> None:
            while queue and load:
                a = min(load, key=load.get)
                if load[a] >= in_flight:
                    return
                t = queue.popleft()
                pending[call(self.actors[a], tasks[t])] = (a, t)
                load[a] += 1

        fill()
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            a, t = pending.pop(ref)
            if a in load:
                load[a] -= 1
            try:
                result = ray.get(ref)
            except lost as exc:
                load.pop(a, None)  # this actor will not come back: its other tasks fail the same way
                attempts[t] += 1
                if attempts[t] > retries:
                    raise LoralagError(
                        f"a {self.kind} task failed on {attempts[t]} Ray workers in turn: {exc}"
                    ) from exc
                if not load:
                    raise LoralagError(
                        f"every Ray {self.kind} worker died (last: {str(exc).strip().splitlines()[0]}); what was "
                        "finished is kept, run again to resume"
                    ) from exc
                queue.appendleft(t)
                moved += 1
            except Exception as exc:
                cause = unwrap(exc)
                if cause is exc:
                    raise
                raise cause from None
            else:
                on_result(t, result)
            fill()
        return moved
