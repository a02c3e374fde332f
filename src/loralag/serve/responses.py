"""Running a request on the engine and answering it: JSON or server-sent events, stop strings held back
across chunks, usage, the routing summary (and with `return_routing: "tokens"` every position's routing), and a
client that hangs up ends its sequences.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid

import torch
from fastapi import Request
from fastapi.responses import (
    JSONResponse,
    Response,
    StreamingResponse,
)

from loralag.routing.trace import shares_and_entropy
from loralag.serve.context import ServerContext
from loralag.serve.engine import (
    EngineRequest,
    EngineStopped,
    QueueFull,
    Routing,
)
from loralag.serve.protocol import APIError
from loralag.serve.requests import sampling_params
from loralag.serve.transport import POLL_S, ClientGone, timeout_error

log = logging.getLogger("loralag.serve")

ROUTING_TOP = 20  # adapters listed by name in a routing summary; the rest are summed as "other"


async def run_request(
    request: Request,
    ctx: ServerContext,
    kind: str,
    body,
    prompts,
    max_tokens,
    default_max: int,
    routing: Routing,
    max_tokens_param: str = "max_tokens",
):
    n = 1 if body.n is None else body.n
    if n < 1:
        raise APIError(400, f"'n' must be at least 1, got {n}", param="n", code="invalid_value")
    if n * len(prompts) > ctx.engine.max_batch:
        raise APIError(
            400,
            f"the request asks for {n * len(prompts)} sequences (prompts × n) but this server runs at "
            f"most {ctx.engine.max_batch} at once",
            param="n",
            code="invalid_value",
        )
    sampling = sampling_params(ctx, body, prompts, max_tokens, default_max, max_tokens_param)
    tokens = body.return_routing == "tokens"
    ereq = EngineRequest(prompts, n, sampling, routing, ctx.request_timeout, token_routing=tokens)
    try:
        ctx.engine.submit(ereq)
    except QueueFull as e:
        retry = {"Retry-After": "1"}
        raise APIError(429, f"{e}; retry later", "rate_limit_error", None, "rate_limit_exceeded", retry) from e
    except EngineStopped as e:
        raise APIError(503, str(e), "server_error", None, "server_shutting_down") from e
    ctx.metrics.prompt_tokens.inc(sum(len(p) for p in prompts) * n)
    gen = _Generation(request, ctx, kind, body, ereq)
    if body.stream:
        # Wait for the first event before answering, so that an error up to then (time limit in the queue,
        # engine failure) still gets its own status code rather than a 200 stream holding an error.
        try:
            first = await gen.next_event()
        except ClientGone:
            request.scope["loralag_outcome"] = 499
            return Response(status_code=499)
        except BaseException:
            ctx.engine.cancel(ereq)
            raise
        return StreamingResponse(
            gen.stream(first),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        return JSONResponse(await gen.collect())
    except ClientGone:
        request.scope["loralag_outcome"] = 499
        return Response(status_code=499)


class _Generation:
    """Turns the engine's events for one request into an OpenAI response or stream."""

    def __init__(self, request: Request, ctx: ServerContext, kind: str, body, ereq: EngineRequest):
        self.request, self.ctx, self.kind, self.body, self.ereq = request, ctx, kind, body, ereq
        self.chat = kind == "chat.completion"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        size = ereq.size
        self.texts = [""] * size
        self.reasons: list[str | None] = [None] * size
        self.tokens = [0] * size
        self.counts: list[dict] = [{} for _ in range(size)]
        self.token_records: list[dict | None] = [None] * size
        self.done = 0
        self.want_routing = bool(body.return_routing)
        self.checked = time.monotonic()

    async def next_event(self):
        """The next engine event; raises ClientGone if the client left, APIError for an error event."""
        ereq = self.ereq
        while True:
            now = time.monotonic()
            if now - self.checked > POLL_S:  # events may flow without pause: check the client every POLL_S
                self.checked = now
                if await self.request.is_disconnected():
                    self.ctx.engine.cancel(ereq)
                    raise ClientGone()
            if now > ereq.deadline + 5.0:  # the engine is stuck in a long step: give up here
                self.ctx.engine.cancel(ereq)
                raise timeout_error("the request ran past the server's time limit")
            try:
                event = await asyncio.wait_for(ereq.events.get(), POLL_S)
            except asyncio.TimeoutError:
                continue
            if event[0] == "error":
                _, status, type_, code, message = event
                err = timeout_error(message) if status == 408 else APIError(status, message, type_, None, code)
                raise err
            if event[0] == "text":
                self.texts[event[1]] += event[2]
            elif event[0] == "done":
                _, i, reason, ntok, counts, record = event
                self.reasons[i], self.tokens[i], self.counts[i] = reason, ntok, counts
                self.token_records[i] = record
                self.done += 1
                if self.done == self.ereq.size:
                    self._record()
            return event

    def _record(self) -> None:
        m, ereq, ep = self.ctx.metrics, self.ereq, self.request.url.path
        now = time.monotonic()
        if ereq.first_token_at is not None:
            m.ttft.observe(ereq.first_token_at - ereq.arrival, endpoint=ep)
            n = max(self.tokens)
            if n > 1:
                m.tpot.observe((now - ereq.first_token_at) / (n - 1))

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.ereq.prompts) * self.ereq.n
        completion = sum(self.tokens)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def routing(self, indices=None) -> dict:
        total: dict[str, torch.Tensor] = {}
        for i in range(self.ereq.size) if indices is None else indices:
            for lib, c in self.counts[i].items():
                total[lib] = total[lib] + c if lib in total else c.clone()
        return routing_summary(self.ereq.routing, total, self.ctx.engine.adapter_names)

    def token_routing(self, i: int) -> dict:
        return token_routing(
            self.ereq.routing, self.token_records[i], self.ctx.engine.adapter_names, self.ctx.tokenizer
        )

    async def collect(self) -> dict:
        try:
            while self.done < self.ereq.size:
                await self.next_event()
        except BaseException:
            self.ctx.engine.cancel(self.ereq)
            raise
        choices = []
        for i, text in enumerate(self.texts):
            if self.chat:
                choice = {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": self.reasons[i],
                }
            else:
                choice = {"index": i, "text": text, "logprobs": None, "finish_reason": self.reasons[i]}
            if self.want_routing:
                choice["routing"] = self.routing([i])
            if self.token_records[i] is not None:
                choice["token_routing"] = self.token_routing(i)
            choices.append(choice)
        out = {
            "id": self.id,
            "object": self.kind,
            "created": self.created,
            "model": self.ctx.model_name,
            "choices": choices,
            "usage": self.usage(),
        }
        if self.chat:
            out["system_fingerprint"] = None
        if self.want_routing:
            out["routing"] = self.routing()
        return out

    def _chunk(self, choices: list, **extra) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        data = {"id": self.id, "object": obj, "created": self.created, "model": self.ctx.model_name, "choices": choices}
        if self.chat:
            data["system_fingerprint"] = None
        data.update(extra)
        return f"data: {json.dumps(data)}\n\n"

    def _choice(self, i: int, text: str | None, reason: str | None) -> dict:
        if self.chat:
            delta = {} if text is None else {"content": text}
            return {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}

    async def stream(self, first):
        include_usage = bool(self.body.stream_options and self.body.stream_options.include_usage)
        try:
            if self.chat:
                for i in range(self.ereq.size):
                    yield self._chunk(
                        [
                            {
                                "index": i,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
            event = first
            while True:
                if event[0] == "text":
                    yield self._chunk([self._choice(event[1], event[2], None)])
                elif event[0] == "done":
                    choice = self._choice(event[1], None, event[2])
                    if self.want_routing:
                        choice["routing"] = self.routing([event[1]])
                    if self.token_records[event[1]] is not None:
                        choice["token_routing"] = self.token_routing(event[1])
                    yield self._chunk([choice])
                if self.done == self.ereq.size:
                    break
                event = await self.next_event()
            extra = {}
            if include_usage:
                extra["usage"] = self.usage()
            if self.want_routing:
                extra["routing"] = self.routing()
            if extra:
                yield self._chunk([], **extra)
            yield "data: [DONE]\n\n"
        except ClientGone:
            self.request.scope["loralag_outcome"] = 499
        except APIError as e:
            self.request.scope["loralag_outcome"] = e.status
            yield f"data: {json.dumps(e.body())}\n\n"
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            self.request.scope["loralag_outcome"] = 499
            raise
        except Exception:
            log.exception("stream failed")
            self.request.scope["loralag_outcome"] = 500
            yield f"data: {json.dumps(APIError(500, 'internal error', 'server_error').body())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            if self.done < self.ereq.size:
                self.ctx.engine.cancel(self.ereq)
                if "loralag_outcome" not in self.request.scope:
                    self.request.scope["loralag_outcome"] = 499  # the response was closed under us


def routing_summary(
    routing: Routing, counts: dict[str, torch.Tensor], names: dict[str, list[str]], top: int = ROUTING_TOP
) -> dict:
    """Per library: how it was routed, the tokens routed (once per adapted module), the adapters used and
    their share (the `top` largest by name, the rest as 'other'), and the entropy of the shares in nats
    (routing.trace.shares_and_entropy, as generate and eval report them)."""
    out = {}
    for lib, desc in routing.describe().items():
        entry = dict(desc)
        c = counts.get(lib)
        total = int(c.sum()) if c is not None else 0
        entry["routed_tokens"] = total
        used = {names[lib][i]: int(c[i]) for i in c.nonzero().squeeze(1).tolist()} if total else {}
        shares, entropy = shares_and_entropy(used)
        listed = dict(list(shares.items())[:top])
        entry["adapters_used"] = len(shares)
        entry["shares"] = {n: round(s, 6) for n, s in listed.items()}
        if len(shares) > top:
            entry["shares"]["other"] = round(sum(shares.values()) - sum(listed.values()), 6)
        if total:
            entry["entropy"] = round(entropy, 6)
        out[lib] = entry
    return out


def _score(x: float) -> float | None:
    return round(x, 5) if math.isfinite(x) else None  # JSON has no NaN: no decision is null


def token_routing(routing: Routing, record: dict, names: dict[str, list[str]], tokenizer) -> dict:
    """One choice's routing per position (`return_routing: "tokens"`): its tokens (the prompt's, then the generated
    ones fed back: the last generated token is never fed), and per library its routing, its adapted modules in
    model order, `winners[m][t]` (an index into `adapters`, null: no adapter) and `scores[m][t]` (the router's
    score of the winner) for module m and position t, and the sequence vote: the adapter that won the most
    (position, module) decisions over the prompt (a tie goes to the name that sorts first, as
    RoutingState.vote; a chat template's tokens vote too). Libraries that were off have no matrices."""
    ids = record["token_ids"]
    prompt = record["prompt_tokens"]
    libraries = {}
    for lib, desc in routing.describe().items():
        entry = dict(desc)
        data = record["libraries"].get(lib)
        if data is None:
            libraries[lib] = entry | {"modules": [], "adapters": [], "winners": [], "scores": [], "vote": None}
            continue
        W, S = data["winners"], data["scores"]
        used = sorted(set(W[W >= 0].tolist()))
        local = {g: j for j, g in enumerate(used)}
        counts = torch.bincount(W[:, :prompt][W[:, :prompt] >= 0].flatten(), minlength=len(names[lib]))
        votes = {names[lib][g]: int(counts[g]) for g in counts.nonzero().squeeze(1).tolist()}
        vote = None
        if votes:
            best = min(votes.items(), key=lambda kv: (-kv[1], kv[0]))
            vote = {"adapter": best[0], "decisions": best[1], "share": round(best[1] / sum(votes.values()), 6)}
        entry |= {
            "modules": data["modules"],
            "adapters": [names[lib][g] for g in used],
            "winners": [[local[g] if g >= 0 else None for g in row] for row in W.tolist()],
            "scores": [[_score(x) for x in row] for row in S.tolist()],
            "vote": vote,
        }
        libraries[lib] = entry
    return {
        "tokens": [tokenizer.decode([t], skip_special_tokens=False, clean_up_tokenization_spaces=False) for t in ids],
        "token_ids": ids,
        "prompt_tokens": prompt,
        "libraries": libraries,
    }
