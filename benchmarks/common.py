"""Shared helpers for the benchmarks: arguments, machine record, side-by-side timing, synthetic adapters,
synthetic libraries, markdown tables and plots.

Every benchmark measures all of its methods for one figure in the same process, interleaved rep by rep
(warm-up first), and reports the median of the reps. Ratios are formed from those medians.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"
GiB = 1024**3
MiB = 1024**2


# -- arguments and output --------------------------------------------------------------------------
def parse_args(description: str, extra=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="small sizes, a few seconds (smoke test)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default benchmarks/results, or benchmarks/results/quick with --quick)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument(
        "--mem-limit-gib",
        type=float,
        default=14.0,
        help="skip a method whose estimated peak memory exceeds this (reported as 'does not fit')",
    )
    if extra:
        extra(p)
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.out is None:
        args.out = RESULTS / "quick" if args.quick else RESULTS
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def cache_root() -> Path:
    """Where synthetic libraries and adapters are kept between runs (outside ~/.cache/loralag on purpose,
    so searches for trained adapters there never find the synthetic ones)."""
    root = Path(os.environ.get("LORALAG_BENCH_CACHE", Path.home() / ".cache" / "loralag-bench")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def machine_info() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = (
            int(
                next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[
                    1
                ]
            )
            * 1024
        )
    except (OSError, StopIteration):
        mem = 0
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "?"
    import peft
    import torch
    import transformers

    from loralag.routing import kernels

    return {
        "cpu": cpu,
        "cpus_visible": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_gib": round(mem / GiB, 1),
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "platform": platform.platform(),
        "git_commit": commit,
        "native_kernels": kernels.available(),  # routing's kernels.c built (else the torch fallback)
    }


def machine_md(info: dict) -> str:
    keys = [
        "device",
        "cpu",
        "cpus_visible",
        "torch_threads",
        "ram_gib",
        "loadavg_1m_at_start",
        "torch",
        "transformers",
        "peft",
        "python",
        "git_commit",
        "native_kernels",
    ]
    return (
        "Machine: "
        + ", ".join(f"{k}={info[k]}" for k in keys if k in info)
        + f", loadavg_1m_at_end={os.getloadavg()[0]:.2f}"
    )


def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if v is None:
            return "—"
        if isinstance(v, float):
            return fmt(v)
        return str(v)

    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def fmt(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01:
        return f"{v:.3g}"
    return f"{v:.2e}"


def fmt_time(s: float | None) -> str:
    if s is None:
        return "—"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.0f} µs"


def fmt_bytes(b: float) -> str:
    if b >= GiB:
        return f"{b / GiB:.2f} GiB"
    if b >= MiB:
        return f"{b / MiB:.1f} MiB"
    return f"{b / 1024:.0f} KiB"


def write_report(out: Path, name: str, title: str, body: str, info: dict, data, elapsed: float, quick: bool) -> Path:
    head = f"# {title}\n\n" + ("**Quick mode (smoke test, small sizes; not for conclusions).**\n\n" if quick else "")
    head += machine_md(info) + f". Wall time of this benchmark: {elapsed:.0f} s.\n\n"
    path = out / f"{name}.md"
    path.write_text(head + body.rstrip() + "\n")
    (out / f"{name}.json").write_text(
        json.dumps({"machine": info, "quick": quick, "elapsed_s": elapsed, "data": data}, indent=1, default=str) + "\n"
    )
    print(f"wrote {path}")
    return path


def write_tables(out: Path, name: str, lines: list[str], data) -> None:
    """A study's markdown (`lines`) and its data as <out>/<name>.md and .json; the markdown printed too."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(lines))


def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


# -- timing ----------------------------------------------------------------------------------------
def side_by_side(
    fns: dict, reps: int = 7, min_reps: int = 3, budget_s: float = 20.0, sample_s: float = 0.005, warmup: int = 1
) -> dict[str, dict]:
    """Time every callable in `fns` interleaved: warm-up each, then `reps` rounds in which every method is
    timed once (the starting method rotates each round). A sample repeats a fast callable enough times to
    last about `sample_s` and reports the time per call. Rounds are cut to fit `budget_s` (never below
    `min_reps`). Returns name -> {"median": s, "samples": [...], "inner": calls per sample}."""
    names = list(fns)
    est = {}
    for n in names:  # warm-up: `warmup` calls, more (up to 5) while they are fast; estimate from the fastest
        times, spent = [], 0.0
        while len(times) < warmup or (len(times) < 5 and spent < 0.05):
            t = time.perf_counter()
            fns[n]()
            times.append(time.perf_counter() - t)
            spent += times[-1]
        est[n] = min(times)
    inner = {n: max(1, min(1000, int(sample_s / max(est[n], 1e-7)))) for n in names}
    per_round = sum(est[n] * inner[n] for n in names)
    reps = max(min_reps, min(reps, int(budget_s / max(per_round, 1e-9))))
    samples = {n: [] for n in names}
    for rep in range(reps):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for n in order:
            f, k = fns[n], inner[n]
            t = time.perf_counter()
            for _ in range(k):
                f()
            samples[n].append((time.perf_counter() - t) / k)
    return {n: {"median": median(samples[n]), "samples": samples[n], "inner": inner[n]} for n in names}


def median(xs):
    xs = sorted(xs)
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


# -- synthetic adapters -----------------------------------------------------------------------------
def random_aligned(
    n: int, r: int, d_in: int, d_out: int, seed: int = 0, chunk: int = 512, s_range: tuple[float, float] = (0.02, 0.2)
):
    """n random *aligned* adapters: A* (n, r, d_in) with orthonormal rows (QR of a Gaussian), and
    B* = U·S (n, d_out, r) with U orthonormal columns and S sorted descending, uniform in s_range.
    So A*[i, 0] is exactly the top right singular vector (the arrow) of B*_i A*_i."""
    import torch

    g = torch.Generator().manual_seed(seed)
    A = torch.empty(n, r, d_in)
    B = torch.empty(n, d_out, r)
    lo, hi = s_range
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        A[s : s + m] = torch.linalg.qr(torch.randn(m, d_in, r, generator=g)).Q.transpose(1, 2)
        S = (lo + (hi - lo) * torch.rand(m, r, generator=g)).sort(dim=1, descending=True).values
        B[s : s + m] = torch.linalg.qr(torch.randn(m, d_out, r, generator=g)).Q * S.unsqueeze(1)
    return A, B


def stream_safetensors(path: Path, specs: list[tuple[str, tuple, str]], produce, metadata: dict[str, str]) -> None:
    """Write a safetensors file tensor by tensor: `specs` lists (name, shape, dtype) in file order and
    `produce(name)` returns each tensor when its turn comes, so only one module's tensors are ever in memory
    (safetensors' own `save` builds the whole file in memory first). Written to a temporary name, then renamed."""
    import numpy as np
    import torch

    sizes = {"F32": 4, "BF16": 2, "F16": 2}
    header, off = {}, 0
    for name, shape, dt in specs:
        nbytes = sizes[dt] * int(np.prod(shape))
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    header["__metadata__"] = metadata
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    with open(tmp, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for name, shape, _ in specs:
            t = produce(name).contiguous()
            assert tuple(t.shape) == tuple(shape), (name, t.shape, shape)
            if t.dtype == torch.bfloat16:
                t = t.view(torch.int16)
            f.write(t.numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_synthetic_library(
    path: Path,
    shapes: dict,
    modules: dict,
    n: int,
    seed: int = 0,
    seg_size: int = 128,
    dtype: str = "float32",
    rebuild: bool = False,
):
    """A library of n synthetic aligned adapters (`random_aligned`) written directly, without PEFT folders or
    alignment: `modules` maps module name -> rank; every adapter targets all of them. Segments hold
    `seg_size` adapters each (128 is what `loralag build` writes by default). The adapters depend only on
    (seed, module, adapter index), not on seg_size, so two layouts of one seed hold identical adapters.
    Reused when a complete one is already there."""
    import torch

    from loralag.library import store as L

    path = Path(path)
    if path.exists():
        try:
            lib = L.Library(path)
            if len(lib) == n and not rebuild:
                return lib
        except Exception:
            pass
        shutil.rmtree(path)
    lib = L.create_library(path, "synthetic", shapes, dtype=dtype)
    tdt = L.DTYPES[dtype]
    code = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}[dtype]
    gen = 64  # adapters generated per call, fixed so the values do not depend on seg_size
    for s in range(0, n, seg_size):
        m = min(seg_size, n - s)
        names = [f"syn{i:06d}" for i in range(s, s + m)]
        specs, rows = [], {}
        for module, r in sorted(modules.items()):
            d_in, d_out = shapes[module][:2]
            specs += [
                (f"{module}.A", (m, r, d_in), code),
                (f"{module}.B", (m, d_out, r), code),
                (f"{module}.arrow", (m, d_in), code),
            ]
            rows[module] = [[nm, r] for nm in names]
        cache = {}

        def produce(name, s=s, m=m):
            module, part = name.rsplit(".", 1)
            if module not in cache:
                cache.clear()
                r = modules[module]
                d_in, d_out = shapes[module][:2]
                j = sorted(modules).index(module)
                A = torch.empty(m, r, d_in)
                B = torch.empty(m, d_out, r)
                for b in range(s - s % gen, s + m, gen):  # whole generation blocks, cut to [s, s+m)
                    a, bb = random_aligned(gen, r, d_in, d_out, seed=(seed * 1_000_003 + j) * 100_003 + b // gen)
                    lo, hi = max(b, s), min(b + gen, s + m)
                    A[lo - s : hi - s], B[lo - s : hi - s] = a[lo - b : hi - b], bb[lo - b : hi - b]
                cache[module] = {"A": A.to(tdt), "B": B.to(tdt), "arrow": A[:, 0].to(tdt)}
            return cache[module][part]

        # streamed beside the library, then checked, moved in and committed as one segment
        incoming = path.with_name(f"{path.name}.incoming.safetensors")
        stream_safetensors(incoming, specs, produce, {"rows": json.dumps(rows)})
        lib.add_segment(incoming, source="synthetic")
    return L.Library(path)


def library_bytes(lib) -> int:
    return sum(f.stat().st_size for f in (lib.path / "segments").iterdir())


def elapsed_since(t0: float) -> float:
    return time.perf_counter() - t0


_T0 = time.perf_counter()


def log(*a):
    print(f"[{time.perf_counter() - _T0:7.1f}s]", *a, file=sys.stderr, flush=True)


# -- knowledge routing, teacher-forced -------------------------------------------------------------------
def teacher_forced_routing(
    model,
    tok,
    lib,
    questions,
    mentions: dict,
    router: str,
    k: int,
    oracle: bool = False,
    gold_at: str | None = None,
    on_trace=None,
):
    """Knowledge library only: each question's prompt is prefilled with the KV cache, then its gold answer is
    fed token by token (as generation feeds its own tokens). Returns the share of routing decisions
    (token × module) on the gold adapter at the answer positions (those that produce an answer token) and on
    the subject's mention, per layer too, and the gold answer's mean negative log-likelihood. oracle: every
    token on the gold adapter (the adapters' own quality). gold_at: where the routing matters — "prompt": the
    gold adapter on the prompt's tokens before the last, `router` at the answer positions (the prompt's last
    token and the fed answer tokens); "answer": the other way round. The prompt's last token then runs in a call
    of its own after the rest (the same computation, in two calls). on_trace(trace, prompt_length, gold index):
    called with each question's RoutingTrace, for measures of one's own."""
    import torch
    from transformers import DynamicCache

    from loralag import attach, detach
    from loralag.experiments.lama.routing_stats import subject_mask
    from loralag.models import cache_kwarg

    if gold_at not in (None, "prompt", "answer"):
        raise ValueError(f"gold_at must be None, 'prompt' or 'answer', got {gold_at!r}")
    cache_kw = cache_kwarg(model)
    state = attach(model, {"knowledge": lib}, router=router, k=k)
    answer, subject, layers, nll = [0, 0], [0, 0], {}, 0.0
    try:
        for q in questions:
            gold = lib.names.index(q.entity)
            if oracle:
                state.fix("knowledge", [q.entity])
            p_ids = tok(q.prompt, return_tensors="pt").input_ids
            a_ids = tok(" " + q.example.answers[0], add_special_tokens=False).input_ids
            kv = {cache_kw: DynamicCache(), "use_cache": True}  # filled in place, call after call
            with state.tracing() as trace, torch.no_grad():
                if gold_at is None:
                    out = model(input_ids=p_ids, **kv)
                else:  # the prompt before its last token on one side, the answer positions on the other
                    fix_gold = lambda: state.fix("knowledge", [q.entity])  # noqa: E731
                    route = lambda: state.set_router("knowledge", router, k=k)  # noqa: E731
                    before, after = (fix_gold, route) if gold_at == "prompt" else (route, fix_gold)
                    before()
                    model(input_ids=p_ids[:, :-1], **kv)
                    after()
                    out = model(input_ids=p_ids[:, -1:], **kv)
                logits = [out.logits[0, -1]]
                for t in a_ids[:-1]:
                    out = model(input_ids=torch.tensor([[t]]), **kv)
                    logits.append(out.logits[0, -1])
            lp = torch.stack(logits).float().log_softmax(-1)
            nll -= float(lp[torch.arange(len(a_ids)), torch.tensor(a_ids)].sum())
            P = p_ids.shape[1]
            if on_trace is not None:
                on_trace(trace, P, gold)
            smask = subject_mask(tok, [q.prompt], [mentions[q.entity]], P)[0]
            for module in trace.modules("knowledge"):
                w = trace.winner_matrix(module, "knowledge")[0]
                hits, n = int((w[P - 1 :] == gold).sum()), len(w) - (P - 1)
                answer[0] += hits
                answer[1] += n
                layer = next((int(p) for p in module.split(".") if p.isdigit()), -1)
                layers.setdefault(layer, [0, 0])
                layers[layer][0] += hits
                layers[layer][1] += n
                subject[0] += int(((w[:P] == gold) & smask).sum())
                subject[1] += int(smask.sum())
    finally:
        detach(model)
    return {
        "router": "oracle" if oracle else router,
        "k": k,
        "gold_at": gold_at,
        "answer_to_gold": answer[0] / max(1, answer[1]),  # no decisions (router "none"): 0
        "subject_to_gold": subject[0] / max(1, subject[1]),
        "answer_by_layer": [layers[layer][0] / layers[layer][1] for layer in sorted(layers)],
        "answer_nll": nll / len(questions),
    }
