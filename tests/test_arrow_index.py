"""The arrow index: exact when it scans every cluster, consistent across paths, stored with the library."""

import pytest
import torch
from conftest import save_lora, tiny_llama

from loralag import attach, build_library, detach, open_library
from loralag.library.arrow_index import build_index, scan_clusters, search
from loralag.library.store import module_shapes


def unit(n, d, seed):
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("n,k", [(500, 20), (37, 5), (10, 20)])
def test_scanning_every_cluster_is_exact(n, k):
    arrows, X = unit(n, 48, 0), torch.randn(30, 48)
    index = build_index(arrows, nlist=max(1, n // 8)).bind(arrows)
    exact_v, exact_i = (X @ arrows.T).abs().topk(min(k, n), dim=1)
    for find in (search, scan_clusters):  # the exact shortcut, and the cluster scan over every cluster
        v, i = find(index, X, min(k, n), index.nlist)
        torch.testing.assert_close(v[:, : exact_v.shape[1]], exact_v)
        assert torch.equal(i[:, : exact_i.shape[1]].sort(1).values, exact_i.sort(1).values)
        v1, i1 = find(index, X[:1], min(k, n), index.nlist)  # the decoding path
        assert torch.equal(i1.sort(1).values, i[:1].sort(1).values)


def test_partial_scan_returns_members_of_probed_clusters_only():
    arrows, X = unit(400, 32, 1), torch.randn(25, 32)
    index = build_index(arrows, nlist=20).bind(arrows)
    v, i = search(index, X, 10, nprobe=3)
    probes = (X @ index.centroids.T).abs().topk(3, dim=1).indices
    cluster_of = torch.empty(400, dtype=torch.long)
    for c in range(index.nlist):
        cluster_of[index.order[index.offsets[c] : index.offsets[c + 1]]] = c
    for t in range(len(X)):
        allowed = index.order[torch.cat([torch.arange(index.offsets[c], index.offsets[c + 1]) for c in probes[t]])]
        exact = (X[t] @ arrows[allowed].T).abs().topk(10)
        assert set(i[t].tolist()) == set(allowed[exact.indices].tolist())
        torch.testing.assert_close(v[t], exact.values)
    v1, i1 = search(index, X[3:4], 10, nprobe=3)
    assert torch.equal(i1[0], i[3])


def test_sign_invariance():
    arrows = unit(300, 16, 2)
    flipped = arrows * torch.where(torch.rand(300, 1, generator=torch.Generator().manual_seed(3)) < 0.5, -1.0, 1.0)
    a = build_index(arrows, nlist=12)
    b = build_index(flipped, nlist=12)
    assert torch.equal(a.order, b.order) and torch.equal(a.offsets, b.offsets)


def test_library_index_is_stored_used_and_dropped_on_change(tmp_path, ids):
    model = tiny_llama()
    for i in range(12):
        save_lora(model, tmp_path / "ads" / f"a{i}", seed=i, r=3, target_modules=("q_proj", "up_proj"))
    lib = build_library(
        tmp_path / "lib",
        [tmp_path / "ads" / f"a{i}" for i in range(10)],
        base_model="tiny",
        shapes=module_shapes(model),
        progress=False,
    )
    info = lib.build_index(nlist=3, progress=False)
    lib = open_library(lib.path)
    assert lib.summary()["arrow_index"] == info and (lib.path / info["file"]).is_file()
    with torch.no_grad():
        attach(model, lib, router="lag", k=4)
        exact = model(ids).logits
        detach(model)
        attach(model, lib, router="lag", k=4, nprobe=3)
        indexed = model(ids).logits
        detach(model)
    torch.testing.assert_close(indexed, exact, atol=1e-5, rtol=1e-5)
    lib.add([tmp_path / "ads" / "a10"], progress=False)
    lib = open_library(lib.path)
    assert lib.summary()["arrow_index"] is None and not list(lib.path.glob("arrow-index-*"))
    attach(model, lib, router="lag", nprobe=2)
    with pytest.raises(ValueError, match="no arrow index"):
        model(ids)
    detach(model)
