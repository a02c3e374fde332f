"""routing/trace.py: RoutingTrace's winners across prefill and decoding steps, the per-sequence vote counts (padding
left out), shares, entropy and describe(), each against counts made by hand or by a brute-force loop over every
(module, token) decision."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from loralag.routing.trace import RoutingTrace

NAMES = ["alpha", "beta", "gamma", "delta"]


def traced(steps: int = 2, seed: int = 0, batch: int = 3, prompt: int = 5, modules=("m0", "m1", "m2")):
    """A trace of `modules` on library "lib": a prefill of `prompt` tokens, then `steps` one-token decoding steps;
    winners drawn from -1 (no single adapter) to 3. Returns it and the full winner matrices per module."""
    g = torch.Generator().manual_seed(seed)
    trace = RoutingTrace({(m, "lib"): NAMES for m in modules})
    full = {}
    for m in modules:
        cols = [torch.randint(-1, 4, (batch, prompt), generator=g)] + [
            torch.randint(-1, 4, (batch, 1), generator=g) for _ in range(steps)
        ]
        for w in cols:
            trace.record(m, "lib", w, w.float() / 10)
        full[m] = torch.cat(cols, dim=1)
    return trace, full


def brute_counts(full: dict, seq: int, mask=None) -> Counter:
    c = Counter()
    for w in full.values():
        for t, i in enumerate(w[seq].tolist()):
            if i >= 0 and (mask is None or mask[t]):
                c[NAMES[i]] += 1
    return c


def test_winners_and_scores_are_concatenated_along_the_tokens():
    trace, full = traced(steps=3)
    assert trace.keys == [("m0", "lib"), ("m1", "lib"), ("m2", "lib")]
    for m, w in full.items():
        assert trace.winner_matrix(m, "lib").shape == (3, 8)
        assert torch.equal(trace.winner_matrix(m, "lib"), w)
        assert torch.allclose(trace.score_matrix(m, "lib"), w.float() / 10)
        assert trace.adapter_names(m, "lib", 1) == [NAMES[i] if i >= 0 else None for i in w[1].tolist()]


def test_recorded_tensors_are_detached_copies_on_the_cpu():
    trace = RoutingTrace({("m", "lib"): ["a", "b"]})
    score = torch.tensor([[0.5, 1.5]], requires_grad=True)
    trace.record("m", "lib", torch.tensor([[0, 1]]), score * 2)
    s = trace.score_matrix("m", "lib")
    assert not s.requires_grad and s.dtype == torch.float32 and s.tolist() == [[1.0, 3.0]]
    half = RoutingTrace({("m", "lib"): ["a"]})
    half.record("m", "lib", torch.tensor([[0]]), torch.tensor([[0.25]], dtype=torch.bfloat16))
    assert half.score_matrix("m", "lib").dtype == torch.float32


def test_libraries_and_modules():
    trace = RoutingTrace({("q", "task"): ["t"], ("gate", "know"): ["k"], ("up", "know"): ["k"]})
    for module, lib in (("gate", "know"), ("q", "task"), ("up", "know")):
        trace.record(module, lib, torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2))
    assert trace.libraries() == ["know", "task"]  # sorted
    assert trace.modules("know") == ["gate", "up"] and trace.modules("task") == ["q"]
    assert trace.modules("other") == []


@pytest.mark.parametrize("seed", range(4))
def test_counts_match_a_brute_force_over_every_decision(seed):
    trace, full = traced(steps=2, seed=seed)
    for seq in range(3):
        assert trace.counts("lib", seq) == brute_counts(full, seq)
        mask = torch.tensor([0, 0, 1, 1, 1, 1, 0], dtype=torch.long)  # left padding, a finished last token
        assert trace.counts("lib", seq, mask) == brute_counts(full, seq, mask.tolist())


def test_a_mask_longer_than_the_winners_is_cut_to_them():
    """generate's attention mask also covers the last generated token, which was never fed back and routed."""
    trace, full = traced(steps=1)  # 6 routed columns
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 1])
    assert trace.counts("lib", 0, mask) == brute_counts(full, 0, mask[:6].tolist())


def test_summary_shares_and_entropy_by_hand():
    trace = RoutingTrace({("m0", "lib"): NAMES, ("m1", "lib"): NAMES})
    # sequence 0: m0 picks alpha, alpha, beta, -1; m1 picks alpha, gamma, alpha, alpha -> alpha 5, beta 1, gamma 1
    trace.record("m0", "lib", torch.tensor([[0, 0, 1, -1]]), torch.zeros(1, 4))
    trace.record("m1", "lib", torch.tensor([[0, 2, 0, 0]]), torch.zeros(1, 4))
    s = trace.summary(0)["lib"]
    assert s["routed"] == 7 and s["adapters"] == 3
    assert next(iter(s["shares"])) == "alpha"  # most used first
    assert s["shares"] == pytest.approx({"alpha": 5 / 7, "beta": 1 / 7, "gamma": 1 / 7})
    assert s["entropy"] == pytest.approx(-(5 / 7) * math.log(5 / 7) - 2 * (1 / 7) * math.log(1 / 7))
    # the last two positions masked out: m0 alpha, alpha; m1 alpha, gamma -> alpha 3, gamma 1
    masked = trace.summary(0, torch.tensor([1, 1, 0, 0]))["lib"]
    assert masked["shares"] == pytest.approx({"alpha": 3 / 4, "gamma": 1 / 4}) and masked["routed"] == 4
    assert masked["entropy"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_one_adapter_has_entropy_plus_zero_and_none_routed_has_no_shares():
    trace = RoutingTrace({("m", "a"): NAMES, ("m", "b"): NAMES})
    trace.record("m", "a", torch.tensor([[3, 3, 3]]), torch.zeros(1, 3))
    trace.record("m", "b", torch.tensor([[-1, -1, -1]]), torch.zeros(1, 3))  # e.g. a mixing router
    s = trace.summary(0)
    assert s["a"] == {"adapters": 1, "shares": {"delta": 1.0}, "entropy": 0.0, "routed": 3}
    assert math.copysign(1.0, s["a"]["entropy"]) == 1.0  # 0.0, not -0.0 (printed "-0.00" otherwise)
    assert s["b"] == {"adapters": 0, "shares": {}, "entropy": 0.0, "routed": 0}
    assert trace.summary_lines(0) == [
        "a: 1 adapter used, 3 token×module decisions, entropy 0.00 nats",
        "  delta 100%",
        "b: no single adapter chosen (1 modules)",
    ]
    assert trace.summary_lines(0, libraries=["b"]) == ["b: no single adapter chosen (1 modules)"]


def test_describe_formats_each_library_and_cuts_to_the_top_adapters():
    names = [f"ad{i}" for i in range(8)]
    trace = RoutingTrace({("m", "know"): names, ("q", "task"): ["t0", "t1"]})
    # know: ad0 ×8, ad1 ×4, ad2 ×2, ad3 ×1, ad4 ×1 over 16 tokens; task: t1 ×16
    w = torch.tensor([[0] * 8 + [1] * 4 + [2] * 2 + [3, 4]])
    trace.record("m", "know", w, torch.zeros(1, 16))
    trace.record("q", "task", torch.ones(1, 16, dtype=torch.long), torch.zeros(1, 16))
    h = -sum(p * math.log(p) for p in (8 / 16, 4 / 16, 2 / 16, 1 / 16, 1 / 16))
    assert trace.describe(0, top=3) == (
        f"know: 5 adapters used, 16 token×module decisions, entropy {h:.2f} nats\n"
        "  ad0 50% · ad1 25% · ad2 12% · +2 more\n"
        "task: 1 adapter used, 16 token×module decisions, entropy 0.00 nats\n"
        "  t1 100%"
    )
    assert "+" not in trace.describe(0, top=5).splitlines()[1]  # all five shown, nothing more


def test_describe_leaves_out_padding():
    """A trace from generate() carries its attention mask: padded positions were routed but are not counted."""
    trace = RoutingTrace({("m", "lib"): ["pad", "real"]})
    # sequence 0 left-padded by 3 (the padding routed to "pad"), sequence 1 not padded
    trace.record("m", "lib", torch.tensor([[0, 0, 0, 1, 1], [1, 0, 1, 1, 1]]), torch.zeros(2, 5))
    trace.record("m", "lib", torch.tensor([[1], [1]]), torch.zeros(2, 1))
    unmasked = trace.describe(0)
    assert unmasked.startswith("lib: 2 adapters used, 6 token×module decisions")
    trace.attention_mask = torch.tensor([[0, 0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    assert trace.describe(0) == "lib: 1 adapter used, 3 token×module decisions, entropy 0.00 nats\n  real 100%"
    assert trace.describe(1).startswith("lib: 2 adapters used, 6 token×module decisions")
    assert "real 83% · pad 17%" in trace.describe(1)
