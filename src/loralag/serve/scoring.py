"""Prompt scoring on /v1/completions: `echo: true` with `logprobs: N` returns every prompt token's log
probability under the routed model (and its N most likely alternatives), plus, with `max_tokens: 1`, the next
token picked greedily. This is what lm-evaluation-harness's `local-completions` model asks for its
loglikelihoods, so a running `loralag serve` can be evaluated with lm-eval as it is.

The prompt runs as one forward pass on the engine's thread (Engine.run_on_engine), routed as the request says
(groups.group_specs under RoutingState.configure), outside the decoding batch: nothing is cached or generated
beyond the one token."""

from __future__ import annotations

import asyncio
import time
import uuid
from contextlib import nullcontext

import torch

from loralag.serve.groups import Routing, group_specs
from loralag.serve.protocol import APIError

MAX_LOGPROBS = 5  # as OpenAI's legacy completions


def check_scoring(body) -> bool:
    """Whether the request asks for prompt scoring, its options checked (a 400 naming the field otherwise)."""
    if not body.echo and body.logprobs is None:
        return False
    if not body.echo or body.logprobs is None:
        field = "echo" if body.echo else "logprobs"  # the one given where it cannot be honoured
        raise APIError(
            400,
            "this server returns logprobs for prompt scoring only: echo true with logprobs N",
            param=field,
            code="unsupported_parameter",
        )
    if not 0 <= body.logprobs <= MAX_LOGPROBS:
        raise APIError(400, f"logprobs must be in [0, {MAX_LOGPROBS}]", param="logprobs", code="invalid_value")
    if body.max_tokens not in (0, 1):
        raise APIError(
            400,
            "with echo and logprobs, max_tokens is 0 (score the prompt) or 1 (and the next token, greedily)",
            param="max_tokens",
            code="unsupported_parameter",
        )
    if body.max_tokens == 1 and body.temperature not in (None, 0):
        raise APIError(
            400,
            "the token after a scored prompt is greedy: temperature 0",
            param="temperature",
            code="unsupported_parameter",
        )
    for field, value in (("n", body.n), ("best_of", body.best_of)):
        if value not in (None, 1):
            raise APIError(400, f"prompt scoring takes {field} 1", param=field, code="unsupported_parameter")
    if body.stream:
        raise APIError(400, "prompt scoring is not streamed", param="stream", code="unsupported_parameter")
    return True


def score_prompts(engine, tokenizer, prompts: list[list[int]], routing: Routing, top: int, next_token: bool):
    """On the engine's thread: per prompt, the OpenAI `logprobs` object of the prompt (and the next token), all
    under the request's routing (set once for the whole request)."""
    state = engine.state
    specs = group_specs(routing.key, [routing], engine.base_specs) if state is not None else {}
    device = next(engine.model.parameters()).device
    out = []
    with state.configure(specs) if state is not None else nullcontext(), torch.no_grad():
        for ids in prompts:  # one at a time: a prompt's (tokens × vocabulary) log-probabilities can be large
            logits = engine.model(input_ids=torch.tensor([ids], device=device)).logits[0]
            out.append(_scored(tokenizer, ids, torch.log_softmax(logits.double(), dim=-1), top, next_token))
    return out


def _scored(tokenizer, ids: list[int], lp: torch.Tensor, top: int, next_token: bool) -> dict:
    """One prompt's choice: its text, OpenAI's `logprobs` object from the log-probabilities `lp` (tokens ×
    vocabulary), and how many tokens were generated (the greedy next one, or none)."""
    given = lp[:-1].gather(1, torch.tensor(ids[1:], device=lp.device).unsqueeze(1)).squeeze(1)
    token_ids = list(ids)
    logprobs: list[float | None] = [None, *given.tolist()]
    rows = lp[:-1]
    if next_token:
        token_ids.append(int(lp[-1].argmax()))
        logprobs.append(float(lp[-1, token_ids[-1]]))
        rows = lp
    tops: list[dict | None] = [None]
    if top:
        values, index = rows.topk(top, dim=-1)
        for i, vs in zip(index.tolist(), values.tolist()):
            top_row: dict[str, float] = {}
            for j, v in zip(i, vs):  # two tokens that read the same keep the likelier's value
                top_row.setdefault(tokenizer.decode([j]), float(v))
            tops.append(top_row)
    else:
        tops += [{} for _ in range(len(rows))]
    pieces = [tokenizer.decode([t]) for t in token_ids]
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {
        "text": tokenizer.decode(token_ids),
        "logprobs": {"tokens": pieces, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets},
        "completion_tokens": len(token_ids) - len(ids),
    }


async def score_request(ctx, body, prompts: list[list[int]], routing: Routing) -> dict:
    """The response of a prompt-scoring request (see check_scoring)."""
    job = ctx.engine.run_on_engine(
        lambda: score_prompts(ctx.engine, ctx.tokenizer, prompts, routing, body.logprobs, body.max_tokens == 1)
    )
    scored = await asyncio.wrap_future(job)
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(s["completion_tokens"] for s in scored)
    ctx.metrics.prompt_tokens.inc(prompt_tokens)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [
            {"index": i, "text": s["text"], "logprobs": s["logprobs"], "finish_reason": "length"}
            for i, s in enumerate(scored)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }
