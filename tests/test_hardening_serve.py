"""Issue 16, the server: one request's numerical failure ends it alone, sampling values checked up front, bodies
bounded while they stream in, prompts longer than the context refused before validation or tokenising, the event
loop never blocked (/health answers during the largest request), slow clients cut off, and an API key."""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from starlette.testclient import TestClient
from test_serve import (  # noqa: F401
    CONTEXT,
    MODEL,
    Server,
    _check_error,
    _concurrent,
    _sequential,
    assets,
    prompt_of,
    served_model,
)

from loralag import open_library
from loralag.serve import app as serve_mod
from loralag.serve import endpoints
from loralag.serve import requests as serve_requests
from loralag.serve import sampling as serve_sampling
from loralag.serve.app import create_app, warn_if_exposed

KEY = "s3cret-key"
LIMIT = 2 * 2**20


def raw(server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


@pytest.fixture(scope="module")
def server(assets):  # noqa: F811
    model, tok = served_model(assets)
    libs = [open_library(assets / "alpha"), open_library(assets / "beta")]
    app = create_app(
        model, tok, libs, router="lag", k=2, max_batch=16, model_name=MODEL, body_timeout=1.5, default_max_tokens=8
    )
    srv = Server(app, header_timeout=1.0, keep_alive=1)
    yield srv
    srv.stop()


def completion(prompt, **kw):
    return {"model": MODEL, "prompt": prompt, "max_tokens": 10, "temperature": 0, **kw}


# -- 1. isolation ---------------------------------------------------------------------------------------------------
def test_a_tiny_temperature_beside_greedy_requests(server):
    """The issue's case: temperature 1e-300 (its probabilities turned NaN) beside four greedy requests: all five
    answered 500. Now the tiny temperature samples the argmax, and the others are untouched."""
    requests = [("completion", prompt_of(i), i % 2 == 0, None) for i in range(4)]
    alone = _sequential(server, requests)

    async def together():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            tiny = c.post("/v1/completions", json=completion(prompt_of(0), max_tokens=12, temperature=1e-300, seed=1))
            return await asyncio.gather(tiny, _concurrent(server, requests))

    tiny, others = asyncio.run(together())
    assert others == alone
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == alone[0]  # the limit of sampling as temperature -> 0: greedy
    assert server.metric("loralag_engine_errors_total") == 0


@pytest.fixture
def poison(server, monkeypatch):
    """Requests with seed 666 get NaN logits from their `after`-th token on (0: the prefill's)."""
    engine = server.app.state.ctx.engine
    real = engine._sample
    after = {"n": 0}

    def sample(logits, seqs):
        for i, s in enumerate(seqs):
            if s.req.sampling.seed == 666 and len(s.tokens) >= after["n"]:
                logits[i, 5] = float("nan")
        return real(logits, seqs)

    monkeypatch.setattr(engine, "_sample", sample)
    return after


@pytest.mark.parametrize("after", [0, 3])
@pytest.mark.parametrize("stream", [False, True])
def test_nan_logits_end_their_request_alone(server, poison, after, stream):
    poison["n"] = after
    requests = [("chat" if i % 2 else "completion", prompt_of(10 + i), i % 3 == 0, None) for i in range(6)]
    alone = _sequential(server, requests)
    failures = server.metric("loralag_request_errors_total", code="numerical_error")
    bad = completion(prompt_of(1), max_tokens=12, temperature=0.7, seed=666, stream=stream, ignore_eos=True)

    async def together():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return await asyncio.gather(c.post("/v1/completions", json=bad), _concurrent(server, requests))

    r, others = asyncio.run(together())
    assert others == alone  # the same answers as alone
    if stream and after > 0:  # the stream had started: it ends with the error event
        assert r.status_code == 200
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        err = json.loads(events[-2])["error"]
    else:
        err = _check_error(r, 500)
    assert err["code"] == "numerical_error" and "other requests are not affected" in err["message"]
    assert "Traceback" not in r.text
    assert server.metric("loralag_request_errors_total", code="numerical_error") == failures + 1
    assert server.metric("loralag_engine_errors_total") == 0
    assert server.healthy() and server.http.get("/health").json()["running"] == 0


def test_a_failed_sampling_ends_its_request_alone(server, monkeypatch):
    real = serve_sampling.draw

    def draw(logits, sp, generator):
        if sp.seed == 777:
            raise RuntimeError("invalid multinomial distribution")
        return real(logits, sp, generator)

    monkeypatch.setattr(serve_sampling, "draw", draw)
    requests = [("completion", prompt_of(20 + i), False, None) for i in range(4)]
    alone = _sequential(server, requests)

    async def together():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            bad = completion("who", temperature=1.0, seed=777, n=3)
            return await asyncio.gather(c.post("/v1/completions", json=bad), _concurrent(server, requests))

    r, others = asyncio.run(together())
    assert others == alone
    err = _check_error(r, 500)
    assert err["code"] == "sampling_error" and "invalid multinomial" in err["message"]
    assert server.http.get("/health").json()["running"] == 0  # its two sibling sequences ended too


@pytest.mark.parametrize(
    "raw,param",
    [
        (b'{"model": "tiny-llama", "prompt": "who", "temperature": NaN}', None),
        (b'{"model": "tiny-llama", "prompt": "who", "top_p": Infinity}', None),
        (b'{"model": "tiny-llama", "prompt": "who", "temperature": -Infinity}', None),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": -1e-9}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.0000001}, "top_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"),
        ({"logit_bias": {"5": 1e9}}, "logit_bias"),
    ],
)
def test_sampling_values_are_checked_before_tokenising(server, monkeypatch, raw, param):
    calls = []
    monkeypatch.setattr(endpoints, "completion_prompts", lambda *a: calls.append(a) or [[5]])
    if isinstance(raw, bytes):
        r = server.http.post("/v1/completions", content=raw, headers={"content-type": "application/json"})
        err = _check_error(r, 400)
        assert "not a JSON value" in err["message"]
    else:
        err = _check_error(server.http.post("/v1/completions", json=completion("who", **raw)), 400, param)
        assert err["code"] == "invalid_value"
    assert calls == []


@pytest.mark.parametrize(
    "raw,what",
    [
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (b'{"model": "tiny-llama", "prompt": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}", "nested too deeply"),
        (b'{"model": "tiny-llama", "prompt": "who \\ud800 is"}', "lone UTF-16 surrogate"),
        (b'{"model": "tiny-llama", "messages": [{"role": "user", "content": "\\udfff"}]}', "lone UTF-16 surrogate"),
        (b'{"model": "tiny-llama", "prompt": "who", "stop": ["\\ud83d"]}', "lone UTF-16 surrogate"),
    ],
)
def test_pathological_json_is_a_400(server, raw, what):
    path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
    r = server.http.post(path, content=raw, headers={"content-type": "application/json"})
    assert what in _check_error(r, 400)["message"]
    # a surrogate pair is one character: served
    ok = server.http.post(
        "/v1/completions",
        content=b'{"model": "tiny-llama", "prompt": "who \\ud83d\\ude00", "max_tokens": 2}',
        headers={"content-type": "application/json"},
    )
    assert ok.status_code == 200
    assert server.healthy()


# -- 2. bounded resources ------------------------------------------------------------------------------------------
def _read_response(sock: socket.socket, timeout: float = 10.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


@pytest.mark.parametrize("chunked", [True, False])
def test_the_body_limit_applies_while_the_body_streams_in(server, chunked):
    """Refused at the limit, not after reading everything: the client is told 413 long before it has sent 64 MiB."""
    sock = raw(server)
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    total = 64 * 2**20
    if chunked:
        head += "Transfer-Encoding: chunked\r\n\r\n"
    else:
        head += f"Content-Length: {total}\r\nExpect: nothing\r\n\r\n"
    sock.sendall(head.encode())
    piece = b"[" + b"1," * 32767 + b"1"
    frame = (f"{len(piece):x}\r\n".encode() + piece + b"\r\n") if chunked else piece
    sent = 0
    sock.settimeout(0.5)
    if not chunked:  # a declared length over the limit is refused before a byte of the body is read
        response = _read_response(sock)
    else:
        response = b""
        try:
            while sent < total:
                sock.sendall(frame)
                sent += len(piece)
        except (TimeoutError, BrokenPipeError, ConnectionResetError):
            pass
        response = _read_response(sock)
    sock.close()
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < total / 2, sent
    assert server.metric("loralag_rejected_requests_total", code="request_too_large") >= 1
    assert server.healthy()


def test_a_body_a_little_over_the_limit_gets_its_413(server):
    """The rest of a refused body is read and dropped (up to 8 MiB, 2 s), so a client that sends it all and then
    reads still finds its 413 instead of a connection reset by unread data."""

    def chunks():
        for _ in range(48):
            yield b"1," * 32768  # 3 MiB, chunked

    for _ in range(5):
        for content in (chunks(), b"1" * (LIMIT + 100_000)):
            r = server.http.post("/v1/completions", content=content, headers={"content-type": "application/json"})
            assert _check_error(r, 413)["code"] == "request_too_large"


def test_prompts_longer_than_the_context_are_refused_before_validation_or_tokenising(server, monkeypatch):
    ctx = server.app.state.ctx
    parsed, tokenised = [], []
    real_parse = serve_requests.validate
    monkeypatch.setattr(serve_requests, "validate", lambda *a: parsed.append(1) or real_parse(*a))
    monkeypatch.setattr(endpoints, "completion_prompts", lambda *a: tokenised.append(1) or [[5]])
    monkeypatch.setattr(endpoints, "chat_prompt", lambda *a: tokenised.append(1) or [5])
    chars = ctx.max_prompt_chars
    assert chars < LIMIT
    cases = [
        ("/v1/completions", completion([7] * CONTEXT), "prompt"),
        ("/v1/completions", completion([[7] * 3, [7] * (CONTEXT + 5)]), "prompt"),
        ("/v1/completions", completion("the " * (chars // 4 + 1)), "prompt"),
        ("/v1/completions", completion(["who", "x" * (chars + 1)]), "prompt"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "the " * (chars // 8 + 1)}] * 2},
            "messages",
        ),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": ""}] * (CONTEXT + 1)},
            "messages",
        ),
    ]
    for path, body, param in cases:
        err = _check_error(server.http.post(path, json=body), 400, param)
        assert err["code"] == "context_length_exceeded"
    too_many = _check_error(server.http.post("/v1/completions", json=completion(["who"] * 17)), 400, "prompt")
    assert "at most 16" in too_many["message"]
    assert parsed == [] and tokenised == []


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_health_answers_while_the_largest_bodies_are_read(server):
    """Bodies just under the 2 MiB limit, each the worst case of its kind for the parser, the validation or the
    tokenizer, sent back to back from three threads while /health is polled."""
    ids = b'{"model": "tiny-llama", "prompt": [' + b",".join([b"0"] * (LIMIT // 2 - 40)) + b"]}"
    objects = b'{"model": "tiny-llama", "prompt": "who", "junk": [' + b",".join([b"{}"] * (LIMIT // 3 - 40)) + b"]}"
    text = json.dumps(completion("the " * ((server.app.state.ctx.max_prompt_chars - 8) // 4), max_tokens=1)).encode()
    messages = json.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "a"}] * (CONTEXT - 1), "max_tokens": 1}
    ).encode()
    bodies = [ids, objects, text, messages]
    assert all(len(b) <= LIMIT for b in bodies), [len(b) for b in bodies]
    stop, statuses = threading.Event(), []
    before = _rss()

    def hammer(i):
        with httpx.Client(base_url=server.url, timeout=120) as c:
            while not stop.is_set():
                body = bodies[i % len(bodies)]
                path = "/v1/chat/completions" if b'"messages"' in body[:40] else "/v1/completions"
                statuses.append(c.post(path, content=body, headers={"content-type": "application/json"}).status_code)
                i += 1

    def poll(seconds: float) -> list[float]:
        waits = []
        with httpx.Client(base_url=server.url, timeout=30) as c:
            t_end = time.monotonic() + seconds
            while time.monotonic() < t_end:
                t0 = time.perf_counter()
                assert c.get("/health").status_code == 200
                waits.append(time.perf_counter() - t0)
                time.sleep(0.05)
        return sorted(waits)

    idle = poll(2)
    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    waits = poll(12)
    stop.set()
    for t in threads:
        t.join(120)
    grown = _rss() - before
    median, idle_median = waits[len(waits) // 2], idle[len(idle) // 2]
    print(
        f"/health idle: median {idle_median * 1000:.1f} ms, max {idle[-1] * 1000:.1f} ms; during 2 MiB bodies: "
        f"{len(waits)} polls, median {median * 1000:.1f} ms, max {waits[-1] * 1000:.1f} ms; {len(statuses)} bodies "
        f"({sorted(set(statuses))}); RSS +{grown / 2**20:.0f} MiB"
    )
    assert len(statuses) >= 3 and set(statuses) <= {200, 400}
    # latency is measured, not asserted (a shared machine's load moves it): benchmarks/load_test.py reports it
    assert grown < 400 * 2**20


@pytest.mark.parametrize("step", ["read_request", "completion_prompts"])
def test_health_answers_while_a_request_is_parsed_or_tokenised(server, monkeypatch, step):
    """The parse (JSON, validation) and the tokenising of a request run off the event loop: held there on purpose,
    they leave /health answering. On the loop, /health would wait for them (and time out here)."""
    entered, release = threading.Event(), threading.Event()
    original = getattr(endpoints, step)

    def held(*args):
        entered.set()
        release.wait(30)
        return original(*args)

    monkeypatch.setattr(endpoints, step, held)
    answer = {}
    thread = threading.Thread(
        target=lambda: answer.update(r=server.http.post("/v1/completions", json=completion("who")))
    )
    thread.start()
    try:
        assert entered.wait(30), f"{step} was not reached"
        with httpx.Client(base_url=server.url, timeout=5) as c:
            assert c.get("/health").json()["status"] == "ok"
    finally:
        release.set()
        thread.join(60)
    assert answer["r"].status_code == 200, answer["r"].text


def test_slow_headers_are_cut_off(server):
    sock = raw(server)  # connects, sends nothing
    t0 = time.monotonic()
    assert _read_response(sock, 10) == b"" and time.monotonic() - t0 < 8  # 1 s, with slack for a busy machine
    sock.close()
    sock = raw(server)  # a byte at a time, each before the previous would time out a keep-alive
    t0 = time.monotonic()
    sock.settimeout(5)
    closed = False
    for b in b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 50:
        try:
            sock.sendall(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        time.sleep(0.1)
        if time.monotonic() - t0 > 8:
            break
    if not closed:
        assert _read_response(sock, 2) == b""
    assert time.monotonic() - t0 < 8
    sock.close()
    assert server.healthy()


def test_slow_bodies_get_408_and_idle_connections_close(server):
    sock = raw(server)
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 500\r\n"
        b'\r\n{"model": '
    )
    t0 = time.monotonic()
    response = _read_response(sock, 10)
    assert response.startswith(b"HTTP/1.1 408") and 1.0 < time.monotonic() - t0 < 9, response[:200]
    sock.close()
    assert server.metric("loralag_rejected_requests_total", code="body_timeout") >= 1
    # keep-alive: an idle connection after a full answer is closed after about a second
    sock = raw(server)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _read_response(sock).startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    sock.settimeout(5)
    rest = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    assert time.monotonic() - t0 < 8
    sock.close()


# -- 3. the API key ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(assets):  # noqa: F811
    model, tok = served_model(assets)
    return lambda **kw: create_app(model, tok, model_name=MODEL, api_key=KEY, **kw)


def test_the_api_key_guards_everything_but_health(keyed, monkeypatch):
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    with TestClient(keyed()) as c:
        for method, path in [
            ("GET", "/v1/models"),
            ("GET", f"/v1/models/{MODEL}"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/chat/completions"),
            ("GET", "/metrics"),
            ("GET", "/openapi.json"),
            ("GET", "/v1/nowhere"),
        ]:
            r = c.request(method, path, json={"model": MODEL, "prompt": "who", "max_tokens": 2})
            err = _check_error(r, 401)
            assert err["code"] is None and "didn't provide an API key" in err["message"]
            assert r.headers["www-authenticate"] == "Bearer"
            for header in (f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", f"Basic {KEY}", "Bearer", KEY):
                err = _check_error(c.request(method, path, headers={"Authorization": header}), 401)
                assert err["code"] == "invalid_api_key"
        assert compared  # the comparison is hmac's, in constant time
        assert c.get("/health").status_code == 200
        good = {"Authorization": f"Bearer {KEY}"}
        assert c.get("/v1/models", headers=good).json()["data"][0]["id"] == MODEL
        assert c.get("/metrics", headers=good).status_code == 200
        assert c.get("/openapi.json", headers=good).json()["paths"]["/v1/completions"]["post"]["requestBody"]
        r = c.post(
            "/v1/completions",
            headers={"authorization": f"bearer {KEY}"},
            json={"model": MODEL, "prompt": "who", "max_tokens": 2, "temperature": 0},
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
        assert 'loralag_rejected_requests_total{code="invalid_api_key"}' in c.get("/metrics", headers=good).text
    with TestClient(keyed(metrics_public=True)) as c:
        assert c.get("/metrics").status_code == 200
        _check_error(c.get("/v1/models"), 401)


def test_the_openai_client_with_and_without_the_key(keyed):
    srv = Server(keyed())
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        assert (
            client.completions.create(model=MODEL, prompt="who", max_tokens=2, temperature=0).choices[0].text
            is not None
        )
        wrong = openai.OpenAI(base_url=srv.url + "/v1", api_key="guess", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError) as e:
            wrong.models.list()
        assert e.value.code == "invalid_api_key"
    finally:
        srv.stop()


def test_serve_reads_the_key_from_the_environment_and_warns_when_exposed(assets, monkeypatch):  # noqa: F811
    assert warn_if_exposed("0.0.0.0", None) and "LORALAG_API_KEY" in warn_if_exposed("::", None)
    assert warn_if_exposed("0.0.0.0", KEY) is None and warn_if_exposed("127.0.0.1", None) is None
    assert warn_if_exposed("localhost", None) is None
    started = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **k: started.append(self.config))
    monkeypatch.setenv("LORALAG_API_KEY", KEY)
    serve_mod.serve(str(assets / "model"), host="127.0.0.1", port=0)
    monkeypatch.delenv("LORALAG_API_KEY")
    with pytest.warns(UserWarning, match="without an API key"):
        serve_mod.serve(str(assets / "model"), host="0.0.0.0", port=0)
    keyed_config, open_config = started
    assert keyed_config.timeout_keep_alive == serve_mod.KEEP_ALIVE_S and keyed_config.limit_concurrency
    with TestClient(keyed_config.app) as c:
        _check_error(c.get("/v1/models"), 401)
        assert c.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    with TestClient(open_config.app) as c:
        assert c.get("/v1/models").status_code == 200
    with pytest.raises(ValueError, match="API key"):
        create_app(torch.nn.Linear(1, 1), None, api_key="")
