"""Sampling and stopping, apart from the engine: one token per batch row (greedy rows by one argmax, sampled
rows in float64 within their nucleus), a row whose numbers fail failing alone, and how much of a streamed text
to hold back while a stop string may still be forming."""

from __future__ import annotations

from dataclasses import dataclass

import torch

NUMERICAL = (
    "numerical_error",
    "the model's output for this request holds NaN or infinite values, so it was stopped "
    "(the server's other requests are not affected)",
)


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


def sample_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list, eos_ids=()
) -> tuple[list[int | None], dict[int, tuple[str, str]]]:
    """One token per row of `logits` (B, V), which this may change in place, and {row: (code, message)} for the
    rows that failed (None in their place): logits holding NaN or +Inf (or nothing but -Inf), or a failed draw.
    The other rows are sampled exactly as if the failed ones were not there; `ignore_eos` rows never end."""
    eos = [i for i in eos_ids if i < logits.shape[1]]
    ignore = [i for i, sp in enumerate(params) if sp.ignore_eos]
    if eos and ignore:
        logits[torch.tensor(ignore).unsqueeze(1), torch.tensor(eos).unsqueeze(0)] = float("-inf")
    broken = (torch.isnan(logits) | torch.isposinf(logits)).any(1) | torch.isneginf(logits).all(1)
    tokens: list[int | None] = logits.argmax(dim=-1).tolist()
    failures: dict[int, tuple[str, str]] = {}
    for i, sp in enumerate(params):
        if broken[i]:
            tokens[i], failures[i] = None, NUMERICAL
        elif sp.temperature > 0:
            try:
                tokens[i] = draw(logits[i], sp, generators[i])
            except (RuntimeError, ValueError) as e:
                tokens[i] = None
                failures[i] = (
                    "sampling_error",
                    f"sampling failed for this request ({e}), so it was stopped (the server's other requests "
                    "are not affected)",
                )
    return tokens, failures


def draw(logits: torch.Tensor, sp: SamplingParams, generator: torch.Generator | None) -> int:
    """Sample one token from one row of logits (V,) at sp.temperature, within nucleus sp.top_p.

    In float64 and shifted by the row's maximum: a tiny temperature (1e-300) divides differences of
    logits, never the logits themselves, so the distribution tends to the argmax instead of turning NaN."""
    x = logits.double()
    probs = torch.softmax((x - x.max()) / sp.temperature, dim=-1)
    if sp.top_p < 1.0:
        p, idx = probs.sort(descending=True)
        drop = (p.cumsum(0) - p) > sp.top_p  # keep the smallest head whose mass reaches top_p
        p = p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, idx, p)
    if not bool(torch.isfinite(probs).all()) or not float(probs.sum()) > 0:
        raise ValueError("the token probabilities are not finite")
    return int(torch.multinomial(probs, 1, generator=generator))


def holdback(text: str, stops) -> int:
    """Characters at the end of `text` not to send yet: an unfinished UTF-8 character, or a stop string's start."""
    n = 0
    while n < len(text) and text[len(text) - 1 - n] == "\ufffd":
        n += 1
    if stops:
        for k in range(min(len(text), max(len(s) for s in stops) - 1), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in stops):
                return max(n, k)
    return n
