"""Training and evaluation throughput on a Ray cluster (loralag.cluster) with 1 and 2 workers, against the same
work done locally in this process, reported as ratios (local seconds / Ray seconds: above 1 is faster).

The cluster is a local `ray.cluster_utils.Cluster`: a head and a second node of one CPU each, so each worker
has one CPU and one torch thread; the local run uses one thread too, so a ratio says what the workers add, not
what more threads would. Ray times include starting the workers and shipping the model to them (what a user
waits for); the per-adapter time of the local run gives the README's cost of 10^5 documents.

    python benchmarks/bench_cluster.py [--model default] [--docs 4] [--steps 30] [--questions 24] [--quick]
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from common import md_table, parse_args, write_report

WORDS = (
    "river harbour glass guild founded council winter copper mill treaty north valley tower market bell lantern "
    "salt orchard bridge quarry weaver ferry archive chapel forge meadow signal"
).split()


def documents(n: int, words: int = 120):
    from loralag.training.train import Document

    return [
        Document(f"doc{i}", f"Entity {i}: " + " ".join(WORDS[(i * 5 + j * (i + 3)) % len(WORDS)] for j in range(words)))
        for i in range(n)
    ]


def same_adapters(a: Path, b: Path, names) -> bool:
    import torch
    from safetensors.torch import load_file

    for name in names:
        x, y = load_file(a / name / "adapter_model.safetensors"), load_file(b / name / "adapter_model.safetensors")
        if x.keys() != y.keys() or not all(torch.equal(x[k], y[k]) for k in x):
            return False
    return True


def main() -> None:
    def extra(p):
        p.add_argument("--model", default="default")
        p.add_argument("--docs", type=int, default=4, help="documents (one adapter each)")
        p.add_argument("--steps", type=int, default=30, help="training steps per adapter (the CLI's default)")
        p.add_argument("--questions", type=int, default=24)
        p.add_argument("--max-new-tokens", type=int, default=16)

    args = parse_args(__doc__.splitlines()[0], extra)
    if args.quick:
        args.docs, args.steps, args.questions, args.max_new_tokens = 2, 2, 4, 4
    import ray
    import torch
    from common import machine_info
    from ray.cluster_utils import Cluster

    from loralag.cluster.evaluate import RayAnswerer
    from loralag.cluster.train import train_on_ray
    from loralag.evaluation import evaluate as ev
    from loralag.library.store import build_library, module_shapes
    from loralag.models import load_model
    from loralag.routing.state import attach, detach
    from loralag.training.train import TrainConfig, train_adapters

    torch.set_num_threads(1)
    info = machine_info()
    t_all = time.perf_counter()
    model, tokenizer = load_model(args.model)
    docs = documents(args.docs)
    cfg = TrainConfig(steps=args.steps)
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    data: dict = {"model": args.model, "docs": args.docs, "steps": args.steps, "questions": args.questions}
    try:
        t = time.perf_counter()
        train_adapters(model, tokenizer, docs, tmp / "local", cfg, progress=False)
        local_train = time.perf_counter() - t
        data["train"] = {"local": {"seconds": local_train, "per_adapter_s": local_train / len(docs)}}
        print(f"local training: {local_train:.1f} s ({local_train / len(docs):.2f} s per adapter)")

        node = {"num_cpus": 1, "object_store_memory": 1024 * 2**20}
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        cluster.add_node(**node)
        ray.init(address=cluster.address)
        try:
            for workers in (1, 2):
                out = tmp / f"ray{workers}"
                run = train_on_ray(model, tokenizer, docs, out, cfg, workers=workers, progress=False)
                same = same_adapters(out, tmp / "local", [d.name for d in docs])
                data["train"][f"ray{workers}"] = {
                    "seconds": run.seconds,
                    "ratio": local_train / run.seconds,
                    "identical_to_local": same,
                }
                print(
                    f"Ray, {workers} worker(s): {run.seconds:.1f} s, ratio {local_train / run.seconds:.2f}, same={same}"
                )

            lib = build_library(
                tmp / "lib", [tmp / "local"], base_model=args.model, shapes=module_shapes(model), progress=False
            )
            records = [
                {
                    "id": f"q{i}",
                    "input": f"What is {WORDS[i % len(WORDS)]} of entity {i % args.docs}?",
                    "output": [{"answer": "x"}],
                }
                for i in range(args.questions)
            ]
            path = tmp / "nq-dev-kilt.jsonl"
            import json

            path.write_text("".join(json.dumps(r) + "\n" for r in records))
            [ds] = ev.load_datasets([path])
            options = dict(batch_size=4, max_new_tokens=args.max_new_tokens, chat=False)
            attach(model, {"lib": lib}, router="lag", k=20)
            t = time.perf_counter()
            local_preds = ev.generate_predictions(model, tokenizer, ds, **options)
            local_eval = time.perf_counter() - t
            detach(model)
            data["eval"] = {"local": {"seconds": local_eval, "questions_per_s": len(records) / local_eval}}
            print(f"local answering: {local_eval:.1f} s")
            for workers in (1, 2):
                t = time.perf_counter()
                with RayAnswerer(model, tokenizer, {"lib": lib}, "lag", 20, workers=workers) as answerer:
                    t_answer = time.perf_counter()
                    preds = answerer.generate_predictions(ds, **options)
                    answering = time.perf_counter() - t_answer
                total = time.perf_counter() - t
                data["eval"][f"ray{workers}"] = {
                    "seconds": total,
                    "answering_s": answering,
                    "ratio": local_eval / total,
                    "ratio_answering": local_eval / answering,
                    "identical_to_local": preds == local_preds,
                }
                same = preds == local_preds
                print(f"Ray eval, {workers} worker(s): {total:.1f} s ({answering:.1f} s answering), same={same}")
        finally:
            ray.shutdown()
            cluster.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    tr, evd = data["train"], data["eval"]
    per = tr["local"]["per_adapter_s"]
    data["cost_1e5_docs_hours_one_worker"] = 1e5 * per / 3600
    rows = [["local (this process, 1 thread)", f"{tr['local']['seconds']:.1f}", "1.00", "-"]]
    rows += [
        [
            f"Ray, {w} worker(s)",
            f"{tr[f'ray{w}']['seconds']:.1f}",
            f"{tr[f'ray{w}']['ratio']:.2f}",
            str(tr[f"ray{w}"]["identical_to_local"]),
        ]
        for w in (1, 2)
    ]
    erows = [["local (this process, 1 thread)", f"{evd['local']['seconds']:.1f}", "-", "1.00", "-", "-"]]
    erows += [
        [
            f"Ray, {w} worker(s)",
            f"{evd[f'ray{w}']['seconds']:.1f}",
            f"{evd[f'ray{w}']['answering_s']:.1f}",
            f"{evd[f'ray{w}']['ratio']:.2f}",
            f"{evd[f'ray{w}']['ratio_answering']:.2f}",
            str(evd[f"ray{w}"]["identical_to_local"]),
        ]
        for w in (1, 2)
    ]
    body = (
        f"Model `{args.model}`; {args.docs} knowledge adapters (gate/up/down, r=6) of {args.steps} steps each; "
        f"{args.questions} questions answered with LAG (k=20) over their library, batches of 4, "
        f"{args.max_new_tokens} new tokens. Ray: a local cluster of a head and a second node, one CPU each; "
        "times include starting the workers and shipping the model to them.\n\n"
        "## Training\n\n"
        + md_table(["run", "seconds", "ratio to local", "adapters identical to local"], rows)
        + f"\n\nLocal: {per:.2f} s per adapter. 10^5 documents at that rate: {1e5 * per / 3600:.0f} hours on one "
        f"worker, {1e5 * per / 3600 / 100:.1f} hours on 100.\n\n## Evaluation\n\n"
        + md_table(
            [
                "run",
                "seconds",
                "answering (s), workers ready",
                "ratio to local",
                "ratio, answering only",
                "predictions identical",
            ],
            erows,
        )
        + "\n"
    )
    write_report(
        args.out,
        "cluster",
        "Ray: training and evaluation throughput",
        body,
        info,
        data,
        time.perf_counter() - t_all,
        args.quick,
    )


if __name__ == "__main__":
    main()
