"""Which per-token rule routes the answer to the gold knowledge adapter? lag against lag-prefix with a growing
weight on the token's own pick, on the knowledge library of a `loralag bench` run.

    python benchmarks/prefix_rules.py --results benchmarks/results/lama --questions 60

For slot-filling and QA questions of that run, the prompt is prefilled with the KV cache and the gold answer is
then fed token by token (teacher forcing, as generation feeds its own tokens), with only the knowledge library
attached. Reported per rule: the share of knowledge decisions (token × module) on the gold adapter at the answer
positions (the decisions that produce an answer token) and at the subject's mention, and the gold answer's
negative log-likelihood. `own` is what the token's own LAG pick adds to its count (0.5: it only breaks ties).
Writes prefix_rules.md / .json into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RULES = (("lag", 0.5), ("lag-prefix", 0.5), ("lag-prefix", 4.0), ("lag-prefix", 30.0))


def measure(model, tok, lib, questions, mentions, router, own, k):
    from common import teacher_forced_routing

    import loralag.routing.prefix_evidence as PE

    tie, PE.TIE = PE.TIE, own
    try:
        row = teacher_forced_routing(model, tok, lib, questions, mentions, router, k)
    finally:
        PE.TIE = tie
    return {"router": router, "own": own} | {
        key: row[key] for key in ("answer_to_gold", "subject_to_gold", "answer_nll")
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--results", type=Path, default=Path("benchmarks/results/lama"), help="a loralag bench results folder"
    )
    p.add_argument("--questions", type=int, default=60, help="slot-filling and QA questions (default 60)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/prefix-rules"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    from loralag.experiments.lama.config import bench_data, size_config
    from loralag.experiments.lama.data import QA, SLOT_FILLING
    from loralag.library.store import open_library
    from loralag.models import load_model

    torch.set_num_threads(args.threads)
    settings = json.loads((args.results / "settings.json").read_text())
    cfg = size_config(settings["config"] | {"k_sweep": tuple(settings["config"]["k_sweep"])})
    data = bench_data(cfg, settings["data_dir"])  # the run's own data, questions included
    lib = open_library(settings["knowledge_library"])
    model, tok = load_model(settings["model"], dtype=torch.float32)
    per = max(1, args.questions // 2)
    questions = data.questions[SLOT_FILLING][:per] + data.questions[QA][:per]
    mentions = {e.name: e.mentions for e in data.entities}
    rows = []
    for router, own in RULES:
        t = time.perf_counter()
        rows.append(measure(model, tok, lib, questions, mentions, router, own, min(cfg.k, len(lib))))
        print(json.dumps(rows[-1]), f"({time.perf_counter() - t:.0f} s)", flush=True)
    lines = [
        f"# lag against lag-prefix rules — {len(lib)} knowledge adapters, {len(questions)} questions",
        "",
        "Knowledge library only; prompt prefilled, gold answer fed token by token with the KV cache.",
        "",
        "| router | own pick adds | answer positions to gold (%) | subject tokens to gold (%) | gold answer NLL |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['router']} | {r['own']} | {100 * r['answer_to_gold']:.1f} | "
            f"{100 * r['subject_to_gold']:.1f} | {r['answer_nll']:.2f} |"
        )
    from common import write_tables

    write_tables(args.out, "prefix_rules", lines, rows)


if __name__ == "__main__":
    main()
