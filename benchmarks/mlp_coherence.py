"""Does per-token LAG lose by picking a knowledge adapter per module rather than per MLP? LAG routes each adapted
linear layer on its own (the paper's equations, PEFT's Arrow), so one token's gate, up and down projections in a
layer can take three different documents' adapters, and the MLP then mixes parts of unrelated updates.

    python benchmarks/mlp_coherence.py --data ../shared/data/lama-trex --out benchmarks/results/mlp-coherence

The bench's knowledge adapters (the full size's 200, cached where `loralag bench` caches them, trained first if
they are not there) as one library, routed alone on the bench's slot-filling and QA questions with the gold answer
fed token by token (benchmarks/common.teacher_forced_routing). At the answer positions: how often a layer's three
projections pick the same adapter, and the gold answer's NLL under per-module LAG against one pick per MLP (the
gate projection's LAG pick, from the MLP's input, applied at up and down too: the down projection's input is
made by the other two, so the MLP's first projection is where one decision can be taken), beside the Oracle and
the base model. Writes mlp_coherence.md / .json into --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@contextlib.contextmanager
def one_pick_per_mlp():
    """While open, every RoutedLinear named *.up_proj or *.down_proj applies the adapter its layer's gate_proj
    picked for the same tokens (the knowledge library alone; gate_proj routes as its router says)."""
    from loralag.routing import layer as routed_layer
    from loralag.routing.routers import ROUTERS, Routed, _apply_winner

    forward = routed_layer.RoutedLinear.forward
    picks: dict[str, torch.Tensor] = {}  # layer prefix -> the gate's winners for the tokens of this call

    def coherent(self, x):
        mlp, _, projection = self.name.rpartition(".")
        bank, spec = self.banks["knowledge"], self.state.specs["knowledge"]
        if projection not in PROJECTIONS or spec.router in ("fixed", "none"):
            return forward(self, x)
        X = x.reshape(-1, x.shape[-1]).to(bank.dtype)
        batch = x.shape[0] if x.dim() > 2 else 1
        if projection == "gate_proj":
            routed = ROUTERS[spec.router](bank, X, spec, batch)
            picks[mlp] = routed.winner
        else:
            winner = picks[mlp]
            routed = Routed(_apply_winner(bank, X, winner), winner, torch.zeros(len(winner)))
        if self.state.trace is not None:
            self.state.trace.record(self.name, "knowledge", routed.winner.view(batch, -1), routed.score.view(batch, -1))
        h = self.base(x)
        return h.add_(routed.delta.view(h.shape).to(h.dtype))

    routed_layer.RoutedLinear.forward = coherent
    try:
        yield
    finally:
        routed_layer.RoutedLinear.forward = forward


class Agreement:
    """At the answer positions, per (layer, token): do the three projections pick one adapter, do gate and up
    (the same input) agree, is the gold adapter among the three picks."""

    def __init__(self):
        self.n = self.all_three = self.gate_up = self.gold_any = 0

    def __call__(self, trace, prompt_length: int, gold: int) -> None:
        layers: dict[str, dict[str, torch.Tensor]] = {}
        for module in trace.modules("knowledge"):
            mlp, _, projection = module.rpartition(".")
            layers.setdefault(mlp, {})[projection] = trace.winner_matrix(module, "knowledge")[0, prompt_length - 1 :]
        for picks in layers.values():
            g, u, d = (picks[p] for p in PROJECTIONS)
            self.n += len(g)
            self.all_three += int(((g == u) & (u == d)).sum())
            self.gate_up += int((g == u).sum())
            self.gold_any += int(((g == gold) | (u == gold) | (d == gold)).sum())

    def shares(self) -> dict:
        n = max(1, self.n)
        return {
            "decisions": self.n,
            "all_three_same": self.all_three / n,
            "gate_up_same": self.gate_up / n,
            "gold_in_any": self.gold_any / n,
        }


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="a folder of LAMA T-REx relation files")
    p.add_argument("--questions", type=int, default=None, help="per family (default: all the bench's)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/mlp-coherence"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    from common import teacher_forced_routing, write_tables

    from loralag.experiments.lama.config import bench_data, default_cache_dir, size_config
    from loralag.experiments.lama.data import QA, SLOT_FILLING
    from loralag.experiments.lama.run import adapter_folders, knowledge_document, knowledge_train_config
    from loralag.library.store import build_library, module_shapes
    from loralag.models import load_model
    from loralag.training.train import train_adapters

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = size_config("full")
    data = bench_data(cfg, args.data)
    model, tok = load_model("default", dtype=torch.float32)
    questions = [q for d in (SLOT_FILLING, QA) for q in data.questions[d][: args.questions]]
    mentions = {e.name: e.mentions for e in data.entities}
    docs = [knowledge_document(e, data.relations, cfg) for e in data.entities]
    cache = default_cache_dir()
    t = time.perf_counter()
    paths = train_adapters(model, tok, docs, adapter_folders(cache, cfg)["knowledge"], knowledge_train_config(cfg))
    lib = build_library(
        cache / "mlp-coherence" / f"knowledge-{len(paths)}",
        paths,
        base_model="default",
        shapes=module_shapes(model),
        replace=True,
    )
    prepared = time.perf_counter() - t
    k = cfg.k
    rows, agreement = {}, Agreement()
    for name, router, kk, oracle, coherent in (
        ("base (no adapter)", "none", 1, False, False),
        (f"LAG@{k}, per module", "lag", k, False, False),
        (f"LAG@{k}, one pick per MLP", "lag", k, False, True),
        ("Oracle", "fixed", 1, True, False),
    ):
        t = time.perf_counter()
        with one_pick_per_mlp() if coherent else contextlib.nullcontext():
            on_trace = agreement if router == "lag" and not coherent else None
            rows[name] = teacher_forced_routing(
                model, tok, lib, questions, mentions, router, kk, oracle, on_trace=on_trace
            )
        rows[name]["seconds"] = time.perf_counter() - t
        print(name, json.dumps({key: v for key, v in rows[name].items() if key != "answer_by_layer"}), flush=True)
    agree = agreement.shares()
    lines = [
        f"# One knowledge pick per module or per MLP — {len(lib)} knowledge adapters, {len(questions)} slot-filling"
        " and QA questions",
        "",
        f"Data `{args.data}`; the full bench's knowledge adapters (rank {cfg.know_r}, {cfg.know_steps} steps, "
        f"init {cfg.know_init}); the knowledge library alone, the prompt prefilled, the gold answer fed token by "
        "token. Answer positions: the decisions that produce an answer token; for one pick per MLP, the share to "
        "gold is the gate projection's (the pick all three apply).",
        "",
        "| routing | answer positions to gold (%) | subject tokens to gold (%) | gold answer NLL |",
        "|---|---|---|---|",
        *(
            f"| {name} | {100 * r['answer_to_gold']:.1f} | {100 * r['subject_to_gold']:.1f} | {r['answer_nll']:.2f} |"
            for name, r in rows.items()
        ),
        "",
        f"Per-module LAG at the answer positions, over {agree['decisions']} (layer, token) pairs: the three "
        f"projections pick one adapter in {100 * agree['all_three_same']:.1f}%, gate and up (the same input) agree "
        f"in {100 * agree['gate_up_same']:.1f}%, the gold adapter is among the three picks in "
        f"{100 * agree['gold_in_any']:.1f}%.",
        "",
        f"Library prepared in {prepared:.0f} s (0 to train when cached); routing: "
        + ", ".join(f"{name} {r['seconds']:.0f} s" for name, r in rows.items()),
    ]
    write_tables(args.out, "mlp_coherence", lines, {"rows": rows, "agreement": agree, "k": k})


if __name__ == "__main__":
    main()
