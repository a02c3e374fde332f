"""What distinct adapter inits do: two `loralag bench` runs that differ only in `shared_init`, side by side.

    loralag bench --size small --shared-init --out results/small-shared
    loralag bench --size small --out results/small-distinct
    python benchmarks/compare_inits.py results/small-shared results/small-distinct --out benchmarks/results/inits

Writes inits.md (and inits.json): every method's normalised score and gain fraction in both runs, knowledge
routing to the gold adapter (subject tokens, answer positions, per layer) and how alike the knowledge library's
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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("shared", type=Path, help="results folder of the shared-init run")
    p.add_argument("distinct", type=Path, help="results folder of the distinct-init run")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/inits"))
    args = p.parse_args()
    from loralag.library.store import open_library

    runs = {
        name: json.loads((folder / "results.json").read_text())
        for name, folder in (("shared", args.shared), ("distinct", args.distinct))
    }
    for name, r in runs.items():
        if r["settings"]["config"].get("shared_init", False) != (name == "shared"):
            raise SystemExit(f"{name}: that run's shared_init is {r['settings']['config'].get('shared_init')}")
    stats = {}
    for name, r in runs.items():
        lib = open_library(r["settings"]["knowledge_library"])
        stats[name] = {
            "arrow_abs_cos": arrow_similarity(lib),
            "shared_subspace": shared_subspace(lib),
            "adapters": len(lib),
        }
    methods = [m for m in runs["distinct"]["normalised"] if m in runs["shared"]["normalised"]]
    lines = [
        "# Distinct vs shared LoRA inits",
        "",
        f"Two `loralag bench --size {runs['distinct']['settings']['size']}` runs that differ only in the "
        "adapters' init: one seed for every adapter (`--shared-init`, loralag 0.1) or each adapter's own "
        "(`adapter_seed(seed, name)`).",
        "",
        "| knowledge library | shared | distinct |",
        "|---|---|---|",
        f"| mean \\|cos\\| between two adapters' arrows | {stats['shared']['arrow_abs_cos']:.3f} | "
        f"{stats['distinct']['arrow_abs_cos']:.3f} |",
        f"| share of an adapter's A* in the library's top-r common subspace | "
        f"{stats['shared']['shared_subspace']:.3f} | {stats['distinct']['shared_subspace']:.3f} |",
        "",
        "## Normalised score (AVG, % of the Oracle) and gain fraction",
        "",
        "| method | shared: AVG | distinct: AVG | shared: gain | distinct: gain |",
        "|---|---|---|---|---|",
    ]
    for m in methods:
        cells = []
        for key in ("normalised", "gain"):
            for name in ("shared", "distinct"):
                v = (runs[name].get(key) or {}).get(m, {}).get("AVG")
                cells.append("—" if v is None else f"{v:.1f}")
        lines.append(f"| {m} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |")
    lines += [
        "",
        "## Knowledge routing to the gold adapter (%)",
        "",
        "| method | shared: subject tokens | distinct: subject tokens | shared: answer | distinct: answer |",
        "|---|---|---|---|---|",
    ]
    by_layer = {}
    for m in runs["distinct"]["routing"]:
        kn = {name: runs[name]["routing"].get(m, {}).get("knowledge") for name in runs}
        if not all(kn.values()) or kn["distinct"].get("subject") is None:
            continue
        fmt = [
            f"{100 * kn[n][key]:.1f}" if kn[n].get(key) is not None else "—"
            for key in ("subject", "answer")
            for n in ("shared", "distinct")
        ]
        lines.append(f"| {m} | {fmt[0]} | {fmt[1]} | {fmt[2]} | {fmt[3]} |")
        by_layer[m] = {n: kn[n]["subject_by_layer"] for n in kn}
    lines += ["", "Subject tokens to gold per layer: `inits.json` (`subject_by_layer`), plotted in `inits.png`."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inits.md").write_text("\n".join(lines) + "\n")
    (args.out / "inits.json").write_text(json.dumps({"library": stats, "subject_by_layer": by_layer}, indent=1) + "\n")
    plot(by_layer, args.out / "inits.png")
    print("\n".join(lines))


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
        for name, style in (("shared", ":"), ("distinct", "-")):
            ys = [float("nan") if v is None else v for v in by_layer[m][name]]
            ax.plot(range(len(ys)), ys, style, color=color, label=f"{m}, {name} init")
    ax.set_xlabel("layer")
    ax.set_ylabel("subject-token decisions to the gold adapter")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
