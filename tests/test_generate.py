"""generate() with routed libraries on a tiny llama, and the routing table and heatmap of its trace."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import save_lora, tiny_llama
from rich.console import Console
from tiny_text import tiny_tokenizer

from loralag import attach, build_library, detach
from loralag.errors import LoralagError
from loralag.generate import (
    encode_prompts,
    generate,
    majority_adapter,
    majority_per_token,
    routing_heatmap,
    routing_table,
)
from loralag.library.store import module_shapes

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread
PROMPTS = ["what is the capital of the red moon ?", "who"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    model = tiny_llama()
    for i in range(3):
        save_lora(model, tmp / "adapters" / f"a{i}", seed=i, target_modules=("q_proj", "v_proj", "gate_proj"))
    lib = build_library(tmp / "lib", [tmp / "adapters"], base_model="tiny", shapes=module_shapes(model), progress=False)
    return model, lib, tmp


def render(table) -> str:
    console = Console(width=160, record=True, file=open("/dev/null", "w"))
    console.print(table)
    return console.export_text()


def test_left_padding_and_chat_template():
    tok = tiny_tokenizer(chat=True)
    enc = encode_prompts(tok, PROMPTS, chat=True)
    assert enc["input_ids"].shape == enc["attention_mask"].shape
    # left padded: the short prompt's padding comes first, every prompt ends on the last column
    assert enc["attention_mask"][1, 0] == 0 and enc["attention_mask"][:, -1].all()
    text = tok.decode(enc["input_ids"][0][enc["attention_mask"][0].bool()])
    assert "assistant" in text and "capital" in text
    plain = encode_prompts(tok, PROMPTS, chat=False)
    assert plain["input_ids"].shape[1] < enc["input_ids"].shape[1]
    assert tok.padding_side == "right"  # restored


def test_generate_batch_matches_single(setup):
    model, lib, _ = setup
    tok = tiny_tokenizer()
    texts = generate(model, tok, PROMPTS, max_new_tokens=6)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    # left padding + attention mask: each row decodes as it would alone
    assert [generate(model, tok, [p], max_new_tokens=6)[0] for p in PROMPTS] == texts
    # trace=True with nothing attached: no trace to give
    assert generate(model, tok, PROMPTS[:1], max_new_tokens=2, trace=True)[1] is None


def test_trace_table_and_summary(setup):
    model, lib, _ = setup
    tok = tiny_tokenizer(chat=True)
    attach(model, [lib], router="lag", k=2)
    try:
        texts, trace = generate(model, tok, PROMPTS, max_new_tokens=4, trace=True)
    finally:
        detach(model)
    assert len(texts) == 2 and trace is not None
    modules = trace.modules("lib")
    assert len(modules) == 6  # q, v, gate in each of 2 layers, in layer order
    assert modules[0].startswith("model.layers.0.") and modules[-1].startswith("model.layers.1.")
    P = trace.prompt_length
    assert trace.input_ids.shape[1] <= P + 4
    # prefill + one column per decoding step (the last generated token is never routed)
    assert trace.winner_matrix(modules[0], "lib").shape == (2, trace.input_ids.shape[1] - 1)

    real = int(trace.attention_mask[1, :P].sum())
    assert 0 < real < P  # the short prompt is padded
    table = routing_table(trace, tok, trace.input_ids, seq=1)
    assert table.row_count == real  # padding skipped, generated tokens not listed
    out = render(table)
    assert "who" in out and "<pad>" not in out
    assert "lib: " in out and "entropy" in out and "adapter" in out

    full = routing_table(trace, tok, trace.input_ids, seq=1, prompt_only=False)
    assert full.row_count > real

    # majority per token: an adapter of the library and a share of modules in (0, 1]
    positions = [p for p in range(P) if trace.attention_mask[0, p]]
    for name, share in majority_per_token(trace, "lib", 0, positions):
        assert name in lib.names and 1 / 6 <= share <= 1
    # the summary over prompt tokens counts exactly real tokens × modules
    mask = torch.zeros(trace.winner_matrix(modules[0], "lib").shape[1], dtype=torch.bool)
    mask[positions] = True
    s = trace.summary(0, mask)["lib"]
    assert s["routed"] == len(positions) * 6
    assert abs(sum(s["shares"].values()) - 1) < 1e-6
    name, share = majority_adapter(trace, seq=0)
    assert name == next(iter(s["shares"])) and share == pytest.approx(s["shares"][name])


def test_fixed_router_table_is_unanimous(setup):
    model, lib, _ = setup
    tok = tiny_tokenizer()
    state = attach(model, [lib])
    try:
        state.fix("lib", ["a2", "a0"])
        _, trace = generate(model, tok, PROMPTS, max_new_tokens=3, trace=True)
    finally:
        detach(model)
    assert majority_adapter(trace, seq=0) == ("a2", 1.0)
    assert majority_adapter(trace, seq=1) == ("a0", 1.0)
    entropy = trace.summary(1)["lib"]["entropy"]
    assert entropy == 0 and math.copysign(1.0, entropy) == 1.0  # 0.00, not -0.00
    text = trace.describe(1)
    assert "entropy 0.00 nats" in text and "-0.00" not in text
    assert "a0 100%" in text and "{" not in text  # a formatted line, not a dict of floats
    # only real tokens count: the short prompt's padding is left out
    real = int(trace.attention_mask[1, : trace.winner_matrix(trace.modules("lib")[0], "lib").shape[1]].sum())
    assert f"{real * 6} token×module decisions" in text
    out = render(routing_table(trace, tok, seq=1))  # input_ids default to the trace's
    assert "a0" in out and "100%" in out and "a2" not in out.split("lib:")[0]


def test_heatmap_png(setup, tmp_path):
    model, lib, _ = setup
    tok = tiny_tokenizer()
    attach(model, [lib], k=2)
    try:
        _, trace = generate(model, tok, PROMPTS, max_new_tokens=3, trace=True)
    finally:
        detach(model)
    path = routing_heatmap(trace, tok, trace.input_ids, tmp_path / "sub" / "routing.png", seq=0, prompt_only=False)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 2000
    # width and height from the IHDR chunk: a readable picture, wider than tall for 6 modules
    w, h = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert w > h > 100


def test_trace_errors(setup):
    model, lib, _ = setup
    tok = tiny_tokenizer()
    attach(model, [lib], k=2)
    try:
        _, trace = generate(model, tok, PROMPTS[:1], max_new_tokens=2, trace=True)
    finally:
        detach(model)
    with pytest.raises(LoralagError, match="no library named 'other'"):
        routing_table(trace, tok, seq=0, library="other")
    with pytest.raises(LoralagError, match="out of range"):
        routing_table(trace, tok, seq=3)


def test_stop_strings(setup):
    model, _, _ = setup
    tok = tiny_tokenizer()
    full = generate(model, tok, PROMPTS, max_new_tokens=8, chat=False)
    words = full[0].split()
    assert len(words) >= 3
    stop = words[1]
    cut = generate(model, tok, PROMPTS, max_new_tokens=8, chat=False, stop=[" " + stop])
    assert cut[0] == words[0]  # cut before the stop string
    # the other sequence of the batch is unaffected up to where it would have stopped
    assert full[1].startswith(cut[1])


def test_fix_refuses_a_name_the_library_does_not_hold(setup):
    model, lib, _ = setup
    state = attach(model, [lib])
    try:
        with pytest.raises(LoralagError, match=r"no adapter named 'a7'; it holds: a0, a1, a2"):
            state.fix("lib", ["a0", "a7"])
        with pytest.raises(LoralagError, match=r"no adapter named 'a00' \(did you mean 'a0'\?\); it holds: a0, a1"):
            state.fix("lib", ["a00", None])
        with pytest.raises(LoralagError, match="one adapter name per sequence"):
            state.fix("lib", "a0")
        with pytest.raises(LoralagError, match=r"no adapter named 'ada_lovelace'.*it holds: a0"):
            state.set_router("lib", "fixed", fixed=["ada_lovelace"])  # the README snippet's call, a wrong name
        assert state.specs["lib"].router == "lag"  # unchanged
    finally:
        detach(model)


def test_content_mask_marks_the_users_words_only():
    tok = tiny_tokenizer(chat=True)
    enc = encode_prompts(tok, PROMPTS, chat=True, content_mask=True)
    for row, prompt in enumerate(PROMPTS):
        ids = enc["input_ids"][row][enc["content_mask"][row]]
        assert tok.decode(ids).replace(" ", "") == prompt.replace(" ", "")  # the tiny decoder drops a space
        assert enc["content_mask"][row].sum() < enc["attention_mask"][row].sum()  # the template's tokens are out
    plain = encode_prompts(tok, PROMPTS, chat=False, content_mask=True)
    assert torch.equal(plain["content_mask"], plain["attention_mask"].bool())
    assert "content_mask" not in encode_prompts(tok, PROMPTS, chat=True)  # model(**enc) keeps working
