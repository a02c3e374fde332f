"""Library.add_segment: a segment file written outside the library (what the benchmarks stream for synthetic
libraries at scale) is checked, moved in and committed; its adapters read back exactly as written, and route
exactly like the same adapters added from PEFT folders."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import save_lora, tiny_llama
from safetensors.torch import save_file

from loralag.errors import LibraryError
from loralag.library import store as L
from loralag.library.store import module_shapes

SHAPES = {"m1": [6, 5, "linear"], "m2": [4, 3, "linear"]}


def aligned(m: int, r: int, d_in: int, d_out: int, seed: int):
    """m aligned adapters: A* with orthonormal rows, B* = U·S with decreasing S."""
    g = torch.Generator().manual_seed(seed)
    A = torch.linalg.qr(torch.randn(m, d_in, r, generator=g)).Q.transpose(1, 2).contiguous()
    S = torch.rand(m, r, generator=g).sort(dim=1, descending=True).values + 0.5
    B = (torch.linalg.qr(torch.randn(m, d_out, r, generator=g)).Q * S.unsqueeze(1)).contiguous()
    return A, B


def segment_file(path, modules: dict[str, list[str]], rank=2, seed=0, dtype=torch.float32, rows=None):
    """A segment in the library format written with safetensors itself; modules: module -> adapter names."""
    tensors, table, factors = {}, {}, {}
    for j, (module, names) in enumerate(modules.items()):
        d_in, d_out, _ = SHAPES[module]
        r = rank[module] if isinstance(rank, dict) else rank
        A, B = aligned(len(names), r, d_in, d_out, seed + j)
        tensors.update(
            {f"{module}.A": A.to(dtype), f"{module}.B": B.to(dtype), f"{module}.arrow": A[:, 0].to(dtype).clone()}
        )
        table[module] = [[n, r] for n in names]
        factors.update({(module, n): (A[i], B[i]) for i, n in enumerate(names)})
    save_file(tensors, path, metadata={"rows": json.dumps(rows if rows is not None else table)})
    return factors


def test_added_segment_reads_back_as_written(tmp_path):
    lib = L.create_library(tmp_path / "lib", "synthetic", SHAPES)
    factors = segment_file(tmp_path / "in.safetensors", {"m1": ["a", "b", "c"], "m2": ["b", "c"]})
    assert lib.add_segment(tmp_path / "in.safetensors", source="synthetic") == ["a", "b", "c"]
    assert not (tmp_path / "in.safetensors").exists()  # moved in, not copied
    again = L.Library(tmp_path / "lib")  # what a fresh open sees
    assert again.names == ["a", "b", "c"]
    assert again.entry("a")["target_modules"] == ["m1"] and again.entry("b")["target_modules"] == ["m1", "m2"]
    assert {again.entry(n)["rank"] for n in "abc"} == {2} and again.entry("a")["source"] == "synthetic"
    for (module, name), (A, B) in factors.items():
        got_A, got_B = again.adapter_factors(name)[module]
        assert torch.equal(got_A, A) and torch.equal(got_B, B)
        assert torch.equal(again.bank(module).arrows[again.bank(module).index[name]], A[0])
    # a second segment adds to the first; an adapter's rank is its largest over its modules
    more = segment_file(tmp_path / "more.safetensors", {"m1": ["d"], "m2": ["d"]}, rank={"m1": 3, "m2": 1}, seed=5)
    assert lib.add_segment(tmp_path / "more.safetensors") == ["d"]
    assert lib.entry("d")["rank"] == 3 and lib.entry("d")["target_modules"] == ["m1", "m2"]
    assert lib.adapter_factors("d")["m2"][0].shape == (1, 4) and torch.equal(
        lib.adapter_factors("d")["m2"][0], more[("m2", "d")][0]
    )
    assert L.Library(tmp_path / "lib").names == ["a", "b", "c", "d"]
    assert len(list((tmp_path / "lib" / L.SEGMENTS).iterdir())) == 2


def test_an_added_segments_checksum_is_its_files_sha256(tmp_path):
    """So that a key over the library's checksums (training under a library) changes when an adapter's weights do:
    the same name added again from other bytes gets another checksum."""
    lib = L.create_library(tmp_path / "lib", "synthetic", SHAPES)
    segment_file(tmp_path / "in.safetensors", {"m1": ["a", "b"]})
    want = "segment:" + hashlib.sha256((tmp_path / "in.safetensors").read_bytes()).hexdigest()
    lib.add_segment(tmp_path / "in.safetensors")
    assert lib.entry("a")["checksum"] == lib.entry("b")["checksum"] == want
    lib.remove(["a"])
    segment_file(tmp_path / "again.safetensors", {"m1": ["a"]}, seed=3)
    lib.add_segment(tmp_path / "again.safetensors")
    assert L.Library(tmp_path / "lib").entry("a")["checksum"] not in (want, "-")


def test_a_segment_copied_from_a_built_library_routes_the_same(tmp_path):
    model = tiny_llama()
    shapes = module_shapes(model)
    for i in range(3):
        save_lora(model, tmp_path / "ads" / f"ad{i}", seed=i, r=3, target_modules=("q_proj", "v_proj"))
    built = L.build_library(tmp_path / "built", [tmp_path / "ads"], base_model="tiny", shapes=shapes, progress=False)
    [seg] = {a["segment"] for a in built.adapters}
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes((tmp_path / "built" / L.SEGMENTS / f"{seg}.safetensors").read_bytes())
    lib = L.create_library(tmp_path / "lib", "tiny", shapes)
    assert lib.add_segment(copy) == built.names
    for name in built.names:
        assert lib.entry(name)["target_modules"] == built.entry(name)["target_modules"]
        assert lib.entry(name)["rank"] == built.entry(name)["rank"]
        for module, (A, B) in built.adapter_factors(name).items():
            assert torch.equal(lib.adapter_factors(name)[module][0], A)
            assert torch.equal(lib.adapter_factors(name)[module][1], B)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: segment_file(p, {"m1": ["a"]}), r"already holds \['a'\]"),
        (lambda p: segment_file(p, {"m1": ["x"]}, dtype=torch.float16), "stored as torch.float16"),
        (lambda p: segment_file(p, {"m1": ["x"]}, rows={"m1": [["x", 2]], "m3": [["x", 2]]}), "'m3' is not a module"),
        (lambda p: segment_file(p, {"m1": ["x", "y"]}, rows={"m1": [["x", 2]]}), "lists 1 rows"),
        (lambda p: segment_file(p, {"m1": ["x", "x"]}), "names an adapter twice"),
        (lambda p: segment_file(p, {"m1": ["../x"]}), "adapter '../x'"),
        (lambda p: save_file({"m1.A": torch.zeros(1, 2, 6)}, p), "no valid 'rows' table"),
    ],
)
def test_a_segment_that_does_not_fit_is_refused_and_changes_nothing(tmp_path, make, message):
    lib = L.create_library(tmp_path / "lib", "synthetic", SHAPES)
    segment_file(tmp_path / "first.safetensors", {"m1": ["a"]})
    lib.add_segment(tmp_path / "first.safetensors")
    before = (tmp_path / "lib" / L.MANIFEST).read_bytes()
    make(tmp_path / "bad.safetensors")
    with pytest.raises(LibraryError, match=message):
        lib.add_segment(tmp_path / "bad.safetensors")
    assert (tmp_path / "bad.safetensors").is_file()  # left where it was
    assert (tmp_path / "lib" / L.MANIFEST).read_bytes() == before
    assert len(list((tmp_path / "lib" / L.SEGMENTS).iterdir())) == 1
    assert L.Library(tmp_path / "lib").names == ["a"]
