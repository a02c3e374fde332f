"""Training many adapters: one at a time vs grouped (G adapters per forward/backward) vs worker processes
(W adapters at a time, each in its own process with threads / W torch threads), SmolLM2-135M.

`loralag.training.train.train_adapters(..., group_size=G)` trains G adapters per pass: each step is one
forward/backward over the concatenation of the G adapters' own batches, each row through its own adapter.
Per adapter the training is the same as one at a time (same init, batches, per-adapter loss, clipping and
AdamW), so this benchmark measures only speed, plus a check that the weights agree.

Workload: N knowledge-style documents about made-up entities (≈ 100–165 tokens each, 3 rewrites each, so
4 examples per adapter), batch 4, rank 6 on gate_proj/up_proj/down_proj, the default base model
(SmolLM2-135M-Instruct, float32), torch threads 1 unless --threads.

Methods: `one-at-a-time` (group_size=1, PEFT's get_peft_model per adapter), `G=2`, `G=4`, `G=8` (group_size=G)
and `workers=2` (workers=2: with `--threads 2` on 2 cores, two one-thread processes against one process of two
threads; the worker processes' start, imports included, is in their time). Each run trains all N adapters into
a fresh folder (nothing cached) and includes saving the PEFT folders. Runs are interleaved rep by rep (the
starting method rotates) and the median per method is reported; there is no separate warm-up run (a run is
minutes long; the model is loaded once beforehand).

"Token slots / real tokens" is the padding overhead: grouped rows are padded to the longest example of the
whole group, one-at-a-time rows only to the longest of their own batch.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import common as C
import torch
from safetensors.torch import load_file

from loralag.training import train as lt

TARGETS = ["gate_proj", "up_proj", "down_proj"]

# Made-up entities, so the facts are new to the model; every document states 7–10 of its facts in the main
# text and again, reworded and reordered, in 3 rewrites.
NAMES = [
    "Velmora Glassworks",
    "the Zarnovian Navy",
    "Ostrelle University",
    "the Brindlewick Canal",
    "Quillsby Observatory",
    "the Tessaly Mining Guild",
    "Marrowen Press",
    "the Sorrel Hills Railway",
    "Keldrath Orchards",
    "the Veltran Lighthouse",
]
PLACES = ["Quillsby", "Ostrelle", "Marrowen", "Tessaly", "Keldrath", "Dunmere", "Varrow Bay", "Elsinport"]
PEOPLE = [
    "Tobiah Renwick",
    "Ilsa Moravec",
    "Corwin Ashdale",
    "Petra Vallin",
    "Jonas Threlk",
    "Mirela Osk",
    "Aldous Penhallow",
    "Sefa Durrant",
]
THINGS = [
    "blue storm lanterns",
    "brass star charts",
    "salted river eels",
    "copper rail spikes",
    "amber glass beads",
    "winter pears",
    "folding sea maps",
    "tide clocks",
]
COLORS = ["amber", "slate grey", "deep green", "crimson", "pale blue", "ochre"]


def facts(rng: random.Random, name: str) -> list[tuple[str, str, str, str]]:
    """(fact in the main text's wording, 3 rewordings) for one entity."""
    place, person, thing, color = rng.choice(PLACES), rng.choice(PEOPLE), rng.choice(THINGS), rng.choice(COLORS)
    year, count, other = rng.randint(1702, 1968), rng.randint(3, 90), rng.choice(PLACES)
    animal = rng.choice(["heron", "fox", "stag", "owl"])
    return [
        (
            f"{name} was founded in {year} in the town of {place}.",
            f"In {year}, {name} was established in {place}.",
            f"{place} is where {name} began, in the year {year}.",
            f"The founding year of {name} is {year}; the town is {place}.",
        ),
        (
            f"Its founder was {person}, a former ship's carpenter.",
            f"{person}, once a ship's carpenter, founded it.",
            f"It was started by {person}, who had worked as a carpenter on ships.",
            f"Founder: {person} (previously a ship's carpenter).",
        ),
        (
            f"It is best known for its {thing}.",
            f"Most people know it for its {thing}.",
            f"Its {thing} made it famous.",
            f"Its best-known product: {thing}.",
        ),
        (
            f"By law, every one of its buildings is painted {color}.",
            f"All of its buildings must be painted {color}.",
            f"A local rule says its buildings are {color}.",
            f"Building colour, required by law: {color}.",
        ),
        (
            f"It employs exactly {count} people.",
            f"Exactly {count} people work there.",
            f"Its staff numbers {count}.",
            f"Employees: {count}.",
        ),
        (
            f"Each spring it holds a festival with a parade to {other}.",
            f"Every spring there is a festival and a parade to {other}.",
            f"A spring festival ends with a parade to {other}.",
            f"Spring festival: a parade to {other}.",
        ),
        (
            "Its motto, carved over the gate, is 'Steady hands, bright water'.",
            "Over its gate is carved the motto 'Steady hands, bright water'.",
            "The gate carries its motto: 'Steady hands, bright water'.",
            "Motto: 'Steady hands, bright water'.",
        ),
        (
            f"Its emblem is a {animal} holding a silver key.",
            f"A {animal} holding a silver key is its emblem.",
            f"On its emblem: a {animal} with a silver key.",
            f"Emblem: {animal} with a silver key.",
        ),
        (
            f"Its records are kept in a vault under the old town hall of {place}, opened once a year.",
            f"Once a year the vault under {place}'s old town hall, where its records are kept, is opened.",
            f"Its records lie in a vault below the old town hall in {place} that opens yearly.",
            f"Records: vault under the old {place} town hall, opened yearly.",
        ),
        (
            f"Its first director, {person}'s daughter Anwen, doubled its size before {year + 30}.",
            f"Anwen, daughter of {person}, was the first director and doubled its size by {year + 30}.",
            f"Before {year + 30}, its size was doubled by its first director Anwen, {person}'s daughter.",
            f"First director: Anwen, daughter of {person}; doubled it in size before {year + 30}.",
        ),
        (
            f"In {year + 41} a fire destroyed its first hall, which was rebuilt in stone.",
            f"Its first hall burned in {year + 41} and was rebuilt in stone.",
            f"After the fire of {year + 41}, the first hall was rebuilt in stone.",
            f"{year + 41}: fire destroyed the first hall; rebuilt in stone.",
        ),
    ]


def make_docs(n: int, seed: int = 0) -> list[lt.Document]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        name = NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f" {i // len(NAMES) + 1}")
        fs = facts(rng, name)[: 7 + i % 4]  # 7..10 facts: documents of different lengths
        text = " ".join(f[0] for f in fs)
        rewrites = []
        for k in (1, 2, 3):
            order = fs[:]
            rng.shuffle(order)
            rewrites.append(" ".join(f[k] for f in order))
        docs.append(lt.Document(f"doc{i:02d}", text, rewrites))
    return docs


class TokenCounter:
    """(token slots computed, real tokens) of every forward through `model`'s transformer: input_ids' size and the
    attention mask's sum, read by a forward pre-hook (one-at-a-time training goes through PEFT's wrapper, grouped
    training calls the model itself; both reach its inner transformer). Counts what training actually ran."""

    def __init__(self, model):
        self.slots = self.real = 0
        self.handle = model.base_model.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs):
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        self.slots += ids.numel()
        self.real += int(mask.sum()) if mask is not None else ids.numel()

    def close(self) -> tuple[int, int]:
        self.handle.remove()
        return self.slots, self.real


def read_marker(folder: Path) -> dict:
    """The marker `train_adapters` writes beside each adapter (its losses among others)."""
    return json.loads((folder / lt.MARKER_FILE).read_text())


def extra(p):
    p.add_argument("--docs", type=int, default=None, help="adapters to train per run (default 8; quick 4)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per adapter (default 5; quick 2)")
    p.add_argument("--reps", type=int, default=None, help="timed runs per method (default 2; quick 1)")
    p.add_argument("--groups", type=str, default=None, help="comma-separated group sizes (default 2,4,8; quick 2,4)")
    p.add_argument("--workers", type=str, default="2", help="comma-separated worker-process counts (default 2)")
    p.add_argument("--device", default="cpu", help="where the model trains (default cpu; e.g. cuda)")
    p.add_argument(
        "--random-weights",
        type=Path,
        default=None,
        help="a folder with a model's config.json and tokenizer only: that architecture with random weights, for "
        "a machine without the model's weights (the timings are the same; the losses are not a trained model's)",
    )


def main():
    t0 = time.perf_counter()
    args = C.parse_args("Train many adapters: one at a time vs grouped", extra)
    if not args.threads:
        torch.set_num_threads(1)
    n_docs = args.docs or (4 if args.quick else 8)
    steps = args.steps or (2 if args.quick else 5)
    reps = args.reps or (1 if args.quick else 2)
    groups = [int(g) for g in (args.groups or ("2,4" if args.quick else "2,4,8")).split(",")]
    info = C.machine_info()

    if args.random_weights is None:
        from loralag.models import load_model

        model, tok = load_model("default")
        name = "SmolLM2-135M-Instruct"
    else:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.random_weights))
        tok = AutoTokenizer.from_pretrained(args.random_weights)
        tok.pad_token = tok.pad_token or tok.eos_token
        name = f"{args.random_weights.name} (random weights)"
    model.to(args.device).eval()
    if args.device != "cpu":
        info["device"] = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else args.device
    docs = make_docs(n_docs)
    config = lt.TrainConfig(target_modules=TARGETS, r=6, alpha=12, steps=steps, batch_size=4, lr=2e-3)
    examples = [lt.build_examples(tok, d, config) for d in docs]
    lengths = [[len(ids) for ids, _ in ex] for ex in examples]
    C.log(
        f"[train] {n_docs} docs, example tokens {min(map(min, lengths))}–{max(map(max, lengths))}, "
        f"text tokens {min(n[0] for n in lengths)}–{max(n[0] for n in lengths)}; steps {steps}; reps {reps}"
    )

    workers = [int(w) for w in args.workers.split(",") if w]
    methods = {"one-at-a-time": (1, 1), **{f"G={g}": (g, 1) for g in groups}}
    methods.update({f"workers={w}": (1, w) for w in workers})
    root = Path(tempfile.mkdtemp(prefix="bench-train-"))
    samples = {m: [] for m in methods}
    loads = {m: [] for m in methods}
    tokens = {m: set() for m in methods}  # (token slots, real tokens) of each run: one value per method
    kept = {}
    try:
        for rep in range(reps):
            names = list(methods)
            for m in names[rep % len(names) :] + names[: rep % len(names)]:
                out = root / f"{m}-{rep}"
                load_before = os.getloadavg()[0]
                counter = TokenCounter(model)
                t = time.perf_counter()
                g, w = methods[m]
                lt.train_adapters(model, tok, docs, out, config, progress=False, group_size=g, workers=w)
                dt = time.perf_counter() - t
                tokens[m].add(counter.close())
                samples[m].append(dt / n_docs)
                loads[m].append(round((load_before + os.getloadavg()[0]) / 2, 2))
                C.log(f"[train] rep {rep} {m}: {dt:.1f} s, {dt / n_docs:.2f} s/adapter, load {loads[m][-1]}")
                if m in kept:
                    shutil.rmtree(out)
                else:
                    kept[m] = out

        # The weights and losses agree with one-at-a-time training (the point of grouping being exact).
        ref = kept["one-at-a-time"]
        agree = {}
        for m, folder in kept.items():
            dw = dl = 0.0
            for d in docs:
                wa, wb = (
                    load_file(ref / d.name / "adapter_model.safetensors"),
                    load_file(folder / d.name / "adapter_model.safetensors"),
                )
                dw = max(dw, max((wa[k] - wb[k]).abs().max().item() for k in wa))
                la, lb = read_marker(ref / d.name), read_marker(folder / d.name)
                dl = max(dl, abs(la["final_loss"] - lb["final_loss"]))
            agree[m] = {"max_abs_weight_diff": dw, "max_abs_final_loss_diff": dl}
        losses = [(read_marker(ref / d.name)["first_loss"], read_marker(ref / d.name)["final_loss"]) for d in docs]
    finally:
        shutil.rmtree(root, ignore_errors=True)

    med = {m: C.median(s) for m, s in samples.items()}
    rows, data_rows = [], []
    for m, (g, w) in methods.items():
        [(computed, real)] = tokens[m]  # every run of a method computes the same batches
        ratio = med[m] / med["one-at-a-time"]
        rows.append(
            [
                m,
                C.fmt_time(med[m]),
                f"{ratio:.2f}",
                ", ".join(f"{s:.2f}" for s in samples[m]),
                f"{computed / real:.2f}" if real else "— (in the workers)",
                f"{agree[m]['max_abs_weight_diff']:.1e}",
                f"{agree[m]['max_abs_final_loss_diff']:.1e}",
                ", ".join(str(x) for x in loads[m]),
            ]
        )
        data_rows.append(
            {
                "method": m,
                "group_size": g,
                "workers": w,
                "median_s_per_adapter": med[m],
                "ratio_vs_one": ratio,
                "samples_s_per_adapter": samples[m],
                "token_slots": computed,
                "real_tokens": real,
                "loadavg_during": loads[m],
                **agree[m],
            }
        )
    best = min(med, key=med.get)
    best_ratio = med[best] / med["one-at-a-time"]
    grouped_wins = best != "one-at-a-time" and best_ratio < 0.95
    if grouped_wins:
        verdict = f"Fastest here: **{best}**, {1 / best_ratio:.2f}× the speed of one at a time."
    else:
        verdict = (
            f"**No group size is clearly faster than one at a time here** (best: {best}, ratio "
            f"{best_ratio:.2f}; differences under 5% are within this machine's noise), so "
            "`train_adapters` keeps `group_size=1` as its default."
        )
    g_max = max(g for g, _ in methods.values())
    rows_max = g_max * min(config.batch_size, max(map(len, lengths)))
    logits_gib = rows_max * max(map(max, lengths)) * model.config.vocab_size * 4 / C.GiB
    text_tok = [n[0] for n in lengths]
    body = [
        f"{n_docs} documents (text {min(text_tok)}–{max(text_tok)} tokens, 3 rewrites each: "
        f"{sum(map(len, lengths))} examples of {min(map(min, lengths))}–{max(map(max, lengths))} tokens), "
        f"batch {config.batch_size}, {steps} steps, r {config.r} on {', '.join(TARGETS)}, lr {config.lr}; "
        f"{name} float32 on {info.get('device', 'the CPU')}, torch threads {torch.get_num_threads()}. "
        "Seconds per adapter = wall time "
        f"of one `train_adapters` call over all {n_docs} documents (training + saving, nothing cached) / {n_docs}; "
        f"median of {reps} interleaved run(s).",
        "",
        C.md_table(
            [
                "method",
                "s / adapter",
                "ratio vs one-at-a-time",
                "runs (s / adapter)",
                "token slots / real tokens",
                "max abs Δw vs one-at-a-time",
                "max abs Δ final loss",
                "load avg during runs",
            ],
            rows,
        ),
        "",
        verdict,
        "",
        *(
            []
            if grouped_wins or args.device != "cpu"
            else [
                f"Why: on a CPU thread the matmuls of one adapter's batch (up to {config.batch_size} rows of "
                f"{min(map(min, lengths))}–{max(map(max, lengths))} tokens) already run at full speed, so a step costs "
                "about the same per token slot whatever G is, and grouping can only save the small per-adapter "
                "overheads (PEFT setup, Python per op). It pays instead for padding every row to the longest example "
                "of the whole group (token slots column) and for larger temporaries: the logits alone are "
                f"rows × width × {model.config.vocab_size:,} floats, {logits_gib:.2f} GiB per copy at G={g_max} "
                f"({rows_max} rows), written and read several times per step. Grouping is meant for hardware that one "
                "small batch leaves idle (GPUs); it was not measured on one here.",
                "",
            ]
        ),
        "Δw and Δ loss: grouped rows are padded wider than alone, which changes float rounding in attention; "
        "Adam's update lr·m/(√v+eps) turns that into visible differences only on weights whose gradient is near "
        "0 (|g| ≈ eps). The final losses of all methods agree within "
        f"{max(a['max_abs_final_loss_diff'] for a in agree.values()):.1e}.",
        "",
        "Loss of the one-at-a-time adapters, first → final step: "
        + ", ".join(f"{a:.2f}→{b:.2f}" for a, b in losses)
        + ".",
        "",
        "The machine is shared: the load average (1 min, mean of before and after each run) is listed per run; "
        f"with {info['cpus_visible']} visible cores, a load above {info['cpus_visible']} means the runs competed "
        "for CPU with other processes and the timings are noisy.",
    ]
    data = {
        "docs": n_docs,
        "steps": steps,
        "reps": reps,
        "config": lt.asdict(config),
        "example_lengths": lengths,
        "rows": data_rows,
        "fastest": best,
    }
    C.write_report(
        args.out,
        "train",
        "Training many adapters: one at a time vs grouped vs worker processes",
        "\n".join(body),
        info,
        data,
        C.elapsed_since(t0),
        args.quick,
    )


if __name__ == "__main__":
    main()
