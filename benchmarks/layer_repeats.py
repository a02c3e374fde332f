"""Repeat the routed-layer cells the targets name, at several thread counts, and write the medians over runs.

    python benchmarks/layer_repeats.py [--runs 4] [--threads 1,2] [--cells 2048x2048:100,1000:1,512] [--summarize]

Each run is a separate `bench_layer.py` process (runs alternate between thread counts, so slow phases of the
machine spread over both); its report goes to results/layer-repeats/threads{T}-run{i}.md/.json. medians.md
then holds, per cell and thread count, the median over runs of lag/floor and PEFT/lag, with every run's value.
--summarize only rewrites medians.md from the runs already there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "layer-repeats"


def run(runs: int, threads: list[int], cells: str) -> None:
    for i in range(1, runs + 1):
        for t in threads:
            tmp = OUT / f".threads{t}-run{i}"
            subprocess.run(
                [
                    sys.executable,
                    str(HERE / "bench_layer.py"),
                    "--cells",
                    cells,
                    "--threads",
                    str(t),
                    "--out",
                    str(tmp),
                ],
                check=True,
            )
            for ext in ("md", "json"):
                (tmp / f"layer.{ext}").replace(OUT / f"threads{t}-run{i}.{ext}")
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()


def summarize() -> str:
    cells: dict[tuple, dict[str, list[float]]] = {}
    for f in sorted(OUT.glob("threads*-run*.json")):
        threads = int(f.stem.split("-")[0].removeprefix("threads"))
        for r in json.loads(f.read_text())["data"]:
            m = r["median_s"]
            cell = cells.setdefault((r["d_in"], r["d_out"], r["N"], r["T"], threads), {"lag/floor": [], "PEFT/lag": []})
            cell["lag/floor"].append(m["lag"] / m["floor"])
            if "peft-arrow" in m:
                cell["PEFT/lag"].append(m["peft-arrow"] / m["lag"])
    lines = [
        "# Routed layer: medians over repeated runs",
        "",
        "Each run is one `bench_layer.py` process (itself a median of interleaved reps); below, the median over runs "
        "and every run's value.",
        "",
        "| shape | N | T | torch threads | runs | lag/floor | PEFT/lag |",
        "|---|---|---|---|---|---|---|",
    ]
    for (d_in, d_out, N, T, threads), v in sorted(cells.items()):

        def fmt(xs):
            return f"**{statistics.median(xs):.2f}** ({', '.join(f'{x:.2f}' for x in xs)})" if xs else "—"

        lines.append(
            f"| {d_in}→{d_out} | {N:,} | {T} | {threads} | {len(v['lag/floor'])} | {fmt(v['lag/floor'])} "
            f"| {fmt(v['PEFT/lag'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--cells", default="2048x2048:100,1000:1,512", help="as bench_layer.py --cells")
    p.add_argument("--summarize", action="store_true", help="only rewrite medians.md from the runs already there")
    args = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        run(args.runs, [int(t) for t in args.threads.split(",")], args.cells)
    (OUT / "medians.md").write_text(summarize())
    print((OUT / "medians.md").read_text())


if __name__ == "__main__":
    main()
