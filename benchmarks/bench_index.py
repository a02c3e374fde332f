"""The sub-linear arrow stage: recall and speed of the arrow index (loralag.library.arrow_index) at N = 100,000.

Two generators (d = 576, rank 4, float32):

  random     A* = orthonormal rows (QR of a Gaussian d×r); arrows = A*[:, 0]; tokens x ~ N(0, I).
  clustered  300 random unit centres c_j. Adapter i picks a centre j uniformly and gets the arrow
             a = ±normalize(c_j + σa·g/√d), g ~ N(0, I), random sign; its other r−1 rows of A* are a random
             orthonormal completion. Tokens: x = ±(c_j + σx·g/√d) for a uniformly chosen centre.
             "tight": σa = 0.6, σx = 1.0 (arrow·centre cosine ≈ 0.86); "loose": σa = 1.5, σx = 3.0 (≈ 0.55).

For each generator the index is built with `arrow_index.build_index` (nlist = 2·√N, 12 iterations: what
`Library.build_index` / `loralag index` run per module), then for each nprobe:

  recall@20         |index top-20 ∩ exact top-20| / 20
  LAG winner in     share of tokens whose exact LAG winner (argmax ‖A*x‖ over the exact top-20) is in the index's top-20
  LAG winner same   share of tokens whose LAG winner over the index's top-20 equals the exact one
  time              the arrow stage only: `arrow_index.search` vs the exact `(X @ arrows.T).abs().topk(20)`,
                    for T = 1 (decoding) and T = 512 (prefill), interleaved, median of reps
"""

from __future__ import annotations

import time

import common as C
import torch

from loralag.library import arrow_index
from loralag.library.bank import ModuleBank
from loralag.routing.routers import project

K = 20


def extra(p):
    p.add_argument("--n", type=int, default=None, help="adapters (default 100,000; quick 4,000)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per token count")


def orthonormal_completion(first: torch.Tensor, r: int, g) -> torch.Tensor:
    """(n, r, d) orthonormal rows whose first row is ±first (normalised)."""
    n, d = first.shape
    M = torch.cat([first.unsqueeze(2), torch.randn(n, d, r - 1, generator=g)], dim=2)
    Q = torch.linalg.qr(M).Q  # Q[:, :, 0] = ±first/|first|
    sign = torch.sign((Q[:, :, 0] * first).sum(1)).view(n, 1, 1)
    return (Q * sign).transpose(1, 2).contiguous()


GENERATORS = {"random": None, "clustered tight": (0.6, 1.0), "clustered loose": (1.5, 3.0)}


def generate(kind: str, n: int, d: int, r: int, T: int, seed: int = 0, centres: int = 300, chunk: int = 8192):
    g = torch.Generator().manual_seed(seed)
    A = torch.empty(n, r, d)
    if kind == "random":
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            A[s : s + m] = torch.linalg.qr(torch.randn(m, d, r, generator=g)).Q.transpose(1, 2)
        X = torch.randn(T, d, generator=g)
    else:
        sa, sx = GENERATORS[kind]
        c = torch.nn.functional.normalize(torch.randn(centres, d, generator=g), dim=1)
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            j = torch.randint(0, centres, (m,), generator=g)
            a = torch.nn.functional.normalize(c[j] + sa * torch.randn(m, d, generator=g) / d**0.5, dim=1)
            a = a * (torch.randint(0, 2, (m, 1), generator=g) * 2 - 1)
            A[s : s + m] = orthonormal_completion(a, r, g)
        j = torch.randint(0, centres, (T,), generator=g)
        X = (c[j] + sx * torch.randn(T, d, generator=g) / d**0.5) * (torch.randint(0, 2, (T, 1), generator=g) * 2 - 1)
    return A, X


def lag_winner(bank, X, cand):
    Z = project(bank, X, cand)
    return cand.gather(1, Z.norm(dim=-1).argmax(dim=1, keepdim=True)).squeeze(1)


def quality(bank, index, X, nprobes, batch=512):
    """Per nprobe: recall@20, exact LAG winner inside the index top-20, LAG winner unchanged."""
    out = {p: {"recall": 0.0, "winner_in": 0.0, "winner_same": 0.0} for p in nprobes}
    for s in range(0, len(X), batch):
        Xb = X[s : s + batch]
        _, ex = (Xb @ bank.arrows.T).abs().topk(K, dim=1)
        w_ex = lag_winner(bank, Xb, ex)
        for p in nprobes:
            _, ids = arrow_index.search(index, Xb, K, p)
            hit = (ids.unsqueeze(2) == ex.unsqueeze(1)).any(dim=1)  # (T, K): exact item found
            out[p]["recall"] += float(hit.float().mean(dim=1).sum())
            out[p]["winner_in"] += float((ids == w_ex.unsqueeze(1)).any(dim=1).float().sum())
            out[p]["winner_same"] += float((lag_winner(bank, Xb, ids) == w_ex).float().sum())
    return {p: {k: v / len(X) for k, v in q.items()} for p, q in out.items()}


def main():
    t0 = time.perf_counter()
    args = C.parse_args(__doc__.splitlines()[0], extra)
    quick = args.quick
    n = args.n or (4000 if quick else 100_000)
    d, r = 576, 4
    T_eval = 256 if quick else 2048
    Ts = [1, 64] if quick else [1, 512]
    budget = args.budget or (1.0 if quick else 10.0)
    reps = 5 if quick else 9
    info = C.machine_info()
    data = []
    for seed, kind in enumerate(GENERATORS):
        C.log(f"[index] {kind}: generating N={n}")
        A, X = generate(kind, n, d, r, T_eval, seed=seed + 1)
        bank = ModuleBank.from_tensors("m", [str(i) for i in range(n)], A, torch.zeros(n, 1, r))
        C.log(f"[index] {kind}: building the index")
        tb = time.perf_counter()
        index = arrow_index.build_index(bank.arrows)
        t_build = time.perf_counter() - tb
        index.bind(bank.arrows)
        sizes = (index.offsets[1:] - index.offsets[:-1]).float()
        nprobes = sorted({p for p in (1, 2, 4, 8, 16, 32, 64) if p < index.nlist} | {index.nlist})
        C.log(f"[index] {kind}: quality, nlist={index.nlist}")
        with torch.inference_mode():
            q = quality(bank, index, X, nprobes)
            timing = {}
            for T in Ts:
                # successive calls take successive blocks of tokens (a decoding step sees a new token each time)
                blocks = [X[s : s + T].contiguous() for s in range(0, len(X) - T + 1, T)][:64]
                nxt = {"i": 0}

                def block(nxt=nxt, blocks=blocks):
                    nxt["i"] += 1
                    return blocks[nxt["i"] % len(blocks)]

                fns = {"exact": lambda bank=bank: (block() @ bank.arrows.T).abs_().topk(K, dim=1)}
                for p in nprobes:
                    fns[p] = lambda p=p, index=index: arrow_index.search(index, block(), K, p)
                C.log(f"[index] {kind}: timing T={T}")
                res = C.side_by_side(fns, reps=reps, budget_s=budget)
                timing[T] = {str(k): v["median"] for k, v in res.items()}
        data.append(
            {
                "kind": kind,
                "n": n,
                "d": d,
                "r": r,
                "nlist": index.nlist,
                "build_s": t_build,
                "cluster_size": {"mean": float(sizes.mean()), "max": float(sizes.max()), "min": float(sizes.min())},
                "quality": {str(p): v for p, v in q.items()},
                "time": timing,
                "T_eval": T_eval,
            }
        )
        del A, X, bank, index
    elapsed = C.elapsed_since(t0)

    # -- report ------------------------------------------------------------------------------------------
    body = [__doc__.split("\n\n", 1)[1].strip(), ""]
    summary_rows = []
    for rec in data:
        nl = rec["nlist"]
        body += [
            f"## {rec['kind']}: N={rec['n']:,}, nlist={nl}, index build {rec['build_s']:.1f} s",
            "",
            f"Cluster sizes: mean {rec['cluster_size']['mean']:.0f}, min {rec['cluster_size']['min']:.0f}, "
            f"max {rec['cluster_size']['max']:.0f}. Quality over {rec['T_eval']} tokens.",
            "",
        ]
        rows = []
        for p, qv in rec["quality"].items():
            row = [
                ("all" if int(p) == nl else p) + ("" if int(p) != nl else f" ({nl})"),
                qv["recall"],
                qv["winner_in"],
                qv["winner_same"],
            ]
            for tt in rec["time"].values():
                row += [C.fmt_time(tt[p]), tt["exact"] / tt[p]]
            rows.append(row)
        hdr = ["nprobe", "recall@20", "LAG winner in top-20", "LAG winner same"]
        for T in rec["time"]:
            hdr += [f"time T={T}", f"speed-up T={T}"]
        body += [
            C.md_table(hdr, rows),
            "",
            "Exact arrow stage: " + ", ".join(f"T={T}: {C.fmt_time(tt['exact'])}" for T, tt in rec["time"].items()),
            "",
        ]
        ok = [p for p, qv in rec["quality"].items() if qv["winner_in"] >= 0.99]
        if ok:
            p = min(ok, key=int)
            summary_rows.append(
                [rec["kind"], p, rec["quality"][p]["recall"], rec["quality"][p]["winner_in"]]
                + [rec["time"][T]["exact"] / rec["time"][T][p] for T in rec["time"]]
            )
        else:
            summary_rows.append([rec["kind"], "none reaches 0.99", None, None] + [None for _ in rec["time"]])
    Tk = list(data[0]["time"])
    body += [
        "## At the recall target",
        "",
        "Smallest nprobe whose 'LAG winner in top-20' ≥ 0.99, and its speed-up over the exact arrow stage "
        "(target ≥ 5×):",
        "",
        C.md_table(
            ["generator", "nprobe", "recall@20", "LAG winner in top-20"] + [f"speed-up T={T}" for T in Tk], summary_rows
        ),
        "",
        "![trade-off](index.png)",
    ]
    plot(data, args.out / "index.png")
    C.write_report(
        args.out, "index", "Sub-linear arrow stage (arrow index)", "\n".join(body), info, data, elapsed, quick
    )


def plot(data, path):
    plt = C.plt()
    Ts = list(data[0]["time"])
    fig, axes = plt.subplots(1, len(Ts), figsize=(6 * len(Ts), 4.5), squeeze=False)
    for ax, T in zip(axes[0], Ts):
        for rec in data:
            ps = list(rec["quality"])
            sp = [rec["time"][T]["exact"] / rec["time"][T][p] for p in ps]
            for key, style in (("recall", "-o"), ("winner_in", "--s")):
                (line,) = ax.plot(
                    sp,
                    [rec["quality"][p][key] for p in ps],
                    style,
                    label=f"{rec['kind']}: {'recall@20' if key == 'recall' else 'LAG winner in top-20'}",
                )
            for p, x, y in zip(ps, sp, [rec["quality"][p]["recall"] for p in ps]):
                ax.annotate(p, (x, y), fontsize=7, textcoords="offset points", xytext=(3, -8))
        ax.axhline(0.99, color="k", lw=0.5)
        ax.axvline(5, color="k", lw=0.5, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("speed-up over the exact arrow stage")
        ax.set_ylabel("share")
        ax.set_title(f"T={T} (labels: nprobe)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
