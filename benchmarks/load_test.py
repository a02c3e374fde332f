"""A load test of `loralag serve` with malformed and poisoned requests mixed in (issue 16).

    python benchmarks/load_test.py                     # 64 clients for 150 s, a tiny random llama + 8 adapters
    python benchmarks/load_test.py --duration 300 --clients 64 --bad-share 0.3

The server runs as `loralag.serve.app.serve()` in a subprocess (its own uvicorn configuration, an API key), on
127.0.0.1. Each client sends one request after another for --duration seconds. A well-formed request is a greedy
completion or chat completion (streamed or not) of one of 16 prompts: its answer must equal the one the server
gave that prompt alone before the load started. The others (--bad-share of all) are malformed or poisoned, each
with the status it must get:

    temperature 1e-300 (greedy's answer, 200)      NaN / Infinity in the body (400)     100,000-deep JSON (400)
    a lone surrogate (400)                         wrong types (400)                    a prompt over the context (400)
    a 3 MiB body, chunked (413)                    no or a wrong API key (401)           an unknown adapter (404)
    seeded sampling at temperature 1.5 (200)       a client that hangs up mid-stream    a body that stalls (408)

/health is polled every 0.25 s meanwhile (its latency), and the server's RSS sampled. The server runs on
--threads torch threads (default 1). Prints a summary and writes
it as JSON to --out (default benchmarks/results/load_test.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

KEY = "load-test-key"
PROMPTS = [
    f"{a} {b}"
    for a in ("What is", "Who wrote", "Explain", "Name")
    for b in ("the sun ?", "a river .", "Hamlet ?", "a cat .")
]
BAD_KINDS = [
    "tiny_temperature",
    "nan",
    "deep",
    "surrogate",
    "types",
    "too_long",
    "huge",
    "no_key",
    "wrong_key",
    "unknown_adapter",
    "sampled",
    "hang_up",
    "stall",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, in KiB."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                fields[line.split(":")[0]] = int(line.split()[1])
    return fields.get("VmRSS", 0), fields.get("VmHWM", 0)


def prepare(folder: Path) -> tuple[str, str]:
    """A tiny random llama (bench_serve's) and a library of 8 random adapters for it."""
    from bench_serve import build_small_library, tiny_model_and_tokenizer
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_and_tokenizer(folder / "model")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    build_small_library(model, folder / "lib", n=8, rank=4, targets=["q_proj", "v_proj", "up_proj"], std=0.3)
    return model_dir, str(folder / "lib")


def start_server(model_dir: str, lib: str, port: int, threads: int) -> subprocess.Popen:
    code = (
        f"import torch; torch.set_num_threads({threads}); "
        f"from loralag.serve.app import serve; serve({model_dir!r}, [{lib!r}], port={port}, api_key={KEY!r}, "
        f"max_batch=16, max_queue=256, request_timeout=60, log_level='error', body_timeout=3.0, model_name='m')"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start")


def good_request(rng: random.Random, i: int) -> tuple[str, dict]:
    p = PROMPTS[i]
    if rng.random() < 0.5:
        return "/v1/completions", {"model": "m", "prompt": p, "max_tokens": 12, "temperature": 0}
    return "/v1/chat/completions", {
        "model": "m",
        "messages": [{"role": "user", "content": p}],
        "max_tokens": 12,
        "temperature": 0,
    }


def answer_text(path: str, data: dict) -> str:
    choice = data["choices"][0]
    return choice["message"]["content"] if "chat" in path else choice["text"]


async def post(client: httpx.AsyncClient, path: str, body: dict, stream: bool) -> tuple[int, str | None]:
    """(status, the answer's text) for a request, streamed or not."""
    if not stream:
        r = await client.post(path, json=body)
        return r.status_code, answer_text(path, r.json()) if r.status_code == 200 else None
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, None
        text = ""
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return 500, None
            for c in event["choices"]:
                text += (c.get("delta") or {}).get("content") or c.get("text") or ""
        return 200, text


async def raw_exchange(port: int, head: bytes, body_parts: list[bytes], stall: float = 0.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        for part in body_parts:
            writer.write(part)
            await writer.drain()
        if stall:
            await asyncio.sleep(stall)
        return await asyncio.wait_for(reader.read(200), 30)
    except (ConnectionError, asyncio.TimeoutError):
        return b""
    finally:
        writer.close()


async def bad_request(kind: str, client: httpx.AsyncClient, port: int, rng: random.Random, reference: dict):
    """Send one bad request of `kind`; returns (expected status, got status)."""
    i = rng.randrange(len(PROMPTS))
    path, body = good_request(rng, i)
    raw = None
    if kind == "tiny_temperature":
        status, text = await post(client, path, {**body, "temperature": 1e-300}, rng.random() < 0.5)
        return 200, status if text == reference[(path, i)] else f"{status}-wrong-text"
    if kind == "sampled":
        status, _ = await post(client, path, {**body, "temperature": 1.5, "seed": rng.randrange(10**6)}, False)
        return 200, status
    if kind == "nan":
        raw = json.dumps(body).replace('"temperature": 0', '"temperature": NaN').encode()
    elif kind == "deep":
        raw = b"[" * 100000 + b"]" * 100000
    elif kind == "surrogate":
        raw = json.dumps(body).replace("?", "\\ud800").replace(".", "\\udc00").encode()
    elif kind == "types":
        raw = json.dumps({**body, "max_tokens": "12", "n": True}).encode()
    elif kind == "too_long":
        raw = json.dumps({"model": "m", "prompt": [5] * 3000, "max_tokens": 1}).encode()
    elif kind == "unknown_adapter":
        raw = json.dumps({**body, "adapters": "adapter999"}).encode()
    if raw is not None:
        r = await client.post(path, content=raw, headers={"content-type": "application/json"})
        return {"unknown_adapter": 404}.get(kind, 400), r.status_code
    if kind in ("no_key", "wrong_key"):
        headers = {"Authorization": "Bearer nope"} if kind == "wrong_key" else {"Authorization": ""}
        r = await client.post(path, json=body, headers=headers)
        return 401, r.status_code
    if kind == "huge":
        piece = b"1," * 32768
        chunks = [f"{len(piece):x}\r\n".encode() + piece + b"\r\n"] * 48  # 3 MiB
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        ).encode()
        start = b'{"model": "m", "prompt": ['
        answer = await raw_exchange(port, head, [f"{len(start):x}\r\n".encode() + start + b"\r\n", *chunks])
        return 413, int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else "closed"
    if kind == "stall":
        data = json.dumps(body).encode()
        head = (
            f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n"
        ).encode()
        answer = await raw_exchange(port, head, [data[: len(data) // 2]])
        return 408, int(answer[9:12]) if answer.startswith(b"HTTP/1.1 ") else "closed"
    if kind == "hang_up":
        async with client.stream(
            "POST", path, json={**body, "stream": True, "max_tokens": 200, "ignore_eos": True}
        ) as r:
            async for _ in r.aiter_lines():
                break
        return "gone", "gone"
    raise ValueError(kind)


async def run_load(port: int, clients: int, duration: float, bad_share: float, seed: int) -> dict:
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {KEY}"}
    limits = httpx.Limits(max_connections=clients * 2, max_keepalive_connections=clients * 2)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=120, limits=limits) as client:
        reference = {}
        for i in range(len(PROMPTS)):  # each prompt alone first: the answers the load must reproduce
            for path, body in (good_request(random.Random(0), i), good_request(random.Random(3), i)):
                status, text = await post(client, path, body, False)
                assert status == 200, (status, path)
                reference[(path, i)] = text
        counts: Counter = Counter()
        wrong: list = []
        latencies: list[float] = []
        health: list[float] = []
        t_end = time.monotonic() + duration

        async def worker(w: int):
            rng = random.Random(seed * 1000 + w)
            while time.monotonic() < t_end:
                if rng.random() >= bad_share:
                    i = rng.randrange(len(PROMPTS))
                    path, body = good_request(rng, i)
                    t0 = time.perf_counter()
                    try:
                        status, text = await post(client, path, body, rng.random() < 0.5)
                    except httpx.HTTPError as e:
                        status, text = type(e).__name__, None
                    latencies.append(time.perf_counter() - t0)
                    counts["good"] += 1
                    if status == 200 and text == reference[(path, i)]:
                        counts["good_correct"] += 1
                    else:
                        counts["good_failed"] += 1
                        wrong.append(("good", path, i, status))
                else:
                    kind = rng.choice(BAD_KINDS)
                    try:
                        want, got = await bad_request(kind, client, port, rng, reference)
                    except httpx.HTTPError as e:
                        want, got = "answer", type(e).__name__
                    counts["bad"] += 1
                    counts[f"bad:{kind}"] += 1
                    if want == got:
                        counts["bad_as_expected"] += 1
                    else:
                        counts["bad_unexpected"] += 1
                        wrong.append((kind, want, got))

        async def monitor():
            async with httpx.AsyncClient(base_url=base, timeout=30) as h:
                while time.monotonic() < t_end:
                    t0 = time.perf_counter()
                    r = await h.get("/health")
                    health.append(time.perf_counter() - t0 if r.status_code == 200 else float("inf"))
                    await asyncio.sleep(0.25)

        t0 = time.monotonic()
        await asyncio.gather(monitor(), *(worker(w) for w in range(clients)))
        wall = time.monotonic() - t0
        metrics = (await client.get("/metrics")).text
    latencies.sort()
    health.sort()
    pct = lambda xs, q: round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 1) if xs else None  # noqa: E731
    five = sum(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("loralag_requests_total{") and 'status="5' in line
    )
    return {
        "wall_s": round(wall, 1),
        "requests": counts["good"] + counts["bad"],
        **dict(counts),
        "server_5xx": five,
        "engine_errors": next(
            (
                float(line.split()[-1])
                for line in metrics.splitlines()
                if line.startswith("loralag_engine_errors_total ")
            ),
            0.0,
        ),
        "good_latency_ms": {"p50": pct(latencies, 0.5), "p99": pct(latencies, 0.99), "max": pct(latencies, 1.0)},
        "health_ms": {"polls": len(health), "p50": pct(health, 0.5), "p99": pct(health, 0.99), "max": pct(health, 1.0)},
        "unexpected": wrong[:20],
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=150.0)
    ap.add_argument("--bad-share", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the server (on a machine shared with other "
        "jobs, more OpenMP threads than free cores make every step wait for a descheduled thread)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results" / "load_test.json")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, lib = prepare(Path(tmp))
        port = free_port()
        server = start_server(model_dir, lib, port, args.threads)
        try:
            rss0 = rss_kib(server.pid)[0]
            samples = []

            async def sample_rss():
                while server.poll() is None:
                    samples.append(rss_kib(server.pid)[0])
                    await asyncio.sleep(1.0)

            async def both():
                sampler = asyncio.create_task(sample_rss())
                try:
                    return await run_load(port, args.clients, args.duration, args.bad_share, args.seed)
                finally:
                    sampler.cancel()

            summary = asyncio.run(both())
            rss1, hwm = rss_kib(server.pid)
            summary["server_rss_mib"] = {
                "before": round(rss0 / 1024),
                "max_sampled": round(max(samples) / 1024),
                "after": round(rss1 / 1024),
                "peak": round(hwm / 1024),
            }
            summary["healthy_after"] = httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
        finally:
            server.terminate()
            server.wait(30)
    summary["settings"] = {
        "clients": args.clients,
        "duration_s": args.duration,
        "bad_share": args.bad_share,
        "threads": args.threads,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


if __name__ == "__main__":
    main()
