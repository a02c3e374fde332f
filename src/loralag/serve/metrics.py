"""Prometheus metrics for `loralag serve`, through `prometheus_client`.

Each `ServerMetrics` owns its `CollectorRegistry`, so several servers (or test apps) in one process do not
collide. `exposition(accept)` is what GET /metrics answers: the text format (or OpenMetrics when the scraper
asks for it), negotiated by `prometheus_client.exposition.choose_encoder`.

Multiprocess mode: when `PROMETHEUS_MULTIPROC_DIR` is set before `prometheus_client` is first imported (e.g.
in the environment of `loralag serve --ray-replicas N`, of gunicorn workers), every process writes its values
under that folder and each /metrics sums them over the processes (`multiprocess.MultiProcessCollector`):
counters and histograms add up, gauges are summed over the live processes (`livesum`). Empty the folder
between runs. A gauge computed when scraped (`set_function`) cannot be called from another process, so in
this mode it is sampled into the folder every `REFRESH_S` seconds and at each scrape of its own process.

The metrics keep the interface the engine and middlewares use: `inc(amount, **labels)`,
`observe(value, **labels)`, `set(value, **labels)`, `set_function(fn)`.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable

import prometheus_client
from prometheus_client import CollectorRegistry, multiprocess, values
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
REFRESH_S = 1.0  # multiprocess mode: how often gauges computed when scraped are written for the other processes


def multiprocess_dir() -> str | None:
    """The folder of multiprocess mode, or None when values live in this process only. Decided by
    prometheus_client when it was imported (its value class), not by the environment now."""
    if values.ValueClass is values.MutexValue:
        return None
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir")


_EXIT_HOOK = threading.Lock()
_exit_hooked = False


def _hook_exit(path: str) -> None:
    """Remove this process's live gauges from the folder when it exits (counters and histograms stay: they
    are totals). Whoever kills processes without letting them exit calls `multiprocess.mark_process_dead`."""
    global _exit_hooked
    with _EXIT_HOOK:
        if not _exit_hooked:
            atexit.register(lambda: multiprocess.mark_process_dead(os.getpid(), path))
            _exit_hooked = True


class _Metric:
    """A prometheus_client metric with labels passed as keywords to the update itself."""

    def __init__(self, metric):
        self.metric = metric

    def _child(self, labels: dict):
        return self.metric.labels(**labels) if labels else self.metric


class Counter(_Metric):
    def inc(self, amount: float = 1, **labels) -> None:
        self._child(labels).inc(amount)


class Histogram(_Metric):
    def observe(self, value: float, **labels) -> None:
        self._child(labels).observe(value)


class Gauge(_Metric):
    def __init__(self, metric, owner: ServerMetrics):
        super().__init__(metric)
        self._owner = weakref.ref(owner)
        self.fn: Callable[[], float] | None = None

    def set(self, value: float, **labels) -> None:
        self._child(labels).set(value)

    def set_function(self, fn: Callable[[], float]) -> None:
        """Compute the (label-less) value when scraped."""
        owner = self._owner()
        if owner is None or owner.multiprocess is None:
            self.metric.set_function(fn)
            return
        self.fn = fn
        self.refresh()
        owner._start_refresher()

    def refresh(self) -> None:
        if self.fn is not None:
            self.metric.set(self.fn())


class ServerMetrics:
    """Every metric the server exports, under the `loralag_` prefix, in a registry of its own."""

    def __init__(self):
        self.multiprocess = multiprocess_dir()
        self.registry = CollectorRegistry()
        if self.multiprocess is not None:
            os.makedirs(self.multiprocess, exist_ok=True)
            multiprocess.MultiProcessCollector(self.registry, path=self.multiprocess)
            _hook_exit(self.multiprocess)
        # In multiprocess mode the values live in the folder and the collector reads them all: the metrics
        # themselves are registered nowhere.
        reg = None if self.multiprocess is not None else self.registry
        self._refresher: threading.Thread | None = None

        def counter(name, doc, labels=()):
            return Counter(prometheus_client.Counter(name, doc, labels, registry=reg))

        def histogram(name, doc, labels=(), buckets=LATENCY_BUCKETS):
            return Histogram(prometheus_client.Histogram(name, doc, labels, registry=reg, buckets=buckets))

        def gauge(name, doc):
            return Gauge(prometheus_client.Gauge(name, doc, registry=reg, multiprocess_mode="livesum"), self)

        self.requests = counter(
            "loralag_requests_total",
            "HTTP requests answered, by endpoint and status code (499: the client went away before the answer)",
            ("endpoint", "status"),
        )
        self.prompt_tokens = counter("loralag_prompt_tokens_total", "Prompt tokens of the requests that were run")
        self.generation_tokens = counter("loralag_generation_tokens_total", "Tokens generated")
        self.latency = histogram(
            "loralag_request_latency_seconds", "Time from arrival to the last byte of the answer", ("endpoint",)
        )
        self.ttft = histogram(
            "loralag_time_to_first_token_seconds", "Time from arrival to the first generated token", ("endpoint",)
        )
        self.queue_wait = histogram("loralag_queue_wait_seconds", "Time a request waited before its prefill")
        self.tpot = histogram(
            "loralag_time_per_output_token_seconds",
            "Mean time between generated tokens, per request",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.queue_depth = gauge("loralag_queue_depth", "Requests waiting for a slot in the batch")
        self.queue_capacity = gauge("loralag_queue_capacity", "Requests the queue holds before answering 429")
        self.running = gauge("loralag_running_sequences", "Sequences in the running batch")
        self.max_batch = gauge("loralag_max_batch", "Sequences the running batch holds at most")
        self.forward_passes = counter(
            "loralag_forward_passes_total", "Forward passes run by the engine, by kind", ("kind",)
        )
        self.batch_size = histogram(
            "loralag_batch_size", "Sequences per forward pass, by kind", ("kind",), buckets=BATCH_BUCKETS
        )
        self.forward_seconds = histogram(
            "loralag_forward_seconds", "Duration of one forward pass and sampling, by kind", ("kind",)
        )
        self.routed = counter(
            "loralag_adapter_routed_tokens_total",
            "Tokens routed to each adapter, counted once per adapted module that chose it",
            ("library", "adapter"),
        )
        self.engine_errors = counter(
            "loralag_engine_errors_total", "Forward passes that failed (their requests got 500)"
        )
        self.request_errors = counter(
            "loralag_request_errors_total",
            "Requests ended alone by a failure of their own (NaN/Inf logits, a failed sampling), by code",
            ("code",),
        )
        self.rejected = counter(
            "loralag_rejected_requests_total",
            "Requests refused before they were read whole or "
            "run (body too large or too slow, missing API key, ...), by code",
            ("code",),
        )

    def all(self) -> list[_Metric]:
        return [v for v in vars(self).values() if isinstance(v, _Metric)]

    def refresh(self) -> None:
        """Multiprocess mode: write the current value of every gauge computed when scraped."""
        for m in self.all():
            if isinstance(m, Gauge):
                try:
                    m.refresh()
                except Exception:  # e.g. a function of an engine being torn down: keep the last value
                    log.debug("could not refresh gauge %s", m.metric._name, exc_info=True)

    def _start_refresher(self) -> None:
        if self._refresher is not None:
            return
        ref = weakref.ref(self)  # the thread must not keep the metrics (and the engine in their functions) alive

        def loop():
            while True:
                time.sleep(REFRESH_S)
                metrics = ref()
                if metrics is None:
                    return
                metrics.refresh()
                del metrics

        self._refresher = threading.Thread(target=loop, name="loralag-metrics-refresh", daemon=True)
        self._refresher.start()

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """The body and content type of GET /metrics for a scraper sending `Accept: accept`."""
        if self.multiprocess is not None:
            self.refresh()
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type

    def render(self) -> str:
        """The text exposition format."""
        return self.exposition()[0].decode()
