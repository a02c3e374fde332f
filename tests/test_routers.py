"""Routers against a brute-force per-token reference built from dense s·B·A and its dense SVD."""

import pytest
import torch
from conftest import save_lora, tiny_llama

from loralag import attach, build_library, detach, read_adapter
from loralag.library.bank import ModuleBank
from loralag.library.store import module_shapes
from loralag.routing import routers as R

N_ADAPTERS = 7


def reference_delta(router, dense, x, k=20, temperature=1.0):
    """One token x through a list of dense deltas W_i = s_i·B_i·A_i, the slow obvious way."""
    svds = [torch.linalg.svd(W.double()) for W in dense]
    ranks = [int(torch.linalg.matrix_rank(W.double(), rtol=1e-5)) for W in dense]  # W holds fp32 noise
    xd = x.double()
    arrow = torch.stack([abs(Vh[0] @ xd) for _, _, Vh in svds])
    spec = torch.stack([(Vh[:r] @ xd).norm() for (_, _, Vh), r in zip(svds, ranks)])
    n = len(dense)
    if router == "arrow":
        j = int(arrow.argmax())
    elif router == "spectral":
        j = int(spec.argmax())
    elif router == "lag":
        cand = arrow.topk(min(k, n)).indices
        j = int(cand[spec[cand].argmax()])
    elif router == "arrow-mix":
        val, cand = arrow.topk(min(k, n))
        coeff = torch.softmax(val / temperature, 0)
        return sum(c * (dense[i].double() @ xd) for c, i in zip(coeff, cand.tolist())).float(), int(cand[0])
    elif router == "uniform":
        return (sum(W.double() @ xd for W in dense) / n).float(), -1
    return (dense[j].double() @ xd).float(), j


def random_bank(n=9, d_in=24, d_out=16, ranks=(2, 3, 4), seed=0):
    from loralag.library.alignment import align

    g = torch.Generator().manual_seed(seed)
    dense, As, Bs, rs = [], [], [], []
    for i in range(n):
        r = ranks[i % len(ranks)]
        A, B = torch.randn(r, d_in, generator=g), torch.randn(d_out, r, generator=g)
        A_s, B_s = align(A, B, 1.5)
        dense.append(1.5 * B @ A)
        As.append(A_s), Bs.append(B_s), rs.append(r)
    from loralag.library.store import _stack_padded

    A, B = _stack_padded(As, Bs)
    return ModuleBank.from_tensors("m", [f"a{i}" for i in range(n)], A, B, rs), dense


@pytest.mark.parametrize("router", ["lag", "arrow", "spectral", "arrow-mix", "uniform"])
@pytest.mark.parametrize("k", [1, 3, 20])
def test_kernels_match_brute_force(router, k):
    bank, dense = random_bank()
    X = torch.randn(13, 24, generator=torch.Generator().manual_seed(5))
    out = R.ROUTERS[router](bank, X, R.RouteSpec(router=router, k=k, temperature=0.7), 1)
    for t in range(len(X)):
        ref, j = reference_delta(router, dense, X[t], k=k, temperature=0.7)
        torch.testing.assert_close(out.delta[t], ref, atol=1e-4, rtol=1e-4)
        if router not in ("uniform",):
            assert int(out.winner[t]) == j


def relaid(bank: ModuleBank, layout: str) -> ModuleBank:
    """The same adapters stored otherwise: rows permuted in one segment, or split over two segments."""
    A, B = bank.parts[0]
    n = bank.n
    if layout == "direct":
        return bank
    if layout == "permuted":
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        parts, seg_of, row_of = [(A[perm], B[perm])], torch.zeros(n, dtype=torch.long), perm.argsort()
    elif layout == "uneven ranks":  # the second half in a segment of a lower rank (its adapters' rank ≤ 2)
        h = n // 2
        assert not A[h:, 2:].any()
        parts = [(A[:h], B[:h]), (A[h:, :2].contiguous(), B[h:, :, :2].contiguous())]
        seg_of = (torch.arange(n) >= h).long()
        row_of = torch.cat([torch.arange(h), torch.arange(n - h)])
    elif layout == "interleaved":  # two segments, adapters alternating between them
        odd = torch.arange(n) % 2
        parts = [(A[odd == 0], B[odd == 0]), (A[odd == 1], B[odd == 1])]
        seg_of, row_of = odd, torch.arange(n) // 2
    elif layout == "spare rows":  # a segment whose every other row belongs to no adapter (removed ones)
        g = torch.Generator().manual_seed(3)
        A2, B2 = torch.randn(2 * n, *A.shape[1:], generator=g), torch.randn(2 * n, *B.shape[1:], generator=g)
        A2[::2], B2[::2] = A, B
        parts, seg_of, row_of = [(A2, B2)], torch.zeros(n, dtype=torch.long), 2 * torch.arange(n)
    else:
        h = n // 2
        parts = [(A[:h], B[:h]), (A[h:], B[h:])]
        seg_of = (torch.arange(n) >= h).long()
        row_of = torch.cat([torch.arange(h), torch.arange(n - h)])
    out = ModuleBank(
        bank.module, bank.d_in, bank.d_out, bank.names, bank.arrows, bank.ranks, bank.r, parts, seg_of, row_of
    )
    assert not out.direct
    return out


@pytest.mark.parametrize("layout", ["direct", "permuted", "two segments", "uneven ranks"])
@pytest.mark.parametrize("order", ["sorted", "shuffled", "repeated"])
def test_gather_returns_each_adapters_own_factors(layout, order):
    """Every gather path (one stack, runs of segments, scattered segments, zero-padded ranks) against
    indexing the one-stack bank, with and without output buffers."""
    bank, _ = random_bank(n=40, ranks=(4,) * 20 + (2,) * 20)
    other = relaid(bank, layout)
    g = torch.Generator().manual_seed(3)
    idx = {
        "sorted": torch.arange(3, 37),
        "shuffled": torch.randperm(40, generator=g),
        "repeated": torch.randint(0, 40, (60,), generator=g).sort().values,
    }[order]
    A_ref, B_ref = bank.parts[0][0][idx], bank.parts[0][1][idx]
    A, B = other.gather(idx)
    assert torch.equal(A, A_ref) and torch.equal(B, B_ref)
    buf_A, buf_B = torch.full((A_ref.numel() + 5,), 7.0), torch.full((B_ref.numel() + 5,), 7.0)
    assert torch.equal(other.gather_A(idx, out=buf_A), A_ref)
    assert torch.equal(other.gather_B(idx, out=buf_B), B_ref)
    assert other.gather(idx, want_a=False)[0] is None and other.gather(idx, want_b=False)[1] is None


@pytest.mark.parametrize("adapters", ["three", "few, many pairs each", "mostly distinct"])
@pytest.mark.parametrize("path", ["block", "native", "torch"])
def test_apply_b_every_path_matches_per_pair_products(adapters, path, monkeypatch):
    """apply_b's paths (block GEMM; the native kernel; one GEMM per adapter, batched products over gathered
    B*) against B*_a z for each pair alone; adapter -1 gives zero."""
    if path == "native" and not R.kernels.available():
        pytest.skip("no C compiler")
    if path == "torch":
        monkeypatch.setattr(R.kernels, "available", lambda: False)
    bank, _ = random_bank(n=40, ranks=(4,) * 20 + (2,) * 20)
    bank = relaid(bank, "uneven ranks")
    g = torch.Generator().manual_seed(8)
    P = 120
    pool = {
        "three": torch.tensor([3, 25, 31]),
        "few, many pairs each": torch.arange(0, 40, 4),
        "mostly distinct": torch.arange(40),
    }[adapters]
    adapter = pool[torch.randint(0, len(pool), (P,), generator=g)]
    adapter[::7] = -1
    Z = torch.randn(P, bank.r, generator=g)
    if path != "block":
        monkeypatch.setattr(R, "BLOCK_COLS", 0)
    out = R.apply_b(bank, adapter, Z)
    A_full, B_full = random_bank(n=40, ranks=(4,) * 20 + (2,) * 20)[0].parts[0]
    for p in range(P):
        ref = torch.zeros(bank.d_out) if adapter[p] < 0 else B_full[adapter[p]] @ Z[p]
        torch.testing.assert_close(out[p], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", ["direct", "two segments", "uneven ranks"])
@pytest.mark.parametrize("L", [1, 5])
def test_fixed_applies_each_sequences_adapter(layout, L):
    """`fixed` (Oracle, PRAG, sequence votes): each sequence's tokens through its own dense s·B·A, None: zero."""
    bank, dense = random_bank(n=40, ranks=(4,) * 20 + (2,) * 20)
    bank = relaid(bank, layout)
    names = ["a31", None, "a2", "a31"]
    X = torch.randn(len(names) * L, 24, generator=torch.Generator().manual_seed(4))
    out = R.ROUTERS["fixed"](bank, X, R.RouteSpec(router="fixed", fixed=names), len(names))
    for t in range(len(X)):
        name = names[t // L]
        ref = torch.zeros(16) if name is None else dense[int(name[1:])] @ X[t]
        torch.testing.assert_close(out.delta[t], ref, atol=1e-4, rtol=1e-4)
        assert int(out.winner[t]) == (-1 if name is None else int(name[1:]))


@pytest.mark.parametrize("router", ["lag", "arrow-mix"])
@pytest.mark.parametrize("layout", ["direct", "permuted", "two segments"])
@pytest.mark.parametrize(
    "chunk_bytes", ["native", None, 24 * 4 * 7, 1]
)  # the kernel; torch path: default, 7 rows, 1 adapter per chunk
def test_union_and_grouped_paths_agree(router, layout, chunk_bytes, monkeypatch):
    if chunk_bytes != "native":
        monkeypatch.setattr(R.kernels, "available", lambda: False)
    bank, _ = random_bank(n=40)
    X = torch.randn(100, 24, generator=torch.Generator().manual_seed(2))
    spec = R.RouteSpec(router=router, k=5)
    monkeypatch.setattr(R, "STEP_COST", 1e9)  # force the union GEMM
    union = R.ROUTERS[router](bank, X, spec, 1)
    monkeypatch.setattr(R, "STEP_COST", 0.0)  # force the per-adapter grouped GEMMs
    monkeypatch.setattr(R, "GEMM_RATE", 1.0)
    if isinstance(chunk_bytes, int):
        monkeypatch.setattr(R, "CHUNK_BYTES", chunk_bytes)
    per_token = R.ROUTERS[router](relaid(bank, layout), X, spec, 1)
    torch.testing.assert_close(union.delta, per_token.delta, atol=1e-5, rtol=1e-5)
    assert torch.equal(union.winner, per_token.winner)


@pytest.mark.parametrize("layout", ["direct", "permuted", "two segments", "uneven ranks", "interleaved", "spare rows"])
def test_lag_scoring_every_adapter_equals_the_arrow_filter(layout, monkeypatch):
    """route_lag's two exact ways (A*x of every adapter, arrow scores read off its first coordinate; or the
    arrow stage, then A*x of the candidates only) pick the brute-force winner and apply the same delta."""
    bank, dense = random_bank(n=12, ranks=(4, 3) * 3 + (2, 1) * 3)  # the second half of rank ≤ 2
    bank = relaid(bank, layout)
    X = torch.randn(17, 24, generator=torch.Generator().manual_seed(4))
    spec = R.RouteSpec("lag", k=4)
    out = {}
    for every in (True, False):
        monkeypatch.setattr(R, "_scoring_all_pays", lambda *a, every=every: every)
        out[every] = R.route_lag(bank, X, spec, 1)
    assert torch.equal(out[True].winner, out[False].winner)
    torch.testing.assert_close(out[True].score, out[False].score, atol=1e-5, rtol=1e-5)
    for t in range(len(X)):
        ref, j = reference_delta("lag", dense, X[t], k=4)
        assert int(out[True].winner[t]) == j
        torch.testing.assert_close(out[True].delta[t], ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("native", [True, False])
def test_scoring_every_adapter_is_chosen_where_it_pays(native, monkeypatch):
    """The cost model: a batch decoding against a small library scores everything; a prefill against a large
    library filters first. Without the native kernel the filter's grouped projection costs more, so scoring
    everything pays for larger libraries too (32 tokens against the LAMA library's 200 adapters)."""
    if native and not R.kernels.available():
        pytest.skip("no C compiler")
    if not native:
        monkeypatch.setattr(R.kernels, "available", lambda: False)

    def bank(n, d):
        return ModuleBank.from_tensors("m", [f"a{i}" for i in range(n)], torch.zeros(n, 8, d), torch.zeros(n, d, 8))

    assert R._scoring_all_pays(bank(50, 64), torch.zeros(32, 64), 20)
    assert R._scoring_all_pays(bank(200, 576), torch.zeros(32, 576), 20) != native
    assert not R._scoring_all_pays(bank(1000, 1024), torch.zeros(512, 1024), 20)


@pytest.fixture(scope="module")
def llama_library(tmp_path_factory):
    """A tiny Llama and a library of mixed-rank, mixed-alpha adapters on partly different modules."""
    tmp = tmp_path_factory.mktemp("routers")
    model = tiny_llama()
    targets = [("q_proj", "v_proj", "up_proj"), ("q_proj", "down_proj"), ("v_proj", "up_proj", "down_proj")]
    for i in range(N_ADAPTERS):
        save_lora(model, tmp / "ads" / f"a{i}", seed=10 + i, r=2 + i % 3, alpha=4 + i, target_modules=targets[i % 3])
    lib = build_library(tmp / "lib", [tmp / "ads"], base_model="tiny", shapes=module_shapes(model), progress=False)
    adapters = [read_adapter(tmp / "ads" / f"a{i}") for i in range(N_ADAPTERS)]
    return model, lib, adapters


class ReferenceLinear(torch.nn.Module):
    """Per-token Python loop over dense deltas: the brute-force routed layer."""

    def __init__(self, base, dense, router, k):
        super().__init__()
        self.base, self.dense, self.router, self.k = base, dense, router, k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        delta = torch.stack([reference_delta(self.router, self.dense, t, self.k)[0] for t in flat])
        return self.base(x) + delta.view(*x.shape[:-1], -1)


def logits_with(model, wrap, ids):
    """model(ids).logits with every module for which wrap(name, module) returns a replacement swapped for it
    (None: kept), the originals put back after."""
    originals = {}
    for name in module_shapes(model):
        parent, _, child = name.rpartition(".")
        replacement = wrap(name, getattr(model.get_submodule(parent), child))
        if replacement is not None:
            originals[name] = getattr(model.get_submodule(parent), child)
            setattr(model.get_submodule(parent), child, replacement)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for name, orig in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, orig)


def dense_deltas(adapters, name: str) -> list[torch.Tensor]:
    """s·B·A of module `name` for each adapter that has it."""
    return [a.modules[name].scale * a.modules[name].B @ a.modules[name].A for a in adapters if name in a.modules]


def reference_logits(model, adapters, router, k, ids):
    def wrap(name, base):
        dense = dense_deltas(adapters, name)
        return ReferenceLinear(base, dense, router, k) if dense else None

    return logits_with(model, wrap, ids)


def routed_logits(model, lib, router, k, ids):
    attach(model, lib, router=router, k=k)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        detach(model)


def test_spectral_equals_brute_force(llama_library, ids):
    model, lib, adapters = llama_library
    torch.testing.assert_close(
        routed_logits(model, lib, "spectral", 20, ids),
        reference_logits(model, adapters, "spectral", 20, ids),
        atol=1e-4,
        rtol=1e-4,
    )


@pytest.mark.parametrize("router,k", [("lag", 2), ("arrow", 1), ("arrow-mix", 3), ("uniform", 1)])
def test_routers_equal_brute_force_on_model(llama_library, ids, router, k):
    model, lib, adapters = llama_library
    torch.testing.assert_close(
        routed_logits(model, lib, router, k, ids),
        reference_logits(model, adapters, router, k, ids),
        atol=1e-4,
        rtol=1e-4,
    )


def test_lag_limits(llama_library, ids):
    model, lib, _ = llama_library
    spectral = routed_logits(model, lib, "spectral", 20, ids)
    torch.testing.assert_close(routed_logits(model, lib, "lag", N_ADAPTERS, ids), spectral, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(routed_logits(model, lib, "lag", 100, ids), spectral, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        routed_logits(model, lib, "lag", 1, ids), routed_logits(model, lib, "arrow", 20, ids), atol=1e-5, rtol=1e-5
    )
    base = model(ids).logits
    assert (spectral - base).abs().max() > 1e-2  # the routed adapters really change the output
    torch.testing.assert_close(routed_logits(model, lib, "none", 20, ids), base, atol=0, rtol=0)


@pytest.mark.parametrize("router", ["lag", "arrow", "spectral", "arrow-mix"])
def test_one_token_paths_equal_batched(router):
    """Decoding sends one token at a time through dedicated fast paths; they must agree with the batch."""
    bank, _ = random_bank(n=30)
    X = torch.randn(6, 24, generator=torch.Generator().manual_seed(11))
    spec = R.RouteSpec(router=router, k=4)
    batched = R.ROUTERS[router](bank, X, spec, 1)
    for t in range(len(X)):
        one = R.ROUTERS[router](bank, X[t : t + 1], spec, 1)
        torch.testing.assert_close(one.delta[0], batched.delta[t], atol=1e-5, rtol=1e-5)
        assert int(one.winner[0]) == int(batched.winner[t])


@pytest.mark.parametrize("router,k", [("lag", 20), ("lag", 3), ("arrow", 1), ("arrow-mix", 5)])
def test_half_precision_decoding_filter_equals_exact(router, k, monkeypatch):
    """One or two tokens score float16 arrows and re-rank a margin exactly: same result as float32 arrows."""
    bank, _ = random_bank(n=300, d_in=64, ranks=(3, 4))
    spec = R.RouteSpec(router=router, k=k)
    for seed in range(20):
        X = torch.randn(1 + seed % 2, 64, generator=torch.Generator().manual_seed(seed)) * 10.0 ** (seed % 3 - 1)
        fast = R.ROUTERS[router](bank, X, spec, 1)
        assert bank._arrows_half is not None  # the float16 path ran
        with monkeypatch.context() as m:
            m.setattr(R, "HALF_TOKENS", 0)
            exact = R.ROUTERS[router](bank, X, spec, 1)
        assert torch.equal(fast.winner, exact.winner)
        # float32 sums in another order: arrow-mix's mixture cancels terms, so compare at their scale
        torch.testing.assert_close(fast.delta, exact.delta, atol=1e-5 * float(exact.delta.abs().max()), rtol=1e-5)
        torch.testing.assert_close(fast.score, exact.score, atol=1e-6, rtol=1e-5)


def test_half_precision_filter_breaks_float16_ties_exactly():
    """Two arrows equal in float16 but not in float32: the exact re-rank picks the truly better one."""
    g = torch.Generator().manual_seed(0)
    n, d = 200, 64
    arrows = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    arrows[7] = arrows[7].half().float()  # exactly representable in float16
    ulp = 2.0 ** (torch.floor(torch.log2(arrows[7].abs())) - 10)
    twin = arrows[7] + 0.2 * ulp * arrows[7].sign()  # a fifth of a float16 step away
    arrows[150] = twin
    assert torch.equal(arrows[7].half(), twin.half())  # indistinguishable to the float16 stage
    x = arrows[7].clone()  # twin·x = |x|² + (twin - x)·x > x·x
    A = torch.linalg.qr(torch.randn(n, d, 3, generator=g)).Q.transpose(1, 2).clone()
    A[:, 0] = arrows  # only the arrows matter to the Arrow stage
    bank = ModuleBank.from_tensors("m", [f"a{i}" for i in range(n)], A, torch.zeros(n, 8, 3))
    exact = (arrows @ x).abs()
    assert int(exact.argmax()) == 150 and float(exact[150] - exact[7]) > 0
    val, cand = R.arrow_topk(bank, x.unsqueeze(0), 1)
    assert int(cand[0, 0]) == 150 and bank._arrows_half is not None
    torch.testing.assert_close(val[0, 0], exact[150])


def test_many_segments_route_like_one(tmp_path, ids):
    """A library written in many segments (resumable builds, adds) routes exactly like a compacted one."""
    model = tiny_llama()
    for i in range(9):
        save_lora(model, tmp_path / "ads" / f"a{i}", seed=40 + i, r=2 + i % 2, target_modules=("q_proj", "up_proj"))
    shapes = module_shapes(model)
    many = build_library(
        tmp_path / "many", [tmp_path / "ads"], base_model="tiny", shapes=shapes, chunk_size=2, progress=False
    )
    many.remove(["a3"])
    one = build_library(tmp_path / "one", [tmp_path / "ads"], base_model="tiny", shapes=shapes, progress=False)
    one.remove(["a3"])
    one.compact()
    assert len({a["segment"] for a in many.adapters}) == 5 and len({a["segment"] for a in one.adapters}) == 1
    for router in ("lag", "spectral", "arrow-mix"):
        torch.testing.assert_close(
            routed_logits(model, many, router, 3, ids), routed_logits(model, one, router, 3, ids), atol=1e-6, rtol=1e-6
        )
