"""The library on disk: build, resume after a kill, add and remove without re-aligning, mmap, info."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import save_lora, tiny_llama

from loralag import attach, build_library, detach, open_library
from loralag.errors import AdapterError, LibraryError
from loralag.library import store as L
from loralag.library.store import module_shapes

TARGETS = ("q_proj", "v_proj", "up_proj")


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_llama()
    for i in range(8):
        save_lora(model, root / f"a{i}", seed=i, r=2 + i % 3, target_modules=TARGETS)
    return root, model


def build(path, folders, model, **kw):
    return build_library(path, folders, base_model="tiny", shapes=module_shapes(model), progress=False, **kw)


def outputs(model, lib, names, ids):
    """Logits with each named adapter fixed for the whole batch."""
    out = {}
    for n in names:
        state = attach(model, lib)
        state.fix(lib.name, [n] * len(ids))
        with torch.no_grad():
            out[n] = model(ids).logits
        detach(model)
    return out


def count_alignments(monkeypatch):
    calls = []
    real = L.align
    monkeypatch.setattr(L, "align", lambda *a: calls.append(1) or real(*a))
    return calls


def segment_files(lib):
    return {f.name: f.read_bytes() for f in (lib.path / "segments").iterdir()}


def test_manifest_records_everything(tmp_path, adapters):
    root, model = adapters
    lib = build(tmp_path / "lib", [root / "a0", root / "a1"], model)
    m = json.loads((lib.path / "manifest.json").read_text())
    assert m["format_version"] == L.FORMAT_VERSION and m["base_model"]["name"] == "tiny"
    assert m["base_model"]["modules"]["model.layers.0.mlp.up_proj"] == [32, 48, "linear"]
    a0 = m["adapters"][0]
    assert a0["name"] == "a0" and a0["rank"] == 2 and a0["alpha"] == 8 and len(a0["checksum"]) == 64
    assert a0["source"].endswith("a0") and len(a0["target_modules"]) == 6
    s = lib.summary()
    assert s["adapters"] == 2 and s["ranks"] == [2, 3] and s["bytes_on_disk"] > 0


def test_add_and_remove_do_not_realign_others(tmp_path, adapters, ids, monkeypatch):
    root, model = adapters
    lib = build(tmp_path / "lib", [root / f"a{i}" for i in range(4)], model)
    before = outputs(model, lib, lib.names, ids)
    files = segment_files(lib)
    calls = count_alignments(monkeypatch)
    lib.add([root / "a4", root / "a5"], progress=False)
    assert len(calls) == 2 * 6  # only the two new adapters, 6 modules each
    assert all(segment_files(lib)[f] == b for f, b in files.items())  # old segments untouched
    assert lib.names == [f"a{i}" for i in range(6)]
    lib.remove(["a1", "a4"])
    assert lib.names == ["a0", "a2", "a3", "a5"] and len(calls) == 12
    after = outputs(model, open_library(lib.path), ["a0", "a2", "a3"], ids)
    assert all(torch.equal(after[n], before[n]) for n in after)
    lib.compact()
    assert len(calls) == 12 and len(list((lib.path / "segments").iterdir())) == 1
    compacted = outputs(model, open_library(lib.path), ["a0", "a2", "a3"], ids)
    assert all(torch.equal(compacted[n], before[n]) for n in compacted)
    with pytest.raises(LibraryError, match="no adapter named 'a1'"):
        lib.remove(["a1"])


def test_rebuild_skips_identical_and_refuses_changed(tmp_path, adapters, monkeypatch):
    root, model = adapters
    lib = build(tmp_path / "lib", [root / "a0", root / "a1"], model)
    calls = count_alignments(monkeypatch)
    build(tmp_path / "lib", [root / "a0", root / "a1"], model)
    assert calls == []
    changed = save_lora(model, tmp_path / "new" / "a0", seed=99, target_modules=TARGETS)
    with pytest.raises(AdapterError, match="differs from the one of that name"):
        build(tmp_path / "lib", [changed], model)
    build(tmp_path / "lib", [changed], model, replace=True)
    lib = open_library(lib.path)
    assert lib.entry("a0")["source"] == str(changed.resolve()) and lib.names == ["a1", "a0"]


def test_crash_inside_a_segment_write_leaves_previous_library(tmp_path, adapters, ids, monkeypatch):
    root, model = adapters
    lib = build(tmp_path / "lib", [root / "a0", root / "a1"], model)
    before = outputs(model, lib, lib.names, ids)

    def torn_write(path, data):  # half a file, then the process "dies"
        path.with_name(".tmp-0-" + path.name).write_bytes(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(L, "atomic_save_safetensors", lambda p, t, m: torn_write(p, b"x" * 1000))
    with pytest.raises(KeyboardInterrupt):
        lib.add([root / "a2"], progress=False)
    monkeypatch.undo()
    again = open_library(lib.path)
    assert again.names == ["a0", "a1"]
    after = outputs(model, again, again.names, ids)
    assert all(torch.equal(after[n], before[n]) for n in after)
    again.add([root / "a2"], progress=False)  # the next write sweeps the torn file and completes
    assert open_library(lib.path).names == ["a0", "a1", "a2"]
    assert not [f for f in (lib.path / "segments").iterdir() if f.name.startswith(".tmp-")]


KILLED_BUILD = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from conftest import tiny_llama
    from loralag.library import store as L
    real = L.align
    def slow(*a):
        time.sleep(0.05)
        return real(*a)
    L.align = slow
    L.build_library({out!r}, [{src!r}], base_model="tiny", shapes=L.module_shapes(tiny_llama()), chunk_size=1,
                    progress=False)
""")


def test_build_killed_part_way_is_readable_and_resumes(tmp_path, adapters, monkeypatch):
    root, model = adapters
    out = tmp_path / "lib"
    script = KILLED_BUILD.format(tests=os.path.dirname(__file__), out=str(out), src=str(root))
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while time.time() < deadline:  # kill it once a few, but not all, adapters are committed
        manifest = out / "manifest.json"
        if manifest.is_file() and len(json.loads(manifest.read_text())["adapters"]) >= 3:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    partial = open_library(out)
    done = len(partial)
    assert 3 <= done < 8, "the build finished before it could be killed"
    assert partial.bank("model.layers.0.self_attn.q_proj").n == done
    calls = count_alignments(monkeypatch)
    lib = build(out, [root], model)
    assert len(lib) == 8 and len(calls) == (8 - done) * 6  # resumed, not restarted
    assert lib.names == [f"a{i}" for i in range(8)]


def test_open_refuses_what_is_not_a_library(tmp_path):
    with pytest.raises(LibraryError, match="no manifest.json"):
        open_library(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(LibraryError, match="not valid JSON"):
        open_library(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "x", "format_version": 99}))
    with pytest.raises(LibraryError, match="version 99"):
        open_library(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(LibraryError, match="not empty and holds no manifest"):
        L.create_library(other, "x", {})
    assert (other / "precious.txt").read_text() == "keep me"


MMAP_PROBE = textwrap.dedent("""
    import resource, sys, json
    import torch
    from loralag.library import store as L
    from loralag.library.storage import atomic_save_safetensors
    n, d, r = 2000, 1024, 8
    lib = L.create_library(sys.argv[1], "synthetic", {"m": [d, d, "linear"]})
    A = torch.randn(n, r, d); B = torch.randn(n, d, r)
    seg = lib._save_segment({"m.A": A, "m.B": B, "m.arrow": A[:, 0].clone()}, {"m": [[f"a{i}", r] for i in range(n)]})
    lib._commit([{"name": f"a{i}", "source": "-", "checksum": "-", "rank": r, "alpha": r, "use_rslora": False,
                  "target_modules": ["m"], "segment": seg} for i in range(n)])
    del A, B, lib
    import gc; gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lib = L.open_library(sys.argv[1])
    bank = lib.bank("m")
    A, _ = bank.gather(torch.tensor([5, 17]))
    print(json.dumps({"rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before,
                      "arrows_kib": bank.arrows.numel() * 4 // 1024, "factors_kib": 2 * n * r * d * 4 // 1024}))
""")


def test_opening_maps_instead_of_reading(tmp_path):
    """Peak RSS while opening: the arrows are read, the 128 MB of A*/B* are not."""
    out = subprocess.run(
        [sys.executable, "-c", MMAP_PROBE, str(tmp_path / "big")], capture_output=True, text=True, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["rss_kib"] < 2 * r["arrows_kib"] + 16 * 1024 < r["factors_kib"] / 2, r
