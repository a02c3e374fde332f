"""library/storage.py: atomic writes (temporary file beside the target, renamed over it, removed when the write
fails) and the safetensors helpers, checked against the `safetensors` library itself: what we write it reads back,
what it writes we read back, and a file it would not trust we refuse too."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loralag.errors import LibraryError
from loralag.library import storage
from loralag.library.storage import (
    TMP_PREFIX,
    atomic_save_safetensors,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    mmap_safetensors,
    read_tensor,
)


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 4, generator=g),
        "f16": torch.randn(5, generator=g).half(),
        "bf16": torch.randn(2, 3, 2, generator=g).bfloat16(),
        "i64": torch.arange(-3, 6, dtype=torch.long).view(3, 3),
        "empty": torch.zeros(0, 4),
    }


# -- atomic writes ------------------------------------------------------------------------------------------------
def test_atomic_write_bytes_replaces_the_target_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "manifest.json"
    atomic_write_bytes(target, b"first")
    assert target.read_bytes() == b"first"
    atomic_write_bytes(target, b"second, longer")
    assert target.read_bytes() == b"second, longer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]
    fsync_dir(tmp_path)  # a folder can be synced


def test_the_temporary_file_sits_beside_the_target_under_the_swept_prefix(tmp_path, monkeypatch):
    seen = []
    real_replace = os.replace

    def spy(src, dst):
        seen.append((os.fspath(src), os.fspath(dst), open(src, "rb").read()))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    target = tmp_path / "seg.safetensors"
    atomic_write_bytes(target, b"payload")
    [(src, dst, data)] = seen
    assert dst == str(target) and data == b"payload"
    assert os.path.dirname(src) == str(tmp_path)  # same folder: the rename stays on one file system
    assert os.path.basename(src) == f"{TMP_PREFIX}{os.getpid()}-seg.safetensors"
    assert TMP_PREFIX.startswith(".")


def test_a_failed_write_removes_its_temporary_file_and_keeps_the_target(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_bytes(b"old")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(LibraryError, match=r"could not write .*manifest\.json: No space left on device"):
        atomic_write_bytes(target, b"new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_a_failed_rename_removes_its_temporary_file(tmp_path):
    target = tmp_path / "taken"
    target.mkdir()
    (target / "inside").write_text("x")  # a file cannot replace a non-empty folder
    with pytest.raises(LibraryError, match="could not write"):
        atomic_write_bytes(target, b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]
    assert (target / "inside").read_text() == "x"


def test_a_write_into_a_missing_folder_is_a_library_error(tmp_path):
    with pytest.raises(LibraryError, match="could not write"):
        atomic_write_bytes(tmp_path / "nope" / "f", b"x")


def test_atomic_write_json_round_trips(tmp_path):
    obj = {"format": "loralag-library", "adapters": [{"name": "é", "rank": 4}], "n": None}
    atomic_write_json(tmp_path / "m.json", obj)
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text) == obj and text.endswith("\n")


# -- safetensors: ours against the library's own reader and writer -------------------------------------------------
def test_atomic_save_safetensors_is_read_back_by_safetensors(tmp_path):
    ts = tensors()
    ts["transposed"] = torch.randn(4, 6).t()  # not contiguous: saved as its values
    path = tmp_path / "a.safetensors"
    atomic_save_safetensors(path, ts, {"rows": "[1, 2]"})
    back = load_file(path)
    assert set(back) == set(ts)
    for k, t in ts.items():
        assert back[k].dtype == t.dtype and torch.equal(back[k], t), k
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"rows": "[1, 2]"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_read_tensor_and_mmap_read_what_safetensors_wrote(tmp_path):
    ts = tensors()
    path = tmp_path / "b.safetensors"
    save_file(ts, path, metadata={"k": "v", "rows": "{}"})
    mapped, meta = mmap_safetensors(path)
    assert meta == {"k": "v", "rows": "{}"}
    assert set(mapped) == set(ts)
    for k, t in ts.items():
        assert mapped[k].dtype == t.dtype and mapped[k].shape == t.shape and torch.equal(mapped[k], t), k
        one = read_tensor(path, k)
        assert one.dtype == t.dtype and torch.equal(one, t), k
    with pytest.raises(LibraryError, match="holds no tensor 'missing'"):
        read_tensor(path, "missing")


def test_a_mapped_tensor_is_copy_on_write(tmp_path):
    path = tmp_path / "c.safetensors"
    save_file({"w": torch.ones(4, 4)}, path)
    before = path.read_bytes()
    mapped, _ = mmap_safetensors(path)
    mapped["w"].fill_(5.0)  # writable, but only in this process's copy of the pages
    assert path.read_bytes() == before
    assert torch.equal(load_file(path)["w"], torch.ones(4, 4))
    assert torch.equal(mmap_safetensors(path)[0]["w"], torch.ones(4, 4))


def test_a_file_without_tensors_maps_to_nothing(tmp_path):
    path = tmp_path / "d.safetensors"
    save_file({}, path, metadata={"only": "metadata"})
    assert mmap_safetensors(path) == ({}, {"only": "metadata"})


def test_a_missing_file_is_a_library_error(tmp_path):
    with pytest.raises(LibraryError, match="cannot read"):
        mmap_safetensors(tmp_path / "absent.safetensors")


# -- files that do not fit are refused, naming the file ------------------------------------------------------------
def raw_file(path, header: dict | bytes | None, data: bytes = b"", claimed: int | None = None):
    if header is None:  # not even the 8 bytes of the header's length
        path.write_bytes(b"\x05\x00\x00")
        return path
    hb = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if claimed is None else claimed) + hb + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "header, data, claimed, why",
    [
        (None, b"", None, "3 bytes, too short for a header"),
        (b"", b"", None, "header is not JSON"),
        ({"t": entry()}, bytes(8), 10**6, "header claims"),
        (b"{not json", b"", None, "not JSON"),
        (b"[1, 2]", b"", None, "not a JSON object"),
        ({"__metadata__": {"a": 1}}, b"", None, "metadata is not a map of strings"),
        ({"t": entry(dtype="I32")}, bytes(8), None, "has dtype 'I32'"),
        ({"t": {"dtype": "F32", "shape": [2]}}, bytes(8), None, "no valid dtype, shape and data_offsets"),
        ({"t": entry(shape=(-2,))}, bytes(8), None, "no valid dtype, shape and data_offsets"),
        ({"t": entry(shape=(True,), offsets=(0, 4))}, bytes(4), None, "no valid dtype, shape and data_offsets"),
        ({"t": entry(shape=(3,))}, bytes(8), None, "needs 12 bytes"),  # offsets too short for the shape
        ({"t": entry(offsets=(0, 8))}, bytes(7), None, "the file holds 7 bytes of data"),  # truncated data
        ({"t": entry(offsets=(4, 12))}, bytes(8), None, "needs 8 bytes at \\[4, 12\\)"),
        ({"t": entry(offsets=(8, 0))}, bytes(8), None, "needs 8 bytes"),
    ],
)
def test_a_corrupt_header_is_refused(tmp_path, header, data, claimed, why):
    path = raw_file(tmp_path / "bad.safetensors", header, data, claimed)
    with pytest.raises(LibraryError, match=f"bad.safetensors is not a valid safetensors file.*{why}"):
        mmap_safetensors(path)
    with pytest.raises(LibraryError, match="not a valid safetensors file"):
        read_tensor(path, "t")


def test_a_truncated_copy_of_a_real_file_is_refused(tmp_path):
    path = tmp_path / "e.safetensors"
    save_file({"a": torch.randn(8, 8), "b": torch.randn(3)}, path)
    full = path.read_bytes()
    for cut in (4, 20, len(full) - 1):
        path.write_bytes(full[:cut])
        with pytest.raises(LibraryError, match="not a valid safetensors file"):
            mmap_safetensors(path)
    # safetensors' own limit on the header: refused unread even when the file is large enough to hold it
    # (a sparse file: no disk space used)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", storage.MAX_HEADER + 1))
        f.truncate(storage.MAX_HEADER + 64)
    with pytest.raises(LibraryError, match="header claims"):
        mmap_safetensors(path)
