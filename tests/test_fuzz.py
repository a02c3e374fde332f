"""Issue 16, fuzzing (bounded, derandomised): hypothesis over request bodies and over library manifests, segment
row tables and headers; schemathesis over the server's own OpenAPI schema. The server must never answer 5xx or a
traceback and stay healthy; a library must open and read, or refuse with a LibraryError, never anything else."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import schemathesis
from conftest import save_lora, tiny_llama
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import MODEL, Server, assets, served_model  # noqa: F401

from loralag import build_library, open_library
from loralag.errors import LibraryError
from loralag.library.store import module_shapes
from loralag.serve.app import create_app, openapi_schema

FUZZ = settings(
    max_examples=120, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
)


@pytest.fixture(scope="module")
def server(assets):  # noqa: F811
    model, tok = served_model(assets)
    app = create_app(
        model,
        tok,
        [open_library(assets / "alpha"), open_library(assets / "beta")],
        k=2,
        max_batch=16,
        model_name=MODEL,
        default_max_tokens=4,
        request_timeout=30,
    )
    srv = Server(app)
    yield srv
    statuses = {
        line.split('status="')[1].split('"')[0]: float(line.split()[-1])
        for line in srv.http.get("/metrics").text.splitlines()
        if line.startswith("loralag_requests_total{") and "/v1/" in line
    }
    print(f"\nfuzzed requests by status: {dict(sorted(statuses.items()))}")
    assert srv.healthy()
    assert srv.metric("loralag_engine_errors_total") == 0
    srv.stop()


CASES = {"server": 0, "library": 0}


def check_answer(r) -> None:
    """No 5xx, no traceback; errors in OpenAI's shape; a stream ends with [DONE]."""
    CASES["server"] += 1
    assert r.status_code < 500, r.text[:500]
    assert "Traceback" not in r.text and 'File "' not in r.text
    if r.status_code >= 400:
        body = r.json()
        assert set(body) == {"error"} and body["error"]["message"], body
        return
    ctype = r.headers.get("content-type") or r.headers.get("Content-Type") or ""
    ctype = ctype[0] if isinstance(ctype, list) else ctype  # schemathesis lists each header's values
    if ctype.startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]"), r.text[-300:]
    elif ctype.startswith("application/json"):
        assert isinstance(r.json(), dict)


def small_tokens(body):
    """Keep generation short: fuzzing is about input handling, not long generations."""
    if isinstance(body, dict):
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and not isinstance(body[key], bool) and body[key] > 4:
                body[key] = 4
    return body


# -- request bodies ----------------------------------------------------------------------------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
words = st.sampled_from(["who", "the red moon", "", " ", "\u00e9t\u00e9", "\U0001f600", "\x00", "</s>", "<s>"])


def mostly(valid):
    """Valid values seven times in eight, anything JSON otherwise: most bodies are served, many are refused."""
    return st.sampled_from([True] * 7 + [False]).flatmap(lambda ok: valid if ok else json_values)


texts = st.text(st.characters(codec="utf-8"), max_size=12) | words
prompt = mostly(
    st.one_of(
        texts,
        st.lists(texts, min_size=1, max_size=3),
        st.lists(st.integers(0, 96), min_size=1, max_size=6),
        st.lists(st.lists(st.integers(0, 96), min_size=1, max_size=4), min_size=1, max_size=3),
    )
)
part = st.fixed_dictionaries({"type": mostly(st.just("text")), "text": mostly(texts)})
message = st.fixed_dictionaries(
    {
        "role": mostly(st.sampled_from(["user", "system", "assistant", "developer"])),
        "content": mostly(texts | st.lists(part, min_size=1, max_size=2)),
    },
    optional={"name": texts},
)
common = {
    "temperature": mostly(st.sampled_from([0, 0.0, 1e-300, 5e-324, 0.7, 2.0, -0.0]) | st.floats(0, 2)),
    "top_p": mostly(st.sampled_from([1e-300, 0.5, 1.0]) | st.floats(1e-9, 1)),
    "n": mostly(st.integers(1, 3)),
    "stream": mostly(st.booleans()),
    "stop": mostly(st.sampled_from(["a", "the", " "]) | st.lists(texts.filter(bool), max_size=4)),
    "seed": mostly(st.integers(-(2**70), 2**70)),
    "presence_penalty": mostly(st.just(0)),
    "frequency_penalty": mostly(st.just(0.0)),
    "logit_bias": mostly(st.just({})),
    "user": mostly(texts),
    "router": mostly(st.sampled_from(["lag", "arrow", "arrow-mix", "spectral", "uniform", "none", "lag-prefix"])),
    "k": mostly(st.integers(1, 2**62)),
    "libraries": mostly(st.lists(st.sampled_from(["alpha", "beta"]), max_size=2, unique=True)),
    "adapters": mostly(
        st.sampled_from(["a1", "alpha/a0", "beta/a0", "b1", ["alpha/a2", "b0"], {"alpha": "a1"}, {"beta": None}, {}])
    ),
    "return_routing": mostly(st.booleans()),
    "ignore_eos": mostly(st.booleans()),
    "stream_options": mostly(st.fixed_dictionaries({"include_usage": st.booleans()})),
    "max_tokens": mostly(st.integers(1, 4)),
}
completion_bodies = st.fixed_dictionaries(
    {"model": mostly(st.just(MODEL)), "prompt": prompt},
    optional={**common, "echo": mostly(st.just(False)), "best_of": st.integers(0, 3), "extra": json_values},
)
chat_bodies = st.fixed_dictionaries(
    {"model": mostly(st.just(MODEL)), "messages": mostly(st.lists(message, min_size=1, max_size=3))},
    optional={
        **common,
        "max_completion_tokens": mostly(st.integers(1, 4)),
        "tools": json_values,
        "tool_choice": mostly(st.just("none")),
        "response_format": mostly(st.just({"type": "text"})),
    },
)


@FUZZ
@given(body=completion_bodies | json_values)
def test_fuzzed_completion_bodies(server, body):
    check_answer(server.http.post("/v1/completions", json=small_tokens(body)))


@FUZZ
@given(body=chat_bodies | json_values)
def test_fuzzed_chat_bodies(server, body):
    check_answer(server.http.post("/v1/chat/completions", json=small_tokens(body)))


@settings(max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=200) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_fuzzed_raw_bytes(server, raw):
    check_answer(server.http.post("/v1/completions", content=raw, headers={"content-type": "application/json"}))


# -- schemathesis over the server's own schema -------------------------------------------------------------------
schema = schemathesis.openapi.from_dict(openapi_schema())
# The fuzzing phase alone, bounded by max_examples (the coverage phase makes hundreds of cases per operation and the
# stateful one chains them; run `schemathesis run` against a live server for those)
schema.config.phases.update(phases=["fuzzing"])


@schema.parametrize()
@settings(max_examples=40, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_schemathesis(server, case):
    small_tokens(case.body if isinstance(case.body, dict) else None)
    check_answer(case.call(base_url=server.url, timeout=60))


# -- library manifests and segments ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzlib")
    model = tiny_llama()
    for i in range(3):
        save_lora(model, root / "ads" / f"a{i}", seed=i, r=2 + i, target_modules=("q_proj", "up_proj"))
    lib = build_library(
        root / "lib", [root / "ads"], base_model="tiny", shapes=module_shapes(model), progress=False, chunk_size=2
    )
    lib.build_index(progress=False)
    return lib.path


@pytest.fixture(scope="module", autouse=True)
def report_cases():
    yield
    print(f"\nfuzz cases run: {CASES}")


def fresh_copy(src: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    (dst / "segments").mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copy(f, dst / f.name)
    for f in (src / "segments").iterdir():
        os.link(f, dst / "segments" / f.name)  # the segments are only read
    return dst


def use(path: Path) -> None:
    """Open the library and read everything a router would: LibraryError is the only acceptable failure."""
    CASES["library"] += 1
    try:
        lib = open_library(path)
        for module in lib.target_modules:
            lib.bank(module)
        for name in lib.names:
            lib.adapter_factors(name)
    except LibraryError as e:
        assert "\n" not in str(e) and str(e)


def mutate(obj, path: list, value, delete: bool):
    """obj with the value at `path` (keys / indices, taken modulo what is there) replaced or deleted."""
    if not path or not isinstance(obj, (dict, list)) or not obj:
        return value
    keys = list(obj) if isinstance(obj, dict) else list(range(len(obj)))
    key = keys[path[0] % len(keys)]
    out = dict(obj) if isinstance(obj, dict) else list(obj)
    if delete and len(path) == 1:
        del out[key]
        return out
    out[key] = mutate(obj[key], path[1:], value, delete)
    return out


edits = st.tuples(
    st.lists(st.integers(0, 50), min_size=1, max_size=5),
    json_values
    | st.sampled_from(
        ["../../x", "/etc/passwd", "a/b", "..", "", "float16", "linear", "segments", 0, -1, 10**9, [], {}]
    ),
    st.booleans(),
)


@FUZZ
@given(edit_list=st.lists(edits, min_size=1, max_size=3))
def test_fuzzed_manifests(library, tmp_path_factory, edit_list):
    lib = fresh_copy(library, tmp_path_factory.getbasetemp() / "manifest-fuzz")
    m = json.loads((lib / "manifest.json").read_text())
    for path, value, delete in edit_list:
        m = mutate(m, path, value, delete)
    (lib / "manifest.json").write_text(json.dumps(m))
    use(lib)


@FUZZ
@given(
    edit_list=st.lists(edits, min_size=1, max_size=3),
    flips=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), max_size=3),
)
def test_fuzzed_segments(library, tmp_path_factory, edit_list, flips):
    """Row tables edited, and bytes of a segment's header flipped."""
    from safetensors.torch import load_file, save_file

    lib = fresh_copy(library, tmp_path_factory.getbasetemp() / "segment-fuzz")
    seg = sorted((lib / "segments").iterdir())[0]
    src = library / "segments" / seg.name
    seg.unlink()
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        rows = json.loads(f.metadata()["rows"])
    for path, value, delete in edit_list:
        rows = mutate(rows, path, value, delete)
    save_file(load_file(str(src)), str(seg), metadata={"rows": json.dumps(rows)})
    data = bytearray(seg.read_bytes())
    for at, byte in flips:
        data[at % len(data)] = byte
    seg.write_bytes(bytes(data))
    use(lib)
