"""One routed linear layer: LAG vs Arrow vs SpectR vs PEFT Arrow vs the floor, per token count and library size.

For each shape (d_in -> d_out), library size N and token count T, every method computes the full layer
output base(x) + delta(x) on the same random tokens, timed side by side (interleaved, median of reps):

  floor         base nn.Linear + one matmul of the tokens against the stacked arrows (the least any
                Arrow-style router must do)
  lag           loralag's `lag` router (k=20): arrow top-k, ‖A*x‖ over the k, apply the winner
  lag-seg128    the same bank split in segments of 128 adapters, as `loralag build` writes it
  arrow         loralag's `arrow` router (top-1 by |a·x|)
  spectral      loralag's `spectral` router (SpectR over all N, in chunks of 256 adapters)
  dense-spectr  a plain dense SpectR pass: X @ A*_all -> ‖·‖ per adapter -> argmax -> B*_w z
  peft-arrow    PEFT's Arrow (ArrowConfig(top_k=3)): through `create_arrow_model` on a one-linear model
                for small N, else PEFT's own `ArrowLoraLinearLayer.forward` on ModuleDicts of nn.Linear

Adapters are random aligned ones (orthonormal A* rows via QR, B* = U·S), rank 8, float32.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import common as C
import torch
from torch import nn

from loralag.library.bank import ModuleBank
from loralag.routing.layer import RoutedLinear
from loralag.routing.routers import RouteSpec

METHODS = ["floor", "lag", "lag-seg128", "arrow", "spectral", "dense-spectr", "peft-arrow"]
HEAVY_BYTES = 256 * 2**20  # a PEFT forward allocating more than this is timed apart from the others


def extra(p):
    p.add_argument(
        "--peft-create-max",
        type=int,
        default=None,
        help="largest N built with create_arrow_model (default 100; quick 10); above it PEFT's layer is called",
    )
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per (shape, N, T)")
    p.add_argument(
        "--cells",
        default=None,
        help="only these cells, e.g. '2048x2048:100,1000:512' (shapes:N values:T values; ';' between groups)",
    )


def peft_bytes(T, N, r, d_in, d_out, eb=4):
    """Peak extra memory of one ArrowLoraLinearLayer.forward: the stacked A and B, the (T,N) score,
    full_score and coeff tensors, z (T,N,r), and y (T,N,d_out) which exists twice (y and y*scales)."""
    return eb * (N * r * (d_in + d_out) + 3 * T * N + T * N * r + 2 * T * N * d_out)


def make_peft_direct(A, B, arrows):
    """PEFT's ArrowLoraLinearLayer fed with ModuleDicts of nn.Linear whose weights are views of A and B.
    The prototypes are set to the exact arrows (PEFT would compute them by power iteration once; their
    values do not change the forward's cost)."""
    from peft import ArrowConfig
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    N, r, d_in = A.shape
    d_out = B.shape[1]
    names = [f"task_{i}" for i in range(N)]
    cfg = ArrowConfig(top_k=3)
    cfg.task_adapter_names, cfg.gks_adapter_names = names, []
    layer = ArrowLoraLinearLayer(d_in, cfg)
    lora_A, lora_B = nn.ModuleDict(), nn.ModuleDict()
    for i, n in enumerate(names):
        a = torch.nn.utils.skip_init(nn.Linear, d_in, r, bias=False)
        a.weight = nn.Parameter(A[i], requires_grad=False)
        b = torch.nn.utils.skip_init(nn.Linear, r, d_out, bias=False)
        b.weight = nn.Parameter(B[i], requires_grad=False)
        lora_A[n], lora_B[n] = a, b
    layer.register_buffer("prototypes", arrows.clone(), persistent=False)
    layer._protos_ready = True
    scaling = {n: 1.0 for n in names}
    drop = nn.Identity()
    return lambda base, X: base(X) + layer(X, lora_A, lora_B, drop, scaling)


class One(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.lin = base

    def forward(self, x):
        return self.lin(x)


def make_peft_created(A, B, base, tmp: Path):
    """PEFT's Arrow as a user builds it: N adapter folders, `create_arrow_model` on a one-linear model."""
    from peft import ArrowConfig, create_arrow_model
    from safetensors.torch import save_file

    N, r, d_in = A.shape
    paths = []
    for i in range(N):
        f = tmp / f"a{i}"
        f.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "base_model.model.lin.lora_A.weight": A[i].contiguous(),
                "base_model.model.lin.lora_B.weight": B[i].contiguous(),
            },
            str(f / "adapter_model.safetensors"),
        )
        (f / "adapter_config.json").write_text(
            json.dumps(
                {
                    "peft_type": "LORA",
                    "r": r,
                    "lora_alpha": r,
                    "target_modules": ["lin"],
                    "lora_dropout": 0.0,
                    "bias": "none",
                    "inference_mode": True,
                }
            )
        )
        paths.append(str(f))
    base_copy = nn.Linear(base.in_features, base.out_features, bias=False)
    base_copy.weight.data.copy_(base.weight.data)
    t = time.perf_counter()
    model = create_arrow_model(One(base_copy), paths, ArrowConfig(top_k=3, rng_seed=0)).eval()
    t_create = time.perf_counter() - t
    with torch.inference_mode():
        t = time.perf_counter()
        model(torch.zeros(1, d_in))  # first forward builds the prototypes (15 power iterations each)
        t_proto = time.perf_counter() - t
    return (lambda base, X: model(X)), t_create, t_proto


def seg_bank(A, B, names, size=128):
    parts, where = {}, []
    for p, s in enumerate(range(0, len(A), size)):
        arrows = A[s : s + size, 0].contiguous()
        parts[f"s{p}"] = (A[s : s + size], B[s : s + size], lambda arrows=arrows: arrows, None)  # arrow reader
    where = [(f"s{i // size}", i % size, A.shape[1]) for i in range(len(A))]
    return ModuleBank.from_segments("m", A.shape[2], B.shape[1], names, where, parts, A.dtype)


def parse_cells(spec: str) -> list[tuple[tuple[int, int], list[int], list[int]]]:
    """'2048x2048:100,1000:512;576x1536:1000:1' -> [((2048, 2048), [100, 1000], [512]), ...] (repeat runs
    of a few cells, to quote medians over runs)."""
    out = []
    for group in spec.split(";"):
        shape, ns, ts = group.split(":")
        d_in, d_out = (int(v) for v in shape.split("x"))
        out.append(((d_in, d_out), [int(v) for v in ns.split(",")], [int(v) for v in ts.split(",")]))
    return out


def main():
    t0 = time.perf_counter()
    args = C.parse_args(__doc__.splitlines()[0], extra)
    quick = args.quick
    shapes = [(2048, 2048), (576, 1536), (1536, 576)]
    Ns = [10, 300] if quick else [10, 100, 1000, 10000]
    Ts = [1, 64] if quick else [1, 512]
    grid = [((d_in, d_out), Ns, Ts) for d_in, d_out in shapes] if args.cells is None else parse_cells(args.cells)
    r, k = 8, 20
    create_max = args.peft_create_max if args.peft_create_max is not None else (10 if quick else 100)
    budget = args.budget or (1.0 if quick else 12.0)
    reps = 5 if quick else 9
    info = C.machine_info()
    rows, data, notes = [], [], []
    torch.manual_seed(0)
    tmp_root = Path(tempfile.mkdtemp(prefix="bench-layer-", dir=C.cache_root()))
    for (d_in, d_out), Ns, Ts in grid:
        base = nn.Linear(d_in, d_out, bias=False).eval()
        for N in Ns:
            C.log(f"[layer] {d_in}->{d_out} N={N}: generating adapters")
            A, B = C.random_aligned(N, r, d_in, d_out, seed=N + d_in)
            names = [f"a{i}" for i in range(N)]
            bank = ModuleBank.from_tensors("m", names, A, B)
            sbank = seg_bank(A, B, names) if N > 128 else None
            A_flat = A.reshape(N * r, d_in)
            peft_fn, peft_path, t_create, t_proto = None, None, None, None
            if N <= create_max:
                peft_fn, t_create, t_proto = make_peft_created(A, B, base, tmp_root / f"{d_in}x{d_out}-{N}")
                peft_path = "create_arrow_model"
                notes.append(
                    f"create_arrow_model with N={N} adapters on one {d_in}→{d_out} linear: "
                    f"{t_create:.1f} s, first forward (prototypes) {t_proto:.1f} s"
                )
            for T in Ts:
                X = torch.randn(T, d_in)
                # the layers a routed model runs: base(x) + the library's delta, added in place
                layers = {
                    m: RoutedLinear(
                        base, "m", {"lib": b}, SimpleNamespace(specs={"lib": RouteSpec(router=router, k=k)}, trace=None)
                    )
                    for m, router, b in [
                        ("lag", "lag", bank),
                        ("lag-seg128", "lag", sbank),
                        ("arrow", "arrow", bank),
                        ("spectral", "spectral", bank),
                    ]
                    if b is not None
                }

                def routed(m, X=X):
                    return layers[m](X)

                def floor(X=X, bank=bank):
                    return base(X), X @ bank.arrows.T

                def dense(X=X, T=T, A_flat=A_flat, B=B):
                    h = base(X)
                    Z = (X @ A_flat.T).view(T, N, r)
                    w = Z.norm(dim=-1).argmax(dim=1)
                    z = Z[torch.arange(T), w]
                    return h + torch.bmm(B[w], z.unsqueeze(-1)).squeeze(-1)

                fns = {"floor": floor, "lag": lambda: routed("lag")}
                if sbank is not None:
                    fns["lag-seg128"] = lambda: routed("lag-seg128")
                fns.update(
                    {"arrow": lambda: routed("arrow"), "spectral": lambda: routed("spectral"), "dense-spectr": dense}
                )
                need = peft_bytes(T, N, r, d_in, d_out)
                resident = 2 * A.numel() * 4
                peft_note = None
                if need + resident > args.mem_limit_gib * C.GiB:
                    peft_note = f"does not fit (needs {(need + resident) / C.GiB:.1f} GiB)"
                else:
                    if peft_fn is None and peft_path != "ArrowLoraLinearLayer.forward":
                        direct = make_peft_direct(A, B, bank.arrows)
                        peft_fn, peft_path = direct, "ArrowLoraLinearLayer.forward"
                    fns["peft-arrow"] = lambda f=peft_fn, X=X: f(base, X)
                with torch.inference_mode():
                    # sanity: the routed outputs agree with the plain computations they claim to be
                    ref = dense()
                    assert torch.allclose(routed("spectral"), ref, atol=1e-4), "spectral != dense SpectR"
                    if sbank is not None:
                        assert torch.equal(routed("lag-seg128"), routed("lag")), "segmented bank changed lag"
                    C.log(f"[layer] {d_in}->{d_out} N={N} T={T}: timing {list(fns)}")
                    if "peft-arrow" in fns and need > HEAVY_BYTES:
                        # PEFT's forward allocates and faults in GBs per call here: interleaved, that churn lands
                        # on whichever method runs next. So the others are timed together, then PEFT alone.
                        peft = {"peft-arrow": fns.pop("peft-arrow")}
                        res = C.side_by_side(fns, reps=reps, budget_s=budget)
                        res.update(C.side_by_side(peft, reps=reps, budget_s=budget))
                        notes.append(
                            f"{d_in}→{d_out} N={N} T={T}: PEFT Arrow timed after the others, not interleaved "
                            f"(its forward allocates {need / C.GiB:.1f} GiB per call)"
                        )
                    else:
                        res = C.side_by_side(fns, reps=reps, budget_s=budget)
                med = {m: res[m]["median"] for m in res}
                fl = med["floor"]
                rec = {
                    "d_in": d_in,
                    "d_out": d_out,
                    "N": N,
                    "T": T,
                    "median_s": med,
                    "reps": len(res["floor"]["samples"]),
                    "peft_path": peft_path if "peft-arrow" in med else None,
                    "peft_note": peft_note,
                    "peft_need_bytes": need,
                }
                data.append(rec)
                rows.append(rec)
                C.log("[layer]   " + ", ".join(f"{m}={C.fmt_time(v)}" for m, v in med.items()))
            del bank, sbank, A, B, A_flat, peft_fn
    import shutil

    shutil.rmtree(tmp_root, ignore_errors=True)
    elapsed = C.elapsed_since(t0)

    # -- report ----------------------------------------------------------------------------------------
    hdr = ["shape", "N", "T"] + METHODS
    t_rows, r_rows = [], []
    for rec in rows:
        med = rec["median_s"]
        cells = []
        for m in METHODS:
            if m in med:
                cells.append(C.fmt_time(med[m]))
            elif m == "peft-arrow" and rec["peft_note"]:
                cells.append(rec["peft_note"])
            else:
                cells.append("—")
        shape = f"{rec['d_in']}→{rec['d_out']}"
        t_rows.append([shape, rec["N"], rec["T"]] + cells)
        fl = med["floor"]
        ratios = [med[m] / fl if m in med else None for m in METHODS[1:]]
        pl = med["peft-arrow"] / med["lag"] if "peft-arrow" in med else None
        path = rec["peft_path"] or (rec["peft_note"] or "—")
        r_rows.append([shape, rec["N"], rec["T"]] + ratios + [pl, path])
    body = [
        __doc__.split("\n\n", 1)[1].strip(),
        "",
        f"Rank {r}, k={k}, float32, tokens x ~ N(0, I). Times are medians of interleaved reps (warm-up first; "
        f"fast calls are looped inside a sample). Each call computes base(x) + delta(x) for all T tokens.",
        "",
        "## Time per call",
        "",
        C.md_table(hdr, t_rows),
        "",
        "## Ratios (method / floor; PEFT / lag)",
        "",
        C.md_table(["shape", "N", "T"] + [f"{m}/floor" for m in METHODS[1:]] + ["peft/lag", "PEFT path"], r_rows),
        "",
        "PEFT memory: its forward stacks every adapter's A and B and forms y (T×N×d_out) twice (y and y·scale); "
        f"estimated peak = 4·(N·r·(d_in+d_out) + 2·T·N·d_out + …) bytes; skipped when that plus the resident factors "
        f"exceeds {args.mem_limit_gib:g} GiB.",
        "",
    ]
    if notes:
        body += ["PEFT setup (not in the timings) and timing notes:", ""] + [f"- {n}" for n in notes] + [""]
    body += ["![ratios](layer.png)"]
    plot(rows, args.out / "layer.png", sorted({rec["T"] for rec in rows}))
    C.write_report(args.out, "layer", "Routed layer: time per call", "\n".join(body), info, data, elapsed, quick)


def plot(rows, path, Ts):
    plt = C.plt()
    shapes = sorted({(r["d_in"], r["d_out"]) for r in rows}, key=lambda s: -s[0] * s[1])
    fig, axes = plt.subplots(len(Ts), len(shapes), figsize=(5 * len(shapes), 4 * len(Ts)), squeeze=False)
    for i, T in enumerate(Ts):
        for j, (d_in, d_out) in enumerate(shapes):
            ax = axes[i][j]
            sel = [r for r in rows if r["T"] == T and (r["d_in"], r["d_out"]) == (d_in, d_out)]
            for m in METHODS[1:]:
                pts = [(r["N"], r["median_s"][m] / r["median_s"]["floor"]) for r in sel if m in r["median_s"]]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=m)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.axhline(1, color="k", lw=0.5)
            ax.set_title(f"{d_in}→{d_out}, T={T}")
            ax.set_xlabel("adapters N")
            ax.set_ylabel("time / floor")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
