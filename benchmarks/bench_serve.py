"""Throughput and latency of `loralag serve` (continuous batching) against plain `generate`, one request at a time.

    python benchmarks/bench_serve.py                 # SmolLM2-135M (load_model("default")) + a small library
    python benchmarks/bench_serve.py --tiny          # a tiny random llama: a quick run of the whole pipeline

The same model, library and router serve both sides. The baseline calls `loralag.generate` for one prompt
at a time (batch 1, HF generate with its KV cache), in a thread of its own like the server's engine.
The server runs in this process (uvicorn in a thread)
and is driven by 1, 4 and 16 concurrent clients over HTTP, each sending its next request when the previous
one is answered. Every request is a chat completion of exactly --max-tokens tokens (ignore_eos / min_new_tokens),
greedy. Prints a markdown table (tokens/s, ratio to the baseline, latency percentiles) and writes it to
benchmarks/results/serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "Who wrote Hamlet?",
    "Give me three uses for a paperclip.",
    "What is the boiling point of water?",
    "Name a famous painting.",
    "How many legs does a spider have?",
    "What does a compiler do?",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "What is a prime number?",
    "Describe a cat in five words.",
    "What is the largest ocean?",
    "Who was Ada Lovelace?",
    "What is machine learning?",
    "Suggest a name for a dog.",
    "What causes rain?",
    "How does a bicycle stay upright?",
    "What is the speed of light?",
    "Define entropy.",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo, hi = int(pos), min(int(pos) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# -- model and library -----------------------------------------------------------------------------------------
def tiny_model_and_tokenizer(folder: Path):
    """A random tiny llama with a word-level tokenizer made offline (chat template included), saved to `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>"] + sorted({w.strip("?.,'").lower() for p in PROMPTS for w in p.split()})
    words += ["user", "assistant", ":", "?", "."]
    words += [f"w{i}" for i in range(512 - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="</s>", bos_token="<s>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
        "{% if add_generation_prompt %}<s> assistant : {% endif %}"
    )
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(words),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def build_small_library(model, out: Path, n: int, rank: int, targets: list[str], std: float):
    """`n` random PEFT LoRA adapters for `model`, aligned into a loralag library at `out`."""
    from peft import LoraConfig, get_peft_model

    from loralag import build_library
    from loralag.library.store import module_shapes

    folders = out.parent / "adapters"
    for i in range(n):
        torch.manual_seed(1000 + i)
        peft_model = get_peft_model(
            model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False)
        )
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, std)
        peft_model.save_pretrained(str(folders / f"adapter{i:03d}"))
        peft_model.unload()
    return build_library(out, [folders], base_model="bench", shapes=module_shapes(model), progress=False)


# -- the two sides -----------------------------------------------------------------------------------------------
def run_generate(model, tokenizer, prompts: list[str], max_tokens: int) -> dict:
    from loralag.generate import generate

    generate(model, tokenizer, prompts[:1], max_new_tokens=4)  # warm up
    latencies, tokens = [], 0
    t0 = time.perf_counter()
    for p in prompts:
        s = time.perf_counter()
        generate(model, tokenizer, [p], max_new_tokens=max_tokens, min_new_tokens=max_tokens)
        latencies.append(time.perf_counter() - s)
        tokens += max_tokens
    return {"wall": time.perf_counter() - t0, "tokens": tokens, "latencies": latencies, "requests": len(prompts)}


def in_thread(fn, *args):
    """Run fn in a thread of its own, as the server's engine runs the model: the same torch threading for both
    sides (on a busy machine, torch ops issued from the main thread and from another thread can differ a lot)."""
    out = {}

    def target():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # re-raised in the caller
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


class InProcessServer:
    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)


async def run_clients(url: str, model_name: str, prompts: list[str], clients: int, max_tokens: int) -> dict:
    import httpx

    todo = list(prompts)
    latencies, tokens = [], 0

    async def client_loop(http):
        nonlocal tokens
        while todo:
            p = todo.pop(0)
            body = {
                "model": model_name,
                "messages": [{"role": "user", "content": p}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "ignore_eos": True,
            }
            s = time.perf_counter()
            r = await http.post("/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - s)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"wall": wall, "tokens": tokens, "latencies": latencies, "requests": len(prompts)}


# -- report ---------------------------------------------------------------------------------------------------
def row(name: str, clients: int, res: dict, base_tps: float) -> str:
    tps = res["tokens"] / res["wall"]
    lat = res["latencies"]
    return (
        f"| {name} | {clients} | {res['requests']} | {res['tokens']} | {res['wall']:.1f} | {tps:.1f} | "
        f"{tps / base_tps:.2f}× | {percentile(lat, 0.5):.2f} | {percentile(lat, 0.9):.2f} | "
        f"{percentile(lat, 0.99):.2f} |"
    )


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a tiny random llama instead of the default model (quick)")
    ap.add_argument(
        "--model", default="default", help="model spec for loralag.models.load_model (default: SmolLM2-135M)"
    )
    ap.add_argument("--library", default=None, help="an existing library to serve (default: build a small random one)")
    ap.add_argument("--adapters", type=int, default=8, help="adapters in the built library")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--targets", default="q_proj,v_proj", help="modules the built adapters target")
    ap.add_argument("--router", default="lag")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    ap.add_argument("--requests", type=int, default=None, help="requests per run (default: max(8, 2 × clients))")
    ap.add_argument("--baseline-requests", type=int, default=8, help="requests for the generate baseline")
    ap.add_argument("--clients", default="1,4,16", help="concurrency levels")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve.md"))
    args = ap.parse_args(argv)

    from loralag import attach, detach, open_library
    from loralag.models import load_model
    from loralag.serve.app import create_app

    clients = [int(c) for c in args.clients.split(",")]
    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    spec = tiny_model_and_tokenizer(tmp / "tiny") if args.tiny else args.model
    model, tokenizer = load_model(spec)
    model_label = (
        "tiny random llama (4 layers, d=64)" if args.tiny else ("SmolLM2-135M-Instruct" if spec == "default" else spec)
    )
    if args.library:
        lib = open_library(args.library)
    else:
        lib = build_small_library(
            model, tmp / "lib", args.adapters, args.rank, args.targets.split(","), std=0.02 if not args.tiny else 0.3
        )
    print(
        f"model {model_label}; library {lib.path} ({len(lib)} adapters, {len(lib.target_modules)} modules); "
        f"router {args.router} k={args.k}; {args.max_tokens} tokens per request; threads {torch.get_num_threads()}",
        file=sys.stderr,
    )

    def prompts(n):
        return [PROMPTS[i % len(PROMPTS)] + ("" if i < len(PROMPTS) else f" ({i})") for i in range(n)]

    attach(model, [lib], router=args.router, k=args.k)
    base = in_thread(run_generate, model, tokenizer, prompts(args.baseline_requests), args.max_tokens)
    detach(model)
    base_tps = base["tokens"] / base["wall"]
    print(f"generate: {base_tps:.1f} tokens/s", file=sys.stderr)

    app = create_app(
        model,
        tokenizer,
        [lib],
        router=args.router,
        k=args.k,
        max_batch=args.max_batch,
        max_queue=1024,
        request_timeout=3600,
        model_name="bench",
    )
    server = InProcessServer(app)
    results = []
    try:
        asyncio.run(run_clients(server.url, "bench", prompts(2), 2, 4))  # warm up
        for c in clients:
            n = args.requests or max(8, 2 * c)
            res = asyncio.run(run_clients(server.url, "bench", prompts(n), c, args.max_tokens))
            print(f"serve, {c} clients: {res['tokens'] / res['wall']:.1f} tokens/s", file=sys.stderr)
            results.append((c, res))
    finally:
        server.stop()

    lines = [
        "# loralag serve: continuous batching vs generate one request at a time",
        "",
        f"Model {model_label}, library of {len(lib)} adapters (rank {args.rank}, {', '.join(lib.target_modules[:2])}"
        f"{', ...' if len(lib.target_modules) > 2 else ''}; {len(lib.target_modules)} modules), router `{args.router}` "
        f"k={args.k}. Every request: a chat completion of exactly {args.max_tokens} tokens, greedy. "
        f"Server: uvicorn in the benchmark's process, max_batch {args.max_batch}; clients send their next request "
        f"when the previous one is answered. Machine: {os.cpu_count()} CPUs ({platform.machine()}), torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads; load average {load0:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end (other work on the machine slows both sides). Latencies in seconds.",
        "",
        "| setup | concurrent clients | requests | tokens | wall s | tokens/s | vs generate | p50 | p90 | p99 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        row("`generate`, one at a time", 1, base, base_tps),
    ]
    lines += [row("`loralag serve`", c, res, base_tps) for c, res in results]
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"written to {out}", file=sys.stderr)
    return table


if __name__ == "__main__":
    main()
