"""What an adapter init does: two `loralag bench` runs that differ only in their adapters' init, side by side.

    loralag bench --size small --shared-init --out results/small-shared
    loralag bench --size small --out results/small-distinct
    python benchmarks/compare_inits.py results/small-shared results/small-distinct --out benchmarks/results/inits

    loralag bench --size small --task-init activations --out results/small-task-act
    python benchmarks/compare_inits.py results/small-distinct results/small-task-act --out benchmarks/results/inits-task

Writes inits.md (and inits.json): every method's normalised score and gain fraction in both runs, knowledge
routing to the gold adapter (subject tokens, answer positions, per layer) and how alike each library's
adapters are: the mean |cos| between two adapters' arrows at the same module (1: indistinguishable to Arrow),
and the share of an adapter's A* subspace that lies in the span of the others' (see `shared_subspace`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def arrow_similarity(library) -> float:
    """Mean |cos| between the arrows of two different adapters of one module, averaged over modules."""
    out = []
    for module in library.target_modules:
        a = library.bank(module).arrows.double()
        a = a / a.norm(dim=1, keepdim=True)
        c = (a @ a.T).abs()
        n = len(a)
        out.append(float((c.sum() - c.diagonal().sum()) / (n * (n - 1))))
    return sum(out) / len(out)


def shared_subspace(library, rank: int | None = None) -> float:
    """Per module: the top singular directions of all adapters' A* rows stacked (as many as one adapter's rank),
    and the share of each adapter's A* energy inside them, averaged. Near 1: every adapter reads the same few
    input directions, which `|a·x|` and `‖A*x‖` cannot tell apart."""
    out = []
    for module in library.target_modules:
        bank = library.bank(module)
        A, _ = bank.gather(torch.arange(bank.n), want_b=False)
        r = rank or bank.r
        rows = A.reshape(-1, bank.d_in).double()
        U = torch.linalg.svd(rows, full_matrices=False)[2][:r]  # (r, d_in) the common directions
        per = (A.double() @ U.T).pow(2).sum((1, 2)) / A.double().pow(2).sum((1, 2))
        out.append(float(per.mean()))
    return sum(out) / len(out)


# what may differ between the two runs: how the adapters start, and whether the knowledge texts hold QA forms
INIT_FIELDS = ("shared_init", "know_init", "task_init", "know_qa")


def init_label(config: dict) -> str:
    """How a run's adapters started: one shared seed or their own, and any library's non-PEFT init."""
    label = "shared init" if config.get("shared_init") else "distinct inits"
    other = [
        f"{lib}: {config[f'{key}_init']}"
        for key, lib in (("know", "knowledge"), ("task", "task"))
        if config.get(f"{key}_init", "peft") != "peft"
    ]
    other += ["knowledge texts + QA"] if config.get("know_qa") else []
    return ", ".join(other) if other and not config.get("shared_init") else ", ".join([label, *other])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path, help="results folder of one run")
    p.add_argument("b", type=Path, help="a run that differs only in its adapters' init (or --know-qa)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/inits"))
    args = p.parse_args()
    from loralag.library.store import open_library

    raw = [json.loads((folder / "results.json").read_text()) for folder in (args.a, args.b)]
    configs = [r["settings"]["config"] for r in raw]
    other = sorted(
        k
        for k in set(configs[0]) | set(configs[1])
        if k not in (*INIT_FIELDS, "methods") and configs[0].get(k) != configs[1].get(k)  # methods: both runs' shown
    )
    if other:
        raise SystemExit(f"the two runs differ in more than their init: {other}")
    names = [init_label(c) for c in configs]
    if names[0] == names[1]:
        raise SystemExit(f"both runs have {names[0]}")
    runs = dict(zip(names, raw))
    stats = {"knowledge": {}, "task": {}}
    for kind, per_run in stats.items():
        for name, r in runs.items():
            path = Path(r["settings"][f"{kind}_library"])
            if not path.exists():  # a run made on another machine: its scores and routing only
                print(f"{name}: no {kind} library at {path}; its geometry is left out")
                per_run[name] = None
                continue
            lib = open_library(path)
            per_run[name] = {
                "arrow_abs_cos": arrow_similarity(lib),
                "shared_subspace": shared_subspace(lib),
                "adapters": len(lib),
            }

    def geometry(kind, name, key):
        got = stats[kind][name]
        return "— (library not here)" if got is None else f"{got[key]:.3f}"

    a, b = names
    methods = [m for m in runs[b]["normalised"] if m in runs[a]["normalised"]]
    lines = [
        f"# {a} vs {b}",
        "",
        f"Two `loralag bench --size {runs[b]['settings']['size']}` runs that differ only in the adapters' init: "
        "one seed for every adapter (`--shared-init`, loralag 0.1) or each adapter's own "
        "(`adapter_seed(seed, name)`), and A's init per library (`--know-init`, `--task-init`: PEFT's random one, "
        "the top-r directions of the base model's inputs over the adapter's own text (`activations`), or those with "
        "the most energy relative to generic text (`contrast`)); or in the knowledge adapters' texts (`--know-qa`: "
        "each fact also restated as a question and answer).",
    ]
    for kind in stats:
        lines += [
            "",
            f"| {kind} library | {a} | {b} |",
            "|---|---|---|",
            f"| mean \\|cos\\| between two adapters' arrows | {geometry(kind, a, 'arrow_abs_cos')} | "
            f"{geometry(kind, b, 'arrow_abs_cos')} |",
            f"| share of an adapter's A* in the library's top-r common subspace | "
            f"{geometry(kind, a, 'shared_subspace')} | {geometry(kind, b, 'shared_subspace')} |",
        ]
    lines += [
        "",
        "## Normalised score (AVG, % of the Oracle) and gain fraction",
        "",
        f"| method | {a}: AVG | {b}: AVG | {a}: gain | {b}: gain |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        cells = []
        for key in ("normalised", "gain"):
            for name in names:
                v = (runs[name].get(key) or {}).get(m, {}).get("AVG")
                cells.append("—" if v is None else f"{v:.1f}")
        lines.append(f"| {m} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    by_layer = {}
    for lib in ("knowledge", "task"):
        lines += [
            "",
            f"## {lib.capitalize()} routing to the gold adapter (%; the sequence vote: questions)",
            "",
            f"| method | {a}: subject tokens | {b}: subject tokens | {a}: answer | {b}: answer |",
            "|---|---|---|---|---|",
        ]
        for m in runs[b]["routing"]:
            st = {name: runs[name]["routing"].get(m, {}).get(lib) for name in names}
            if not all(st.values()):
                continue
            if st[b].get("subject") is None:  # a sequence vote
                if st[b].get("vote_total"):
                    votes = [f"{st[n]['vote_hits']}/{st[n]['vote_total']}" for n in names]
                    lines.append(f"| {m} (vote) | {votes[0]} | {votes[1]} | | |")
                continue
            fmt = [
                f"{100 * st[n][key]:.1f}" if st[n].get(key) is not None else "—"
                for key in ("subject", "answer")
                for n in names
            ]
            lines.append(f"| {m} | {fmt[0]} | {fmt[1]} | {fmt[2]} | {fmt[3]} |")
            if lib == "knowledge":
                by_layer[m] = {n: st[n]["subject_by_layer"] for n in names}
    lines += [
        "",
        "Knowledge subject tokens to gold per layer: `inits.json` (`subject_by_layer`), plotted in `inits.png`.",
    ]
    from common import write_tables

    found = {"library": stats["knowledge"], "task_library": stats["task"], "subject_by_layer": by_layer}
    write_tables(args.out, "inits", lines, found)
    plot(by_layer, args.out / "inits.png")


def plot(by_layer: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for m, color in (
        ("arrow", "tab:orange"),
        *[(k, "tab:blue") for k in by_layer if k.startswith("lag@")][:1],
        *[(k, "tab:red") for k in by_layer if k.startswith("lag-prefix")][:1],
    ):
        if m not in by_layer:
            continue
        for name, style in zip(by_layer[m], (":", "-")):
            ys = [float("nan") if v is None else v for v in by_layer[m][name]]
            ax.plot(range(len(ys)), ys, style, color=color, label=f"{m}, {name}")
    ax.set_xlabel("layer")
    ax.set_ylabel("subject-token decisions to the gold adapter")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
