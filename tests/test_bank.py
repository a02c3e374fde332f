"""ModuleBank: one module's adapter weights. Every gather, chunk, arrow and address is checked against a brute-force
reference built adapter by adapter from the segments' stacks (segment seg_of[i], row row_of[i], zero-padded to the
bank's rank), and every malformed row table is refused before a native kernel could read through it."""

from __future__ import annotations

import pytest
import torch

from loralag.library.bank import ModuleBank

D_IN, D_OUT = 7, 5


def stacks(m: int, r: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, r, D_IN, generator=g), torch.randn(m, D_OUT, r, generator=g)


def reference(parts, seg_of, row_of, r, i):
    """Adapter i's (A*, B*) read from its own segment and row, padded with zeros to rank r, one element at a time."""
    A, B = parts[int(seg_of[i])]
    row, rs = int(row_of[i]), A.shape[1]
    a, b = torch.zeros(r, D_IN), torch.zeros(D_OUT, r)
    for k in range(rs):
        a[k] = A[row, k]
        b[:, k] = B[row, :, k]
    return a, b


def multi_bank(ranks=(3, 5, 5)):
    """Three segments (ranks per segment), 9 adapters interleaved across them in a scrambled row order."""
    parts = [stacks(4, r, seed=10 + p) for p, r in enumerate(ranks)]
    seg_of = torch.tensor([2, 0, 1, 0, 2, 1, 0, 2, 1])
    row_of = torch.tensor([3, 1, 0, 3, 0, 2, 0, 1, 3])
    r = max(ranks)
    adapter_ranks = torch.tensor([ranks[s] for s in seg_of.tolist()])
    arrows = torch.stack([parts[s][0][row, 0] for s, row in zip(seg_of.tolist(), row_of.tolist())])
    names = [f"ad{i}" for i in range(9)]
    bank = ModuleBank("m", D_IN, D_OUT, names, arrows, adapter_ranks, r, parts, seg_of, row_of)
    return bank, parts, seg_of, row_of


# -- from_tensors: the in-memory bank ----------------------------------------------------------------------------
def test_from_tensors_takes_arrows_from_the_first_row_of_each_A():
    A, B = stacks(6, 4, seed=0)
    bank = ModuleBank.from_tensors("q", [f"n{i}" for i in range(6)], A, B)
    assert (bank.module, bank.n, bank.r, bank.d_in, bank.d_out) == ("q", 6, 4, D_IN, D_OUT)
    assert bank.dtype == torch.float32
    for i in range(6):
        assert torch.equal(bank.arrows[i], A[i][0])
    assert bank.ranks.tolist() == [4] * 6
    assert bank.index == {f"n{i}": i for i in range(6)}
    assert bank.direct  # one full-rank segment in bank order
    half = bank.arrows_half
    assert half.dtype == torch.float16 and torch.allclose(half.float(), bank.arrows, atol=1e-2)
    explicit = ModuleBank.from_tensors("q", [f"n{i}" for i in range(6)], A, B, ranks=[4, 3, 4, 2, 4, 1])
    assert explicit.ranks.tolist() == [4, 3, 4, 2, 4, 1]


def test_from_tensors_gathers_the_rows_asked_for():
    A, B = stacks(6, 4, seed=1)
    bank = ModuleBank.from_tensors("q", list("abcdef"), A, B)
    idx = torch.tensor([5, 0, 3, 3])
    ga, gb = bank.gather(idx)
    for j, i in enumerate(idx.tolist()):
        assert torch.equal(ga[j], A[i]) and torch.equal(gb[j], B[i])
    assert torch.equal(bank.gather_A(idx), ga) and torch.equal(bank.gather_B(idx), gb)
    assert bank.gather(idx, want_a=False)[0] is None and bank.gather(idx, want_b=False)[1] is None
    # into caller buffers, larger than needed: the values are the same and land in those buffers
    out_A, out_B = torch.full((200,), 7.0), torch.full((200,), 7.0)
    ga2, gb2 = bank.gather(idx, out_A=out_A, out_B=out_B)
    assert torch.equal(ga2, ga) and torch.equal(gb2, gb)
    assert ga2.data_ptr() == out_A.data_ptr() and gb2.data_ptr() == out_B.data_ptr()


# -- several segments: padding, scrambled rows ---------------------------------------------------------------------
@pytest.mark.parametrize("ranks", [(3, 5, 5), (5, 5, 5)])  # mixed ranks (zero-padded) and one rank (run copies)
@pytest.mark.parametrize("order", ["sorted", "scrambled", "repeated"])
def test_gather_over_segments_matches_the_brute_force(ranks, order):
    bank, parts, seg_of, row_of = multi_bank(ranks)
    assert not bank.direct and bank.r == 5
    idx = {
        "sorted": torch.arange(9),
        "scrambled": torch.tensor([8, 1, 4, 0, 6, 2]),
        "repeated": torch.tensor([3, 3, 7, 0, 3]),
    }[order]
    for buffers in (False, True):
        kw = dict(out_A=torch.full((999,), 9.0), out_B=torch.full((999,), 9.0)) if buffers else {}
        ga, gb = bank.gather(idx, **kw)
        assert ga.shape == (len(idx), 5, D_IN) and gb.shape == (len(idx), D_OUT, 5)
        for j, i in enumerate(idx.tolist()):
            a, b = reference(parts, seg_of, row_of, 5, i)
            assert torch.equal(ga[j], a), (order, j)  # the pad rows are zeros, even in a reused (dirty) buffer
            assert torch.equal(gb[j], b), (order, j)


def test_arrows_and_chunks_follow_the_row_table():
    bank, parts, seg_of, row_of = multi_bank()
    for i in range(9):
        assert torch.equal(bank.arrows[i], parts[int(seg_of[i])][0][int(row_of[i]), 0])
    seen = []
    for start, A, B in bank.chunks(size=4):
        for j in range(len(A)):
            a, b = reference(parts, seg_of, row_of, 5, start + j)
            assert torch.equal(A[j], a) and torch.equal(B[j], b)
            seen.append(start + j)
    assert seen == list(range(9))
    A, B = stacks(6, 4, seed=2)
    direct = ModuleBank.from_tensors("q", list("abcdef"), A, B)
    assert [(s, len(a)) for s, a, _ in direct.chunks(size=4)] == [(0, 4), (4, 2)]
    assert torch.equal(torch.cat([a for _, a, _ in direct.chunks(4)]), A)


def test_segment_rows_plan_covers_every_adapter_once():
    bank, parts, seg_of, row_of = multi_bank()
    covered = {}
    for p, at, rows in bank.segment_rows():
        positions = list(range(9))[at] if isinstance(at, slice) else at.tolist()
        used = list(range(len(parts[p][0]))) if rows is None else rows.tolist()
        assert len(positions) == len(used)
        for pos, row in zip(positions, used):
            assert (int(seg_of[pos]), int(row_of[pos])) == (p, row)
            covered[pos] = True
    assert sorted(covered) == list(range(9))
    # two segments one after the other: a slice each, the second starting where the first ends
    (A1, B1), (A2, B2) = stacks(3, 2, seed=7), stacks(2, 2, seed=8)
    seg_of, row_of = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0, 1, 2, 1, 0])
    two = ModuleBank(
        "m",
        D_IN,
        D_OUT,
        list("abcde"),
        torch.zeros(5, D_IN),
        torch.full((5,), 2),
        2,
        [(A1, B1), (A2, B2)],
        seg_of,
        row_of,
    )
    plan = two.segment_rows()
    assert [(p, at) for p, at, _ in plan] == [(0, slice(0, 3)), (1, slice(3, 5))]
    assert plan[0][2] is None and plan[1][2].tolist() == [1, 0]
    # a bank in plain order: one slice over everything, all rows in order
    A, B = stacks(3, 2, seed=3)
    assert ModuleBank.from_tensors("q", list("abc"), A, B).segment_rows() == [(0, slice(0, 3), None)]


def test_addresses_point_at_each_adapters_rows_in_place():
    bank, parts, seg_of, row_of = multi_bank()
    idx = torch.tensor([4, 0, 8, 2])
    for factor in (0, 1):
        where, rank = bank.addresses(idx, factor)
        for j, i in enumerate(idx.tolist()):
            stack = parts[int(seg_of[i])][factor]
            assert int(where[j]) == stack[int(row_of[i])].data_ptr()
            assert int(rank[j]) == stack.shape[1 if factor == 0 else 2]
    a, b = bank.all_addresses()
    assert a[0].tolist() == bank.addresses(torch.arange(9), 0)[0].tolist()
    assert b[0].tolist() == bank.addresses(torch.arange(9), 1)[0].tolist()
    # not contiguous float32: no addresses (the kernels cannot read it in place)
    A, B = stacks(3, 2, seed=4)
    assert ModuleBank.from_tensors("q", list("abc"), A.double(), B.double()).addresses(torch.arange(3)) is None
    assert ModuleBank.from_tensors("q", list("abc"), A.double(), B.double()).all_addresses() is None


def test_from_segments_reads_each_adapters_arrow_from_its_segment():
    parts = {s: stacks(3, r, seed=20 + k) for k, (s, r) in enumerate((("s1", 2), ("s2", 4)))}
    reads = []

    def reader(seg):
        def read():
            reads.append(seg)
            return parts[seg][0][:, 0].clone()

        return read

    full = {s: (*parts[s], reader(s)) for s in parts}
    where = [("s2", 1, 4), ("s1", 0, 2), ("s2", 0, 3), ("s1", 2, 1)]
    bank = ModuleBank.from_segments("m", D_IN, D_OUT, list("wxyz"), where, full, torch.float32)
    assert bank.r == 4 and bank.ranks.tolist() == [4, 2, 3, 1]
    for i, (seg, row, _) in enumerate(where):
        assert torch.equal(bank.arrows[i], parts[seg][0][row, 0])
        a, b = bank.gather(torch.tensor([i]))
        assert torch.equal(a[0, : parts[seg][0].shape[1]], parts[seg][0][row])
        assert not a[0, parts[seg][0].shape[1] :].any()
        assert torch.equal(b[0, :, : parts[seg][1].shape[2]], parts[seg][1][row])
    assert sorted(reads) == ["s1", "s2"]  # each segment's arrows read once
    # one segment holding rows the bank skips (removed adapters): only the live rows' arrows, in bank order
    one = {"s2": full["s2"]}
    bank = ModuleBank.from_segments("m", D_IN, D_OUT, ["p", "q"], [("s2", 2, 4), ("s2", 0, 4)], one, torch.float32)
    assert torch.equal(bank.arrows, parts["s2"][0][[2, 0], 0])
    assert not bank.direct
    ga, gb = bank.gather(torch.tensor([1, 0, 1]))  # rows 0, 2, 0 of the segment, not rows 1, 0, 1
    assert torch.equal(ga, parts["s2"][0][[0, 2, 0]]) and torch.equal(gb, parts["s2"][1][[0, 2, 0]])
    empty = ModuleBank.from_segments("m", D_IN, D_OUT, [], [], {}, torch.float32)
    assert empty.n == 0 and empty.arrows.shape == (0, D_IN)


# -- the row table is checked before anything can read through it --------------------------------------------------
def _bank_with(**change):
    A, B = stacks(4, 3, seed=5)
    A2, B2 = stacks(2, 2, seed=6)
    fields = dict(
        module="m",
        d_in=D_IN,
        d_out=D_OUT,
        names=list("abcde"),
        arrows=torch.zeros(5, D_IN),
        ranks=torch.tensor([3, 3, 2, 3, 2]),
        r=3,
        parts=[(A, B), (A2, B2)],
        seg_of=torch.tensor([0, 0, 1, 0, 1]),
        row_of=torch.tensor([0, 3, 1, 2, 0]),
    )
    fields.update(change)
    return ModuleBank(**fields)


def test_a_valid_row_table_is_accepted():
    assert _bank_with().n == 5


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(seg_of=torch.tensor([0, 0, 2, 0, 1])), "segment that does not exist"),
        (dict(seg_of=torch.tensor([0, 0, -1, 0, 1])), "segment that does not exist"),
        (dict(row_of=torch.tensor([0, 4, 1, 2, 0])), "outside its segment"),  # segment 0 holds rows 0..3
        (dict(row_of=torch.tensor([0, 3, 2, 2, 0])), "outside its segment"),  # segment 1 holds rows 0..1
        (dict(row_of=torch.tensor([0, 3, 1, -1, 0])), "outside its segment"),
        (dict(ranks=torch.tensor([3, 3, 3, 3, 2])), "outside its segment"),  # rank 3 in a rank-2 segment
        (dict(ranks=torch.tensor([3, 0, 2, 3, 2])), "outside its segment"),
        (dict(names=list("abcd")), "tables of other lengths"),
        (dict(row_of=torch.tensor([0, 3, 1, 2])), "tables of other lengths"),
        (dict(seg_of=torch.tensor([0, 0, 1, 0, 1, 1])), "tables of other lengths"),
        (dict(ranks=torch.tensor([3, 3, 2, 3])), "tables of other lengths"),
        (dict(arrows=torch.zeros(5, D_IN + 1)), "tables of other lengths"),
        (dict(d_in=D_IN + 1, arrows=torch.zeros(5, D_IN + 1)), "not stacks of"),
        (dict(d_out=D_OUT + 1), "not stacks of"),
        (dict(parts=[stacks(4, 3, 0), (torch.zeros(2, 2, D_IN), torch.zeros(2, D_OUT, 3))]), "not stacks of"),
        (dict(parts=[stacks(4, 3, 0), (torch.zeros(2, 2, D_IN), torch.zeros(3, D_OUT, 2))]), "not stacks of"),
        (dict(parts=[stacks(4, 3, 0), (torch.zeros(2, D_IN), torch.zeros(2, D_OUT, 2))]), "not stacks of"),
    ],
)
def test_a_bad_row_table_is_refused(change, message):
    with pytest.raises(ValueError, match=message):
        _bank_with(**change)
