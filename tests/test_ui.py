"""The routing explorer: the per-token routing the API returns (`return_routing: "tokens"`), checked against the
model's own trace, and the page at /ui driven in a real headless Chromium (Debian's `chromium` through
Playwright's Python API; skipped, with the reason, where either is missing)."""

from __future__ import annotations

import json
import os
import shutil

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
    # several prompts, n each: every choice has its own prompt's positions and its own answer's
    many = _complete(server, prompt=[PROMPT, "tell me about the sun"], n=2, max_tokens=3, return_routing="tokens")
    assert len(many["choices"]) == 4
    for choice in many["choices"]:
        tr = choice["token_routing"]
        assert tr["prompt_tokens"] == (4 if choice["index"] < 2 else 5)
        assert all(len(row) == len(tr["tokens"]) for lib in tr["libraries"].values() for row in lib["winners"])
        assert choice["routing"]["alpha"]["routed_tokens"] == len(tr["tokens"]) * 6
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


# -- the page, in a real browser --------------------------------------------------------------------------------------
CHROMIUM = os.environ.get("LORALAG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FINISHED = "['done', 'failed'].some(s => document.getElementById('run-status').textContent.startsWith(s))"
SCREENSHOT = os.environ.get("LORALAG_UI_SCREENSHOT")  # a path: the side-by-side test saves the page there


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install -y chromium; or set LORALAG_CHROMIUM)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install playwright)")
    with sync_playwright() as p:
        # Debian's chromium, not Playwright's own download; no sandbox: tests may run as root in a container
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


class Page:
    """A browser tab on the server's /ui that records console errors and uncaught exceptions."""

    def __init__(self, browser, url: str):
        self.page = browser.new_page(viewport={"width": 1400, "height": 900})
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        self.page.goto(url + "/ui")

    def ask(self, prompt: str, router: str, k: int, max_tokens: int, router_b: str = "") -> None:
        p = self.page
        p.wait_for_selector("#run:not([disabled])")
        p.fill("#prompt", prompt)
        p.select_option("#router", router)
        p.select_option("#router-b", router_b)
        p.fill("#k", str(k))
        p.fill("#max-tokens", str(max_tokens))
        p.click("#run")
        p.wait_for_function(FINISHED)
        assert p.inner_text("#run-status") == "done", p.inner_text("#results")

    def check_panel(self, server, panel: str, router: str, k: int, max_tokens: int) -> None:
        """The panel shows what the API returns for the same request: the answer, one heatmap column per token
        and one row per adapted module for every library, on hover each cell's adapter and score, the vote."""
        p = self.page
        api = _complete(server, router=router, k=k, max_tokens=max_tokens, return_routing="tokens")["choices"][0]
        tr = api["token_routing"]
        T = len(tr["tokens"])
        assert p.inner_text(f"{panel} .answer") == api["text"]
        assert p.inner_text(f"{panel} h2") == f"router {router}"
        sections = p.query_selector_all(f"{panel} section.library")
        assert [s.get_attribute("data-library") for s in sections] == list(tr["libraries"]) == ["alpha", "beta"]
        for lib_name, lib in tr["libraries"].items():
            sel = f'{panel} section[data-library="{lib_name}"]'
            columns = p.query_selector_all(f"{sel} .heatmap .tok")
            assert len(columns) == T  # one column per token
            assert [c.inner_text() for c in columns] == [t.replace(" ", "·") or "∅" for t in tr["tokens"]]
            assert len(p.query_selector_all(f"{sel} .heatmap .cell")) == T * len(lib["modules"])
            assert p.inner_text(f"{sel} .vote strong") == lib["vote"]["adapter"]
            for m, t in [(0, 0), (len(lib["modules"]) - 1, T - 1), (1, tr["prompt_tokens"])]:
                p.hover(f'{sel} .cell[data-m="{m}"][data-t="{t}"]')
                tip = p.inner_text("#tooltip")
                assert p.is_visible("#tooltip")
                assert p.inner_text("#tooltip b.adapter") == _adapter_at(lib, m, t)
                assert lib["modules"][m] in tip and f"score {lib['scores'][m][t]}" in tip
                assert f"position {t}, {'prompt' if t < tr['prompt_tokens'] else 'generated'}" in tip


def test_page_answers_a_prompt_and_shows_its_routing(server, browser):
    tab = Page(browser, server.url)
    assert "tiny-llama" in tab.page.inner_text("#server-status")
    assert tab.page.eval_on_selector_all("#router option", "os => os.map(o => o.value)") == sorted(
        set(server.http.get("/v1/models").json()["data"][0]["routers"]) - {"fixed"}
    )
    tab.ask(PROMPT, "lag", 2, 6)
    assert len(tab.page.query_selector_all(".panel")) == 1
    tab.check_panel(server, ".panel", "lag", 2, 6)
    # one library only: the other is shown as off
    tab.page.uncheck('#libraries input[value="alpha"]')
    tab.page.click("#run")
    tab.page.wait_for_function("document.getElementById('run-status').textContent === 'done'")
    assert "off for this request" in tab.page.inner_text('section[data-library="alpha"]')
    assert len(tab.page.query_selector_all('section[data-library="beta"] .heatmap .cell')) > 0
    assert tab.errors == []
    tab.page.close()


def test_page_puts_two_routers_side_by_side(server, browser):
    tab = Page(browser, server.url)
    tab.ask(PROMPT, "lag", 2, 6, router_b="arrow")
    assert [h.inner_text() for h in tab.page.query_selector_all(".panel h2")] == ["router lag", "router arrow"]
    tab.check_panel(server, ".panel:nth-child(1)", "lag", 2, 6)
    tab.check_panel(server, ".panel:nth-child(2)", "arrow", 2, 6)
    box_a = tab.page.query_selector(".panel:nth-child(1)").bounding_box()
    box_b = tab.page.query_selector(".panel:nth-child(2)").bounding_box()
    assert box_a["x"] + box_a["width"] <= box_b["x"] and abs(box_a["y"] - box_b["y"]) < 1  # side by side
    if SCREENSHOT:
        tab.page.hover('.panel:nth-child(1) section[data-library="alpha"] .cell[data-m="1"][data-t="3"]')
        tab.page.screenshot(path=SCREENSHOT, full_page=True)
    assert tab.errors == []
    tab.page.close()


def test_page_behind_an_api_key(assets, browser):  # noqa: F811
    model, tok = served_model(assets)
    app = create_app(model, tok, [open_library(assets / "alpha")], k=2, model_name=MODEL, api_key=KEY)
    srv = Server(app)
    try:
        page = srv.http.get("/ui", follow_redirects=True)  # the page itself holds no data: served without the key
        assert page.status_code == 200 and "routing explorer" in page.text
        assert srv.http.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
        assert srv.http.get("/ui/secrets.txt").status_code == 401  # only the page's own files are open
        assert srv.http.get("/v1/models").status_code == 401
        tab = Page(browser, srv.url)
        p = tab.page
        p.wait_for_function("document.getElementById('server-status').textContent.includes('API key')")
        assert p.is_disabled("#run")
        # the only console errors so far: the browser's note of the 401 the page asked for the model
        assert tab.errors and all("401" in e for e in tab.errors)
        tab.errors.clear()
        p.fill("#api-key", KEY)
        p.click("#connect")
        p.wait_for_selector("#run:not([disabled])")
        p.fill("#prompt", PROMPT)
        p.fill("#max-tokens", "4")
        p.click("#run")
        p.wait_for_function("document.getElementById('run-status').textContent === 'done'")
        cells = p.query_selector_all('section[data-library="alpha"] .heatmap .cell')
        tokens = p.query_selector_all('section[data-library="alpha"] .heatmap .tok')
        assert len(cells) == 6 * len(tokens) > 0
        assert tab.errors == []
        p.close()
    finally:
        srv.stop()
