"""Routers: for tokens X (T, d_in) and one module's bank, the adapter delta (T, d_out) and a trace.

Every router is called as `route(bank, X, spec, batch)`: the T tokens are `batch` sequences of
equal length laid out one after the other (only `fixed` needs to know which token is whose).

All routers share three kernels: `arrow_topk` (one matmul against the stacked arrows),
`project` (A*x for each token's candidates only) and `apply_b` (B* of the chosen adapters, tokens
grouped by adapter). The last two run in kernels.c where it is built, reading A* and B* in place; their
torch paths are the fallback. Nothing of size tokens × n × d_out is ever formed; beyond the arrow scores,
only `spectral` and `uniform` (the dense baselines) touch every adapter, in bounded chunks, and `lag`
when its cost model finds A*x of every adapter (tokens × n × r, `project_all`) cheaper than filtering.
"""

from __future__ import annotations

import bisect
import itertools
import threading
from dataclasses import dataclass, field

import torch

from loralag.library import arrow_index
from loralag.library.bank import ModuleBank
from loralag.routing import kernels

# Cost model for choosing how `project` scores candidates (multiply-adds per second on one core, and the
# Python cost of one per-adapter step), measured with benchmarks/bench_layer.py on this machine's CPU.
GEMM_RATE = 40e9
SMALL_GEMM_RATE = 10e9  # the grouped kernel with cache-sized gathers (was 5e9 with one big gather)
STEP_COST = 10e-6
GATHER_RATE = 5e9  # bytes per second copied by a gather of adapter rows
KERNEL_RATE = 25e9  # the grouped projection in kernels.c, per thread
# apply_b over at most this many adapter columns (u·r) and multiply-adds: one block GEMM beats sorting
BLOCK_COLS, BLOCK_MACS = 64, 16e6
CHUNK_BYTES = 1 << 20  # gathered token rows per chunk: about one core's L2
DENSE_CHUNK = 256  # adapters per block in the dense routers
# Decoding (this many tokens or fewer) scores a float16 copy of the arrows, keeps a margin of candidates and
# re-ranks them with the float32 arrows: half the bytes read, the same top k unless float16 rounding
# (≤ 2^-10 of |x|) moves an adapter past 2k + 8 others. On CPUs, float16 GEMMs are slow beyond a few rows.
HALF_TOKENS = 2


@dataclass(frozen=True)
class RouteSpec:
    """How one library is routed: the router's name and its parameters. A value: a model's routing changes by
    putting a new RouteSpec in its RoutingState (set_router, fix, configure), never by editing one."""

    router: str = "lag"
    k: int = 20
    temperature: float = 1.0
    fixed: tuple | None = None  # per sequence: an adapter name or None (set through RoutingState.fix)
    nprobe: int | None = None  # search the library's arrow index, scanning this many clusters (None: exact)

    def __post_init__(self):
        if self.fixed is not None and not isinstance(self.fixed, tuple):
            object.__setattr__(self, "fixed", tuple(self.fixed))
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router '{self.router}'; choose one of {sorted(ROUTERS)}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature!r}")
        if self.nprobe is not None and (not isinstance(self.nprobe, int) or self.nprobe < 1):
            raise ValueError(f"nprobe must be a positive integer or None, got {self.nprobe!r}")


@dataclass
class Routed:
    delta: torch.Tensor | None  # (T, d_out), None when nothing applies
    winner: torch.Tensor = field(default=None)  # (T,) adapter index, -1 for none
    score: torch.Tensor = field(default=None)  # (T,) the router's score of the winner


# -- kernels -------------------------------------------------------------------------------------------
_workspace = threading.local()


def workspace(slot: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat scratch buffer reused across calls (per thread). Fresh allocations of tens of MB cost
    more in page faults than the gathers that fill them; results that leave a router never live here."""
    bufs = _workspace.__dict__.setdefault("bufs", {})
    buf = bufs.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        buf = bufs[(slot, dtype)] = torch.empty(numel, dtype=dtype)
    return buf


def arrow_scores(bank: ModuleBank, X: torch.Tensor) -> torch.Tensor:
    """|a_i · x| for every token and adapter: (T, n)."""
    return (X @ bank.arrows.T).abs_()


def arrow_topk(
    bank: ModuleBank, X: torch.Tensor, k: int, nprobe: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k adapters by |a·x|: exact, or through the bank's arrow index when nprobe is given."""
    if nprobe is None:
        k = min(k, bank.n)
        if len(X) <= HALF_TOKENS and _half_filter_pays(bank, X, k):
            return _half_topk(bank, X, k)
        return arrow_scores(bank, X).topk(k, dim=1)
    if bank.ivf is None:
        raise ValueError(f"module '{bank.module}' has no arrow index; build one with `loralag index LIB`")
    if bank.ivf.sorted_arrows is None:
        bank.ivf.bind(bank.arrows)
    return arrow_index.search(bank.ivf, X, k, nprobe)


def _half_filter_pays(bank: ModuleBank, X: torch.Tensor, k: int) -> bool:
    return X.dtype == torch.float32 and X.device.type == "cpu" and bank.n > 2 * _half_margin(k)


def _half_margin(k: int) -> int:
    """Candidates kept by the float16 arrows for the float32 re-rank (see HALF_TOKENS)."""
    return 2 * k + 8


def _half_topk(bank: ModuleBank, X: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact top k of |a·x| for a few tokens, found through the float16 arrows (see HALF_TOKENS)."""
    # Scale each token into float16's range; the ranking of |a·x| does not change with a positive scale.
    x = (X / X.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)).to(torch.float16)
    margin = (x @ bank.arrows_half.T).abs_().topk(_half_margin(k), dim=1).indices  # (T, 2k + 8)
    exact = (bank.arrows.index_select(0, margin.reshape(-1)).view(*margin.shape, -1) @ X.unsqueeze(-1)).squeeze(-1)
    val, pos = exact.abs_().topk(k, dim=1)
    return val, margin.gather(1, pos)


def project(bank: ModuleBank, X: torch.Tensor, cand: torch.Tensor, first: torch.Tensor | None = None) -> torch.Tensor:
    """Z[t, j] = A*_{cand[t, j]} x_t for each token's own candidates: (T, k, r). first (T, k): the signed
    arrow scores a·x of those candidates, Z's first coordinate, which the native kernel then need not compute."""
    T, k = cand.shape
    if T == 1:  # decoding: the candidates are the union
        return (bank.gather_A(cand[0]).reshape(k * bank.r, bank.d_in) @ X[0]).view(1, k, bank.r)
    counts = torch.bincount(cand.reshape(-1), minlength=bank.n)  # pairs per adapter: cheaper than a sort
    union_cost, grouped_cost = _filter_costs(bank, X, k, int(counts.count_nonzero()))
    if union_cost <= grouped_cost:
        uniq, inv = cand.unique(return_inverse=True)
        u = len(uniq)
        if u == bank.n and bank.direct:  # every adapter is a candidate: the stack itself, no copy
            A = bank.parts[0][0]
        else:
            A = bank.gather_A(uniq, out=workspace("A", u * bank.r * bank.d_in, bank.dtype))  # (u, r, d_in)
        Z = (X @ A.reshape(-1, bank.d_in).T).view(T, u, bank.r)
        return Z.gather(1, inv.unsqueeze(-1).expand(T, k, bank.r))
    return _project_grouped(bank, X, cand, counts, first)


def _filter_costs(bank: ModuleBank, X: torch.Tensor, k: int, u: int) -> tuple[float, float]:
    """Estimated seconds of `project`'s two exact ways for T tokens whose candidates number u in all: one dense
    GEMM of every token against the union (T·u·r·d, plus gathering the union's A* unless it is the whole
    one-segment stack), or the grouped projection over just the T·k pairs (the native kernel; without it, a
    GEMM call per adapter). Rates measured on one core here; the ratio is what matters."""
    T, r, d, threads = len(X), bank.r, bank.d_in, torch.get_num_threads()
    union = T * u * r * d / (GEMM_RATE * threads) + (0 if u == bank.n and bank.direct else u * r * d * 4 / GATHER_RATE)
    if kernels.applies_to(X):
        return union, T * k * r * d / (KERNEL_RATE * threads) + STEP_COST
    return union, T * k * r * d / SMALL_GEMM_RATE + u * STEP_COST


def project_all(bank: ModuleBank, X: torch.Tensor) -> torch.Tensor:
    """Z[t, i] = A*_i x_t for every adapter of the bank: (T, n, r), one GEMM per segment, no gathering."""
    T = len(X)
    if bank.direct:
        return (X @ bank.parts[0][0].reshape(-1, bank.d_in).T).view(T, bank.n, bank.r)
    plan = bank.segment_rows()
    padded = any(bank.parts[p][0].shape[1] < bank.r for p, _, _ in plan)
    Z = X.new_zeros(T, bank.n, bank.r) if padded else X.new_empty(T, bank.n, bank.r)
    for p, at, rows in plan:
        A = bank.parts[p][0] if rows is None else bank.parts[p][0].index_select(0, rows)
        Z[:, at, : A.shape[1]] = (X @ A.reshape(-1, bank.d_in).T).view(T, len(A), A.shape[1])
    return Z


def _project_grouped(
    bank: ModuleBank,
    X: torch.Tensor,
    cand: torch.Tensor,
    counts: torch.Tensor | None = None,
    first: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pairs (token, candidate) sorted by adapter: each A* is read once and meets only its own tokens.

    The sorted pairs' token rows are gathered a cache-sized chunk at a time (whole adapters per chunk) into
    one reused buffer: written and read again while still in cache, instead of tens of MB through memory.
    A one-segment bank's A* are used in place, not copied."""
    T, k = cand.shape
    flat = cand.reshape(-1)
    order = flat.argsort()
    if counts is None:
        counts = torch.bincount(flat, minlength=bank.n)
    uniq = counts.nonzero().squeeze(1)  # the adapters in sorted order, and their pairs
    counts = counts.index_select(0, uniq)
    native = _project_native(bank, X, uniq, counts, order, k, first)
    if native is not None:
        return native
    tokens = order // k  # the token of each sorted pair
    if bank.direct:
        views = bank.a_transposed
        At = [views[i] for i in uniq.tolist()]
    else:
        A = bank.gather_A(uniq, out=workspace("A", len(uniq) * bank.r * bank.d_in, bank.dtype))
        At = A.transpose(1, 2).unbind(0)
    Zs = X.new_empty(len(flat), bank.r)
    sizes = counts.tolist()
    ends = list(itertools.accumulate(sizes))
    chunk = max(CHUNK_BYTES // (bank.d_in * X.element_size()), max(sizes))
    buf = workspace("X", chunk * bank.d_in, X.dtype)
    g, start = 0, 0
    while g < len(ends):
        last = max(g, bisect.bisect_right(ends, start + chunk, g) - 1)  # adapters g..last fit in one chunk
        end = ends[last]
        Xc = buf[: (end - start) * bank.d_in].view(-1, bank.d_in)
        torch.index_select(X, 0, tokens[start:end], out=Xc)
        # one GEMM per adapter over its rows; views made in bulk, the loop is just the calls
        part = sizes[g : last + 1]
        for x, a, z in zip(Xc.split(part), At[g : last + 1], Zs[start:end].split(part), strict=True):
            torch.mm(x, a, out=z)
        g, start = last + 1, end
    return Zs.index_select(0, order.argsort()).view(T, k, bank.r)


def _native_where(bank, uniq, t: torch.Tensor, factor: int):
    """Addresses and ranks of adapters uniq's A* (factor 0) or B* (1) for the kernels of kernels.c, or None
    where those do not apply (not built, or not float32 on the CPU): the caller takes its torch path."""
    return bank.addresses(uniq, factor) if kernels.applies_to(t) else None


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def _project_native(bank, X, uniq, counts, order, k, first=None) -> torch.Tensor | None:
    """The grouped projection in kernels.c: A* and token rows read in place, no gathers, no GEMM calls."""
    where = _native_where(bank, uniq, X, 0)
    if where is None:
        return None
    Z = X.new_empty(len(order), bank.r)
    first = None if first is None else first.reshape(-1).contiguous()
    kernels.project_pairs(X.contiguous(), *where, _offsets(counts), order, k, Z, first)
    return Z.view(-1, k, bank.r)


def apply_b(bank: ModuleBank, adapter: torch.Tensor, Z: torch.Tensor) -> torch.Tensor:
    """out[p] = B*_{adapter[p]} Z[p] for each pair p (zero where adapter is -1), each B* read once."""
    P = len(adapter)
    if P == 1:
        if adapter[0] < 0:
            return Z.new_zeros(1, bank.d_out)
        return (bank.gather_B(adapter) @ Z.unsqueeze(-1)).squeeze(-1)
    order = adapter.argsort()
    sorted_adapter = adapter[order]
    uniq, counts = sorted_adapter.unique_consecutive(return_counts=True)
    if len(uniq) * bank.r <= BLOCK_COLS and P * len(uniq) * bank.r * bank.d_out <= BLOCK_MACS:
        return _apply_block(bank, uniq, torch.searchsorted(uniq, adapter), Z)
    if uniq[0] < 0:  # pairs without an adapter sort first and stay zero
        skip, uniq, counts = int(counts[0]), uniq[1:], counts[1:]
    else:
        skip = 0
    out = Z.new_zeros(P, bank.d_out) if skip else Z.new_empty(P, bank.d_out)  # every row gets written
    where = _native_where(bank, uniq, Z, 1) if len(uniq) else None
    if where is not None:  # kernels.c: each B* read in place, rows written straight to pair order
        kernels.apply_pairs(Z.contiguous(), *where, _offsets(counts), order[skip:], out)
        return out
    Zs = Z.index_select(0, order)
    if len(uniq):
        if len(uniq) * 4 <= P - skip:  # few adapters, many tokens each: one GEMM per adapter
            B = bank.gather_B(uniq, out=workspace("B", len(uniq) * bank.d_out * bank.r, bank.dtype))
            ends = (counts.cumsum(0) + skip).tolist()
            for g, (s, e) in enumerate(zip([skip] + ends[:-1], ends)):
                torch.mm(Zs[s:e], B[g].T, out=out[s:e])
        else:  # mostly distinct adapters: batched matrix-vector products over each pair's own B*, gathered
            per = max(1, CHUNK_BYTES // (bank.d_out * bank.r * Z.element_size()))  # a cache-sized chunk at a time
            buf = workspace("B", min(per, P - skip) * bank.d_out * bank.r, bank.dtype)
            for s in range(skip, P, per):
                e = min(s + per, P)
                # z (1, r) times the gathered B*ᵀ (r, d_out) as a view: MKL's batched GEMM runs this form
                # several times faster than B* (d_out, r) times z (r, 1), which it treats as matrix-vector
                B = bank.gather_B(sorted_adapter[s:e], out=buf).transpose(1, 2)
                torch.bmm(Zs[s:e].unsqueeze(1), B, out=out[s:e].unsqueeze(1))
    return out.index_select(0, order.argsort())  # back to pair order


def _apply_block(bank, uniq, inv, Z) -> torch.Tensor:
    """apply_b for a handful of adapters (a task library): each pair's z placed in its adapter's block of
    a (P, u·r) matrix, times the u adapters' B*ᵀ stacked: one GEMM, no sorting (adapter -1: a zero block)."""
    P, u = len(Z), len(uniq)
    Zb = Z.new_zeros(P, u, bank.r)
    Zb[torch.arange(P), inv] = Z
    Bt = bank.gather_B(uniq.clamp(min=0)).transpose(1, 2).contiguous()  # (u, r, d_out)
    if uniq[0] < 0:
        Bt[0] = 0
    return Zb.view(P, u * bank.r) @ Bt.view(u * bank.r, bank.d_out)


def _apply_winner(bank, X, winner, Z=None) -> torch.Tensor:
    """B*_w A*_w x for each token's single winner (Z: its A*x when already known)."""
    if Z is None:
        Z = project(bank, X, winner.clamp(min=0).unsqueeze(1)).squeeze(1)
    return apply_b(bank, winner, Z)


# -- routers -------------------------------------------------------------------------------------------
def route_lag(bank, X, spec, batch):
    """Arrow top-k filter, then SpectR top-1 by ‖A*x‖ among the k, reusing A*x to apply the winner."""
    if len(X) == 1 and spec.nprobe is None:
        return _lag_one_token(bank, X, spec.k)
    if spec.nprobe is None and _scoring_all_pays(bank, X, spec.k):
        Z = project_all(bank, X)  # (T, n, r): its first coordinate is the arrow score, a_i being A*_i's first row
        cand = Z[:, :, 0].abs().topk(min(spec.k, bank.n), dim=1).indices
        Z = Z.gather(1, cand.unsqueeze(-1).expand(-1, -1, bank.r))
    elif spec.nprobe is None and len(X) > HALF_TOKENS:
        S = X @ bank.arrows.T  # signed a·x: A*x's first coordinate, which the projection then reuses
        cand = S.abs().topk(min(spec.k, bank.n), dim=1).indices
        Z = project(bank, X, cand, first=S.gather(1, cand))
    else:
        _, cand = arrow_topk(bank, X, spec.k, spec.nprobe)
        Z = project(bank, X, cand)
    norms = Z.norm(dim=-1)
    score, best = norms.max(dim=1)
    winner = cand.gather(1, best.unsqueeze(1)).squeeze(1)
    z = Z.gather(1, best.view(-1, 1, 1).expand(-1, 1, bank.r)).squeeze(1)
    return Routed(_apply_winner(bank, X, winner, z), winner, score)


def _scoring_all_pays(bank: ModuleBank, X: torch.Tensor, k: int) -> bool:
    """Whether A*x for every adapter (the arrow stage included) costs no more than the arrow stage plus scoring
    the candidates: so for small libraries, and for a batch of tokens whose candidates cover most of the
    library anyway (decoding many sequences), where the filter's gathers and sorts cost more than they save."""
    T, n, r, d = len(X), bank.n, bank.r, bank.d_in
    rate = GEMM_RATE * torch.get_num_threads()
    all_cost = T * n * r * d / rate + (len(bank.parts) - 1) * STEP_COST  # a GEMM per segment
    filtered = min(_filter_costs(bank, X, min(k, n), min(n, T * k)))  # at most T·k distinct candidates
    return all_cost <= T * n * d / rate + STEP_COST + filtered  # STEP_COST: the filter's extra ops


def _lag_one_token(bank, X, k):
    """Decoding: the same steps as route_lag on matrix-vector products, with as few ops as possible."""
    native = _lag_one_native(bank, X, k)
    if native is not None:
        return native
    x = X[0]
    cand = arrow_topk(bank, X, k)[1][0]
    Z = (bank.gather_A(cand).view(-1, bank.d_in) @ x).view(len(cand), bank.r)
    score, j = Z.norm(dim=1).max(dim=0)
    winner = cand[j].view(1)
    delta = bank.gather_B(winner)[0] @ Z[j]
    return Routed(delta.unsqueeze(0), winner, score.view(1))


def _lag_one_native(bank, X, k) -> Routed | None:
    """kernels.c's lag_decode: one token's whole routing in one call (a few dozen torch ops otherwise, which
    cost more than the arithmetic at one token), A* and B* read in place. The arrows are scored as
    `arrow_topk` scores them: the float16 copy with a re-ranked margin where that pays."""
    if not (kernels.applies_to(X) and 0 < bank.r <= kernels.MAX_RANK and bank.n):
        return None
    where = bank.all_addresses()
    if where is None:
        return None
    k = min(k, bank.n)
    half = _half_filter_pays(bank, X, k)
    if half and not kernels.half_arrows():  # this CPU's build cannot read float16: torch's path reads half the bytes
        return None
    w, score, delta = kernels.decode(
        X[0].contiguous(),
        bank.arrows.contiguous(),
        bank.arrows_half if half else None,
        k,
        _half_margin(k) if half else 0,
        *where,
        bank.d_out,
    )
    return Routed(delta.unsqueeze(0), torch.tensor([w]), score)


def route_lag_prefix(bank, X, spec, batch, evidence=None, members=None):
    """LAG per token, then the adapter LAG picked most over the sequence so far (prefix_evidence.py): LAG's own
    pick is the token's vote, and its delta is reused where the two agree. evidence: the library's
    PrefixEvidence (None: plain LAG); members: this bank's adapters as library indices (None: the same)."""
    own = route_lag(bank, X, spec, batch)
    if evidence is None:
        return own
    own_lib = own.winner if members is None else members[own.winner]
    winner, count = evidence.pick(own_lib, batch, members)
    if len(X) == 1:  # decoding: one adapter's two matrix-vector products when the vote moves the token
        j = int(winner[0])
        if j != int(own.winner[0]):
            A, B = bank.parts[int(bank.seg_of[j])]
            row = int(bank.row_of[j])
            own.delta[0] = B[row] @ (A[row] @ X[0])
        return Routed(own.delta, winner, count)
    moved = (winner != own.winner).nonzero().squeeze(1)
    delta = own.delta
    if len(moved):
        rows = X.index_select(0, moved)
        delta.index_copy_(0, moved, _apply_winner(bank, rows, winner.index_select(0, moved)))
    return Routed(delta, winner, count)


def route_arrow(bank, X, spec, batch):
    score, cand = arrow_topk(bank, X, 1, spec.nprobe)
    winner = cand.squeeze(1)
    return Routed(_apply_winner(bank, X, winner), winner, score.squeeze(1))


def route_arrow_mix(bank, X, spec, batch):
    """PEFT ArrowConfig semantics: softmax over the top-k |a·x| / temperature, weighted sum of outputs."""
    val, cand = arrow_topk(bank, X, spec.k, spec.nprobe)
    coeff = torch.softmax(val / spec.temperature, dim=1)
    Z = project(bank, X, cand) * coeff.unsqueeze(-1)
    T, k = cand.shape
    delta = apply_b(bank, cand.reshape(-1), Z.reshape(T * k, -1)).view(T, k, bank.d_out).sum(1)
    return Routed(delta, cand[:, 0], coeff[:, 0])


def route_spectral(bank, X, spec, batch):
    """SpectR over the whole library: argmax ‖A*_i x‖, scanned in chunks of adapters."""
    T = len(X)
    best = X.new_full((T,), -1.0)
    winner = torch.zeros(T, dtype=torch.long)
    z = X.new_zeros(T, bank.r)
    for start, A, _ in bank.chunks(DENSE_CHUNK):
        Z = (X @ A.reshape(-1, bank.d_in).T).view(T, len(A), bank.r)
        val, j = Z.norm(dim=-1).max(dim=1)
        better = val > best
        best = torch.where(better, val, best)
        winner = torch.where(better, j + start, winner)
        z[better] = Z[better, j[better]]
    return Routed(_apply_winner(bank, X, winner, z), winner, best)


def route_uniform(bank, X, spec, batch):
    delta = X.new_zeros(len(X), bank.d_out)
    for _, A, B in bank.chunks(DENSE_CHUNK):
        Z = (X @ A.reshape(-1, bank.d_in).T).view(len(X), len(A), bank.r)
        delta += torch.einsum("tcr,cor->to", Z, B)
    return Routed(delta / bank.n, torch.full((len(X),), -1), X.new_full((len(X),), 1.0 / bank.n))


def route_fixed(bank, X, spec, batch):
    """The adapter named for each sequence (Oracle, PRAG); -1 leaves a sequence on the base model."""
    if spec.fixed is None:
        raise ValueError("router 'fixed' needs the adapters per sequence (RoutingState.fix)")
    # Names resolve per module: a bank holds only the adapters that target its module.
    if len(spec.fixed) != batch:
        raise ValueError(f"router 'fixed' was given {len(spec.fixed)} sequences but the batch holds {batch}")
    fixed = torch.tensor([bank.index.get(n, -1) if n is not None else -1 for n in spec.fixed], dtype=torch.long)
    winner = fixed.repeat_interleave(len(X) // batch)  # tokens are laid out sequence by sequence
    return Routed(
        _apply_per_sequence(bank, X.view(batch, -1, bank.d_in), fixed).view(len(X), -1), winner, X.new_ones(len(X))
    )


def _apply_per_sequence(bank, X, adapter) -> torch.Tensor:
    """B*_s A*_s x for every token of each sequence s (X: (batch, L, d_in)): two batched GEMMs over the
    sequences' own factors, gathered once per distinct adapter. adapter -1: that sequence's delta is 0."""
    if not bool((adapter >= 0).any()):
        return X.new_zeros(*X.shape[:2], bank.d_out)
    uniq, inv = adapter.clamp(min=0).unique(return_inverse=True)  # sorted: few segment runs to gather
    A, B = bank.gather(uniq)
    Z = torch.bmm(X, A.index_select(0, inv).transpose(1, 2))  # (batch, L, r)
    if bool((adapter < 0).any()):
        Z[adapter < 0] = 0
    # z (L, r) times B*ᵀ (r, d_out) as a view: the form MKL's batched GEMM runs fast (see apply_b)
    return torch.bmm(Z, B.index_select(0, inv).transpose(1, 2))


def route_none(bank, X, spec, batch):
    return Routed(None, torch.full((len(X),), -1), X.new_zeros(len(X)))


ROUTERS = {
    "lag": route_lag,
    "lag-prefix": route_lag_prefix,
    "arrow": route_arrow,
    "arrow-mix": route_arrow_mix,
    "spectral": route_spectral,
    "uniform": route_uniform,
    "fixed": route_fixed,
    "none": route_none,
}
STATEFUL = {"lag-prefix"}  # routers that take the library's PrefixEvidence (the sequence so far)
# routers whose delta is one adapter's B*_w A*_w x per token (w = Routed.winner, -1: none): the ones a model can
# be trained under, the gradient to x being that adapter's (layer.py)
SINGLE_PICK = {"lag", "lag-prefix", "arrow", "spectral", "fixed", "none"}
