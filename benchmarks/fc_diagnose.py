"""Does a fact-checking adapter check claims, or answer one label? The bench's fact-checking claims, each
answered by its verdict token, beside what the knowledge adapters themselves know of the claims.

    python benchmarks/fc_diagnose.py --data ../shared/data/lama-trex --out benchmarks/results/fc-diagnose \\
        --fc CACHE/task-.../fact_checking,CACHE/task-.../fact_checking

The full size's knowledge adapters and library, as `loralag bench --size full` trains and caches them (trained
here first where the cache lacks them), and its fact-checking questions (claims about the 200 knowledge
entities, true or false by a coin flip). Reported:
- the knowledge: AUC of the claim's log-likelihood, true claims over false ones, under the base model and under
  the claim entity's own knowledge adapter: whether the verdict is in what the adapter injects at all;
- per fact-checking adapter (--fc, a task adapter folder; default the full size's current one in the cache):
  the margin logit(" SUPPORTS") - logit(" REFUTES") at the verdict position (the labels' first tokens) with
  the gold knowledge adapter under it (the Oracle's setting), with the entity's page in front and no knowledge
  adapter (RAG with the gold page), and with neither: the verdict-token accuracy (the margin's sign; the bench
  generates, and scores the label the answer starts with), its AUC (the check without the adapter's
  one-label lean) and how many claims it calls SUPPORTS. Writes fc_diagnose.md / .json into --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def auc(scores: list[float], positive: list[bool]) -> float:
    """The probability that a random positive scores above a random negative (ties half)."""
    pos = [s for s, y in zip(scores, positive) if y]
    neg = [s for s, y in zip(scores, positive) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def markdown(summary: dict, n_knowledge: int, seconds: float) -> list[str]:
    """fc_diagnose.md's lines from the summary written beside it."""
    from loralag.experiments.lama.report import md_table

    settings = list(next(iter(summary["adapters"].values()), {}))
    cells = "{accuracy:.1f} / {auc:.1f} / {says_supports}"
    return [
        "# Fact checking: does the adapter check the claim?",
        "",
        f"{summary['claims']} fact-checking claims of the full size ({summary['true']} true), "
        f"{n_knowledge} knowledge adapters; {seconds:.0f} s.",
        "",
        "What the knowledge adapters know: AUC (%) of the claim's log-likelihood, true claims over false.",
        "",
        *md_table(["model", "AUC"], [[k, f"{100 * v:.1f}"] for k, v in summary["knowledge"].items()]),
        "",
        "Each fact-checking adapter's verdict token (the margin of SUPPORTS over REFUTES): accuracy, AUC (%), "
        "and the claims it calls SUPPORTS.",
        "",
        *md_table(
            ["adapter", *settings],
            [[a, *(cells.format(**r) for r in rows.values())] for a, rows in summary["adapters"].items()],
        ),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a folder of LAMA T-REx relation files")
    p.add_argument("--fc", default=None, help="comma-separated fact-checking adapter folders (default: the cache's)")
    p.add_argument("--cache", type=Path, default=None, help="the bench's cache (default: its own)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/fc-diagnose"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    from common import write_tables

    import loralag
    from loralag.experiments.lama.answering import sequence_logprobs
    from loralag.experiments.lama.config import bench_data, default_cache_dir, size_config
    from loralag.experiments.lama.data import FACT_CHECKING, rag_prompt
    from loralag.experiments.lama.run import _library, adapter_folders, knowledge_document, knowledge_train_config
    from loralag.library.store import build_library, module_shapes
    from loralag.models import load_model
    from loralag.training.train import train_adapters

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cfg = size_config("full")
    cache = args.cache or default_cache_dir()
    data = bench_data(cfg, args.data)
    claims = data.questions[FACT_CHECKING]
    supports = [q.example.answers[0] == "SUPPORTS" for q in claims]
    folders = adapter_folders(cache, cfg)
    fcs = [Path(f) for f in args.fc.split(",")] if args.fc else [folders["task"] / "fact_checking"]
    missing = [str(f) for f in fcs if not (f / "adapter_config.json").is_file()]
    if missing:
        p.error(f"--fc: no adapter at {', '.join(missing)}")

    model, tok = load_model("default", dtype=torch.float32)
    docs = [knowledge_document(e, data.relations, cfg) for e in data.entities]
    know_paths = train_adapters(model, tok, docs, folders["knowledge"], knowledge_train_config(cfg))
    know = _library(cache, "knowledge", know_paths, model, "default", True)
    gold = [q.entity for q in claims]

    def fixed(state, fixes: dict, n: int):
        """Slices of 16 of n sequences, each after fixing `state`'s libraries to their names in `fixes`."""
        for i in range(0, n, 16):
            for lib, names in fixes.items():
                state.fix(lib, names[i : i + 16])
            yield slice(i, i + 16)

    def loglik(state, texts: list[str], knows: list) -> list[float]:
        return [
            x for b in fixed(state, {"knowledge": knows}, len(texts)) for x in sequence_logprobs(model, tok, texts[b])
        ]

    sup, ref = tok(" SUPPORTS").input_ids[0], tok(" REFUTES").input_ids[0]

    def margin(state, prompts: list[str], fixes: dict) -> list[float]:
        """logit(SUPPORTS) - logit(REFUTES) after each prompt (left-padded: the last position is the verdict's)."""
        tok.padding_side, out = "left", []
        for b in fixed(state, fixes, len(prompts)):
            with torch.no_grad():
                logits = model(**tok(prompts[b], return_tensors="pt", padding=True)).logits[:, -1].float()
            out += (logits[:, sup] - logits[:, ref]).tolist()
        return out

    texts = [q.example.input for q in claims]
    state = loralag.attach(model, {"knowledge": know}, router="none")
    knowledge = {
        "base model": auc(loglik(state, texts, [None] * len(gold)), supports),
        "the entity's knowledge adapter": auc(loglik(state, texts, gold), supports),
    }
    loralag.detach(model)

    plain = [q.prompt for q in claims]
    pages = {e.name: e.page for e in data.entities}
    settings = {
        "gold knowledge adapter": (plain, gold),
        "gold page in front": ([rag_prompt(pages[q.entity], q.prompt) for q in claims], [None] * len(gold)),
        "neither": (plain, [None] * len(gold)),
    }
    adapters = {}
    for fc in fcs:
        where = cache / "libraries" / f"fc-diagnose-{fc.parent.name}"  # a one-adapter library, beside the bench's
        lib = build_library(where, [fc], base_model="default", shapes=module_shapes(model), replace=True)
        state = loralag.attach(model, {"knowledge": know, "task": lib}, router="none")
        task = [lib.names[0]] * len(gold)
        rows = {}
        for name, (prompts, knows) in settings.items():
            m = margin(state, prompts, {"knowledge": knows, "task": task})
            rows[name] = {
                "accuracy": 100 * sum((x > 0) == y for x, y in zip(m, supports)) / len(m),
                "auc": 100 * auc(m, supports),
                "says_supports": sum(x > 0 for x in m),
            }
        loralag.detach(model)
        adapters[fc.parent.name] = rows

    summary = {"claims": len(claims), "true": sum(supports), "knowledge": knowledge, "adapters": adapters}
    lines = markdown(summary, len(data.entities), time.perf_counter() - t0)
    write_tables(args.out, "fc_diagnose", lines, summary)


if __name__ == "__main__":
    main()
