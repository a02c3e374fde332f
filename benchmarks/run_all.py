"""Run every benchmark and write benchmarks/results/SUMMARY.md (with --quick: benchmarks/results/quick/).

    python benchmarks/run_all.py [--quick] [--threads N] [--only layer,e2e] [--timeout 900]

Each benchmark runs in its own process (fresh memory, its own peak RSS), one after the other, and writes
<name>.md, <name>.json and a PNG into the results folder. Synthetic libraries and adapters are cached in
$LORALAG_BENCH_CACHE (default ~/.cache/loralag-bench; ~20 GB after a full run; delete it freely).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common as C  # noqa: E402

BENCHES = ["layer", "align", "index", "memory", "e2e", "train"]


def headline(name: str, d: dict) -> list[str]:
    """A few key numbers per benchmark, read from its JSON."""
    out = []
    if name == "layer":
        rows = d["data"]
        nmax = max(r["N"] for r in rows)
        for r in rows:
            if r["N"] == nmax:
                m = r["median_s"]
                s = f"{r['d_in']}→{r['d_out']}, N={r['N']:,}, T={r['T']}: lag/floor {m['lag'] / m['floor']:.2f}"
                s += f", dense SpectR/floor {m['dense-spectr'] / m['floor']:.2f}"
                s += f", PEFT/lag {m['peft-arrow'] / m['lag']:.1f}" if "peft-arrow" in m else f", PEFT {r['peft_note']}"
                out.append(s)
    elif name == "e2e":
        rows = {r["method"]: r for r in d["data"]["rows"]}
        b = rows["base"]
        for n, r in rows.items():
            if n != "base":
                out.append(
                    f"{n}: prefill {r['prefill_tok_s'] / b['prefill_tok_s']:.2f}× base, "
                    f"decode {r['decode_tok_s'] / b['decode_tok_s']:.2f}× base ({r['decode_tok_s']:.1f} tok/s)"
                )
    elif name == "align":
        for res in d["data"]["results"]:
            sh = res["shape"]
            out.append(
                f"{sh[0]}→{sh[1]} r{sh[2]}: align_batch {res['rate']['align_batch']:,.0f} adapters/s "
                f"(max rel err {res['max_rel_err']['align_batch']:.1e}), dense SVD {res['rate']['dense-svd']:.2g}/s, "
                f"PEFT power-iteration median |cos| {res['cos_median']['peft-power']:.3f}"
            )
        t = d["data"]["trained"]
        out.append(
            f"trained adapters: PEFT prototypes |cos| < 0.99 on {t['peft-power_share_below_0.99']:.0%} of modules"
        )
        for c in d["data"]["topk"]:
            if c["approx"] == "peft-power" and c["k"] in (3, 20):
                out.append(
                    f"top-{c['k']} changed by PEFT prototypes: {c['changed']:.0%} ({c['library']}, {c['tokens']})"
                )
    elif name == "memory":
        for r in d["data"]:
            out.append(
                f"{r['layout']}, {r['group']}: open peak {r['open']['hwm'] / r['arrows_bytes']:.2f}× arrows "
                f"({r['open']['hwm'] / r['factors_bytes']:.3f}× all A*/B*)"
            )
    elif name == "index":
        for rec in d["data"]:
            ok = [p for p, q in rec["quality"].items() if q["winner_in"] >= 0.99]
            if ok:
                p = min(ok, key=int)
                sp = ", ".join(f"T={T}: {t['exact'] / t[p]:.1f}×" for T, t in rec["time"].items())
                out.append(
                    f"{rec['kind']}: nprobe={p} (of {rec['nlist']}) keeps the LAG winner for "
                    f"{rec['quality'][p]['winner_in']:.3f}, recall@20 {rec['quality'][p]['recall']:.3f}; speed-up {sp}"
                )
            else:
                out.append(f"{rec['kind']}: no nprobe reaches 0.99")
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(BENCHES))
    p.add_argument("--timeout", type=float, default=900, help="seconds per benchmark")
    p.add_argument("--summary-only", action="store_true", help="rebuild SUMMARY.md from the reports already written")
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)  # only so that SUMMARY.md records the count the benchmarks used
    out = C.RESULTS / "quick" if args.quick else C.RESULTS
    out.mkdir(parents=True, exist_ok=True)
    todo = args.only.split(",") if args.only else BENCHES
    status = {}
    t_all = time.perf_counter()
    for name in todo if not args.summary_only else []:
        cmd = [sys.executable, str(HERE / f"bench_{name}.py"), "--out", str(out)]
        cmd += ["--quick"] if args.quick else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t = time.perf_counter()
        try:
            rc = subprocess.run(cmd, timeout=args.timeout).returncode
            status[name] = ("ok" if rc == 0 else f"failed (exit {rc})", time.perf_counter() - t)
        except subprocess.TimeoutExpired:
            status[name] = (f"timed out after {args.timeout:.0f} s", time.perf_counter() - t)
        print(f"== {name}: {status[name][0]} in {status[name][1]:.0f} s", flush=True)
    total = time.perf_counter() - t_all
    if args.summary_only:  # each report records its own machine, load and wall time
        status = {n: ("ok" if (out / f"{n}.json").is_file() else "missing", float("nan")) for n in todo}

    info = C.machine_info()
    lines = ["# Benchmark summary", ""]
    if args.quick:
        lines += ["**Quick mode: smoke-test sizes, not for conclusions.**", ""]
    lines += [
        C.machine_md(info) + f". Total wall time: {total:.0f} s.",
        "",
        C.md_table(
            ["benchmark", "status", "wall time", "report"],
            [
                [n, s, f"{t:.0f} s" if t == t else "(in its report)", f"[{n}.md]({n}.md)"]
                for n, (s, t) in status.items()
            ],
        ),
        "",
    ]
    for name in todo:
        js = out / f"{name}.json"
        lines += [f"## {name}", ""]
        if status[name][0] != "ok" or not js.is_file():
            lines += [f"No results ({status[name][0]}).", ""]
            continue
        d = json.loads(js.read_text())
        try:
            lines += [f"- {h}" for h in headline(name, d)] + [""]
        except Exception as e:  # a summary line must never hide the report itself
            lines += [f"(headline failed: {e!r})", ""]
        body = (out / f"{name}.md").read_text().split("\n", 1)[1]  # without its title
        lines += [body.replace("\n## ", "\n### "), ""]
    (out / "SUMMARY.md").write_text("\n".join(lines))
    print(f"wrote {out / 'SUMMARY.md'}")
    sys.exit(0 if all(s == "ok" for s, _ in status.values()) else 1)


if __name__ == "__main__":
    main()
