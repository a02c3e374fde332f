"""How far two `loralag bench` runs agree, question by question: what one retraining moves.

    loralag bench --size full --data ../shared/data/lama-trex --out benchmarks/results/lama
    loralag bench --size full --data ../shared/data/lama-trex --task-seed 1 \\
        --methods base,oracle,arrow,lag,lag-prefix,spectral,rag,r-lag --out benchmarks/results/lama-task-seed1
    python benchmarks/compare_runs.py benchmarks/results/lama benchmarks/results/lama-task-seed1 \\
        --out benchmarks/results/task-seed

For every method both runs answered and every family: each run's score (the run's own, from results.json) and,
over the questions both asked, how many are right in both and in only one, read from results.json's `right` (the
run's own verdict per question; runs from before it existed: from their `predictions/*/<dataset>.generations.jsonl`,
rescored), and how many answers are the same text where both runs' predictions are still there (git keeps
results.json and results.md only). Two runs of one setting that differ only in a seed show how much of a gap
between methods one training can move. Writes compare_runs.md and .json into --out.
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


def verdicts(results: dict) -> dict[str, dict[str, dict[str, bool]]]:
    """{method: {dataset: {question id: right}}} from results.json's `right` and `question_ids` ({} before them)."""
    ids = results.get("question_ids", {})
    return {
        m: {d: dict(zip(ids[d], (c == "1" for c in bits), strict=True)) for d, bits in per.items()}
        for m, per in results.get("right", {}).items()
    }


def agreement(ra: dict[str, bool], rb: dict[str, bool], answers: tuple[dict, dict] | None = None) -> dict:
    """Over the question ids in both verdicts {id: right}: right in both, only in a, only in b, and (given both
    runs' generation records) the same answer text, else None."""
    ids = sorted(ra.keys() & rb.keys())
    a, b = answers or ({}, {})
    return {
        "questions": len(ids),
        "both": sum(ra[i] and rb[i] for i in ids),
        "only_a": sum(ra[i] and not rb[i] for i in ids),
        "only_b": sum(rb[i] and not ra[i] for i in ids),
        "same_answer": sum(a[i]["answer"] == b[i]["answer"] for i in ids) if answers else None,
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
    va, vb = verdicts(ra), verdicts(rb)

    def rescored(g: dict, table: dict) -> dict:  # a run from before results.json kept verdicts: rescore its answers
        return {
            _method(f, table): {d: {i: correct(d, r) for i, r in rows.items()} for d, rows in per.items()}
            for f, per in g.items()
        }

    for run, v, g in ((args.a, va, ga), (args.b, vb, gb)):
        if not v and not g:
            p.error(f"{run}: results.json has no per-question `right` and there are no predictions/ to rescore")
    va, vb = va or rescored(ga, ra["table"]), vb or rescored(gb, rb["table"])
    folder = {_method(f, ra["table"]): f for f in ga.keys() & gb.keys()}  # methods whose answers both runs keep
    rows = []
    for method in sorted(va.keys() & vb.keys()):
        for dataset in sorted(va[method].keys() & vb[method].keys()):
            f = folder.get(method)
            both = f is not None and dataset in ga[f] and dataset in gb[f]
            row = {"method": method, "dataset": dataset}
            row |= agreement(
                va[method][dataset], vb[method][dataset], (ga[f][dataset], gb[f][dataset]) if both else None
            )
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
        " only in B, and how many answers are the same text (— where a run's predictions/ are not here).",
        "",
        "| method | family | score A | score B | right in both | only A | only B | same answer |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        same = "—" if r["same_answer"] is None else f"{r['same_answer']}/{r['questions']}"
        lines.append(
            f"| {r['method']} | {FAMILY_OF.get(r['dataset'], r['dataset'])} | {r['score_a']} | {r['score_b']} | "
            f"{r['both']} | {r['only_a']} | {r['only_b']} | {same} |"
        )
    write_tables(args.out, "compare_runs", lines, {"normalised": norm, "rows": rows})


if __name__ == "__main__":
    main()
