"""How far other questions of the same kind would move a `loralag bench` run's scores: the percentile bootstrap
that runs made since it was added write into their results.md, recomputed from any run's results.json.

    python benchmarks/score_intervals.py benchmarks/results/lama benchmarks/results/lama-task-b-only-seed1 \\
        --out benchmarks/results/intervals

Per run and method: % of the Oracle (AVG) and the gain fraction with their 95% intervals over 2,000 resamples of
the questions (each family's drawn with replacement, the same draw for every method:
loralag.experiments.lama.intervals), and the share of resamples in which each of the issue's targets holds.
Needs results.json's per-question verdicts (`right`, in runs since `lama-task-under-lag-fact-fp32`).
With --seeds the runs are trainings of one setting that differ only in the task adapters' seed (`--task-seed`):
it also reports, per method, the mean over them, one training's standard deviation and the t-interval of the mean
(loralag.experiments.lama.intervals.across_seeds), the spread that resampling the questions does not see:

    python benchmarks/score_intervals.py benchmarks/results/lama benchmarks/results/lama-task-b-only-seed{1,2,3,4} \\
        --seeds --out benchmarks/results/seeds

Writes intervals.md and intervals.json into --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from loralag.errors import LoralagError
from loralag.experiments.lama.intervals import (
    LEVEL,
    RESAMPLES,
    SEED,
    across_seeds,
    across_seeds_markdown,
    intervals_markdown,
    score_intervals,
)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="results folders of `loralag bench` (each with results.json)")
    p.add_argument("--resamples", type=int, default=RESAMPLES)
    p.add_argument("--level", type=float, default=LEVEL, help="interval level in %% (default 95)")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/intervals"))
    p.add_argument("--seeds", action="store_true", help="the runs differ only in --task-seed: also their spread")
    args = p.parse_args()
    if args.resamples < 1 or not 0 < args.level < 100:
        p.error("--resamples must be ≥ 1 and --level between 0 and 100")
    lines = ["# Score intervals over the questions", ""]
    out, loaded = {}, {}
    for run in args.runs:
        path = run / "results.json"
        try:
            loaded[str(run)] = results = json.loads(path.read_text())
            iv = score_intervals(results, args.resamples, args.level, args.seed)
        except (OSError, json.JSONDecodeError, LoralagError) as e:
            sys.exit(f"{path}: {e}")
        out[str(run)] = iv
        lines += [f"## {run}", "", *intervals_markdown(iv), ""]
    if args.seeds:
        try:
            spread = across_seeds(loaded, args.level)
        except LoralagError as e:
            sys.exit(f"--seeds: {e}")
        out["across_seeds"] = spread
        lines += ["## Across trainings of the task adapters", "", *across_seeds_markdown(spread), ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "intervals.md").write_text("\n".join(lines))
    (args.out / "intervals.json").write_text(json.dumps(out, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
