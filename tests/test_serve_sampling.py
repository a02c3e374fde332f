"""serve/sampling.py on its own: tokens against a float64 brute force of the sampling rule, failures kept to
their row, and the held-back tail of a streamed text."""

from __future__ import annotations

import math

import pytest
import torch

from loralag.serve.sampling import SamplingParams, draw, holdback, sample_tokens


def reference_probs(row: torch.Tensor, temperature: float, top_p: float) -> list[float]:
    """The sampling rule written out in Python floats: softmax at the temperature, then the smallest set of most
    probable tokens whose mass reaches top_p, renormalised."""
    xs = [float(v) for v in row]
    top = max(xs)
    w = [math.exp((x - top) / temperature) for x in xs]
    total = sum(w)
    p = [v / total for v in w]
    if top_p < 1.0:
        order = sorted(range(len(p)), key=lambda i: -p[i])
        keep, mass = set(), 0.0
        for i in order:
            if mass >= top_p:
                break
            keep.add(i)
            mass += p[i]
        p = [v if i in keep else 0.0 for i, v in enumerate(p)]
        total = sum(p)
        p = [v / total for v in p]
    return p


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.6), (0.5, 0.2)])
def test_draw_follows_the_rule(temperature, top_p):
    """With one seed, draw picks what torch.multinomial picks from the brute-force distribution."""
    logits = torch.randn(40, generator=torch.Generator().manual_seed(3)) * 3
    want = torch.tensor(reference_probs(logits, temperature, top_p), dtype=torch.float64)
    sp = SamplingParams(max_tokens=1, temperature=temperature, top_p=top_p)
    for seed in range(30):
        got = draw(logits, sp, torch.Generator().manual_seed(seed))
        assert got == int(torch.multinomial(want, 1, generator=torch.Generator().manual_seed(seed)))
        assert want[got] > 0  # never outside the nucleus


def test_a_tiny_temperature_is_the_argmax_not_nan():
    logits = torch.tensor([0.1, 2.5, 2.4, -1.0])
    assert draw(logits, SamplingParams(max_tokens=1, temperature=1e-300), torch.Generator().manual_seed(0)) == 1


def test_sample_tokens_greedy_sampled_and_failed_rows():
    g = torch.Generator().manual_seed(9)
    logits = torch.randn(4, 30, generator=g)
    logits[2, 5] = float("nan")
    params = [
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=1, temperature=0.9, seed=1),
        SamplingParams(max_tokens=1, temperature=0.9),
        SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
    ]
    gens = [None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2), None]
    eos = int(logits[3].argmax())
    tokens, failures = sample_tokens(logits.clone(), params, gens, eos_ids={eos})
    assert tokens[0] == int(logits[0].argmax())
    assert tokens[1] == draw(logits[1], params[1], torch.Generator().manual_seed(1))
    assert tokens[2] is None and failures[2][0] == "numerical_error" and set(failures) == {2}
    masked = logits[3].clone()
    masked[eos] = float("-inf")
    assert tokens[3] == int(masked.argmax()) != eos  # ignore_eos: the end token is never picked

    # the failed row changes nothing for the others: sampled without it, they come out the same
    alone, none = sample_tokens(
        logits[[0, 1, 3]].clone(),
        [params[i] for i in (0, 1, 3)],
        [None, torch.Generator().manual_seed(1), None],
        eos_ids={eos},
    )
    assert alone == [tokens[0], tokens[1], tokens[3]] and none == {}


def test_rows_of_only_minus_infinity_or_plus_infinity_fail():
    logits = torch.zeros(3, 5)
    logits[0] = float("-inf")
    logits[1, 2] = float("inf")
    tokens, failures = sample_tokens(logits, [SamplingParams(max_tokens=1, temperature=0.0)] * 3, [None] * 3)
    assert tokens[:2] == [None, None] and set(failures) == {0, 1} and tokens[2] == 0


def test_a_failed_draw_fails_its_row_alone(monkeypatch):
    from loralag.serve import sampling

    def broken(logits, sp, generator):
        raise ValueError("the token probabilities are not finite")

    monkeypatch.setattr(sampling, "draw", broken)
    tokens, failures = sample_tokens(
        torch.randn(2, 6), [SamplingParams(1, temperature=1.0), SamplingParams(1, temperature=0.0)], [None, None]
    )
    assert tokens[0] is None and failures[0][0] == "sampling_error" and tokens[1] is not None and 1 not in failures


@pytest.mark.parametrize(
    "text, stops, held",
    [
        ("hello wor", ["world"], 3),
        ("hello", ["xyz"], 0),
        ("ab\ufffd", [], 1),
        ("say STO", ["STOP", "TOP!"], 3),
        ("x\ufffd\ufffd", ["y"], 2),
        ("", ["a"], 0),
    ],
)
def test_holdback_keeps_what_may_still_become_a_stop_string(text, stops, held):
    """Brute force: the longest tail that starts a stop string (shorter than it), or the unfinished characters."""
    tail = max([k for k in range(1, len(text) + 1) for s in stops if len(s) > k and s.startswith(text[-k:])], default=0)
    partial = len(text) - len(text.rstrip("\ufffd"))
    assert holdback(text, stops) == max(tail, partial) == held
