"""How far two `loralag bench` runs agree, question by question: what one retraining moves.

    loralag bench --size full --data ../shared/data/lama-trex --out benchmarks/results/lama
    loralag bench --size full --data ../shared/data/lama-trex --task-seed 1 \\
        --methods base,oracle,arrow,lag,lag-prefix,spectral,rag,r-lag --out benchmarks/results/lama-task-seed1
    python benchmarks/compare_runs.py benchmarks/results/lama benchmarks/results/lama-task-seed1 \\
        --out benchmarks/results/task-seed

For every method both runs answered (their `predictions/*/<dataset>.generations.jsonl`) and every family:
each run's score (the run's own, from results.json) and, over the questions both asked, how many are right in
both, in only one, and how many answers are the same text. Two runs of one setting that differ only in a seed
show how much of a gap between methods one training can move. Writes compare_runs.md and .json into --out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def generations(run: Path) -> dict[str, dict[str, dict[str, dict]]]:
    """{method folder: {dataset: {question id: generation record}}} of a results folder."""
    out: dict = {}
    for path in sorted((run / "predictions").glob("*/*.generations.jsonl")):
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        out.setdefault(path.parent.name, {})[path.name.removesuffix(".generations.jsonl")] = {r["id"]: r for r in rows}
    return out


def agreement(a: dict[str, dict], b: dict[str, dict], correct) -> dict:
    """Over the question ids in both: right in both, only in a, only in b, the same answer text."""
    ids = sorted(a.keys() & b.keys())
    ra = {i: correct(a[i]) for i in ids}
    rb = {i: correct(b[i]) for i in ids}
    return {
        "questions": len(ids),
        "both": sum(ra[i] and rb[i] for i in ids),
        "only_a": sum(ra[i] and not rb[i] for i in ids),
        "only_b": sum(rb[i] and not ra[i] for i in ids),
        "same_answer": sum(a[i]["answer"] == b[i]["answer"] for i in ids),
    }


def _method(folder: str, table: dict) -> str:
    """The method a predictions folder holds (folders spell "lag@20/seq" as "lag-k20-seq")."""
    return next((m for m in table if m.replace("/", "-").replace("@", "-k") == folder), folder)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="a loralag bench results folder")
    p.add_argument("b", type=Path, help="another one")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/compare-runs"))
    args = p.parse_args()

    from common import write_tables

    from loralag.evaluation.kilt import exact_match_score, strict_accuracy
    from loralag.experiments.lama.data import FAMILY_OF, QA, SLOT_FILLING

    def correct(dataset: str, r: dict) -> bool:  # as the run scored it: KILT's EM, else its accuracy
        if dataset in (SLOT_FILLING, QA):
            return any(exact_match_score(r["answer"], g) for g in r["gold"])
        return strict_accuracy(r["answer"], r["gold"])

    ra, rb = (json.loads((r / "results.json").read_text()) for r in (args.a, args.b))
    ga, gb = generations(args.a), generations(args.b)
    for run, g in ((args.a, ga), (args.b, gb)):
        if not g:  # git keeps results.json and results.md only: the answers stay where the bench ran
            p.error(f"{run}: no predictions/*/*.generations.jsonl (the bench writes them; git does not keep them)")
    rows = []
    for folder in sorted(ga.keys() & gb.keys()):
        for dataset in sorted(ga[folder].keys() & gb[folder].keys()):
            a, b = ga[folder][dataset], gb[folder][dataset]
            method = _method(folder, ra["table"])
            row = {"method": method, "folder": folder, "dataset": dataset}
            row |= agreement(a, b, lambda r, d=dataset: correct(d, r))
            row["score_a"] = ra["table"].get(method, {}).get(dataset)
            row["score_b"] = rb["table"].get(method, {}).get(dataset)
            rows.append(row)
    norm = {
        m: (ra["normalised"][m]["AVG"], rb["normalised"][m]["AVG"]) for m in ra["normalised"] if m in rb["normalised"]
    }
    lines = [
        f"# Two bench runs question by question: A `{args.a}`, B `{args.b}`",
        "",
        "% of the Oracle (AVG), each run against its own Oracle:",
        "",
        "| method | A | B | B − A |",
        "|---|---|---|---|",
        *(f"| {m} | {x:.1f} | {y:.1f} | {y - x:+.1f} |" for m, (x, y) in norm.items()),
        "",
        "Per family: each run's score, then over the same questions how many are right in both runs, only in A,"
        " only in B, and how many answers are the same text.",
        "",
        "| method | family | score A | score B | right in both | only A | only B | same answer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {FAMILY_OF.get(r['dataset'], r['dataset'])} | {r['score_a']} | {r['score_b']} | "
            f"{r['both']} | {r['only_a']} | {r['only_b']} | {r['same_answer']}/{r['questions']} |"
        )
    write_tables(args.out, "compare_runs", lines, {"normalised": norm, "rows": rows})


if __name__ == "__main__":
    main()
