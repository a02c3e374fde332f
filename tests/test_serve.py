"""`loralag serve` end to end: a real uvicorn server on 127.0.0.1 with a tiny llama and two small libraries,
driven by the official openai client (plain, streaming, chat), raw httpx for bad input, and concurrency checks:
continuous batching must give exactly the one-at-a-time outputs."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from conftest import TINY_LLAMA, save_lora
from prometheus_client.parser import text_string_to_metric_families
from tiny_text import WORDS, tiny_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

from loralag import attach, build_library, open_library
from loralag.generate import generate
from loralag.library.store import module_shapes
from loralag.models import load_model
from loralag.serve.app import create_app, server_config
from loralag.serve.sampling import holdback

MODEL = "tiny-llama"
CONTEXT = 4096  # long enough that a request can run for seconds (timeouts, disconnects)
PLAIN_WORDS = [w for w in WORDS if w.isalpha()]


def tiny_long_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **{**TINY_LLAMA, "max_position_embeddings": CONTEXT},
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A saved tiny model folder (with tokenizer and chat template) and two libraries built for it."""
    tmp = tmp_path_factory.mktemp("serve")
    model = tiny_long_llama()
    model.save_pretrained(tmp / "model")
    tiny_tokenizer(chat=True).save_pretrained(tmp / "model")
    shapes = module_shapes(model)
    for i in range(3):
        save_lora(model, tmp / "ad_alpha" / f"a{i}", seed=i, target_modules=("q_proj", "v_proj", "gate_proj"))
    for i in range(2):
        save_lora(model, tmp / "ad_beta" / f"b{i}", seed=10 + i, target_modules=("o_proj", "up_proj"))
    save_lora(model, tmp / "ad_beta" / "a0", seed=20, target_modules=("o_proj",))  # same name as alpha's a0
    build_library(tmp / "alpha", [tmp / "ad_alpha"], base_model="tiny", shapes=shapes, progress=False)
    build_library(tmp / "beta", [tmp / "ad_beta"], base_model="tiny", shapes=shapes, progress=False)
    return tmp


class Server:
    """uvicorn in a thread on a free port of 127.0.0.1, configured as `loralag serve` runs it (`config`: options)."""

    def __init__(self, app, **config):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(
            server_config(app, port=self.port, log_level="warning", timeout_graceful_shutdown=2, **config)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=60)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=60)

    def aclient(self):
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=120)

    def stop(self):
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)

    def metric(self, name: str, **labels) -> float:
        """The sample `name{labels}` of /metrics as prometheus_client's parser reads it (0 when absent)."""
        want = {k: str(v) for k, v in labels.items()}
        for family in text_string_to_metric_families(self.http.get("/metrics").text):
            for sample in family.samples:
                if sample.name == name and sample.labels == want:
                    return sample.value
        return 0.0

    def healthy(self) -> bool:
        r = self.http.get("/health")
        return r.status_code == 200 and r.json()["status"] == "ok"


def served_model(assets):
    model, tok = load_model(str(assets / "model"))
    return model, tok


@pytest.fixture(scope="module")
def server(assets):
    model, tok = served_model(assets)
    libs = [open_library(assets / "alpha"), open_library(assets / "beta")]
    srv = Server(create_app(model, tok, libs, router="lag", k=2, max_batch=16, max_queue=64, model_name=MODEL))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def small_server(assets):
    """One sequence at a time, one waiting, 1.5 s per request: for 429, time limits and disconnects."""
    model, tok = served_model(assets)
    srv = Server(
        create_app(
            model,
            tok,
            [open_library(assets / "alpha")],
            k=2,
            max_batch=1,
            max_queue=1,
            request_timeout=1.5,
            model_name=MODEL,
        )
    )
    yield srv
    srv.stop()


def prompt_of(i: int) -> str:
    rng = random.Random(i)
    return " ".join(rng.choice(PLAIN_WORDS) for _ in range(2 + i % 11))


# -- the happy path -------------------------------------------------------------------------------------------
def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    card = server.http.get("/v1/models").json()["data"][0]
    assert card["max_model_len"] == CONTEXT
    assert [(lib["name"], lib["adapters"]) for lib in card["libraries"]] == [("alpha", 3), ("beta", 3)]
    assert server.http.get(f"/v1/models/{MODEL}").json()["id"] == MODEL
    health = server.http.get("/health").json()
    assert health["status"] == "ok" and health["max_batch"] == 16


def test_completion_plain_and_streaming(server):
    c = server.client
    r = c.completions.create(model=MODEL, prompt="what is the capital of the red moon ?", max_tokens=10, temperature=0)
    assert r.object == "text_completion" and len(r.choices) == 1
    text = r.choices[0].text
    assert text and r.choices[0].finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens == 9 and r.usage.completion_tokens <= 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    chunks = list(
        c.completions.create(
            model=MODEL,
            prompt="what is the capital of the red moon ?",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == r.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens and not chunks[-1].choices


def test_stream_is_server_sent_events_ending_with_done(server):
    body = {"model": MODEL, "prompt": "tell me about the sun", "max_tokens": 5, "temperature": 0, "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(e["object"] == "text_completion" for e in events)


def test_chat_plain_and_streaming(server):
    c = server.client
    messages = [{"role": "system", "content": "answer"}, {"role": "user", "content": "who is the blue sun ?"}]
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    assert r.object == "chat.completion"
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    # the prompt went through the model's chat template
    tok = tiny_tokenizer(chat=True)
    templated = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(tok(templated, add_special_tokens=False)["input_ids"])
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # content given as a list of text parts is the same conversation
    parts = [
        {"role": "system", "content": [{"type": "text", "text": "ans"}, {"type": "text", "text": "wer"}]},
        messages[1],
    ]
    assert (
        c.chat.completions.create(model=MODEL, messages=parts, max_tokens=8, temperature=0).choices[0].message.content
        == msg.content
    )


def test_greedy_output_equals_generate(server, assets):
    """The server's decoding (its own KV cache handling, routing per step) equals loralag.generate."""
    model, tok = served_model(assets)
    state = attach(model, [open_library(assets / "alpha"), open_library(assets / "beta")], router="lag", k=2)
    prompts = [prompt_of(i) for i in range(4)]
    routed = [generate(model, tok, [p], max_new_tokens=12)[0] for p in prompts]
    state.fix("alpha", ["a1"])
    state.set_router("beta", "none")
    fixed = generate(model, tok, [prompts[0]], max_new_tokens=12)[0]
    for p, want in zip(prompts, routed):
        got = server.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=12, temperature=0
        )
        assert got.choices[0].message.content.strip() == want
    got = server.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompts[0]}],
        max_tokens=12,
        temperature=0,
        extra_body={"adapters": {"alpha": "a1"}},
    )
    assert got.choices[0].message.content.strip() == fixed


# -- concurrency ------------------------------------------------------------------------------------------------
async def _concurrent(server, requests):
    async with server.aclient() as client:

        async def one(kind, prompt, stream, extra):
            if kind == "chat":
                args = dict(
                    model=MODEL,
                    messages=[{"role": "user", "content": prompt}],
                    max_tokens=12,
                    temperature=0,
                    extra_body=extra,
                )
                if not stream:
                    return (await client.chat.completions.create(**args)).choices[0].message.content
                out = await client.chat.completions.create(**args, stream=True)
                return "".join([ch.choices[0].delta.content or "" async for ch in out if ch.choices])
            args = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body=extra)
            if not stream:
                return (await client.completions.create(**args)).choices[0].text
            out = await client.completions.create(**args, stream=True)
            return "".join([ch.choices[0].text async for ch in out if ch.choices])

        return await asyncio.gather(*(one(*r) for r in requests))


def _sequential(server, requests):
    out = []
    for kind, prompt, _, extra in requests:
        if kind == "chat":
            r = server.client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=12,
                temperature=0,
                extra_body=extra,
            )
            out.append(r.choices[0].message.content)
        else:
            r = server.client.completions.create(
                model=MODEL, prompt=prompt, max_tokens=12, temperature=0, extra_body=extra
            )
            out.append(r.choices[0].text)
    return out


def test_32_concurrent_greedy_requests_equal_one_at_a_time(server):
    requests = [("chat" if i % 3 else "completion", prompt_of(i), i % 2 == 1, None) for i in range(32)]
    alone = _sequential(server, requests)
    assert len(set(alone)) > 8  # different prompts, different answers
    passes = server.metric("loralag_batch_size_count", kind="decode")
    seqs = server.metric("loralag_batch_size_sum", kind="decode")
    together = asyncio.run(_concurrent(server, requests))
    assert together == alone
    passes = server.metric("loralag_batch_size_count", kind="decode") - passes
    seqs = server.metric("loralag_batch_size_sum", kind="decode") - seqs
    assert seqs / passes > 2  # they really shared forward passes
    assert server.http.get("/health").json()["running"] == 0


def test_concurrent_requests_with_different_routing_equal_one_at_a_time(server):
    options = [
        None,
        {"adapters": "a1"},
        {"router": "arrow"},
        {"adapters": {"alpha": "a2", "beta": "b0"}},
        {"libraries": ["beta"]},
        {"router": "none"},
        {"k": 1},
        {"adapters": "beta/a0"},
        {"router": "arrow-mix", "k": 2},
        {"adapters": ["alpha/a0", "b1"]},
        {"router": "spectral"},
        {"adapters": "b1"},
    ]
    requests = [
        ("completion" if i % 2 else "chat", prompt_of(100 + i), i % 4 == 0, options[i % len(options)])
        for i in range(24)
    ]
    alone = _sequential(server, requests)
    together = asyncio.run(_concurrent(server, requests))
    assert together == alone


# -- sampling ---------------------------------------------------------------------------------------------------
def test_sampling_options(server):
    c = server.client
    prompt = "tell me about the green river"
    greedy = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0).choices[0].text
    a = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=1.5, seed=7, n=3)
    b = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=1.5, seed=7, n=3)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]  # seeded
    assert len({ch.text for ch in a.choices}) > 1  # each choice samples on its own
    assert 3 <= a.usage.completion_tokens <= 36
    # top_p so small that only the most likely token is left: greedy
    assert (
        c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=1.0, top_p=1e-6, seed=3)
        .choices[0]
        .text
        == greedy
    )
    # a list of prompts: n choices per prompt, in order
    r = c.completions.create(model=MODEL, prompt=[prompt, "who"], max_tokens=4, temperature=0, n=2)
    assert [ch.index for ch in r.choices] == [0, 1, 2, 3] and r.choices[0].text == r.choices[1].text
    # streamed choices interleave; each one's text is what the same seed gives without streaming
    messages = [{"role": "user", "content": prompt}]
    plain = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=1.2, seed=5, n=2)
    parts = {0: "", 1: ""}
    for ch in c.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=10, temperature=1.2, seed=5, n=2, stream=True
    ):
        for choice in ch.choices:
            parts[choice.index] += choice.delta.content or ""
    assert [parts[0], parts[1]] == [ch.message.content for ch in plain.choices]
    # token ids as the prompt
    ids = tiny_tokenizer()(prompt)["input_ids"]
    assert c.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0).choices[0].text == greedy


def test_stop_sequences(server):
    c = server.client
    prompt = "what is the capital of the red moon ?"
    full = c.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    words = full.choices[0].text.split(" ")
    assert len(words) > 3
    stop = " " + words[3]
    cut = full.choices[0].text[: full.choices[0].text.index(stop)]
    r = c.completions.create(
        model=MODEL, prompt=prompt, max_tokens=16, temperature=0, stop=[stop, "zzz"], extra_body={"ignore_eos": True}
    )
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(
        c.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=16,
            temperature=0,
            stop=stop,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(ch.choices[0].text for ch in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    # max_tokens ends with "length"
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_holdback_of_partial_stop_strings():
    assert holdback("hello wor", ["world"]) == 3
    assert holdback("hello", ["xyz"]) == 0
    assert holdback("ab\ufffd", []) == 1


# -- routing options --------------------------------------------------------------------------------------------
def test_routing_summary_and_options(server):
    c = server.client
    r = c.completions.create(
        model=MODEL, prompt="who is the moon", max_tokens=6, temperature=0, extra_body={"return_routing": True}
    )
    routing = r.model_extra["routing"]
    assert set(routing) == {"alpha", "beta"}
    alpha = routing["alpha"]
    assert alpha["router"] == "lag" and alpha["k"] == 2
    assert alpha["routed_tokens"] > 0 and abs(sum(alpha["shares"].values()) - 1) < 1e-4
    assert set(alpha["shares"]) <= {"a0", "a1", "a2"}
    assert r.choices[0].model_extra["routing"] == routing  # one choice: the same summary
    # tokens routed = (prompt + generated tokens fed back) × adapted modules (q, v, gate in 2 layers)
    fed = r.usage.prompt_tokens + r.usage.completion_tokens - 1
    assert alpha["routed_tokens"] == fed * 6
    # fixed adapter: every token of alpha goes to it; beta is off
    r = c.completions.create(
        model=MODEL,
        prompt="who is the moon",
        max_tokens=6,
        temperature=0,
        extra_body={"adapters": "a2", "return_routing": True},
    )
    routing = r.model_extra["routing"]
    assert routing["alpha"]["router"] == "fixed" and routing["alpha"]["shares"] == {"a2": 1.0}
    assert routing["beta"] == {"router": "none", "routed_tokens": 0, "adapters_used": 0, "shares": {}}
    # only one library
    r = c.completions.create(
        model=MODEL,
        prompt="who is the moon",
        max_tokens=6,
        temperature=0,
        extra_body={"libraries": ["beta"], "router": "arrow", "return_routing": True},
    )
    routing = r.model_extra["routing"]
    assert routing["alpha"]["router"] == "none" and routing["beta"]["router"] == "arrow"
    assert routing["beta"]["routed_tokens"] > 0
    # router "none" is the base model: the same as turning every library off by adapters={}
    base = (
        c.completions.create(
            model=MODEL, prompt="who is the moon", max_tokens=6, temperature=0, extra_body={"router": "none"}
        )
        .choices[0]
        .text
    )
    off = (
        c.completions.create(
            model=MODEL, prompt="who is the moon", max_tokens=6, temperature=0, extra_body={"adapters": {}}
        )
        .choices[0]
        .text
    )
    assert base == off
    # streaming: the last chunk of a choice carries its routing, a final chunk the whole request's
    chunks = list(
        c.completions.create(
            model=MODEL,
            prompt="who is the moon",
            max_tokens=4,
            temperature=0,
            stream=True,
            extra_body={"adapters": "b0", "return_routing": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].model_extra["routing"]["beta"]["shares"] == {"b0": 1.0}
    assert chunks[-2].choices[0].model_extra["routing"]["beta"]["shares"] == {"b0": 1.0}


def test_metrics_prometheus_text(server):
    server.client.completions.create(
        model=MODEL, prompt="the sun", max_tokens=3, temperature=0, extra_body={"adapters": "a1"}
    )
    r = server.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "loralag_requests_total",
        "loralag_prompt_tokens_total",
        "loralag_generation_tokens_total",
        "loralag_request_latency_seconds",
        "loralag_time_to_first_token_seconds",
        "loralag_queue_depth",
        "loralag_running_sequences",
        "loralag_adapter_routed_tokens_total",
    ):
        assert f"# TYPE {name} " in text
    assert server.metric("loralag_requests_total", endpoint="/v1/completions", status="200") >= 1
    assert server.metric("loralag_adapter_routed_tokens_total", library="alpha", adapter="a1") > 0
    assert server.metric("loralag_request_latency_seconds_count", endpoint="/v1/completions") >= 1
    assert server.metric("loralag_generation_tokens_total") > 0
    for line in text.splitlines():  # every sample line is `name{labels} number`
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[a-z_]+(\{[^}]*\})? [-+0-9.eInf]+", line), line


# -- bad input --------------------------------------------------------------------------------------------------
LONG = " ".join(["the"] * (CONTEXT + 10))
C, CH = "/v1/completions", "/v1/chat/completions"
OK = {"model": MODEL, "prompt": "who", "max_tokens": 2}
OKC = {"model": MODEL, "messages": [{"role": "user", "content": "who"}], "max_tokens": 2}
BAD = [
    # (path, body (raw bytes or dict), status, param)
    (C, b"{not json", 400, None),
    (C, b"", 400, None),
    (C, b"[1, 2]", 400, None),
    (CH, "\xff\xfe".encode("latin-1"), 400, None),
    (C, {**OK, "model": "gpt-4"}, 404, "model"),
    (CH, {**OKC, "model": "nope"}, 404, "model"),
    (C, {"prompt": "who"}, 400, "model"),
    (C, {"model": MODEL}, 400, "prompt"),
    (C, {**OK, "model": 3}, 400, "model"),
    (C, {**OK, "max_tokens": "5"}, 400, "max_tokens"),
    (C, {**OK, "max_tokens": 2.5}, 400, "max_tokens"),
    (C, {**OK, "temperature": "hot"}, 400, "temperature"),
    (C, {**OK, "stream": "yes"}, 400, "stream"),
    (C, {**OK, "n": True}, 400, "n"),
    (C, {**OK, "prompt": 42}, 400, "prompt"),
    (C, {**OK, "stop": [1, 2]}, 400, "stop"),
    (CH, {**OKC, "messages": "hi"}, 400, "messages"),
    (CH, {**OKC, "messages": [{"content": "hi"}]}, 400, "messages.[0].role"),
    (CH, {**OKC, "messages": [{"role": "user", "content": 5}]}, 400, "messages.[0].content"),
    (CH, {**OKC, "messages": []}, 400, "messages"),
    (CH, {**OKC, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.[0].role"),
    (CH, {**OKC, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages.[0].content"),
    (C, {**OK, "prompt": LONG}, 400, "prompt"),
    (CH, {**OKC, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    (C, {**OK, "max_tokens": 0}, 400, "max_tokens"),
    (C, {**OK, "max_tokens": -3}, 400, "max_tokens"),
    (C, {**OK, "max_tokens": CONTEXT}, 400, "max_tokens"),
    (CH, {**OKC, "max_completion_tokens": 10**9}, 400, "max_completion_tokens"),
    (C, {**OK, "temperature": 3.0}, 400, "temperature"),
    (C, {**OK, "top_p": 0}, 400, "top_p"),
    (C, {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (C, {**OK, "n": 0}, 400, "n"),
    (C, {**OK, "n": 17}, 400, "n"),
    (C, {**OK, "prompt": [5, 1000]}, 400, "prompt"),
    (C, {**OK, "logprobs": 3}, 400, "logprobs"),
    (CH, {**OKC, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    (C, {**OK, "adapters": "no-such-adapter"}, 404, "adapters"),
    (C, {**OK, "adapters": {"alpha": "b0"}}, 404, "adapters"),
    (C, {**OK, "adapters": {"gamma": "a0"}}, 404, "adapters"),
    (C, {**OK, "adapters": "a0"}, 400, "adapters"),  # in both libraries: ambiguous
    (C, {**OK, "adapters": ["a1", "a2"]}, 400, "adapters"),  # two for one library
    (C, {**OK, "adapters": 7}, 400, "adapters"),
    (C, {**OK, "libraries": ["gamma"]}, 404, "libraries"),
    (C, {**OK, "router": "magic"}, 400, "router"),
    (C, {**OK, "router": "fixed"}, 400, "adapters"),
    (C, {**OK, "k": 0}, 400, "k"),
    (C, {**OK, "k": "many"}, 400, "k"),
]


def _check_error(r, status, param=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "Traceback" not in r.text and 'File "' not in r.text
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{i}-{p[3] or 'body'}-{p[2]}" for i, p in enumerate(BAD)])
def test_bad_input_gets_an_openai_error(server, path, body, status, param):
    if isinstance(body, bytes):
        r = server.http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = server.http.post(path, json=body)
    _check_error(r, status, param)
    assert server.healthy()


def test_bad_input_leaves_the_server_serving(server):
    for path, body, _status, _ in BAD:
        if isinstance(body, bytes):
            server.http.post(path, content=body)
        else:
            server.http.post(
                path, json={**body, "stream": True} if isinstance(body, dict) and "stream" not in body else body
            )
    _check_error(server.http.get("/v1/nowhere"), 404)
    _check_error(server.http.get("/v1/completions"), 405)
    assert server.healthy()
    r = server.client.completions.create(model=MODEL, prompt="who", max_tokens=2, temperature=0)
    assert r.choices[0].text is not None
    assert server.metric("loralag_requests_total", endpoint="/v1/completions", status="400") >= 20
    assert server.metric("loralag_engine_errors_total") == 0
    # the openai client sees these as typed errors
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="gpt-4", prompt="who")
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model=MODEL, prompt=LONG, max_tokens=2)
    assert e.value.code == "context_length_exceeded"


# -- limits: queue, time, disconnects ---------------------------------------------------------------------------
def test_full_queue_answers_429(small_server):
    srv = small_server
    body = {"model": MODEL, "prompt": "who is the sun", "max_tokens": 40, "temperature": 0, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/completions", json=body) for _ in range(8)))

    responses = asyncio.run(burst())
    codes = sorted(r.status_code for r in responses)
    # one running and one waiting are admitted, the rest refused at once; an admitted one may still end in
    # 408 when a loaded machine keeps it past the 1.5 s limit (the time-limit tests below cover that answer)
    admitted = [c for c in codes if c != 429]
    assert codes.count(429) >= 1 and len(admitted) >= 2 and codes.count(200) >= 1, codes
    assert set(admitted) <= {200, 408}, codes
    err = _check_error(next(r for r in responses if r.status_code == 429), 429)
    assert err["code"] == "rate_limit_exceeded"
    texts = {r.json()["choices"][0]["text"] for r in responses if r.status_code == 200}
    assert len(texts) == 1  # the same greedy answer for each that ran
    assert srv.healthy()


def test_request_past_its_time_limit_is_ended(small_server):
    srv = small_server
    body = {"model": MODEL, "prompt": "who is the sun", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
    t0 = time.monotonic()
    err = _check_error(srv.http.post("/v1/completions", json=body), 408)
    assert err["code"] == "request_timeout" and time.monotonic() - t0 < 10
    # streaming: the stream carries the error event, then [DONE]
    with pytest.raises(openai.APIError) as e:
        for _ in srv.client.completions.create(
            model=MODEL,
            prompt=body["prompt"],
            max_tokens=3000,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        ):
            pass
    assert "time limit" in str(e.value)
    assert srv.healthy()
    assert srv.client.completions.create(model=MODEL, prompt="who", max_tokens=3, temperature=0).choices[0].text
    assert srv.metric("loralag_requests_total", endpoint="/v1/completions", status="408") >= 2


def _wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_client_disconnect_frees_its_slot(small_server):
    srv = small_server
    body = {"model": MODEL, "prompt": "who is the sun", "max_tokens": 3000, "temperature": 0, "ignore_eos": True}
    gone = srv.metric("loralag_requests_total", endpoint="/v1/completions", status="499")
    tokens = srv.metric("loralag_generation_tokens_total")
    # streaming: read two events, then hang up
    with httpx.Client(base_url=srv.url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    assert _wait_for(lambda: srv.metric("loralag_requests_total", endpoint="/v1/completions", status="499") == gone + 1)
    assert _wait_for(lambda: srv.http.get("/health").json()["running"] == 0)
    assert srv.metric("loralag_generation_tokens_total") - tokens < 1500  # it stopped long before 3000 tokens
    # the slot is free: the next request (max_batch=1) runs at once
    assert srv.client.completions.create(model=MODEL, prompt="who", max_tokens=3, temperature=0).choices[0].text
    # not streaming: the client gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json=body, timeout=0.4)
    assert _wait_for(lambda: srv.metric("loralag_requests_total", endpoint="/v1/completions", status="499") == gone + 2)
    assert _wait_for(lambda: srv.http.get("/health").json()["running"] == 0)
    assert srv.healthy()


def test_an_engine_failure_is_a_500_without_details_and_the_server_goes_on(small_server):
    srv = small_server
    engine = srv.app.state.ctx.engine

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    engine._forward = broken
    try:
        r = srv.http.post("/v1/completions", json={"model": MODEL, "prompt": "who", "max_tokens": 3})
    finally:
        del engine._forward
    err = _check_error(r, 500)
    assert err["type"] == "server_error" and "secret" not in r.text
    assert srv.metric("loralag_engine_errors_total") >= 1
    assert srv.healthy()
    assert srv.client.completions.create(model=MODEL, prompt="who", max_tokens=3, temperature=0).choices[0].text


def test_lag_prefix_per_request_equals_generate_alone_and_batched(server, assets):
    """lag-prefix keeps per-sequence counts across steps: the engine carries them with each sequence's KV cache,
    so its answers equal loralag.generate's, alone and batched with other routings joining and leaving."""
    model, tok = served_model(assets)
    attach(model, [open_library(assets / "alpha"), open_library(assets / "beta")], router="lag-prefix", k=2)
    prompts = [prompt_of(200 + i) for i in range(4)]
    want = [generate(model, tok, [p], max_new_tokens=12)[0] for p in prompts]
    extra = {"router": "lag-prefix"}
    got = [
        server.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=12, temperature=0, extra_body=extra
        )
        .choices[0]
        .message.content.strip()
        for p in prompts
    ]
    assert got == want
    requests = [("chat", prompts[i % 4], i % 2 == 0, extra if i % 3 else {"router": "lag"}) for i in range(12)]
    together = asyncio.run(_concurrent(server, requests))
    assert together == _sequential(server, requests)
    assert [t.strip() for t, r in zip(together, requests) if r[3] is extra] == [want[i % 4] for i in range(12) if i % 3]
