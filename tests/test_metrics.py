"""GET /metrics through prometheus_client, read back with prometheus_client's own parser: request counters and
token counters move by exactly what the requests did, each app has its own registry, the scraper's Accept header
picks the format, and multiprocess mode (PROMETHEUS_MULTIPROC_DIR) sums what several processes wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient
from test_serve import tiny_long_llama
from tiny_text import tiny_tokenizer

from loralag.serve.app import create_app

MODEL = "tiny-llama"


def samples(text: str, parse=text_string_to_metric_families) -> dict[tuple, float]:
    """{(sample name, ((label, value), ...)): value} of an exposition, as prometheus_client parses it."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in parse(text) for s in family.samples}


def value(table: dict, name: str, **labels) -> float:
    return table.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))), 0.0)


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_long_llama(), tiny_tokenizer(chat=True)


def test_request_counters_move_with_the_requests(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with TestClient(create_app(model, tok, model_name=MODEL, default_max_tokens=3)) as c:
        first = c.get("/metrics")
        assert first.status_code == 200
        assert first.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        before = samples(first.text)
        types = {f.name: f.type for f in text_string_to_metric_families(first.text)}
        assert types["loralag_requests"] == "counter" and types["loralag_request_latency_seconds"] == "histogram"
        assert types["loralag_queue_depth"] == "gauge" and types["loralag_max_batch"] == "gauge"
        prompt = completion = 0
        for words in ("the sun", "a cat sat", "the dog"):
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": words, "max_tokens": 3, "temperature": 0})
            assert r.status_code == 200, r.text
            prompt += r.json()["usage"]["prompt_tokens"]
            completion += r.json()["usage"]["completion_tokens"]
        bad = c.post("/v1/completions", json={"model": MODEL, "prompt": "the sun", "max_tokens": -1})
        assert bad.status_code == 400
        after = samples(c.get("/metrics").text)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    ep = "/v1/completions"
    assert moved("loralag_requests_total", endpoint=ep, status=200) == 3
    assert moved("loralag_requests_total", endpoint=ep, status=400) == 1
    assert moved("loralag_requests_total", endpoint="/metrics", status=200) == 1  # the first scrape
    assert moved("loralag_request_latency_seconds_count", endpoint=ep) == 4
    assert moved("loralag_request_latency_seconds_bucket", endpoint=ep, le="+Inf") == 4
    assert moved("loralag_prompt_tokens_total") == prompt
    assert moved("loralag_generation_tokens_total") == completion > 0
    assert moved("loralag_time_to_first_token_seconds_count", endpoint=ep) == 3
    assert value(after, "loralag_max_batch") > 0 and value(after, "loralag_queue_depth") == 0


def test_each_app_has_its_own_registry_and_the_scraper_picks_the_format(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with (
        TestClient(create_app(model, tok, model_name=MODEL)) as one,
        TestClient(create_app(model, tok, model_name=MODEL)) as two,
    ):
        for _ in range(2):
            assert one.get("/v1/models").status_code == 200
        assert (
            value(samples(one.get("/metrics").text), "loralag_requests_total", endpoint="/v1/models", status=200) == 2
        )
        assert (
            value(samples(two.get("/metrics").text), "loralag_requests_total", endpoint="/v1/models", status=200) == 0
        )
        om = one.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert om.headers["content-type"].startswith("application/openmetrics-text")
        assert om.text.endswith("# EOF\n")
        assert (
            value(samples(om.text, openmetrics_families), "loralag_requests_total", endpoint="/v1/models", status=200)
            == 2
        )


WRITER = textwrap.dedent(
    """
    import sys
    from loralag.serve.metrics import ServerMetrics

    n, wait = int(sys.argv[1]), sys.argv[2] == "wait"
    m = ServerMetrics()
    assert m.multiprocess, "not in multiprocess mode"
    for _ in range(n):
        m.requests.inc(endpoint="/v1/completions", status=200)
    m.generation_tokens.inc(10 * n)
    m.latency.observe(0.5 * n, endpoint="/v1/completions")
    m.max_batch.set(n)
    m.queue_depth.set_function(lambda: 100 * n)
    if wait:
        print("ready", flush=True)
        sys.stdin.readline()
    else:
        sys.stdout.write(m.render())
    """
)


def test_multiprocess_mode_sums_the_processes(tmp_path):
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"), OMP_NUM_THREADS="1")

    def run(*args, **kw):
        return [sys.executable, "-c", WRITER, *args], dict(env=env, text=True, **kw)

    cmd, kw = run("2", "wait")
    first = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, **kw)
    try:
        assert first.stdout.readline().strip() == "ready"
        cmd, kw = run("5", "render")
        both = samples(subprocess.run(cmd, capture_output=True, check=True, timeout=120, **kw).stdout)
    finally:
        first.communicate("\n", timeout=60)
    assert first.returncode == 0
    ep = "/v1/completions"
    assert value(both, "loralag_requests_total", endpoint=ep, status=200) == 7
    assert value(both, "loralag_generation_tokens_total") == 70
    assert value(both, "loralag_request_latency_seconds_count", endpoint=ep) == 2
    assert value(both, "loralag_request_latency_seconds_sum", endpoint=ep) == pytest.approx(3.5)
    assert value(both, "loralag_request_latency_seconds_bucket", endpoint=ep, le="1.0") == 1  # 1.0 <= 1, 2.5 > 1
    assert value(both, "loralag_max_batch") == 7  # live gauges are summed over the processes
    assert value(both, "loralag_queue_depth") == 700  # a gauge computed when scraped, written for the others

    # Both writers have exited: their totals stay, their gauges went with them.
    cmd, kw = run("0", "render")
    later = samples(subprocess.run(cmd, capture_output=True, check=True, timeout=120, **kw).stdout)
    assert value(later, "loralag_requests_total", endpoint=ep, status=200) == 7
    assert value(later, "loralag_max_batch") == 0 and value(later, "loralag_queue_depth") == 0
