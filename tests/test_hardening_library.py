"""Issue 16, libraries and adapters: validated scaling and names, manifests confined to their library, segment row
tables checked before any kernel reads them, one-line errors naming the file, builds that leave nothing behind
when they fail, and libraries that survive kill -9 at any step and a full disk."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import invoke, output, save_lora, tiny_llama
from safetensors.torch import load_file, save_file

from loralag import attach, build_library, detach, open_library
from loralag.errors import AdapterError, LibraryError, LoralagError
from loralag.evaluation.kilt import read_kilt_predictions
from loralag.library.adapters import find_adapter_folders, read_adapter
from loralag.library.store import module_shapes

HERE = Path(__file__).parent
SHAPES = module_shapes(tiny_llama())


def build(path, folders, **kw):
    return build_library(path, folders, base_model="tiny", shapes=SHAPES, progress=False, **kw)


@pytest.fixture(scope="module")
def ads(tmp_path_factory):
    root = tmp_path_factory.mktemp("ads")
    model = tiny_llama()
    for i in range(4):
        save_lora(model, root / f"a{i}", seed=i, r=2 + i % 2, target_modules=("q_proj", "up_proj"))
    return root


def copy_adapter(src: Path, dst: Path, **config) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    if config:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        cfg.update(config)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    return dst


def one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def edit_manifest(lib: Path, fn) -> None:
    m = json.loads((lib / "manifest.json").read_text())
    fn(m)
    (lib / "manifest.json").write_text(json.dumps(m))


# -- scaling ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config,match",
    [
        ({"lora_alpha": 1e308}, r"lora_alpha 1e\+308 and rank 2 give scale .* non-finite"),
        ({"lora_alpha": float("nan")}, r"field 'lora_alpha' must be a positive number, got nan"),
        ({"lora_alpha": float("inf")}, r"field 'lora_alpha' must be a positive number"),
        ({"r": float("nan")}, r"field 'r' must be a positive number"),
        ({"alpha_pattern": {"q_proj": 1e308}}, r"give scale .* non-finite"),
        ({"alpha_pattern": {"q_proj": float("nan")}}, r"'alpha_pattern' must map module patterns to positive numbers"),
    ],
)
def test_scaling_is_checked_as_applied(tmp_path, ads, config, match):
    bad = copy_adapter(ads / "a0", tmp_path / "ads" / "bad", **config)
    with pytest.raises(AdapterError, match=match) as err:
        build(tmp_path / "lib", [bad])
    assert "'bad'" in one_line(err)
    assert not (tmp_path / "lib").exists()  # nothing stored, nothing left behind


def test_factors_that_overflow_the_library_dtype_are_refused(tmp_path, ads):
    # finite in float32, but the aligned B* = U·S exceeds float16's 65504
    bad = copy_adapter(ads / "a0", tmp_path / "ads" / "big", lora_alpha=2e6)
    with pytest.raises(AdapterError, match=r"adapter 'big': module .* aligns to non-finite float16 factors"):
        build(tmp_path / "lib", [bad], dtype="float16")
    lib = build(tmp_path / "lib32", [bad])  # float32 holds them
    assert all(torch.isfinite(A).all() and torch.isfinite(B).all() for A, B in lib.adapter_factors("big").values())


# -- names --------------------------------------------------------------------------------------------------------
def test_build_dot_names_the_adapter_after_its_folder(tmp_path, ads, monkeypatch):
    monkeypatch.chdir(ads / "a1")
    lib = build(tmp_path / "lib", [Path(".")])
    assert lib.names == ["a1"]
    monkeypatch.chdir(ads / "a1" / "..")
    assert find_adapter_folders([Path("a1/.")])[0].name == "a1"


@pytest.mark.parametrize("name", ["bad\x01name", " padded", "new\nline"])
def test_adapter_names_are_checked_at_build(tmp_path, ads, name):
    bad = copy_adapter(ads / "a0", tmp_path / "ads" / name)
    with pytest.raises(AdapterError, match="adapter name"):
        read_adapter(bad)
    with pytest.raises(AdapterError, match="adapter name"):
        build(tmp_path / "lib", [tmp_path / "ads"])


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", "", "tab\there", "x" * 256, None, 7])
def test_adapter_names_are_checked_at_open(tmp_path, ads, name):
    lib = build(tmp_path / "lib", [ads / "a0"]).path
    edit_manifest(lib, lambda m: m["adapters"][0].update(name=name))
    with pytest.raises(LibraryError, match=r"manifest\.json is corrupt: adapter 0: an adapter name") as err:
        open_library(lib)
    one_line(err)


def test_export_cannot_write_outside_its_folder(tmp_path, ads):
    """The issue's library: an adapter named ../../escaped in manifest and segment."""
    lib = build(tmp_path / "lib", [ads / "a0"])
    seg = lib.path / "segments" / f"{lib.adapters[0]['segment']}.safetensors"
    tensors = load_file(str(seg))
    from safetensors import safe_open

    with safe_open(str(seg), "pt") as f:
        rows = json.loads(f.metadata()["rows"])
    rows = {m: [["../../escaped", r] for _, r in table] for m, table in rows.items()}
    save_file(tensors, str(seg), metadata={"rows": json.dumps(rows)})
    edit_manifest(lib.path, lambda m: m["adapters"][0].update(name="../../escaped"))
    out = tmp_path / "deep" / "er" / "out"
    with pytest.raises(LibraryError):
        open_library(lib.path).export(out)
    assert not (tmp_path / "deep" / "escaped").exists() and not (tmp_path / "escaped").exists()


@pytest.mark.parametrize("where", ["segment", "index"])
def test_manifest_paths_stay_inside_the_library(tmp_path, ads, where):
    lib = build(tmp_path / "lib", [ads / "a0", ads / "a1"])
    outside = tmp_path / "outside"
    outside.mkdir()
    if where == "segment":
        seg = lib.adapters[0]["segment"]
        (outside / f"{seg}.safetensors").write_bytes((lib.path / "segments" / f"{seg}.safetensors").read_bytes())
        for bad in ("../../outside/" + seg, "/etc/passwd", seg + "/../" + seg):
            edit_manifest(lib.path, lambda m: [a.update(segment=bad) for a in m["adapters"]])
            with pytest.raises(LibraryError, match=r"not a segment id"):
                open_library(lib.path)
        # a segment id that is a link out of the library
        edit_manifest(lib.path, lambda m: [a.update(segment="linked") for a in m["adapters"]])
        (lib.path / "segments" / "linked.safetensors").symlink_to(outside / f"{seg}.safetensors")
        with pytest.raises(LibraryError, match=r"segment 'linked' lies outside the library"):
            open_library(lib.path)
    else:
        info = lib.build_index(progress=False)
        for bad in ("../outside/" + info["file"], "/tmp/x.safetensors", "manifest.json"):
            edit_manifest(lib.path, lambda m: m["arrow_index"].update(file=bad))
            with pytest.raises(LibraryError, match=r"'arrow_index' must name an arrow-index"):
                open_library(lib.path)


# -- segments and corrupt files -------------------------------------------------------------------------------
def crafted_rows(lib, fn):
    """Rewrite the first segment's row table with fn(rows) (tensors unchanged)."""
    from safetensors import safe_open

    seg = lib.path / "segments" / f"{lib.adapters[0]['segment']}.safetensors"
    with safe_open(str(seg), "pt") as f:
        rows = json.loads(f.metadata()["rows"])
    tensors = load_file(str(seg))
    save_file(tensors, str(seg), metadata={"rows": json.dumps(fn(rows))})
    return seg


@pytest.mark.parametrize("kernels", ["1", "0"])
def test_a_row_table_past_its_tensors_is_refused_before_routing(tmp_path, ads, kernels, monkeypatch):
    """The issue's crafted segment: a row the stacks do not hold, listed for an adapter the manifest names.
    Before: the torch path raised IndexError and the native kernels read outside the mapping."""
    monkeypatch.setenv("LORALAG_KERNELS", kernels)
    lib = build(tmp_path / "lib", [ads / "a0", ads / "a1"])
    seg = crafted_rows(lib, lambda rows: {m: t + [["ghost", t[0][1]]] * 50 for m, t in rows.items()})
    edit_manifest(lib.path, lambda m: m["adapters"].append(dict(m["adapters"][0], name="ghost")))
    lib = open_library(lib.path)
    model = tiny_llama()
    with pytest.raises(LibraryError, match=r"is corrupt: module .* lists 52 rows .* but holds A \(2,") as err:
        attach(model, lib)
    assert str(seg) in one_line(err)
    detach(model) if hasattr(model, "_loralag") else None


@pytest.mark.parametrize(
    "fn,match",
    [
        (
            lambda rows: {m: [[n, 99] for n, _ in t] for m, t in rows.items()},
            r"lists a rank of 99 in a stack of rank 3",
        ),
        (lambda rows: {m + ".x": t for m, t in rows.items()}, r"is not a module of the base model"),
        (lambda rows: {m: [[n] for n, _ in t] for m, t in rows.items()}, r"rows must be \[name, rank\] pairs"),
        (lambda rows: [1, 2], r"not a map of modules"),
    ],
)
def test_bad_row_tables(tmp_path, ads, fn, match):
    lib = build(tmp_path / "lib", [ads / "a0", ads / "a1"])
    crafted_rows(lib, fn)
    with pytest.raises(LibraryError, match=match):
        open_library(lib.path).bank(lib.target_modules[0])


def test_truncated_and_corrupt_segments_name_the_file(tmp_path, ads):
    lib = build(tmp_path / "lib", [ads / "a0", ads / "a1"])
    seg = lib.path / "segments" / f"{lib.adapters[0]['segment']}.safetensors"
    data = seg.read_bytes()
    for broken, match in [
        (data[: len(data) // 2], r"needs \d+ bytes at"),
        (data[:5], r"too short for a header"),
        (b"\xff" * 64, r"its header claims"),
        (data[:8] + b"{nope" + data[13:], r"not JSON"),
    ]:
        seg.write_bytes(broken)
        with pytest.raises(LibraryError, match=match) as err:
            open_library(lib.path).bank(lib.target_modules[0])
        assert str(seg) in one_line(err) and "not a valid safetensors file" in str(err.value)


@pytest.mark.parametrize(
    "content,match",
    [
        (b"[1, 2]", r"format 'list' version None"),
        (b"\xff\xfe garbage", r"is not valid JSON"),
        (b'{"format": "loralag-library", "format_version": 1}', r"is corrupt: 'base_model'"),
        (
            b'{"format": "loralag-library", "format_version": 1, "base_model": {"name": "x", "modules": {}}, '
            b'"dtype": "f"}',
            r"dtype 'f' is not one of",
        ),
        (
            b'{"format": "loralag-library", "format_version": 1, "base_model": {"name": "x", "modules": {}}, '
            b'"dtype": "float32", "adapters": [{"name": "a", "segment": "s", "target_modules": ["m"], "rank": 2}]}',
            r"adapter 'a' must target a non-empty list of the base model's modules",
        ),
        (b"[" * 100000, r"is not valid JSON"),
    ],
)
def test_corrupt_manifests_give_one_line(tmp_path, content, match):
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "manifest.json").write_bytes(content)
    with pytest.raises(LibraryError, match=match) as err:
        open_library(lib)
    assert "manifest.json" in one_line(err)
    r = invoke("info", lib)
    assert r.exit_code == 2 and "Traceback" not in output(r) and "manifest.json" in output(r)


# -- builds ---------------------------------------------------------------------------------------------------------
def test_build_into_a_file_is_one_line(tmp_path, ads):
    target = tmp_path / "lib"
    target.write_text("not a folder")
    with pytest.raises(LibraryError, match=r"is a file, not a folder") as err:
        build(target, [ads / "a0"])
    one_line(err)
    assert target.read_text() == "not a folder"
    with pytest.raises(LibraryError, match=r"is a file"):
        build(tmp_path / "lib2", [ads / "a0"]).export(target)


def test_folders_without_a_config_are_named(tmp_path, ads, caplog):
    parent = tmp_path / "ads"
    copy_adapter(ads / "a0", parent / "a0")
    (parent / "notes").mkdir()
    (parent / ".a1.tmp-xyz").mkdir()  # a training run's temporary folder: silently skipped
    with caplog.at_level(logging.WARNING, logger="loralag"):
        assert [p.name for p in find_adapter_folders([parent])] == ["a0"]
    assert "skipping 1 folder(s)" in caplog.text and "notes" in caplog.text and ".a1" not in caplog.text
    weights_only = parent / "half"
    weights_only.mkdir()
    (weights_only / "adapter_model.safetensors").write_bytes((ads / "a1" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(AdapterError, match=r"adapter 'half': .* holds adapter weights but no adapter_config\.json"):
        find_adapter_folders([parent])


def test_a_failed_first_build_leaves_nothing_bound(tmp_path, ads):
    other = {m: [2 * s[0], s[1], s[2]] for m, s in SHAPES.items()}  # the wrong model
    with pytest.raises(AdapterError, match="maps 32->"):
        build_library(tmp_path / "lib", [ads / "a0"], base_model="wrong", shapes=other, progress=False)
    assert not (tmp_path / "lib").exists()
    (tmp_path / "mine").mkdir()  # an existing empty folder stays, empty
    with pytest.raises(AdapterError):
        build_library(tmp_path / "mine", [ads / "a0"], base_model="wrong", shapes=other, progress=False)
    assert list((tmp_path / "mine").iterdir()) == []
    # an empty library left bound to a model (by an older version, or made on purpose) is rebound
    from loralag.library.store import create_library

    create_library(tmp_path / "empty", "wrong", other)
    lib = build(tmp_path / "empty", [ads / "a0"])
    assert lib.base_model == "tiny" and lib.names == ["a0"]


# -- predictions files (kilt.py) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("answer,got", [(None, "null"), (1990, "int"), (1.5, "float"), (["x"], "list")])
def test_prediction_answers_must_be_strings(tmp_path, answer, got):
    path = tmp_path / "p.jsonl"
    path.write_text(
        json.dumps({"id": "1", "output": [{"answer": "ok"}]})
        + "\n"
        + json.dumps({"id": "2", "output": [{"answer": answer}]})
        + "\n"
    )
    with pytest.raises(LoralagError, match=rf"p\.jsonl:2: 'answer' must be a string, got {got}"):
        read_kilt_predictions(path)


# -- faults -----------------------------------------------------------------------------------------------------------
def stray(lib: Path) -> list[str]:
    """Files a clean library does not hold: temporaries, segments and indexes the manifest does not name."""
    m = json.loads((lib / "manifest.json").read_text())
    live = {a["segment"] + ".safetensors" for a in m["adapters"]}
    index = (m.get("arrow_index") or {}).get("file")
    out = [f.name for f in lib.iterdir() if f.name not in {"manifest.json", "segments", ".lock", index}]
    return out + [f.name for f in (lib / "segments").iterdir() if f.name not in live]


def test_kill_9_at_every_step_leaves_the_old_or_the_new_library(tmp_path, ads):
    run = subprocess.run(
        [sys.executable, str(HERE / "fault_driver.py"), str(tmp_path), str(ads)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    reference = {a.name: build(tmp_path / "ref" / a.name, [a]) for a in sorted(ads.iterdir())}
    killed = 0
    for op, r in report.items():
        assert r["steps"] >= 3, (op, r["steps"])
        states = {tuple(r["new"])} | ({tuple(r["old"])} if r["old"] is not None else {(), None})
        if op == "build":
            states |= {("a0", "a1")}  # chunk_size=2: the first chunk commits alone
        for one in r["runs"]:
            lib = Path(one["dir"])
            killed += one["killed"]
            assert one["killed"] or one["exit"] == 0, one
            if not (lib / "manifest.json").is_file():
                assert op == "build", one  # killed before the first manifest: no library yet
                state = None
            else:
                opened = open_library(lib)  # opens, and sweeps what the killed write left
                state = tuple(opened.names)
                assert stray(lib) == [], (op, one, stray(lib))
                for name in opened.names:  # every adapter it lists reads back as aligned
                    for module, (A, B) in opened.adapter_factors(name).items():
                        A0, B0 = reference[name].adapter_factors(name)[module]
                        assert torch.allclose(A, A0) and torch.allclose(B, B0)
                if op == "index" and opened.manifest.get("arrow_index"):
                    opened.bank(opened.target_modules[0])  # the index it names is whole
            assert state in states, (op, one, state)
            if op in ("build", "add") and state != tuple(r["new"]):  # a rerun finishes the job
                first = [ads / n for n in r["new"]]
                lib2 = build(lib, first) if op == "build" else open_library(lib)
                if op == "add":
                    lib2.add([ads / "a2", ads / "a3"], progress=False)
                assert open_library(lib).names == r["new"] and stray(lib) == []
        assert r["runs"][-1]["killed"] is False and r["runs"][-1]["exit"] == 0  # past the last step: it completes
    print(f"\nkill -9 points per operation: { ({op: r['steps'] for op, r in report.items()}) }, {killed} kills in all")
    assert killed >= 20


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    sys.path.insert(0, {tests!r})
    from conftest import tiny_llama
    from loralag import open_library
    from loralag.errors import LoralagError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of killing us
    lib = open_library({lib!r})
    resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
    try:
        lib.{call}
    except LoralagError as e:
        print("ERROR", e)
        sys.exit(2)
    print("OK")
""")


@pytest.mark.parametrize("call", ["add([{a2!r}, {a3!r}], progress=False)", "compact()", "build_index(progress=False)"])
def test_a_full_disk_fails_cleanly_and_keeps_the_library(tmp_path, ads, call):
    lib = build(tmp_path / "lib", [ads / "a0", ads / "a1", ads / "a2"])
    lib.remove(["a2"])
    before = (lib.path / "manifest.json").read_bytes()
    files = sorted(f.name for f in (lib.path / "segments").iterdir())
    code = FULL_DISK.format(
        tests=str(HERE), lib=str(lib.path), limit=256, call=call.format(a2=str(ads / "a2"), a3=str(ads / "a3"))
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stdout + run.stderr[-2000:]
    assert "Traceback" not in run.stdout + run.stderr
    line = run.stdout.strip().splitlines()[-1]
    assert line.startswith("ERROR could not write ") and "File too large" in line, line
    assert (lib.path / "manifest.json").read_bytes() == before
    assert sorted(f.name for f in (lib.path / "segments").iterdir()) == files
    assert stray(lib.path) == []
    assert open_library(lib.path).names == ["a0", "a1"]


def test_a_stray_temporary_manifest_is_swept_at_open(tmp_path, ads):
    lib = build(tmp_path / "lib", [ads / "a0"])
    (lib.path / ".tmp-12345-manifest.json").write_text("{half")
    (lib.path / "segments" / ".tmp-12345-abc.safetensors").write_bytes(b"half")
    (lib.path / "segments" / "0123456789abcdef.safetensors").write_bytes(b"orphan")
    assert stray(lib.path) != []
    assert open_library(lib.path).names == ["a0"]
    assert stray(lib.path) == []
    # a read-only library still opens (nothing is swept)
    (lib.path / ".tmp-1-manifest.json").write_text("{half")
    os.chmod(lib.path, 0o555)
    try:
        assert open_library(lib.path).names == ["a0"]
    finally:
        os.chmod(lib.path, 0o755)


def test_kill_9_at_every_step_of_training_then_a_rerun_finishes_it(tmp_path):
    """Training killed at each of its file-system steps (retraining an outdated adapter, adding one): every
    adapter folder left is whole (the old or the new one), a rerun sweeps the killed run's temporary folders and
    finishes, and its adapters equal an uninterrupted run's, tensor for tensor."""
    from safetensors.torch import load_file
    from tiny_text import tiny_tokenizer

    from loralag.library.adapters import read_adapter
    from loralag.training.train import Document, TrainConfig, train_adapters

    run = subprocess.run(
        [sys.executable, str(HERE / "fault_driver.py"), str(tmp_path), "--train"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    probe = Path(report["probe"])
    model, tok = tiny_llama(), tiny_tokenizer()
    docs = [Document("d0", "the cat sat on the mat"), Document("d1", "a dog ran in the park")]
    config = TrainConfig(target_modules=["up_proj"], steps=2, batch_size=1)
    killed = 0
    for one in report["runs"]:
        out = Path(one["dir"])
        killed += one["killed"]
        assert one["killed"] or one["exit"] == 0, one
        for folder in out.iterdir():
            if not folder.name.startswith("."):
                read_adapter(folder)  # whole: the config, weights and marker of one adapter
        train_adapters(model, tok, docs, out, config, progress=False)
        assert sorted(p.name for p in out.iterdir()) == ["d0", "d1"], (one, sorted(out.iterdir()))
        for name in ("d0", "d1"):
            got = load_file(out / name / "adapter_model.safetensors")
            want = load_file(probe / name / "adapter_model.safetensors")
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got), (one, name)
    print(f"\ntraining: {report['steps']} kill -9 points, {killed} kills")
    assert killed >= 5 and report["runs"][-1]["killed"] is False
