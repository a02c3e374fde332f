"""Prometheus metrics for `loralag serve`, in the text exposition format (version 0.0.4), no dependency.

Counters, gauges and histograms with labels, safe to update from the engine thread and the event loop
at once. Gauges can also be computed when scraped (`Gauge.set_function`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(v: float) -> str:
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) < 1e15):
        return str(int(v))
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help: str, labels: Iterable[str] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(labels)
        self._lock = threading.Lock()
        self._values: dict[tuple, object] = {}

    def _key(self, labels: dict) -> tuple:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"metric {self.name} takes labels {self.labelnames}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def get(self, **labels) -> float:
        return self._values.get(self._key(labels), 0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.labelnames:
            items = [((), 0)]
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name, help, labels=()):
        super().__init__(name, help, labels)
        self._fn: Callable[[], float] | None = None

    def set(self, value: float, **labels) -> None:
        with self._lock:
            self._values[self._key(labels)] = value

    def set_function(self, fn: Callable[[], float]) -> None:
        """Compute the (label-less) value when scraped."""
        self._fn = fn

    def get(self, **labels) -> float:
        if self._fn is not None:
            return self._fn()
        return self._values.get(self._key(labels), 0)

    def render(self) -> list[str]:
        if self._fn is not None:
            return self.header() + [f"{self.name} {_num(self._fn())}"]
        with self._lock:
            items = sorted(self._values.items())
        if not items and not self.labelnames:
            items = [((), 0)]
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}" for k, v in items]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, labels=(), buckets=LATENCY_BUCKETS):
        super().__init__(name, help, labels)
        self.buckets = tuple(sorted(buckets))

    def observe(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            counts, total = self._values.get(key, ([0] * len(self.buckets), [0.0, 0]))
            for i, b in enumerate(self.buckets):
                if value <= b:
                    counts[i] += 1
            total[0] += value
            total[1] += 1
            self._values[key] = (counts, total)

    def count(self, **labels) -> int:
        v = self._values.get(self._key(labels))
        return v[1][1] if v else 0

    def sum(self, **labels) -> float:
        v = self._values.get(self._key(labels))
        return v[1][0] if v else 0.0

    def render(self) -> list[str]:
        with self._lock:
            items = sorted((k, (list(c), list(t))) for k, (c, t) in self._values.items())
        lines = self.header()
        for key, (counts, (total, n)) in items:
            for b, c in zip(self.buckets, counts):
                le = 'le="' + _num(float(b)) + '"'
                lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, le)} {c}")
            inf = 'le="+Inf"'
            lines.append(f"{self.name}_bucket{_labels(self.labelnames, key, inf)} {n}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {_num(total)}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {n}")
        return lines


class ServerMetrics:
    """Every metric the server exports, under the `loralag_` prefix."""

    def __init__(self):
        self.requests = Counter(
            "loralag_requests_total",
            "HTTP requests answered, by endpoint and status code (499: the client went away before the answer)",
            ("endpoint", "status"),
        )
        self.prompt_tokens = Counter("loralag_prompt_tokens_total", "Prompt tokens of the requests that were run")
        self.generation_tokens = Counter("loralag_generation_tokens_total", "Tokens generated")
        self.latency = Histogram(
            "loralag_request_latency_seconds", "Time from arrival to the last byte of the answer", ("endpoint",)
        )
        self.ttft = Histogram(
            "loralag_time_to_first_token_seconds", "Time from arrival to the first generated token", ("endpoint",)
        )
        self.queue_wait = Histogram("loralag_queue_wait_seconds", "Time a request waited before its prefill")
        self.tpot = Histogram(
            "loralag_time_per_output_token_seconds",
            "Mean time between generated tokens, per request",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        )
        self.queue_depth = Gauge("loralag_queue_depth", "Requests waiting for a slot in the batch")
        self.queue_capacity = Gauge("loralag_queue_capacity", "Requests the queue holds before answering 429")
        self.running = Gauge("loralag_running_sequences", "Sequences in the running batch")
        self.max_batch = Gauge("loralag_max_batch", "Sequences the running batch holds at most")
        self.forward_passes = Counter(
            "loralag_forward_passes_total", "Forward passes run by the engine, by kind", ("kind",)
        )
        self.batch_size = Histogram(
            "loralag_batch_size", "Sequences per forward pass, by kind", ("kind",), buckets=BATCH_BUCKETS
        )
        self.forward_seconds = Histogram(
            "loralag_forward_seconds", "Duration of one forward pass and sampling, by kind", ("kind",)
        )
        self.routed = Counter(
            "loralag_adapter_routed_tokens_total",
            "Tokens routed to each adapter, counted once per adapted module that chose it",
            ("library", "adapter"),
        )
        self.engine_errors = Counter(
            "loralag_engine_errors_total", "Forward passes that failed (their requests got 500)"
        )
        self.request_errors = Counter(
            "loralag_request_errors_total",
            "Requests ended alone by a failure of their own (NaN/Inf logits, a failed sampling), by code",
            ("code",),
        )
        self.rejected = Counter(
            "loralag_rejected_requests_total",
            "Requests refused before they were read whole or "
            "run (body too large or too slow, missing API key, ...), by code",
            ("code",),
        )

    def all(self) -> list[_Metric]:
        return [v for v in vars(self).values() if isinstance(v, _Metric)]

    def render(self) -> str:
        return "\n".join(line for m in self.all() for line in m.render()) + "\n"
