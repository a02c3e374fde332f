"""Which LoRA init lets LAG's routers find a knowledge adapter, token by token? Knowledge adapters trained as
`loralag bench` trains them, once per init, and each library routed alone on slot-filling and QA questions.

    python benchmarks/knowledge_inits.py --data ../shared/data/lama-trex --entities 24 \\
        --inits peft,activations,contrast --out benchmarks/results/knowledge-inits

For each init: the bench's knowledge adapters of --entities entities (its settings: gate/up/down, rank 6,
12 steps on the article and its restatements; cached beside the bench's, a folder per init), one library, and
for the entities' slot-filling and QA questions the gold answer fed token by token after the prompt (teacher
forcing, benchmarks/common.teacher_forced_routing). Reported per router (Arrow, SpectR, LAG at k = N/10, the
Oracle: the gold adapter on every token; and once the base model without adapters): the share of decisions
on the gold adapter at the answer positions and at the subject's mention, and the gold answer's NLL. The
Oracle's NLL says whether an init still lets the adapter learn its document; the routers' shares say whether
LAG can find it. Writes knowledge_inits.md / .json into --out.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a folder of LAMA T-REx relation files")
    p.add_argument("--entities", type=int, default=24, help="knowledge adapters (default 24)")
    p.add_argument("--inits", default="peft,activations,contrast", help="comma-separated TrainConfig inits")
    p.add_argument("--k", type=int, default=None, help="LAG's k (default: N/10, at least 2)")
    p.add_argument("--steps", type=int, default=None, help="training steps per adapter (default: the bench's)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank, alpha = 2 x rank (default: the bench's)")
    p.add_argument("--qa", action="store_true", help="each fact also restated as a question and answer (--know-qa)")
    p.add_argument("--freeze-a", action="store_true", help="train B alone, A kept at its init (--know-freeze-a)")
    p.add_argument(
        "--vs-library",
        action="store_true",
        help="contrast/salient against the library's own texts (every document's, pooled: "
        "TrainConfig.contrast_against) instead of generic text",
    )
    p.add_argument(
        "--where",
        action="store_true",
        help="also LAG with the gold adapter on the prompt only, and at the answer positions only",
    )
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/knowledge-inits"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    from common import teacher_forced_routing, write_tables

    from loralag.experiments.lama.config import bench_data, default_cache_dir, size_config
    from loralag.experiments.lama.data import QA, SLOT_FILLING
    from loralag.experiments.lama.run import knowledge_document, knowledge_train_config
    from loralag.library.store import build_library, module_shapes
    from loralag.models import load_model
    from loralag.training import CONTRAST_INITS, INITS
    from loralag.training.train import item_texts, train_adapters

    inits = [i.strip() for i in args.inits.split(",") if i.strip()]
    unknown = sorted(set(inits) - set(INITS))
    if unknown or not inits:
        p.error(f"--inits: unknown {unknown}; choose from {INITS}")
    if args.vs_library and set(inits) - set(CONTRAST_INITS):
        p.error(f"--vs-library is a reference for the {' and '.join(CONTRAST_INITS)} inits only")
    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.entities
    k = args.k or max(2, n // 10)
    alpha = 2 * args.rank if args.rank else None
    cfg = size_config(
        "full",
        n_entities=n,
        questions_per_dataset=n,
        know_steps=args.steps,
        know_r=args.rank,
        know_alpha=alpha,
        know_qa=args.qa or None,
        know_freeze_a=args.freeze_a or None,
    )
    default = size_config("full")
    data = bench_data(cfg, args.data)
    model, tok = load_model("default", dtype=torch.float32)
    questions = data.questions[SLOT_FILLING] + data.questions[QA]
    mentions = {e.name: e.mentions for e in data.entities}
    docs = [knowledge_document(e, data.relations, cfg) for e in data.entities]
    cache = default_cache_dir()
    rows, timings = [], {}
    for init in inits:
        kcfg = knowledge_train_config(replace(cfg, know_init=init))
        if args.vs_library:
            kcfg = replace(kcfg, contrast_against=[t for d in docs for t in item_texts(d)])
        t = time.perf_counter()
        # a folder per init (and step count, rank, QA texts): one folder holds one version of each adapter name,
        # and would retrain it per setting
        folder = init + (f"-steps{cfg.know_steps}" if cfg.know_steps != default.know_steps else "")
        folder += f"-r{cfg.know_r}" if cfg.know_r != default.know_r else ""
        folder += "-qa" if cfg.know_qa else ""
        folder += "-frozen-a" if cfg.know_freeze_a else ""
        folder += "-vs-library" if args.vs_library else ""
        paths = train_adapters(model, tok, docs, cache / "knowledge-inits" / folder, kcfg, progress=True)
        timings[init] = time.perf_counter() - t
        lib = build_library(
            cache / "knowledge-inits" / "libraries" / f"{folder}-n{n}",  # per count: a library keeps what was added
            paths,
            base_model="default",
            shapes=module_shapes(model),
            replace=True,
        )
        routers = [("none", 1, False, None)] if init == inits[0] else []  # the base model once
        routers += [("arrow", 1, False, None), ("spectral", n, False, None), ("lag", k, False, None)]
        routers += [("lag", k, False, "prompt"), ("lag", k, False, "answer")] if args.where else []
        routers += [("fixed", 1, True, None)]
        for router, kk, oracle, gold_at in routers:
            t = time.perf_counter()
            row = {"init": init} | teacher_forced_routing(
                model, tok, lib, questions, mentions, router, kk, oracle, gold_at=gold_at
            )
            rows.append(row)
            print(json.dumps({key: v for key, v in row.items() if key != "answer_by_layer"}), flush=True)
            print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    name = {"none": "base (no adapter)", "arrow": "Arrow", "spectral": "SpectR", "lag": f"LAG@{k}", "oracle": "Oracle"}
    lines = [
        f"# Knowledge-library inits — {n} knowledge adapters, {len(questions)} slot-filling and QA questions",
        "",
        f"Data `{args.data}`; the bench's knowledge settings (rank {cfg.know_r}, {cfg.know_steps} steps"
        + (", each fact also as a question and answer" if cfg.know_qa else "")
        + (", A frozen at its init" if cfg.know_freeze_a else "")
        + (", contrasted with the library's own texts pooled" if args.vs_library else "")
        + "). Knowledge"
        " library only; prompt prefilled, the gold answer fed token by token with the KV cache. Chance: "
        f"{100 / n:.1f}%.",
        "",
        "| init | router | answer positions to gold (%) | subject tokens to gold (%) | gold answer NLL |",
        "|---|---|---|---|---|",
    ]
    where = {"prompt": ", the gold adapter on the prompt", "answer": ", the gold adapter at the answer positions"}
    for r in rows:
        if r.get("gold_at"):  # half the decisions are forced: the shares would mix the two
            lines.append(f"| {r['init']} | {name[r['router']]}{where[r['gold_at']]} | — | — | {r['answer_nll']:.2f} |")
            continue
        lines.append(
            f"| {r['init']} | {name[r['router']]} | {100 * r['answer_to_gold']:.1f} | "
            f"{100 * r['subject_to_gold']:.1f} | {r['answer_nll']:.2f} |"
        )
    lines += ["", "Training time per init (s, 0 when cached): " + ", ".join(f"{i} {t:.0f}" for i, t in timings.items())]
    write_tables(args.out, "knowledge_inits", lines, {"rows": rows, "timings": timings})


if __name__ == "__main__":
    main()
