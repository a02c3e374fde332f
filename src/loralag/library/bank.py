"""One module's adapter weights: the arrows in RAM, A* and B* gathered on demand from memory maps.

The arrows (n, d_in) are the only per-adapter memory a router keeps resident: every token is scored
against all of them. A* and B* stay in the segment files' memory maps and only the rows a router
asks for (candidates, winners) are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loralag.library.arrow_index import ArrowIndex


@dataclass
class ModuleBank:
    module: str
    d_in: int
    d_out: int
    names: list[str]
    arrows: torch.Tensor  # (n, d_in), resident
    ranks: torch.Tensor  # (n,)
    r: int  # largest rank; smaller ones are zero-padded
    parts: list[tuple[torch.Tensor, torch.Tensor]]  # per segment: A (m, r_s, d_in), B (m, d_out, r_s)
    seg_of: torch.Tensor  # (n,) which part holds each adapter
    row_of: torch.Tensor  # (n,) its row there
    ivf: ArrowIndex | None = None  # optional sub-linear arrow index (arrow_index.py)
    _arrows_half: torch.Tensor | None = None  # float16 copy for decoding, see arrows_half

    def __post_init__(self):
        self._check_rows()
        # The common case, one segment at full rank, gathers with a single index_select per tensor;
        # when its rows are also the bank's order (nothing removed) even the row lookup goes.
        self._single = len(self.parts) == 1 and self.parts[0][0].shape[1] == self.r
        self._direct = (
            self._single and len(self.parts[0][0]) == self.n and bool((self.row_of == torch.arange(self.n)).all())
        )
        self._padded = any(A.shape[1] < self.r for A, _ in self.parts)

    def _check_rows(self) -> None:
        """Every adapter's (segment, row) lies inside its stack, and the stacks have this bank's shapes: the native
        kernels read rows in place by address, so a bad row table must never reach them."""
        for p, (A, B) in enumerate(self.parts):
            if (
                A.ndim != 3
                or B.ndim != 3
                or len(A) != len(B)
                or A.shape[2] != self.d_in
                or B.shape[1] != self.d_out
                or A.shape[1] != B.shape[2]
            ):
                raise ValueError(
                    f"module {self.module}: segment {p} holds A {tuple(A.shape)} and B {tuple(B.shape)}, "
                    f"not stacks of {self.d_in}->{self.d_out} factors"
                )
        n = len(self.names)
        if (
            len(self.seg_of) != n
            or len(self.row_of) != n
            or len(self.ranks) != n
            or self.arrows.shape != (n, self.d_in)
        ):
            raise ValueError(f"module {self.module}: {n} adapters but tables of other lengths")
        if n:
            sizes = torch.tensor([len(A) for A, _ in self.parts])
            ranks = torch.tensor([A.shape[1] for A, _ in self.parts])
            seg = self.seg_of
            if bool((seg < 0).any() or (seg >= len(self.parts)).any()):
                raise ValueError(f"module {self.module}: an adapter points to a segment that does not exist")
            if bool(
                (self.row_of < 0).any()
                or (self.row_of >= sizes[seg]).any()
                or (self.ranks < 1).any()
                or (self.ranks > ranks[seg]).any()
            ):
                raise ValueError(f"module {self.module}: an adapter's row or rank lies outside its segment's stack")

    @property
    def direct(self) -> bool:
        """One full-rank segment whose rows are the bank's order: stacks can be used as they are."""
        return self._direct

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def dtype(self) -> torch.dtype:
        return self.arrows.dtype

    @property
    def arrows_half(self) -> torch.Tensor:
        """A float16 copy of the arrows for decoding, made on first use: one token's arrow stage is a
        matrix-vector product bound by memory bandwidth, and this halves the bytes it reads."""
        if self._arrows_half is None:
            self._arrows_half = self.arrows.to(torch.float16)
        return self._arrows_half

    @property
    def a_transposed(self) -> list[torch.Tensor]:
        """A one-segment bank's A*ᵀ (d_in, r) per adapter, as views made once: the grouped projection
        calls one GEMM per adapter and should pay for nothing else per adapter."""
        if not hasattr(self, "_a_transposed"):
            self._a_transposed = list(self.parts[0][0].transpose(1, 2).unbind(0))
        return self._a_transposed

    def addresses(self, idx: torch.Tensor, factor: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where each adapter idx's A* (factor 0) or B* (factor 1) starts in memory, and its segment's rank:
        for the native kernels, which read the factors in place from any segment. None when a segment's
        stack is not contiguous float32 on the CPU."""
        if not hasattr(self, "_layout"):
            self._layout = [self._segment_layout(t) for t in (0, 1)]
        if self._layout[factor] is None:
            return None
        base, stride, rank = self._layout[factor]
        seg = self.seg_of.index_select(0, idx)
        return base.index_select(0, seg) + self.row_of.index_select(0, idx) * stride.index_select(
            0, seg
        ), rank.index_select(0, seg)

    def all_addresses(self):
        """addresses() of every adapter's A* and B*, made once: decoding asks for them at every token."""
        if not hasattr(self, "_all_addresses"):
            idx = torch.arange(self.n)
            a, b = self.addresses(idx, 0), self.addresses(idx, 1)
            self._all_addresses = None if a is None or b is None else (a, b)
        return self._all_addresses

    def _segment_layout(self, factor: int):
        """Per segment: address, bytes per adapter, rank; None unless every stack is contiguous float32."""
        stacks = [part[factor] for part in self.parts]
        if not stacks or not all(
            S.dtype == torch.float32 and S.is_contiguous() and S.device.type == "cpu" for S in stacks
        ):
            return None
        rank_dim = 1 if factor == 0 else 2
        return (
            torch.tensor([S.data_ptr() for S in stacks]),
            torch.tensor([S.stride(0) * S.element_size() for S in stacks]),
            torch.tensor([S.shape[rank_dim] for S in stacks]),
        )

    @property
    def index(self) -> dict[str, int]:
        if not hasattr(self, "_index"):
            self._index = {name: i for i, name in enumerate(self.names)}
        return self._index

    @classmethod
    def from_segments(cls, module, d_in, d_out, names, where, parts, dtype) -> ModuleBank:
        """`where[i] = (segment, row, rank)` for adapter names[i]; `parts[segment] = (A, B, read_arrows)`.

        Arrows are read with plain file reads, not through the map, so opening keeps one copy of them."""
        order = list(dict.fromkeys(seg for seg, _, _ in where))
        seg_of = torch.tensor([order.index(seg) for seg, _, _ in where], dtype=torch.long)
        row_of = torch.tensor([row for _, row, _ in where], dtype=torch.long)
        ranks = torch.tensor([rank for _, _, rank in where], dtype=torch.long)
        plist = [(parts[s][0], parts[s][1]) for s in order]
        arrows = torch.empty(0, d_in, dtype=dtype)
        if len(order) == 1:
            arrows = parts[order[0]][2]()
            if len(arrows) != len(names) or not bool((row_of == torch.arange(len(names))).all()):
                arrows = arrows.index_select(0, row_of)
        elif names:
            arrows = torch.empty(len(names), d_in, dtype=dtype)
            for p, seg in enumerate(order):
                sel = (seg_of == p).nonzero().squeeze(1)
                arrows[sel] = parts[seg][2]().index_select(0, row_of[sel])
        r = max((A.shape[1] for A, _ in plist), default=0)
        return cls(module, d_in, d_out, list(names), arrows.to(dtype), ranks, r, plist, seg_of, row_of)

    @classmethod
    def from_tensors(cls, module: str, names: list[str], A: torch.Tensor, B: torch.Tensor, ranks=None) -> ModuleBank:
        """A bank over in-memory stacked factors (tests, benchmarks)."""
        n, r, d_in = A.shape
        ranks = torch.full((n,), r, dtype=torch.long) if ranks is None else torch.as_tensor(ranks)
        return cls(
            module,
            d_in,
            B.shape[1],
            list(names),
            A[:, 0].contiguous(),
            ranks,
            r,
            [(A, B)],
            torch.zeros(n, dtype=torch.long),
            torch.arange(n),
        )

    def gather(
        self, idx: torch.Tensor, want_b: bool = True, out_A=None, out_B=None, want_a: bool = True
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """A* (m, r, d_in) and B* (m, d_out, r) of adapters idx, zero-padded to the bank's rank.

        out_A / out_B: flat buffers of at least that size to write into (reused memory is much faster
        than fresh pages for the tens of MB a prefill gathers). want_a / want_b False: that one is None."""
        if self._single:
            A, B = self.parts[0]
            rows = idx if self._direct else self.row_of.index_select(0, idx)
            return (_rows(A, rows, out_A) if want_a else None), (_rows(B, rows, out_B) if want_b else None)
        A_out = _fill(out_A, (len(idx), self.r, self.d_in), self.dtype, self._padded) if want_a else None
        B_out = _fill(out_B, (len(idx), self.d_out, self.r), self.dtype, self._padded) if want_b else None
        wanted = [(t, out) for t, out in ((0, A_out), (1, B_out)) if out is not None]
        segs = self.seg_of.index_select(0, idx)
        rows = self.row_of.index_select(0, idx)
        runs, counts = segs.unique_consecutive(return_counts=True)
        if not self._padded and len(runs) <= 2 * len(self.parts):
            # Sorted requests (routers ask in bank order) come in a few runs of one segment each: each run
            # is copied straight into its slice of the output, one index_select per tensor.
            s = 0
            for p, m in zip(runs.tolist(), counts.tolist()):
                for t, out in wanted:
                    _rows(self.parts[p][t], rows[s : s + m], out[s : s + m].reshape(-1))
                s += m
            return A_out, B_out
        for p in segs.unique().tolist():
            sel = (segs == p).nonzero().squeeze(1)
            A, B = self.parts[p]
            seg_rows = rows.index_select(0, sel)
            if want_a:
                A_out[sel, : A.shape[1]] = _rows(A, seg_rows)
            if want_b:
                B_out[sel, :, : B.shape[2]] = _rows(B, seg_rows)
        return A_out, B_out

    def gather_A(self, idx: torch.Tensor, out=None) -> torch.Tensor:
        return self.gather(idx, want_b=False, out_A=out)[0]

    def gather_B(self, idx: torch.Tensor, out=None) -> torch.Tensor:
        return self.gather(idx, want_a=False, out_B=out)[1]

    def segment_rows(self) -> list[tuple[int, object, torch.Tensor | None]]:
        """Per segment that holds adapters: (segment, where they sit in the bank (a slice when contiguous, else
        an index tensor), the rows they use (None: all of them, in order)). For products against every adapter
        without gathering the stacks; made once."""
        if not hasattr(self, "_segment_rows"):
            plan = []
            for p, (A, _) in enumerate(self.parts):
                idx = (self.seg_of == p).nonzero().squeeze(1)
                if not len(idx):
                    continue
                rows = self.row_of.index_select(0, idx)
                whole = len(rows) == len(A) and bool((rows == torch.arange(len(A))).all())
                start = int(idx[0])
                at = (
                    slice(start, start + len(idx))
                    if bool((idx == torch.arange(start, start + len(idx))).all())
                    else idx
                )
                plan.append((p, at, None if whole else rows))
            self._segment_rows = plan
        return self._segment_rows

    def chunks(self, size: int = 256):
        """(start, A*, B*) over every adapter in blocks of `size`, for the dense routers (views when possible)."""
        for start in range(0, self.n, size):
            end = min(start + size, self.n)
            if self._direct:
                A, B = self.parts[0]
                yield start, A[start:end], B[start:end]
            else:
                yield start, *self.gather(torch.arange(start, end))


def _rows(stack: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """stack[rows] through a 2-D view: index_select on 2-D is one memcpy per row, on 3-D far slower."""
    flat = stack.reshape(len(stack), -1)
    if out is None:
        return flat.index_select(0, rows).view(len(rows), *stack.shape[1:])
    dst = out[: len(rows) * flat.shape[1]].view(len(rows), flat.shape[1])
    return torch.index_select(flat, 0, rows, out=dst).view(len(rows), *stack.shape[1:])


def _fill(out: torch.Tensor | None, shape: tuple, dtype, zero: bool) -> torch.Tensor:
    n = shape[0] * shape[1] * shape[2]
    if out is None:
        return (torch.zeros if zero else torch.empty)(shape, dtype=dtype)
    t = out[:n].view(shape)
    return t.zero_() if zero else t
