"""Peak resident memory to open a 10,000-adapter library and to route a 512-token batch through it with `lag`.

The library (synthetic aligned adapters, float32, on disk) holds, for every adapter, the three MLP modules of
SmolLM2's layer 0 (gate/up 576→1536, down 1536→576, rank 6) and one 2048→2048 module (rank 8). It is written
twice: in segments of 128 adapters (what `loralag build` writes) and as one segment (a compacted library).

Each measurement runs in a fresh subprocess: import torch and loralag, allocate the tokens, then
  open   Library(path) + bank(module) for the modules measured (reads the manifest and the arrows)
  route  one `lag` call (k=20) per module on 512 random tokens
Peak RSS is read two ways: VmHWM from /proc/self/status, reset after the imports through /proc/self/clear_refs
(exact per phase), and ru_maxrss minus ru_maxrss after the imports (what the brief asks for; ru_maxrss can only
grow, and a child inherits its parent's value, so this parent process never imports torch). Both are reported
as extra bytes over the RSS after imports, against the arrows' size (target: open < 2× arrows) and against all
A*/B* (which opening must not read).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import common as C

SMOL = {
    "model.layers.0.mlp.gate_proj": (576, 1536, 6),
    "model.layers.0.mlp.up_proj": (576, 1536, 6),
    "model.layers.0.mlp.down_proj": (1536, 576, 6),
}
BIG = {"big.proj": (2048, 2048, 8)}
GROUPS = {"SmolLM2 layer-0 MLP (3 modules, r6)": SMOL, "2048→2048 (r8)": BIG}

PROBE = r"""
import json, re, resource, sys, time
def status(k):
    return int(re.search(k + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024
def maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def reset_hwm():
    open("/proc/self/clear_refs", "w").write("5")
inherited = maxrss()
import torch
from loralag.library.store import Library
from loralag.routing.routers import ROUTERS, RouteSpec
path, modules, T, threads = sys.argv[1], sys.argv[2].split(","), int(sys.argv[3]), int(sys.argv[4])
if threads:
    torch.set_num_threads(threads)
shapes = json.loads(open(path + "/manifest.json").read())["base_model"]["modules"]
X = {m: torch.randn(T, shapes[m][0]) for m in modules}
seq = torch.zeros(T, dtype=torch.long)
import gc; gc.collect()
out = {"inherited_maxrss": inherited}
base_rss, base_max = status("VmRSS"), maxrss()
out["after_imports"] = {"rss": base_rss, "maxrss": base_max}
reset_hwm()
t = time.perf_counter()
lib = Library(path)
banks = {m: lib.bank(m) for m in modules}
out["open_s"] = time.perf_counter() - t
out["open"] = {"hwm": status("VmHWM") - base_rss, "maxrss": maxrss() - base_max,
               "anon": status("RssAnon"), "file": status("RssFile"), "rss": status("VmRSS") - base_rss}
out["arrows_bytes"] = sum(b.arrows.numel() * b.arrows.element_size() for b in banks.values())
out["segments"] = len({a["segment"] for a in lib.adapters})
reset_hwm()
spec = RouteSpec(router="lag", k=20)
uniq = 0
t = time.perf_counter()
for m, b in banks.items():
    r = ROUTERS["lag"](b, X[m], spec, seq)
    uniq += len((X[m] @ b.arrows.T).abs().topk(20, dim=1).indices.unique())
out["route_s"] = time.perf_counter() - t
out["route"] = {"hwm": status("VmHWM") - base_rss, "maxrss": maxrss() - base_max,
                "anon": status("RssAnon"), "file": status("RssFile"), "rss": status("VmRSS") - base_rss}
out["distinct_candidates"] = uniq
print("PROBE" + json.dumps(out))
"""

MAKE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import common as C
spec = json.loads(sys.argv[2])
C.write_synthetic_library(spec["path"], spec["shapes"], spec["modules"], spec["n"], seed=spec["seed"],
                          seg_size=spec["seg"])
print("MACHINE" + json.dumps(C.machine_info()))
"""


def extra(p):
    p.add_argument("--n", type=int, default=None, help="adapters (default 10,000; quick 300)")


def run(code, *argv):
    out = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return out.stdout


def main():
    t0 = time.perf_counter()
    args = C.parse_args(__doc__.splitlines()[0], extra)
    quick = args.quick
    n, T = args.n or (300 if quick else 10_000), 64 if quick else 512
    modules = {**SMOL, **BIG}
    shapes = {m: [d_in, d_out, "linear"] for m, (d_in, d_out, _) in modules.items()}
    per_adapter = sum(4 * (r * (d_in + d_out) + d_in) for d_in, d_out, r in modules.values())
    layouts = {"128 per segment": 128, "one segment": n}
    info, libs = None, {}
    for name, seg in layouts.items():
        path = C.cache_root() / f"memlib-n{n}-seg{seg}"
        C.log(f"[memory] library {path} ({n} adapters, ~{C.fmt_bytes(n * per_adapter)}), writing if missing")
        spec = {
            "path": str(path),
            "shapes": shapes,
            "modules": {m: r for m, (_, _, r) in modules.items()},
            "n": n,
            "seed": 5,
            "seg": seg,
        }
        out = run(MAKE, C.HERE, json.dumps(spec))
        info = info or json.loads(out.split("MACHINE", 1)[1])
        libs[name] = path
    rows, data = [], []
    for layout, path in libs.items():
        for group, mods in GROUPS.items():
            C.log(f"[memory] probe: {layout}, {group}")
            res = json.loads(run(PROBE, path, ",".join(mods), T, args.threads or 0).split("PROBE", 1)[1])
            arrows = res["arrows_bytes"]
            factors = sum(4 * n * r * (d_in + d_out) for d_in, d_out, r in mods.values())
            res.update(layout=layout, group=group, factors_bytes=factors, n=n, T=T)
            data.append(res)
            o, r_ = res["open"], res["route"]
            rows.append(
                [
                    layout,
                    group,
                    C.fmt_bytes(arrows),
                    C.fmt_bytes(factors),
                    C.fmt_bytes(o["hwm"]),
                    o["hwm"] / arrows,
                    C.fmt_bytes(o["maxrss"]),
                    o["hwm"] / factors,
                    f"{res['open_s']:.2f} s",
                    C.fmt_bytes(r_["hwm"]),
                    C.fmt_bytes(r_["maxrss"]),
                    r_["hwm"] / factors,
                    f"{res['distinct_candidates']:,}",
                    f"{res['route_s']:.2f} s",
                    "yes" if o["hwm"] < 2 * arrows else "no",
                ]
            )
    elapsed = C.elapsed_since(t0)
    hdr = [
        "layout",
        "modules",
        "arrows",
        "all A*/B*",
        "open: peak Δ (VmHWM)",
        "open / arrows",
        "open: Δ ru_maxrss",
        "open / factors",
        "open time",
        "route: peak Δ (VmHWM)",
        "route: Δ ru_maxrss (cumulative)",
        "route / factors",
        "distinct candidates",
        "route time",
        "open < 2× arrows",
    ]
    body = [
        __doc__.split("\n\n", 1)[1].strip(),
        "",
        f"N = {n:,} adapters, T = {T} random tokens per module, float32.",
        "",
        C.md_table(hdr, rows),
        "",
        "Δ = extra resident bytes over the RSS after the imports (file-backed pages of the memory maps count: "
        "reading a page of the segment file makes it resident). 'route' peaks are measured after resetting VmHWM "
        "at the end of opening, so they include what opening left resident; ru_maxrss is cumulative over both. "
        "'distinct candidates' = adapters in the union of the tokens' exact top-20 summed over the modules, "
        "i.e. whose A* rows routing must read.",
        "",
        "Resident breakdown at the end of each phase (RssAnon / RssFile, absolute, including the interpreter):",
        "",
        C.md_table(
            ["layout", "modules", "open: anon", "open: file", "route: anon", "route: file"],
            [
                [
                    d["layout"],
                    d["group"],
                    C.fmt_bytes(d["open"]["anon"]),
                    C.fmt_bytes(d["open"]["file"]),
                    C.fmt_bytes(d["route"]["anon"]),
                    C.fmt_bytes(d["route"]["file"]),
                ]
                for d in data
            ],
        ),
        "",
        "![memory](memory.png)",
    ]
    plot(data, args.out / "memory.png")
    C.write_report(
        args.out, "memory", "Memory: opening and routing a large library", "\n".join(body), info, data, elapsed, quick
    )


def plot(data, path):
    plt = C.plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{d['layout']}\n{d['group']}" for d in data]
    xs = range(len(data))
    w = 0.2
    for j, (key, lab) in enumerate(
        [("arrows_bytes", "arrows"), ("open", "open peak Δ"), ("route", "route peak Δ"), ("factors_bytes", "all A*/B*")]
    ):
        vals = [(d[key]["hwm"] if isinstance(d[key], dict) else d[key]) / C.MiB for d in data]
        ax.bar([x + j * w for x in xs], vals, width=w, label=lab)
    ax.set_xticks([x + 1.5 * w for x in xs], labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("MiB")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
