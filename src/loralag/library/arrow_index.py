"""Sub-linear Arrow stage: a sign-invariant inverted-file index over the arrow vectors.

At 100,000 adapters the exact Arrow stage (2nh FLOPs and n·h bytes read per token and module)
dominates LAG. Arrows are only defined up to sign and are scored by |a·x|, so we cluster the axes
±a with spherical k-means in which each arrow joins the centroid c maximising |c·a| (after flipping it
to agree with c). A query scores the centroids by |c·x|, scans only the members of its `nprobe` best
clusters exactly, and returns their top k. With nprobe = nlist it is the exact search.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ASSIGN_CHUNK = 16384  # arrows scored against the centroids at a time while building


@dataclass
class ArrowIndex:
    centroids: torch.Tensor  # (c, d) unit vectors
    order: torch.Tensor  # (n,) adapter ids sorted by cluster
    offsets: torch.Tensor  # (c + 1,) cluster j holds order[offsets[j]:offsets[j+1]]
    sorted_arrows: torch.Tensor | None = None  # arrows[order], filled by `bind`

    @property
    def nlist(self) -> int:
        return len(self.centroids)

    def bind(self, arrows: torch.Tensor) -> ArrowIndex:
        """Keep the arrows in cluster order so each cluster is one contiguous block."""
        self.sorted_arrows = arrows.index_select(0, self.order).contiguous()
        return self

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.centroids": self.centroids, f"{prefix}.order": self.order, f"{prefix}.offsets": self.offsets}

    @classmethod
    def from_tensors(cls, tensors: dict, prefix: str) -> ArrowIndex:
        return cls(tensors[f"{prefix}.centroids"], tensors[f"{prefix}.order"], tensors[f"{prefix}.offsets"])


def _assign(arrows: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best centroid of each arrow by |c·a|, and the sign that aligns the arrow with it."""
    best = torch.empty(len(arrows), dtype=torch.long)
    sign = torch.empty(len(arrows))
    for s in range(0, len(arrows), ASSIGN_CHUNK):
        dots = arrows[s : s + ASSIGN_CHUNK].float() @ centroids.T
        j = dots.abs().argmax(dim=1)
        best[s : s + ASSIGN_CHUNK] = j
        sign[s : s + ASSIGN_CHUNK] = torch.sign(dots.gather(1, j.unsqueeze(1)).squeeze(1)).clamp_min_(0) * 2 - 1
    return best, sign


def build_index(arrows: torch.Tensor, nlist: int | None = None, iters: int = 12, seed: int = 0) -> ArrowIndex:
    """Sign-invariant spherical k-means over the arrows; nlist defaults to about 2·sqrt(n)."""
    n = len(arrows)
    nlist = min(n, nlist or max(1, int(2 * n**0.5)))
    g = torch.Generator().manual_seed(seed)
    data = arrows.float()
    centroids = data[torch.randperm(n, generator=g)[:nlist]].clone()
    for _ in range(iters):
        assign, sign = _assign(data, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assign, data * sign.unsqueeze(1))
        norms = sums.norm(dim=1, keepdim=True)
        empty = norms.squeeze(1) < 1e-12
        centroids = torch.where(
            empty.unsqueeze(1), data[torch.randint(0, n, (nlist,), generator=g)], sums / norms.clamp_min(1e-12)
        )
    assign, _ = _assign(data, centroids)
    order = torch.sort(assign, stable=True).indices
    offsets = torch.zeros(nlist + 1, dtype=torch.long)
    offsets[1:] = torch.bincount(assign, minlength=nlist).cumsum(0)
    return ArrowIndex(centroids.to(arrows.dtype), order, offsets)


def search(index: ArrowIndex, X: torch.Tensor, k: int, nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Approximate top-k of |a·x| per token: (values, adapter ids), both (T, k)."""
    assert index.sorted_arrows is not None, "bind the index to the bank's arrows first"
    k, nprobe = min(k, len(index.order)), min(nprobe, index.nlist)
    if nprobe == index.nlist:  # scanning every cluster is the exact search: do it in one matmul
        val, pos = (X @ index.sorted_arrows.T).abs_().topk(k, dim=1)
        return val, index.order[pos]
    return scan_clusters(index, X, k, nprobe)


def scan_clusters(index: ArrowIndex, X: torch.Tensor, k: int, nprobe: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The indexed search proper: score the members of each token's nprobe best clusters (k ≤ n)."""
    T = len(X)
    probes = (X @ index.centroids.T).abs_().topk(nprobe, dim=1).indices  # (T, nprobe)
    starts, ends = index.offsets[probes], index.offsets[probes + 1]
    if T == 1:  # decoding: one matrix-vector product over the probed blocks
        rows = torch.cat([torch.arange(s, e) for s, e in zip(starts[0].tolist(), ends[0].tolist())])
        scores = (index.sorted_arrows.index_select(0, rows) @ X[0]).abs_()
        val, pos = scores.topk(min(k, len(rows)))
        return _pad(val.unsqueeze(0), index.order[rows[pos]].unsqueeze(0), k)
    # Prefill: for each probed cluster, score the tokens that probe it against its block and keep their
    # top k there; the token's top k is then the top k of its nprobe partial lists.
    pair_cluster = probes.reshape(-1)
    pair_token = torch.arange(T).repeat_interleave(nprobe)
    order = pair_cluster.argsort()
    vals = X.new_full((T * nprobe, k), float("-inf"))
    ids = torch.zeros(T * nprobe, k, dtype=torch.long)
    clusters, counts = pair_cluster[order].unique_consecutive(return_counts=True)
    pos = 0
    for c, cnt in zip(clusters.tolist(), counts.tolist()):
        pairs = order[pos : pos + cnt]
        pos += cnt
        s, e = int(index.offsets[c]), int(index.offsets[c + 1])
        if e == s:
            continue
        scores = (X.index_select(0, pair_token[pairs]) @ index.sorted_arrows[s:e].T).abs_()
        v, p = scores.topk(min(k, e - s), dim=1)
        vals[pairs, : v.shape[1]] = v
        ids[pairs, : v.shape[1]] = index.order[s + p]
    val, best = vals.view(T, nprobe * k).topk(k, dim=1)
    return _pad(val, ids.view(T, nprobe * k).gather(1, best), k)


def _pad(val: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Fewer than k real candidates: repeat the best one (harmless for LAG's argmax) instead of garbage."""
    if val.shape[1] < k:
        val = torch.cat([val, val[:, :1].expand(-1, k - val.shape[1])], dim=1)
        ids = torch.cat([ids, ids[:, :1].expand(-1, k - ids.shape[1])], dim=1)
    missing = torch.isinf(val)
    if missing.any():
        ids = torch.where(missing, ids[:, :1], ids)
        val = torch.where(missing, val[:, :1], val)
    return val, ids
