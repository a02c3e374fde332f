"""The routing explorer: the per-token routing the API returns (`return_routing: "tokens"`), checked against the
model's own trace, and the page at /ui driven in a real headless Chromium (Debian's `chromium` through
Playwright's Python API; skipped, with the reason, where either is missing)."""

from __future__ import annotations

import json

import pytest
import torch
from test_serve import MODEL, Server, assets, served_model  # noqa: F401  (assets: the fixture)

from loralag import attach, open_library
from loralag.serve.app import create_app

PROMPT = "who is the moon"
KEY = "sk-ui-test"


@pytest.fixture(scope="module")
def server(assets):  # noqa: F811
    model, tok = served_model(assets)
    libs = [open_library(assets / "alpha"), open_library(assets / "beta")]
    srv = Server(create_app(model, tok, libs, router="lag", k=2, max_batch=8, model_name=MODEL))
    yield srv
    srv.stop()


def _complete(server, **extra):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0} | extra
    r = server.http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _adapter_at(lib: dict, m: int, t: int) -> str | None:
    w = lib["winners"][m][t]
    return None if w is None else lib["adapters"][w]


# -- the API ------------------------------------------------------------------------------------------------------
def test_token_routing_equals_the_models_own_trace(server, assets):  # noqa: F811
    """Every position (prompt and generated) and every adapted module: the winner and score the server returns are
    the ones the model's trace records when the same tokens run through it in one forward pass."""
    out = _complete(server, return_routing="tokens")
    choice = out["choices"][0]
    tr = choice["token_routing"]
    usage = out["usage"]
    ids = tr["token_ids"]
    assert tr["prompt_tokens"] == usage["prompt_tokens"]
    assert len(ids) == len(tr["tokens"]) == usage["prompt_tokens"] + usage["completion_tokens"] - 1  # last: not fed
    model, tok = served_model(assets)
    assert ids[: tr["prompt_tokens"]] == tok(PROMPT)["input_ids"]
    state = attach(model, [open_library(assets / "alpha"), open_library(assets / "beta")], router="lag", k=2)
    with torch.no_grad(), state.tracing() as trace:
        model(input_ids=torch.tensor([ids]))
    for lib_name, lib in tr["libraries"].items():
        assert lib["router"] == "lag" and lib["k"] == 2
        assert set(lib["modules"]) == set(trace.modules(lib_name))
        assert len(lib["winners"]) == len(lib["scores"]) == len(lib["modules"])
        for m, module in enumerate(lib["modules"]):
            want = trace.adapter_names(module, lib_name, 0)
            assert [_adapter_at(lib, m, t) for t in range(len(ids))] == want, (lib_name, module)
            scores = trace.score_matrix(module, lib_name)[0].tolist()
            assert lib["scores"][m] == pytest.approx(scores, rel=1e-3, abs=1e-4)
        # the summary counts the same decisions
        counts = {}
        for row in lib["winners"]:
            for w in row:
                counts[lib["adapters"][w]] = counts.get(lib["adapters"][w], 0) + 1
        summary = choice["routing"][lib_name]
        assert summary["routed_tokens"] == sum(counts.values())
        assert summary["shares"] == {n: pytest.approx(c / sum(counts.values()), abs=1e-5) for n, c in counts.items()}
    # the vote over the prompt is RoutingState.vote's
    votes = state.vote(torch.tensor([ids[: tr["prompt_tokens"]]]))
    assert {lib: v["vote"]["adapter"] for lib, v in tr["libraries"].items()} == {k: v[0] for k, v in votes.items()}
    modules = tr["libraries"]["alpha"]["modules"]  # layer by layer, as the model runs them
    assert modules.index("model.layers.0.self_attn.q_proj") < modules.index("model.layers.0.mlp.gate_proj")
    assert modules.index("model.layers.0.mlp.gate_proj") < modules.index("model.layers.1.self_attn.q_proj")


def test_token_routing_streamed_fixed_off_and_only_when_asked(server):
    plain = _complete(server, return_routing=True)
    assert "token_routing" not in plain["choices"][0] and "routing" in plain  # as before
    assert "token_routing" not in _complete(server)["choices"][0]
    full = _complete(server, return_routing="tokens")
    # streamed: the choice's last chunk carries the same per-token routing
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "stream": True}
    with server.http.stream("POST", "/v1/completions", json=body | {"return_routing": "tokens"}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    done = [e["choices"][0] for e in events if e["choices"] and e["choices"][0]["finish_reason"]]
    assert done[0]["token_routing"] == full["choices"][0]["token_routing"]
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"]) == full["choices"][0]["text"]
    # a fixed adapter wins every decision, with no scores beyond the fixed router's; a library off has no matrix
    fixed = _complete(server, adapters="a2", return_routing="tokens")["choices"][0]["token_routing"]
    alpha, beta = fixed["libraries"]["alpha"], fixed["libraries"]["beta"]
    assert alpha["router"] == "fixed" and alpha["adapters"] == ["a2"]
    assert all(w == 0 for row in alpha["winners"] for w in row) and alpha["vote"]["adapter"] == "a2"
    assert len(alpha["winners"][0]) == len(fixed["tokens"])
    assert beta == {"router": "none", "modules": [], "adapters": [], "winners": [], "scores": [], "vote": None}
    # two routers on one prompt, as the page compares them
    arrow = _complete(server, router="arrow", return_routing="tokens")["choices"][0]["token_routing"]
    assert arrow["libraries"]["alpha"]["router"] == "arrow"
    # chat: the template's tokens are positions too
    r = server.http.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": 3,
            "temperature": 0,
            "return_routing": "tokens",
        },
    ).json()
    tr = r["choices"][0]["token_routing"]
    assert tr["prompt_tokens"] == r["usage"]["prompt_tokens"] > 4
    assert all(len(row) == len(tr["tokens"]) for row in tr["libraries"]["beta"]["winners"])


def test_return_routing_values_and_schema(server):
    r = server.http.post("/v1/completions", json={"model": MODEL, "prompt": PROMPT, "return_routing": "everything"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_routing"
    schema = server.http.get("/openapi.json").json()
    field = schema["components"]["schemas"]["CompletionRequest"]["properties"]["return_routing"]
    assert {"const": "tokens", "type": "string"} in field["anyOf"] or {"enum": ["tokens"], "type": "string"} in field[
        "anyOf"
    ]
    assert "tokens" in field["description"]
