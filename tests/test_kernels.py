"""The native kernels (kernels.c) against per-pair products computed with torch: A*_c x and B*_w z."""

import os
import shutil

import pytest
import torch
from test_routers import random_bank, relaid

from loralag.library.bank import ModuleBank
from loralag.routing import kernels
from loralag.routing import routers as R


def test_the_kernel_is_built_where_a_compiler_is():
    """CI has a C compiler: there the kernel must build, or the routers would quietly take their slow paths."""
    if os.environ.get("LORALAG_KERNELS") == "0" or shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler here, or the kernel is switched off")
    assert kernels.available()


def per_pair(bank: ModuleBank, X: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """A*_{cand[t, j]} x_t, each pair alone, zero-padded to the bank's rank."""
    return torch.stack([bank.gather_A(cand[t]) @ X[t] for t in range(len(X))])


@pytest.mark.parametrize("layout", ["direct", "permuted", "two segments", "uneven ranks", "interleaved", "spare rows"])
@pytest.mark.parametrize("threads", [1, 2])
def test_native_projection_equals_per_pair_products(layout, threads, monkeypatch):
    if not kernels.available():
        pytest.skip("no C compiler")
    bank, _ = random_bank(n=40, ranks=(4,) * 20 + (2,) * 20)  # d_in 24: one vector of 16 and a tail of 8
    bank = relaid(bank, layout)
    g = torch.Generator().manual_seed(6)
    X = torch.randn(13, 24, generator=g)
    # distinct candidates per token; adapter 3 picked by every token (a group of 13 pairs: 4-token tiles and a tail)
    cand = torch.stack([torch.cat([torch.tensor([3]), torch.randperm(40, generator=g)[:6]]).unique()[:5] for _ in X])
    monkeypatch.setattr(kernels, "MIN_THREAD_MACS", 0.0)  # split even this small a job when threads > 1
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        Z = R._project_grouped(bank, X, cand)
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(Z, per_pair(bank, X, cand), atol=1e-5, rtol=1e-5)


def test_native_projection_takes_the_first_coordinate_it_is_given():
    """lag passes the arrow scores a·x (A*x's first coordinate): the kernel copies them and computes the rest."""
    if not kernels.available():
        pytest.skip("no C compiler")
    bank, _ = random_bank(n=40, ranks=(4,) * 20 + (2,) * 20)
    bank = relaid(bank, "uneven ranks")
    g = torch.Generator().manual_seed(7)
    X = torch.randn(11, 24, generator=g)
    cand = torch.stack([torch.randperm(40, generator=g)[:5] for _ in X])
    ref = per_pair(bank, X, cand)
    first = ref[:, :, 0] + 100.0  # not what the kernel would compute: it must be copied
    Z = R._project_grouped(bank, X, cand, first=first)
    assert torch.equal(Z[:, :, 0], first)
    torch.testing.assert_close(Z[:, :, 1:], ref[:, :, 1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("r, d", [(8, 2048), (6, 100), (1, 7), (5, 16)])
def test_native_projection_at_other_ranks_and_widths(r, d):
    """Row tiles of 4 with a remainder (r = 5, 6), a single row, widths with and without a scalar tail."""
    if not kernels.available():
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(r + d)
    n, T, k = 30, 21, 4
    A = (
        torch.linalg.qr(torch.randn(n, d, r, generator=g)).Q.transpose(1, 2).contiguous()
    )  # orthonormal rows, as aligned
    bank = ModuleBank.from_tensors("m", [f"a{i}" for i in range(n)], A, torch.randn(n, 3, r, generator=g))
    X = torch.randn(T, d, generator=g)
    cand = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(T)])
    torch.testing.assert_close(R._project_grouped(bank, X, cand), per_pair(bank, X, cand), atol=1e-4, rtol=1e-5)


def test_no_kernel_for_other_dtypes_or_layouts():
    """float64 tokens or a non-contiguous stack take the torch path, with the same result."""
    bank, _ = random_bank(n=12)
    X = torch.randn(9, 24, generator=torch.Generator().manual_seed(1))
    cand = torch.stack([torch.randperm(12, generator=torch.Generator().manual_seed(t))[:3] for t in range(9)])
    A, B = bank.parts[0]
    strided = ModuleBank.from_tensors("m", bank.names, A.transpose(1, 2).contiguous().transpose(1, 2), B, bank.ranks)
    assert strided.addresses(torch.arange(3)) is None
    torch.testing.assert_close(R._project_grouped(strided, X, cand), per_pair(bank, X, cand), atol=1e-5, rtol=1e-5)
    Xd = X.double()
    bank64 = ModuleBank.from_tensors("m", bank.names, A.double(), B.double(), bank.ranks)
    torch.testing.assert_close(R._project_grouped(bank64, Xd, cand), per_pair(bank64, Xd, cand))


@pytest.mark.parametrize("r, d_out", [(8, 2048), (6, 100), (1, 7), (40, 130)])  # r = 40: two blocks of ranks
def test_native_apply_at_other_ranks_and_widths(r, d_out, monkeypatch):
    """B* rows in blocks of 64 with a remainder, ranks over one block of 32; pairs without an adapter (-1) get zero."""
    if not kernels.available():
        pytest.skip("no C compiler")
    monkeypatch.setattr(R, "BLOCK_COLS", 0)  # not the one-GEMM path for a handful of adapters
    monkeypatch.setattr(kernels, "MIN_THREAD_MACS", 0.0)
    g = torch.Generator().manual_seed(r + d_out)
    n, P = 30, 50
    B = torch.randn(n, d_out, r, generator=g)
    bank = ModuleBank.from_tensors("m", [f"a{i}" for i in range(n)], torch.randn(n, r, 5, generator=g), B)
    adapter = torch.randint(0, n, (P,), generator=g)
    adapter[::9] = -1
    Z = torch.randn(P, r, generator=g)
    ref = torch.stack([torch.zeros(d_out) if a < 0 else B[a] @ z for a, z in zip(adapter.tolist(), Z)])
    torch.testing.assert_close(R.apply_b(bank, adapter, Z), ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("layout", ["direct", "permuted", "two segments", "uneven ranks", "interleaved", "spare rows"])
@pytest.mark.parametrize("k", [5, 20, 50])  # 40 adapters: float16 arrows with a re-ranked margin (k=5), float32, k > n
def test_native_decode_equals_brute_force(layout, k, monkeypatch):
    """One token through lag in one native call: the brute-force winner, its delta and ‖A*x‖."""
    if not kernels.available():
        pytest.skip("no C compiler")
    from test_routers import reference_delta

    calls = []
    decode = kernels.decode
    monkeypatch.setattr(kernels, "decode", lambda *a, **kw: calls.append(a[2] is not None) or decode(*a, **kw))
    bank, dense = random_bank(n=40, ranks=(4,) * 20 + (2,) * 20)
    bank = relaid(bank, layout)
    g = torch.Generator().manual_seed(k)
    for _ in range(8):
        x = torch.randn(1, 24, generator=g)
        out = R.route_lag(bank, x, R.RouteSpec("lag", k=k), 1)
        ref, j = reference_delta("lag", dense, x[0], k=k)
        assert int(out.winner[0]) == j
        torch.testing.assert_close(out.delta[0], ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            out.score[0], per_pair(bank, x, out.winner.view(1, 1))[0, 0].norm(), atol=1e-5, rtol=1e-5
        )
    assert calls == [k == 5 and kernels.half_arrows()] * 8  # the native call ran, with float16 arrows where they pay


def test_without_a_compiler_routing_warns_and_takes_the_torch_paths(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_state", {})  # forget the loaded library for this test only
    monkeypatch.setenv("CC", "no-such-compiler")
    monkeypatch.setenv("LORALAG_KERNEL_CACHE", str(tmp_path))
    with pytest.warns(UserWarning, match="no C compiler"):
        assert not kernels.available()
    bank, dense = random_bank(n=12)
    X = torch.randn(7, 24, generator=torch.Generator().manual_seed(3))
    out = R.route_lag(bank, X, R.RouteSpec("lag", k=3), 1)
    from test_routers import reference_delta

    for t in range(len(X)):
        assert int(out.winner[t]) == reference_delta("lag", dense, X[t], k=3)[1]
