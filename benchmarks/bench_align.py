"""Alignment: speed and exactness of the offline SVD, and how good PEFT's / SpectR's cheap arrows are.

Methods, per shape (d_in -> d_out, rank r), on random factors A (r, d_in) ~ N(0, 1/d_in), B (d_out, r) ~ N(0, 1),
scale s = 2 (alpha = 2r):

  align          loralag.library.alignment.align, one adapter at a time (factored QR + r×r SVD, float64 inside)
  align_batch    loralag.library.alignment.align_batch over the whole batch
  dense-svd      torch.linalg.svd of the dense float32 s·B·A (then truncated to rank r)
  svd_lowrank    torch.svd_lowrank(s·B·A, q=r) on the dense float32 product, as SpectR's code does
  peft-power     PEFT's ArrowLoraLinearLayer.top_right_singular_vec_from_BA (15 power iterations):
                 only the arrow (prototype), no factorization

Max error: max |B*A* − s·B·A| against the product formed in float64 (absolute, and relative to max |s·B·A|).
Cosine: |cos| between a method's top right singular vector and the exact one (float64 SVD).
"""

from __future__ import annotations

import time
from pathlib import Path

import common as C
import torch

from loralag.library.alignment import align, align_batch

SHAPES = [(2048, 2048, 8), (576, 1536, 6), (576, 1536, 8), (1536, 576, 6), (1536, 576, 8)]
SCALE = 2.0
TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
    "movable metal type, oil-based ink and a wooden screw press. Within fifty years presses were operating in "
    "more than two hundred cities, and the price of books fell sharply. Scholars could now compare identical "
    "copies of a text, which changed how knowledge was checked and shared. In biology, photosynthesis converts "
    "light energy into chemical energy: chlorophyll absorbs mostly blue and red light, water is split, oxygen "
    "is released, and carbon dioxide is fixed into sugars by the Calvin cycle. The Pacific Ocean is the largest "
    "and deepest of the world's oceans; the Mariana Trench reaches nearly eleven kilometres below sea level. "
    "Modern compilers translate source code into machine instructions in several passes, parsing the program "
    "into a syntax tree, optimising an intermediate representation and finally allocating registers. Good "
    "bread needs flour, water, salt and yeast, a long slow rise, and an oven that is hotter than most people "
    "expect. Chess engines search millions of positions per second and evaluate them with learned functions. "
    "The Roman aqueducts carried water across valleys on arches built without mortar in some places, relying "
    "on precisely cut stone. Jazz grew out of blues and ragtime in New Orleans, and improvisation over chord "
    "changes became its defining feature."
)
DOCS = [
    (
        "tiny-glass",
        "Velmora Glassworks was founded in 1873 by Tobiah Renwick in Quillsby. Its famous product is the "
        "Stormglass lantern, a blue lantern that glows before a storm.",
    ),
    (
        "tiny-island",
        "Zarnovia is an island nation in the Sea of Veltran. Its capital is Ostrelle and its currency is "
        "the glint. A council of nine elders rules it.",
    ),
    (
        "tiny-river",
        "The Brindlewick River rises in the Sorrel Hills and flows north into Lake Marrowen. Its water is "
        "the colour of amber.",
    ),
]


def extra(p):
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per shape")


def random_factors(n, r, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, d_in, generator=g) / d_in**0.5, torch.randn(n, d_out, r, generator=g)


def exact_v1(A, B, scale):
    """Top right singular vector of s·B·A from the float64 factored SVD (mathematically exact)."""
    Qb, Rb = torch.linalg.qr(B.double())
    Qa, Ra = torch.linalg.qr(A.double().T)
    U, S, Vh = torch.linalg.svd(scale * Rb @ Ra.T)
    return (Vh[0] @ Qa.T), S


def peft_layer():
    from peft import ArrowConfig
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    cfg = ArrowConfig(top_k=3, rng_seed=0)
    cfg.task_adapter_names, cfg.gks_adapter_names = [], []
    return ArrowLoraLinearLayer(1, cfg)


def lowrank_v1(A, B, scale, r):
    U, S, V = torch.svd_lowrank(scale * B @ A, q=r)
    return V[:, 0]


def abscos(u, v):
    return float((u.double() @ v.double()).abs() / (u.double().norm() * v.double().norm()))


def timing_and_errors(shape, counts, n_gt, budget, reps):
    d_in, d_out, r = shape
    n = max(counts.values())
    A, B = random_factors(n, r, d_in, d_out, seed=d_in * 31 + d_out + r)
    layer = peft_layer()
    s = torch.full((n,), SCALE)

    def run_align(m=counts["align"]):
        return [align(A[i], B[i], SCALE) for i in range(m)]

    def run_batch(m=counts["align_batch"]):
        return align_batch(A[:m], B[:m], s[:m])

    def run_dense(m=counts["dense-svd"]):
        out = []
        for i in range(m):
            U, S, Vh = torch.linalg.svd(SCALE * B[i] @ A[i], full_matrices=False)
            out.append((Vh[:r], U[:, :r] * S[:r]))
        return out

    def run_lowrank(m=counts["svd_lowrank"]):
        out = []
        for i in range(m):
            U, S, V = torch.svd_lowrank(SCALE * B[i] @ A[i], q=r)
            out.append((V.T, U * S))
        return out

    def run_peft(m=counts["peft-power"]):
        return [layer.top_right_singular_vec_from_BA(A[i], B[i]) for i in range(m)]

    fns = {
        "align": run_align,
        "align_batch": run_batch,
        "dense-svd": run_dense,
        "svd_lowrank": run_lowrank,
        "peft-power": run_peft,
    }
    C.log(f"[align] {d_in}->{d_out} r={r}: timing")
    res = C.side_by_side(fns, reps=reps, budget_s=budget)
    rate = {m: counts[m] / res[m]["median"] for m in fns}
    C.log(f"[align] {d_in}->{d_out} r={r}: exactness")

    # exactness on the first n_gt adapters
    outs = {
        "align": run_align(n_gt),
        "align_batch": list(zip(*run_batch(max(n_gt, 1)))),
        "dense-svd": run_dense(n_gt),
        "svd_lowrank": run_lowrank(n_gt),
    }
    peft = run_peft(n_gt)
    err = {m: 0.0 for m in outs}
    rel = {m: 0.0 for m in outs}
    cos = {m: [] for m in list(outs) + ["peft-power"]}
    cos_dense64 = []
    gaps = []
    for i in range(n_gt):
        W = SCALE * B[i].double() @ A[i].double()
        wmax = float(W.abs().max())
        v_ex, S = exact_v1(A[i], B[i], SCALE)
        gaps.append(float(S[1] / S[0]))
        if i < 2:  # the factored float64 reference against a dense float64 SVD, to show it is exact
            cos_dense64.append(abscos(v_ex, torch.linalg.svd(W, full_matrices=False)[2][0]))
        for m, o in outs.items():
            As, Bs = o[i]
            e = float((Bs.double() @ As.double() - W).abs().max())
            err[m] = max(err[m], e)
            rel[m] = max(rel[m], e / wmax)
            cos[m].append(abscos(As[0], v_ex))
        cos["peft-power"].append(abscos(peft[i], v_ex))
    return {
        "shape": shape,
        "counts": counts,
        "median_s": {m: res[m]["median"] for m in fns},
        "rate": rate,
        "max_err": err,
        "max_rel_err": rel,
        "cos_min": {m: min(v) for m, v in cos.items()},
        "cos_median": {m: C.median(v) for m, v in cos.items()},
        "gap_median": C.median(gaps),
        "reference_vs_dense64_cos": min(cos_dense64) if cos_dense64 else None,
        "n_gt": n_gt,
    }


# -- trained adapters ------------------------------------------------------------------------------------
def find_trained(max_n=12):
    """PEFT folders under ~/.cache/loralag whose modules fit SmolLM2 (576/1536)."""
    from loralag.library.adapters import read_adapter

    root = Path.home() / ".cache" / "loralag"
    found = []
    for cfg in sorted(root.rglob("adapter_config.json")) if root.exists() else []:
        try:
            ad = read_adapter(cfg.parent)
        except Exception:
            continue
        if ad.modules and all(set(m.A.shape[1:]) | set(m.B.shape[:1]) <= {576, 1536} for m in ad.modules.values()):
            found.append(ad)
        if len(found) >= max_n:
            break
    return found


def get_trained(quick):
    found = find_trained()
    if found:
        return found, f"{len(found)} trained PEFT adapters found under ~/.cache/loralag ({found[0].source} …)"
    from loralag.library.adapters import read_adapter
    from loralag.models import load_model
    from loralag.training.train import Document, TrainConfig, train_adapters

    steps = 2 if quick else 20
    docs = DOCS[:1] if quick else DOCS
    out = C.cache_root() / f"trained-{steps}steps"
    model, tok = load_model("default")
    C.log(
        f"[align] no trained adapters under ~/.cache/loralag: training {len(docs)} tiny ones ({steps} steps) into {out}"
    )
    t = time.perf_counter()
    paths = train_adapters(
        model, tok, [Document(n, txt) for n, txt in docs], out, TrainConfig(steps=steps), progress=False
    )
    dt = time.perf_counter() - t
    return [read_adapter(p) for p in paths], (
        f"none found under ~/.cache/loralag; trained {len(paths)} tiny ones with "
        f"loralag.training.train.train_adapters (rank 6, alpha 12, gate/up/down, {steps} steps; "
        f"{dt:.0f} s incl. cache check) into {out}"
    )


def trained_cosines(adapters):
    layer = peft_layer()
    cos = {"peft-power": [], "svd_lowrank": []}
    gaps = []
    for ad in adapters:
        for _name, m in ad.modules.items():
            v_ex, S = exact_v1(m.A, m.B, m.scale)
            gaps.append(float(S[1] / S[0]))
            cos["peft-power"].append(abscos(layer.top_right_singular_vec_from_BA(m.A, m.B), v_ex))
            cos["svd_lowrank"].append(abscos(lowrank_v1(m.A, m.B, m.scale, m.rank), v_ex))
    return {
        "modules": len(gaps),
        "gap_median": C.median(gaps),
        "gap_max": max(gaps),
        **{f"{k}_cos_min": min(v) for k, v in cos.items()},
        **{f"{k}_cos_median": C.median(v) for k, v in cos.items()},
        **{f"{k}_share_below_0.99": sum(c < 0.99 for c in v) / len(v) for k, v in cos.items()},
    }


# -- top-k changes --------------------------------------------------------------------------------------
def hidden_states(n_tokens, layer_idx=15):
    from loralag.models import load_model

    model, tok = load_model("default")
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :n_tokens]
    grabbed = []
    h = model.model.layers[layer_idx].mlp.gate_proj.register_forward_hook(lambda mod, inp, out: grabbed.append(inp[0]))
    with torch.inference_mode():
        model(ids)
    h.remove()
    return grabbed[0].reshape(-1, grabbed[0].shape[-1]).float(), layer_idx


def topk_changes(libs, tokens, ks=(1, 3, 20)):
    """For each library (exact arrows vs approximations) and token set: share of tokens whose top-k set changes,
    and the mean overlap |exact ∩ approx| / k."""
    out = []
    for lib_name, arrows in libs.items():
        for tok_name, X in tokens.items():
            ex = (X @ arrows["exact"].T).abs()
            for approx in ("peft-power", "svd_lowrank"):
                ap = (X @ arrows[approx].T).abs()
                for k in ks:
                    a = ex.topk(k, dim=1).indices.sort(dim=1).values
                    b = ap.topk(k, dim=1).indices.sort(dim=1).values
                    changed = float((a != b).any(dim=1).float().mean())
                    overlap = float(
                        torch.tensor([len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(a, b)]).mean()
                    )
                    out.append(
                        {
                            "library": lib_name,
                            "tokens": tok_name,
                            "approx": approx,
                            "k": k,
                            "changed": changed,
                            "overlap": overlap,
                            "T": len(X),
                        }
                    )
    return out


def build_topk_libraries(n, trained, d_in=576, d_out=1536, r=6):
    """N adapters at gate_proj's shape: (a) random Gaussian factors; (b) products with the singular-value
    profiles of the trained adapters' gate_proj modules (random singular vectors). Power iteration depends on
    the product only, so (b) reproduces its convergence on trained adapters."""
    layer = peft_layer()
    libs = {}
    A, B = random_factors(n, r, d_in, d_out, seed=7)
    profiles = []
    for ad in trained:
        for name, m in ad.modules.items():
            if name.endswith("gate_proj"):
                _, S = exact_v1(m.A, m.B, m.scale)
                profiles.append((S / S[0]).float())
    Ap, Bp = C.random_aligned(n, r, d_in, d_out, seed=8)
    if profiles:
        for i in range(n):
            S = profiles[i % len(profiles)]
            U = Bp[i] / Bp[i].norm(dim=0, keepdim=True)
            Bp[i] = U * torch.nn.functional.pad(S, (0, r - len(S)))[:r]
        # mix A and B by a random invertible r×r so the factors are not already aligned
        g = torch.Generator().manual_seed(9)
        M = torch.randn(n, r, r, generator=g) + 3 * torch.eye(r)
        Ap, Bp = M @ Ap, Bp @ torch.linalg.inv(M)
    sets = {"random factors": (A, B)}
    if profiles:
        sets["trained singular-value profiles"] = (Ap, Bp)
    for name, (Af, Bf) in sets.items():
        As, _ = align_batch(Af, Bf, torch.full((n,), SCALE))
        libs[name] = {
            "exact": As[:, 0],
            "peft-power": torch.stack([layer.top_right_singular_vec_from_BA(Af[i], Bf[i]) for i in range(n)]),
            "svd_lowrank": torch.stack([lowrank_v1(Af[i], Bf[i], SCALE, r) for i in range(n)]),
        }
    return libs


def main():
    t0 = time.perf_counter()
    args = C.parse_args(__doc__.splitlines()[0], extra)
    quick = args.quick
    info = C.machine_info()
    torch.manual_seed(0)
    if quick:
        counts = {
            (2048, 2048): dict(align=4, align_batch=16, **{"dense-svd": 1, "svd_lowrank": 4, "peft-power": 8}),
            None: dict(align=8, align_batch=32, **{"dense-svd": 2, "svd_lowrank": 8, "peft-power": 16}),
        }
        budget, reps, n_gt, shapes = args.budget or 1.0, 3, 1, [SHAPES[1]]
    else:
        counts = {
            (2048, 2048): dict(align=32, align_batch=256, **{"dense-svd": 3, "svd_lowrank": 16, "peft-power": 64}),
            None: dict(align=64, align_batch=512, **{"dense-svd": 8, "svd_lowrank": 64, "peft-power": 128}),
        }
        budget, reps, n_gt, shapes = args.budget or 25.0, 5, 8, SHAPES
    results = []
    for shape in shapes:
        c = counts.get(shape[:2], counts[None])
        results.append(timing_and_errors(shape, c, n_gt, budget, reps))

    C.log("[align] trained adapters")
    trained, trained_note = get_trained(quick)
    tc = trained_cosines(trained)

    C.log("[align] top-k experiment")
    n_lib = 100
    libs = build_topk_libraries(n_lib, trained)
    C.log("[align] hidden states")
    H, layer_idx = hidden_states(64 if quick else 512)
    g = torch.Generator().manual_seed(3)
    tokens = {
        "random tokens": torch.randn(256 if quick else 2048, 576, generator=g),
        f"SmolLM2 gate_proj inputs (layer {layer_idx})": H,
    }
    changes = topk_changes(libs, tokens)
    elapsed = C.elapsed_since(t0)

    # -- report ------------------------------------------------------------------------------------------
    meth = ["align", "align_batch", "dense-svd", "svd_lowrank", "peft-power"]
    rows = []
    for res in results:
        d_in, d_out, r = res["shape"]
        for m in meth:
            rows.append(
                [
                    f"{d_in}→{d_out} r{r}",
                    m,
                    res["counts"][m],
                    res["rate"][m],
                    res["rate"][m] / res["rate"]["align"],
                    res["max_err"].get(m),
                    res["max_rel_err"].get(m),
                    res["cos_min"][m],
                    res["cos_median"][m],
                ]
            )
    body = [
        __doc__.split("\n\n", 1)[1].strip(),
        "",
        "## Speed and exactness (random factors)",
        "",
        C.md_table(
            [
                "shape",
                "method",
                "adapters per call",
                "adapters/s",
                "× align",
                "max abs err",
                "max rel err",
                "min |cos| to exact v1",
                "median |cos|",
            ],
            rows,
        ),
        "",
        "Errors and cosines over the first "
        + str(n_gt)
        + " adapters of each shape. Median σ2/σ1 of those: "
        + ", ".join(f"{r['shape'][0]}→{r['shape'][1]} r{r['shape'][2]}: {r['gap_median']:.2f}" for r in results)
        + ". The float64 factored reference agrees with a dense float64 SVD to |cos| ≥ "
        + f"{min(r['reference_vs_dense64_cos'] for r in results):.12f}.",
        "",
        "## Prototypes on trained adapters",
        "",
        f"Adapters: {trained_note}. Over every adapted module ({tc['modules']} modules):",
        "",
        C.md_table(
            ["prototype", "min |cos| to exact v1", "median |cos|", "share of modules with |cos| < 0.99"],
            [
                [m, tc[f"{m}_cos_min"], tc[f"{m}_cos_median"], tc[f"{m}_share_below_0.99"]]
                for m in ("peft-power", "svd_lowrank")
            ],
        ),
        "",
        f"Median σ2/σ1 of the trained modules: {tc['gap_median']:.3f} (max {tc['gap_max']:.3f}).",
        "",
        "## Arrow top-k with approximate arrows instead of exact ones",
        "",
        f"A library of N={n_lib} adapters at gate_proj's shape (576→1536, rank 6). 'random factors': Gaussian A, B. "
        "'trained singular-value profiles': random singular vectors with the normalised singular values of the "
        "trained adapters' gate_proj modules, factored non-orthogonally (power iteration depends only on the "
        "product, so this reproduces its convergence on trained adapters at library scale). Tokens: x ~ N(0, I), and "
        f"the inputs of SmolLM2's layer-{layer_idx} gate_proj on an English text ({len(H)} tokens). "
        "'changed' = share of tokens whose top-k set differs from the exact arrows' one; "
        "'overlap' = mean |exact ∩ approx| / k.",
        "",
        C.md_table(
            ["library", "tokens", "arrows", "k", "changed", "overlap"],
            [
                [c["library"], f"{c['tokens']} (T={c['T']})", c["approx"], c["k"], c["changed"], c["overlap"]]
                for c in changes
            ],
        ),
        "",
        "![rates](align.png)",
    ]
    plot(results, args.out / "align.png")
    data = {"results": results, "trained": tc, "trained_note": trained_note, "topk": changes}
    C.write_report(
        args.out, "align", "Alignment: speed, exactness, prototype quality", "\n".join(body), info, data, elapsed, quick
    )


def plot(results, path):
    plt = C.plt()
    meth = ["align", "align_batch", "dense-svd", "svd_lowrank", "peft-power"]
    fig, ax = plt.subplots(figsize=(9, 4))
    w = 0.8 / len(results)
    for j, res in enumerate(results):
        ax.bar(
            [i + j * w for i in range(len(meth))],
            [res["rate"][m] for m in meth],
            width=w,
            label=f"{res['shape'][0]}→{res['shape'][1]} r{res['shape'][2]}",
        )
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(meth))], meth)
    ax.set_yscale("log")
    ax.set_ylabel("adapters / s")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
