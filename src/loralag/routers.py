"""Routers: for tokens X (T, d_in) and one module's bank, the adapter delta (T, d_out) and a trace.

All routers share three kernels: `arrow_topk` (one matmul against the stacked arrows),
`project` (A*x for each token's candidates only) and `apply_b` (B* of the chosen adapters, tokens
grouped by adapter). Nothing of size tokens × n × d_out is ever formed; beyond the arrow scores,
only `spectral` and `uniform` (the dense baselines) touch every adapter, in bounded chunks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .bank import ModuleBank

# Candidate scoring against the batch's union of candidates is one dense GEMM; it wins over a per-token
# gather while the union stays within this many times k (measured in benchmarks/bench_layer.py).
UNION_FACTOR = 32
TOKEN_CHUNK = 64  # tokens per gathered block in the per-token path, bounding its memory
DENSE_CHUNK = 256  # adapters per block in the dense routers


@dataclass
class RouteSpec:
    """How one library is routed: the router's name and its parameters."""

    router: str = "lag"
    k: int = 20
    temperature: float = 1.0
    fixed: list | None = None  # per sequence: an adapter name or None (set through RoutingState.fix)
    granularity: str = "token"

    def __post_init__(self):
        if self.router not in ROUTERS:
            raise ValueError(f"unknown router '{self.router}'; choose one of {sorted(ROUTERS)}")
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature!r}")


@dataclass
class Routed:
    delta: torch.Tensor | None  # (T, d_out), None when nothing applies
    winner: torch.Tensor = field(default=None)  # (T,) adapter index, -1 for none
    score: torch.Tensor = field(default=None)  # (T,) the router's score of the winner


# -- kernels -------------------------------------------------------------------------------------------
def arrow_scores(bank: ModuleBank, X: torch.Tensor) -> torch.Tensor:
    """|a_i · x| for every token and adapter: (T, n)."""
    return (X @ bank.arrows.T).abs_()


def arrow_topk(bank: ModuleBank, X: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return arrow_scores(bank, X).topk(min(k, bank.n), dim=1)


def project(bank: ModuleBank, X: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Z[t, j] = A*_{cand[t, j]} x_t for each token's own candidates: (T, k, r)."""
    T, k = cand.shape
    uniq, inv = cand.unique(return_inverse=True)
    if len(uniq) <= UNION_FACTOR * k:
        A = bank.gather_A(uniq)  # (u, r, d_in)
        Z = (X @ A.reshape(-1, bank.d_in).T).view(T, len(uniq), bank.r)
        return Z.gather(1, inv.unsqueeze(-1).expand(T, k, bank.r))
    Z = X.new_empty(T, k, bank.r)
    for s in range(0, T, TOKEN_CHUNK):
        c = cand[s : s + TOKEN_CHUNK]
        A = bank.gather_A(c.reshape(-1)).view(len(c), k * bank.r, bank.d_in)
        Z[s : s + TOKEN_CHUNK] = torch.bmm(A, X[s : s + TOKEN_CHUNK].unsqueeze(-1)).view(len(c), k, bank.r)
    return Z


def apply_b(bank: ModuleBank, adapter: torch.Tensor, Z: torch.Tensor, token: torch.Tensor, T: int) -> torch.Tensor:
    """delta[token[p]] += B*_{adapter[p]} Z[p] over pairs p, grouped so each B* is read once."""
    delta = Z.new_zeros(T, bank.d_out)
    keep = adapter >= 0
    adapter, Z, token = adapter[keep], Z[keep], token[keep]
    if len(adapter) == 0:
        return delta
    order = adapter.argsort()
    adapter, Z, token = adapter[order], Z[order], token[order]
    uniq, counts = adapter.unique_consecutive(return_counts=True)
    B = bank.gather_B(uniq)  # (u, d_out, r)
    if len(uniq) * 4 <= len(adapter):  # few adapters, many tokens each: one GEMM per adapter
        for g, (s, e) in enumerate(zip((counts.cumsum(0) - counts).tolist(), counts.cumsum(0).tolist())):
            delta.index_add_(0, token[s:e], Z[s:e] @ B[g].T)
    else:  # mostly distinct adapters: one batched matrix-vector product
        Bp = B.repeat_interleave(counts, dim=0)  # (p, d_out, r)
        delta.index_add_(0, token, torch.bmm(Bp, Z.unsqueeze(-1)).squeeze(-1))
    return delta


def _apply_winner(bank, X, winner, Z=None) -> torch.Tensor:
    """B*_w A*_w x for each token's single winner (Z: its A*x when already known)."""
    if Z is None:
        Z = project(bank, X, winner.clamp(min=0).unsqueeze(1)).squeeze(1)
    return apply_b(bank, winner, Z, torch.arange(len(X)), len(X))


# -- routers -------------------------------------------------------------------------------------------
def route_lag(bank, X, spec, seq_ids):
    """Arrow top-k filter, then SpectR top-1 by ‖A*x‖ among the k, reusing A*x to apply the winner."""
    _, cand = arrow_topk(bank, X, spec.k)
    Z = project(bank, X, cand)
    norms = Z.norm(dim=-1)
    score, best = norms.max(dim=1)
    winner = cand.gather(1, best.unsqueeze(1)).squeeze(1)
    z = Z[torch.arange(len(X)), best]
    return Routed(_apply_winner(bank, X, winner, z), winner, score)


def route_arrow(bank, X, spec, seq_ids):
    score, cand = arrow_topk(bank, X, 1)
    winner = cand.squeeze(1)
    return Routed(_apply_winner(bank, X, winner), winner, score.squeeze(1))


def route_arrow_mix(bank, X, spec, seq_ids):
    """PEFT ArrowConfig semantics: softmax over the top-k |a·x| / temperature, weighted sum of outputs."""
    val, cand = arrow_topk(bank, X, spec.k)
    coeff = torch.softmax(val / spec.temperature, dim=1)
    Z = project(bank, X, cand) * coeff.unsqueeze(-1)
    T, k = cand.shape
    token = torch.arange(T).repeat_interleave(k)
    delta = apply_b(bank, cand.reshape(-1), Z.reshape(T * k, -1), token, T)
    return Routed(delta, cand[:, 0], coeff[:, 0])


def route_spectral(bank, X, spec, seq_ids):
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


def route_uniform(bank, X, spec, seq_ids):
    delta = X.new_zeros(len(X), bank.d_out)
    for _, A, B in bank.chunks(DENSE_CHUNK):
        Z = (X @ A.reshape(-1, bank.d_in).T).view(len(X), len(A), bank.r)
        delta += torch.einsum("tcr,cor->to", Z, B)
    return Routed(delta / bank.n, torch.full((len(X),), -1), X.new_full((len(X),), 1.0 / bank.n))


def route_fixed(bank, X, spec, seq_ids):
    """The adapter named for each sequence (Oracle, PRAG); -1 leaves a sequence on the base model."""
    if spec.fixed is None:
        raise ValueError("router 'fixed' needs the adapters per sequence (RoutingState.fix)")
    # Names resolve per module: a bank holds only the adapters that target its module.
    fixed = torch.tensor([bank.index.get(n, -1) if n is not None else -1 for n in spec.fixed], dtype=torch.long)
    if seq_ids.max() >= len(fixed):
        raise ValueError(f"router 'fixed' was given {len(fixed)} sequences but the batch holds {int(seq_ids.max()) + 1}")
    winner = fixed[seq_ids]
    return Routed(_apply_winner(bank, X, winner), winner, X.new_ones(len(X)))


def route_none(bank, X, spec, seq_ids):
    return Routed(None, torch.full((len(X),), -1), X.new_zeros(len(X)))


ROUTERS = {
    "lag": route_lag,
    "arrow": route_arrow,
    "arrow-mix": route_arrow_mix,
    "spectral": route_spectral,
    "uniform": route_uniform,
    "fixed": route_fixed,
    "none": route_none,
}
