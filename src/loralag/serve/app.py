"""`loralag serve`: an OpenAI-compatible HTTP server over a base model with routed LoRA libraries.

    loralag serve --model default --library lib/ [--library lib2/] --router lag --k 20 --port 8000

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both streaming, as
server-sent events ending with `data: [DONE]`, and not), GET /health, GET /metrics (Prometheus).

Routing options go in the request body next to the OpenAI fields (`extra_body=` in the openai client):

    router          one of loralag.ROUTERS for the libraries in use (default: the server's --router)
    k               candidates of the lag / arrow-mix routers (default: the server's --k)
    libraries       names of the attached libraries to use; the others are off for this request
    adapters        fixed adapters instead of routing: "name", "library/name", a list of those (one per
                    library), or {"library": "name"}; libraries without one are off unless listed in
                    `libraries`
    return_routing  true: the response holds `routing`, per library the adapters used and their share
                    of the routed tokens (each token counts once per adapted module)
    ignore_eos      true: keep generating past the end-of-sequence token (benchmarks)

Requests arriving together share forward passes (continuous batching, see serve_engine.py); requests
with different routing settings run as separate groups within each step.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import os
import re
import time
import uuid
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from loralag.library.store import Library, open_library
from loralag.routing.routers import ROUTERS
from loralag.routing.state import STATE_ATTR, attach
from loralag.serve.engine import (
    Engine,
    EngineRequest,
    EngineStopped,
    QueueFull,
    Routing,
    SamplingParams,
)
from loralag.serve.metrics import ServerMetrics

log = logging.getLogger("loralag.serve.app")

ENDPOINTS = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics", "/openapi.json"}
ROUTERS_WITH_K = ("lag", "lag-prefix", "arrow-mix")
ROUTING_TOP = 20  # adapters listed by name in a routing summary; the rest are summed as "other"
POLL_S = 0.25  # how often a waiting handler checks that its client is still there
MAX_BODY_BYTES = 2 * 2**20  # default body limit: 16 prompts of 8,192 token ids fit; json.loads of it takes ~50 ms
BODY_TIMEOUT_S = 30.0  # default time for a client to send its whole body
DRAIN_BYTES, DRAIN_S = 8 * 2**20, 2.0  # what is read and dropped of a body over the limit before answering 413
HEADER_TIMEOUT_S = 10.0  # default time for a client to send a request's headers (uvicorn has no such limit)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this many seconds
MAX_CONNECTIONS = 512  # open connections and tasks beyond which uvicorn answers 503
CHARS_PER_TOKEN_SLACK = 4  # a string prompt may hold this many times (longest token) characters per context token
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "ip6-localhost"}


# -- errors ------------------------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered as OpenAI does: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class _ClientGone(Exception):
    pass


def _h11():
    import h11

    return h11


def _h11_protocol():
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def _timeout_error(message: str) -> APIError:
    # A retry would run into the same limit: tell the openai client not to.
    return APIError(408, message, "timeout_error", None, "request_timeout", {"x-should-retry": "false"})


# -- request bodies ----------------------------------------------------------------------------------------
class _Body(BaseModel):
    # strict: "5" is not an integer, 1.0 is not an integer, 1 is not a boolean
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Body):
    include_usage: bool | None = False


class _Common(_Body):
    model: str
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # loralag
    router: str | None = None
    k: int | None = None
    libraries: list[str] | None = None
    adapters: str | list[str] | dict[str, str | None] | None = None
    return_routing: bool | None = False
    ignore_eos: bool | None = False


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = None
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    tools: list | None = None
    tool_choice: Any = None
    functions: list | None = None
    function_call: Any = None
    response_format: dict | None = None


def openapi_schema() -> dict:
    """The server's OpenAPI 3.1 description (GET /openapi.json): its paths and the request bodies it accepts."""
    components: dict = {}

    def body(model: type[BaseModel]) -> dict:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
        return {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }

    error = {
        "description": "An error, as OpenAI answers it",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "object", "required": ["message", "type"]}},
                }
            }
        },
    }
    json_ok = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    generation = {
        "description": "The completion, or a text/event-stream of chunks when `stream` is true",
        "content": {
            "application/json": {"schema": {"type": "object"}},
            "text/event-stream": {"schema": {"type": "string"}},
        },
    }

    def op(summary: str, ok: dict, **extra) -> dict:
        return {"summary": summary, "responses": {"200": ok, "default": error}, **extra}

    paths = {
        "/health": {"get": op("Whether the engine runs, and its load", json_ok)},
        "/metrics": {
            "get": op(
                "Prometheus metrics", {"description": "OK", "content": {"text/plain": {"schema": {"type": "string"}}}}
            )
        },
        "/v1/models": {"get": op("The served model", json_ok)},
        "/v1/models/{model_id}": {
            "get": op(
                "One model",
                json_ok,
                parameters=[{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            )
        },
        "/v1/completions": {"post": op("A text completion", generation, requestBody=body(CompletionRequest))},
        "/v1/chat/completions": {"post": op("A chat completion", generation, requestBody=body(ChatRequest))},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "loralag", "version": "1"},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _field_names() -> set[str]:
    return {
        f for m in (CompletionRequest, ChatRequest, ChatMessage, ContentPart, StreamOptions) for f in m.model_fields
    }


def _param_path(loc: tuple, fields: set[str]) -> tuple[str, list[str]]:
    """OpenAI's way of naming a field ('messages.[0].content') and pydantic's union branches met on the way."""
    out, branches = "", []
    for part in loc:
        if isinstance(part, int):
            out += f".[{part}]"
        elif not out:
            out = str(part)
        elif part in fields:
            out += f".{part}"
        else:
            branches.append(str(part))
    return out, branches


def _parse(model: type[BaseModel], data: dict):
    try:
        return model.model_validate(data)
    except ValidationError as e:
        fields = _field_names()
        errors = e.errors()
        err = errors[0]
        param, branches = _param_path(err["loc"], fields)
        if err["type"] == "missing":
            raise APIError(
                400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
            ) from None
        if branches:  # a union: name every accepted type
            accepted = []
            for other in errors:
                p, b = _param_path(other["loc"], fields)
                if b and b[0] not in accepted and p.startswith(param.split(".")[0]):
                    accepted.append(b[0])
            got = type(err.get("input")).__name__ if len(branches) == 1 else "a value of the wrong type"
            raise APIError(
                400,
                f"Invalid type for '{param}': expected one of {', '.join(accepted)}; got {got}.",
                param=param,
                code="invalid_type",
            ) from None
        got = type(err.get("input")).__name__
        raise APIError(
            400, f"Invalid type or value for '{param}': {err['msg']} (got {got}).", param=param, code="invalid_type"
        ) from None


def _too_large(limit: int) -> APIError:
    return APIError(
        413, f"the request body is larger than {limit} bytes", code="request_too_large", headers={"Connection": "close"}
    )


async def _read_body(request: Request, ctx: ServerContext) -> bytes:
    """The raw body, read as it streams in (chunked too): refused with 413 as soon as it passes the limit, 408
    when the client takes longer than ctx.body_timeout to send it all."""
    limit = ctx.max_body_bytes
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        ctx.metrics.rejected.inc(code="request_too_large")
        if int(declared) - limit <= DRAIN_BYTES and "expect" not in request.headers:  # else it may not even be sent
            await _drain(request, DRAIN_BYTES)
        raise _too_large(limit)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ctx.body_timeout
    chunks, size = [], 0
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            ctx.metrics.rejected.inc(code="body_timeout")
            raise APIError(
                408,
                f"the request body did not arrive within {ctx.body_timeout:g} s",
                "timeout_error",
                code="body_timeout",
                headers={"Connection": "close", "x-should-retry": "false"},
            ) from None
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            ctx.metrics.rejected.inc(code="request_too_large")
            if message.get("more_body", False):
                await _drain(request, DRAIN_BYTES)
            raise _too_large(limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _drain(request: Request, budget: int) -> None:
    """Read and drop up to `budget` more bytes of a refused body (for at most DRAIN_S): a client that is a little
    over the limit then reads its 413, where closing on unread data would reset the connection under it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_S
    while budget > 0:
        try:
            message = await asyncio.wait_for(request.receive(), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request" or not message.get("more_body", False):
            return
        budget -= len(message.get("body", b""))


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _decode_json(body: bytes) -> dict:
    """Parse a request body into a dict, or raise APIError(400): not JSON (NaN and Infinity are not JSON),
    nested too deeply, holding a lone UTF-16 surrogate, or not an object."""
    try:
        data = json.loads(body, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(
            400,
            "We could not parse the JSON body of your request: send a JSON object with Content-Type: application/json.",
        ) from None
    except ValueError as e:  # NaN, Infinity, -Infinity
        raise APIError(400, f"We could not parse the JSON body of your request: {e}.") from None
    except RecursionError:
        raise APIError(400, "The JSON body of your request is nested too deeply.") from None
    if not isinstance(data, dict):
        raise APIError(400, f"The request body must be a JSON object, not {type(data).__name__}.")
    if _SURROGATE_ESCAPE.search(body):  # \ud800-\udfff escaped: a pair is one character, a lone one no text
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(
                400, "The JSON body of your request holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text."
            ) from None
    return data


def _check_sizes(ctx: ServerContext, data: dict) -> None:
    """Cheap checks of a parsed body's lengths before validating or tokenising it: prompts of more token ids or
    characters than the context can hold and lists longer than the batch are refused here, so neither the
    validation nor the tokenizer works through (or allocates for) a request that cannot run."""
    limit, chars = ctx.max_model_len, ctx.max_prompt_chars

    def too_long(param: str, n: int, unit: str) -> APIError:
        what = f"{n} token ids" if unit == "ids" else f"{n} characters, more than {chars} (the most it could hold)"
        return APIError(
            400,
            f"This model's maximum context length is {limit} tokens, but the prompt holds {what}. "
            "Please shorten the prompt.",
            param=param,
            code="context_length_exceeded",
        )

    prompt = data.get("prompt")
    if isinstance(prompt, str) and len(prompt) > chars:
        raise too_long("prompt", len(prompt), "chars")
    if isinstance(prompt, list):
        if prompt and not isinstance(prompt[0], (list, str)):  # one prompt of token ids
            if len(prompt) >= limit:
                raise too_long("prompt", len(prompt), "ids")
        else:
            if len(prompt) > ctx.engine.max_batch:
                raise APIError(
                    400,
                    f"the request holds {len(prompt)} prompts but this server runs at most "
                    f"{ctx.engine.max_batch} sequences at once",
                    param="prompt",
                    code="invalid_value",
                )
            for p in prompt:
                if isinstance(p, list) and len(p) >= limit:
                    raise too_long("prompt", len(p), "ids")
                if isinstance(p, str) and len(p) > chars:
                    raise too_long("prompt", len(p), "chars")
    messages = data.get("messages")
    if isinstance(messages, list):
        if len(messages) > limit:
            raise APIError(
                400,
                f"This model's maximum context length is {limit} tokens, but the request holds "
                f"{len(messages)} messages.",
                param="messages",
                code="context_length_exceeded",
            )
        total = 0
        for m in messages:
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, str):
                total += len(content)
            elif isinstance(content, list):
                total += sum(
                    len(c.get("text") or "") if isinstance(c, dict) and isinstance(c.get("text"), str) else 1
                    for c in content
                )
            if total > chars:
                raise too_long("messages", total, "chars")


def _read_request(ctx: ServerContext, model: type[BaseModel], body: bytes):
    """Body bytes -> the validated request (runs off the event loop, one at a time). The cyclic garbage collector
    waits meanwhile: a body of a million small objects would otherwise start collections that hold the GIL, and
    with it the event loop, for hundreds of milliseconds; what the body allocated is freed by reference counting."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        data = _decode_json(body)
        _check_sizes(ctx, data)
        return _parse(model, data)
    finally:
        if enabled:
            gc.enable()


# -- the server's state ------------------------------------------------------------------------------------
class ServerContext:
    def __init__(
        self,
        model,
        tokenizer,
        engine: Engine,
        metrics: ServerMetrics,
        model_name: str,
        aliases: set[str],
        request_timeout: float,
        default_max_tokens: int,
        max_body_bytes: int = MAX_BODY_BYTES,
        body_timeout: float = BODY_TIMEOUT_S,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.aliases = aliases | {model_name}
        self.request_timeout = request_timeout
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        state = getattr(model, STATE_ATTR, None)
        self.libraries: dict[str, Library] = dict(state.libraries) if state is not None else {}
        self.adapter_sets = {lib: set(L.names) for lib, L in self.libraries.items()}
        self.default_specs = dict(engine.base_specs)
        self.vocab_size = (
            int(model.get_output_embeddings().weight.shape[0])
            if model.get_output_embeddings() is not None
            else len(tokenizer)
        )
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.max_prompt_chars = self.max_model_len * CHARS_PER_TOKEN_SLACK * _longest_token(tokenizer)

        # Tokenizing (a long prompt, a chat template) runs here, one call at a time, off the event loop.
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loralag-tokenize")

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)


def _longest_token(tokenizer) -> int:
    """Characters of the tokenizer's longest vocabulary entry (at least 16): a bound on the characters one token
    stands for (byte-level BPE writes one character per byte)."""
    try:
        return max(16, max((len(t) for t in tokenizer.get_vocab()), default=16))
    except Exception:  # a tokenizer without get_vocab
        return 64


def _served_name(model, spec: str | None = None) -> str:
    if spec == "default":
        from loralag.models import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    if spec:
        p = Path(spec)
        return p.name if p.exists() else spec
    name = getattr(model.config, "name_or_path", "") or ""
    return Path(name).name or "loralag"


def create_app(
    model,
    tokenizer,
    libraries=(),
    router: str | dict = "lag",
    k: int | dict = 20,
    max_batch: int = 16,
    max_queue: int = 64,
    request_timeout: float = 120.0,
    model_name: str | None = None,
    max_model_len: int | None = None,
    default_max_tokens: int = 512,
    aliases=(),
    api_key: str | None = None,
    metrics_public: bool = False,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout: float = BODY_TIMEOUT_S,
) -> FastAPI:
    """The FastAPI app serving `model` with `libraries` attached (Library objects, paths, or a dict name -> Library).

    With no libraries, whatever is already attached to the model is served (or the plain model).
    `request_timeout`: seconds from arrival (queueing included) after which a request is ended with 408.
    `default_max_tokens`: chat completions' cap when the request gives none (completions default to 16).
    `api_key`: every path but /health (and /metrics when `metrics_public`) requires `Authorization: Bearer KEY`.
    `max_body_bytes`, `body_timeout`: a body larger (413) or slower to arrive (408) is refused as it streams in."""
    if request_timeout <= 0:
        raise ValueError(f"request_timeout must be positive, got {request_timeout}")
    if max_body_bytes < 1 or body_timeout <= 0:
        raise ValueError(f"max_body_bytes and body_timeout must be positive, got {max_body_bytes} and {body_timeout}")
    if api_key is not None and (not api_key or not api_key.isprintable() or api_key != api_key.strip()):
        raise ValueError("the API key must be a non-empty printable string without surrounding spaces")
    if isinstance(libraries, dict):
        libs = {name: lib if isinstance(lib, Library) else open_library(lib) for name, lib in libraries.items()}
    else:
        libs = [lib if isinstance(lib, Library) else open_library(lib) for lib in libraries]
    if libs:
        if getattr(model, STATE_ATTR, None) is not None:
            raise RuntimeError("the model already has libraries attached: pass libraries=() or detach it first")
        attach(model, libs, router=router, k=k)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    metrics = ServerMetrics()
    engine = Engine(
        model, tokenizer, max_batch=max_batch, max_queue=max_queue, max_model_len=max_model_len, metrics=metrics
    )
    name = model_name or _served_name(model)
    ctx = ServerContext(
        model,
        tokenizer,
        engine,
        metrics,
        name,
        set(aliases),
        request_timeout,
        default_max_tokens,
        max_body_bytes,
        body_timeout,
    )

    @asynccontextmanager
    async def lifespan(app):
        gc.collect()
        gc.freeze()  # the model and libraries are long-lived: later collections need not walk them again
        engine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop)

    app = FastAPI(title="loralag", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    schema = openapi_schema()
    app.openapi = lambda: schema
    app.state.ctx = ctx
    if api_key is not None:
        app.add_middleware(
            _KeyMiddleware,
            key=api_key,
            metrics=metrics,
            open_paths={"/health"} | ({"/metrics"} if metrics_public else set()),
        )
    app.add_middleware(_MetricsMiddleware, metrics=metrics)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = {
            404: f"Unknown path {request.url.path}: see GET /v1/models, POST /v1/completions, "
            "POST /v1/chat/completions, GET /health, GET /metrics, GET /openapi.json",
            405: f"Method {request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return APIError(exc.status_code, message, type_, None, None, dict(exc.headers or {})).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return APIError(400, "invalid request").response()

    @app.exception_handler(_ClientGone)
    async def _client_gone(request: Request, exc: _ClientGone):
        request.scope["loralag_outcome"] = 499
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, "The server had an error while processing your request.", "server_error").response()

    @app.get("/health")
    async def health():
        if not engine.alive:
            raise APIError(503, "the generation engine is not running", "server_error", code="engine_down")
        return {
            "status": "ok",
            "model": ctx.model_name,
            "running": engine.running,
            "waiting": engine.queue_depth,
            "max_batch": engine.max_batch,
            "max_queue": engine.max_queue,
        }

    @app.get("/metrics")
    async def metrics_endpoint():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(ctx)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        if model_id not in ctx.aliases:
            raise _model_not_found(model_id)
        return _model_card(ctx)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await ctx.off_loop(_read_request, ctx, CompletionRequest, await _read_body(request, ctx))
        _check_model(ctx, body.model)
        _check_sampling_values(body)
        _unsupported(
            body,
            {
                "echo": False,
                "logprobs": None,
                "suffix": None,
                "presence_penalty": 0,
                "frequency_penalty": 0,
                "logit_bias": {},
            },
        )
        if body.best_of is not None and body.best_of != (body.n or 1):
            raise APIError(
                400, "best_of is not supported (only best_of = n)", param="best_of", code="unsupported_parameter"
            )
        routing = resolve_routing(ctx, body)
        prompts = await ctx.off_loop(_completion_prompts, ctx, body.prompt)
        default = 16
        return await _run(request, ctx, "text_completion", body, prompts, body.max_tokens, default, routing)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await ctx.off_loop(_read_request, ctx, ChatRequest, await _read_body(request, ctx))
        _check_model(ctx, body.model)
        _check_sampling_values(body)
        _unsupported(
            body,
            {
                "presence_penalty": 0,
                "frequency_penalty": 0,
                "logprobs": False,
                "top_logprobs": None,
                "tools": None,
                "functions": None,
                "logit_bias": {},
            },
        )
        if body.tool_choice not in (None, "none"):
            raise APIError(
                400, "tool calls are not supported by this server", param="tool_choice", code="unsupported_parameter"
            )
        if body.response_format not in (None, {"type": "text"}):
            raise APIError(
                400,
                "only response_format {'type': 'text'} is supported",
                param="response_format",
                code="unsupported_parameter",
            )
        routing = resolve_routing(ctx, body)
        prompts = [await ctx.off_loop(_chat_prompt, ctx, body.messages)]
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        return await _run(
            request,
            ctx,
            "chat.completion",
            body,
            prompts,
            max_tokens,
            ctx.default_max_tokens,
            routing,
            max_tokens_param=param,
        )

    return app


# -- checks ------------------------------------------------------------------------------------------------
def _model_card(ctx: ServerContext) -> dict:
    return {
        "id": ctx.model_name,
        "object": "model",
        "created": ctx.created,
        "owned_by": "loralag",
        "max_model_len": ctx.max_model_len,
        "libraries": [
            {
                "name": name,
                "adapters": len(lib),
                "base_model": lib.base_model,
                "router": ctx.default_specs[name].router,
                "k": ctx.default_specs[name].k,
            }
            for name, lib in ctx.libraries.items()
        ],
    }


def _model_not_found(model: str) -> APIError:
    return APIError(404, f"The model '{model}' does not exist on this server.", param="model", code="model_not_found")


def _check_model(ctx: ServerContext, model: str) -> None:
    if model not in ctx.aliases:
        err = _model_not_found(model)
        err.message += f" It serves '{ctx.model_name}' (GET /v1/models)."
        raise err


def _unsupported(body, defaults: dict) -> None:
    for name, default in defaults.items():
        value = getattr(body, name, None)
        if value is not None and value != default:
            raise APIError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def _check_sampling_values(body) -> None:
    """Sampling parameters in range and finite, checked before anything is tokenised (400 otherwise)."""

    def bad(param: str, rule: str, value) -> APIError:
        return APIError(400, f"'{param}' must be {rule}, got {value}", param=param, code="invalid_value")

    if body.temperature is not None and not 0.0 <= body.temperature <= 2.0:  # NaN fails every comparison
        raise bad("temperature", "between 0 and 2", body.temperature)
    if body.top_p is not None and not 0.0 < body.top_p <= 1.0:
        raise bad("top_p", "in (0, 1]", body.top_p)
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None and not -2.0 <= value <= 2.0:
            raise bad(name, "between -2 and 2", value)
    for token, bias in (body.logit_bias or {}).items():
        if not -100.0 <= bias <= 100.0:
            raise bad("logit_bias", f"a map of token ids to numbers between -100 and 100 (token {token!r})", bias)


def resolve_routing(ctx: ServerContext, body) -> Routing:
    """Per attached library, how this request is routed: from router / k / libraries / adapters and the defaults."""
    libs = list(ctx.libraries)
    if body.router is not None and body.router not in ROUTERS:
        raise APIError(
            400,
            f"unknown router '{body.router}'; choose one of {sorted(ROUTERS)}",
            param="router",
            code="invalid_value",
        )
    if body.k is not None and body.k < 1:
        raise APIError(400, f"k must be a positive integer, got {body.k}", param="k", code="invalid_value")
    if body.libraries is not None:
        for lib in body.libraries:
            if lib not in ctx.libraries:
                raise APIError(
                    404,
                    f"no library named '{lib}' is served; libraries: {libs}",
                    param="libraries",
                    code="library_not_found",
                )
    fixed: dict[str, str | None] = {}
    adapters = body.adapters
    if isinstance(adapters, dict):
        for lib, name in adapters.items():
            if lib not in ctx.libraries:
                raise APIError(
                    404,
                    f"no library named '{lib}' is served; libraries: {libs}",
                    param="adapters",
                    code="library_not_found",
                )
            if name is not None and name not in ctx.adapter_sets[lib]:
                raise APIError(
                    404, f"library '{lib}' holds no adapter named '{name}'", param="adapters", code="adapter_not_found"
                )
            fixed[lib] = name
    elif adapters is not None:
        for item in [adapters] if isinstance(adapters, str) else adapters:
            lib, name = _find_adapter(ctx, item)
            if lib in fixed:
                raise APIError(
                    400,
                    f"two adapters given for library '{lib}': '{fixed[lib]}' and '{name}'; "
                    "a sequence uses at most one fixed adapter per library",
                    param="adapters",
                    code="invalid_value",
                )
            fixed[lib] = name
    if body.router == "fixed" and not any(v is not None for v in fixed.values()):
        raise APIError(
            400,
            "router 'fixed' needs 'adapters': the adapter to use in each library",
            param="adapters",
            code="missing_required_parameter",
        )
    if body.libraries is not None:
        selected = set(body.libraries)
    else:
        selected = set(libs) if adapters is None else set()
    modes = []
    for lib in libs:
        if lib in fixed:
            modes.append((lib, ("fixed", fixed[lib])))
            continue
        if lib not in selected:
            modes.append((lib, ("fixed", None)))
            continue
        spec = ctx.default_specs[lib]
        router = body.router or spec.router
        if router in ("none", "fixed"):
            modes.append((lib, ("fixed", None)))
            continue
        k = body.k if body.k is not None else spec.k
        modes.append((lib, ("route", router, k if router in ROUTERS_WITH_K else 1)))
    return Routing(tuple(modes))


def _find_adapter(ctx: ServerContext, item: str) -> tuple[str, str]:
    if "/" in item:
        lib, _, name = item.partition("/")
        if lib in ctx.libraries:
            if name not in ctx.adapter_sets[lib]:
                raise APIError(
                    404, f"library '{lib}' holds no adapter named '{name}'", param="adapters", code="adapter_not_found"
                )
            return lib, name
    owners = [lib for lib, names in ctx.adapter_sets.items() if item in names]
    if not owners:
        raise APIError(
            404, f"no served library holds an adapter named '{item}'", param="adapters", code="adapter_not_found"
        )
    if len(owners) > 1:
        raise APIError(
            400,
            f"adapter '{item}' is in several libraries {owners}: write it 'library/{item}'",
            param="adapters",
            code="invalid_value",
        )
    return owners[0], item


def _completion_prompts(ctx: ServerContext, prompt) -> list[list[int]]:
    tok = ctx.tokenizer
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "'prompt' is an empty list", param="prompt", code="invalid_value")
    if isinstance(prompt[0], int):
        prompt = [prompt]
    out = []
    for p in prompt:
        if isinstance(p, str):
            ids = list(tok(p, add_special_tokens=True)["input_ids"])
        else:
            bad = [t for t in p if not 0 <= t < ctx.vocab_size]
            if bad:
                raise APIError(
                    400,
                    f"token id {bad[0]} is out of the vocabulary [0, {ctx.vocab_size})",
                    param="prompt",
                    code="invalid_value",
                )
            ids = list(p)
        if not ids:
            if tok.bos_token_id is None:
                raise APIError(400, "the prompt is empty", param="prompt", code="invalid_value")
            ids = [tok.bos_token_id]
        out.append(ids)
    return out


def _chat_prompt(ctx: ServerContext, messages: list[ChatMessage]) -> list[int]:
    tok = ctx.tokenizer
    if not messages:
        raise APIError(400, "'messages' must hold at least one message", param="messages", code="invalid_value")
    if not getattr(tok, "chat_template", None):
        raise APIError(
            400, "this model has no chat template: use /v1/completions", param="messages", code="no_chat_template"
        )
    plain = []
    for i, m in enumerate(messages):
        if m.role not in ("system", "user", "assistant", "developer", "tool"):
            raise APIError(400, f"unknown role '{m.role}'", param=f"messages.[{i}].role", code="invalid_value")
        if isinstance(m.content, list):
            parts = []
            for part in m.content:
                if part.type != "text" or part.text is None:
                    raise APIError(
                        400,
                        f"only text content is supported, got a part of type '{part.type}'",
                        param=f"messages.[{i}].content",
                        code="invalid_value",
                    )
                parts.append(part.text)
            content = "".join(parts)
        else:
            content = m.content or ""
        plain.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    try:
        text = tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # the template itself rejects the conversation (roles out of order, ...)
        raise APIError(
            400,
            f"the chat template rejected these messages: {type(e).__name__}: {e}",
            param="messages",
            code="invalid_value",
        ) from None
    ids = list(tok(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise APIError(400, "the conversation is empty after the chat template", param="messages", code="invalid_value")
    return ids


def _sampling(
    ctx: ServerContext, body, prompts: list[list[int]], max_tokens, default: int, param: str
) -> SamplingParams:
    limit = ctx.max_model_len
    longest = max(len(p) for p in prompts)
    prompt_param = "messages" if hasattr(body, "messages") else "prompt"
    if longest >= limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens, but the prompt holds {longest} "
            "tokens (at least one must be left to generate). Please shorten the prompt.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if max_tokens is None:
        max_tokens = min(default, limit - longest)
    elif max_tokens < 1:
        raise APIError(400, f"'{param}' must be at least 1, got {max_tokens}", param=param, code="invalid_value")
    elif longest + max_tokens > limit:
        raise APIError(
            400,
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{longest + max_tokens} tokens ({longest} in the prompt, {max_tokens} for the completion). "
            f"Please reduce the prompt or '{param}'.",
            param=param,
            code="context_length_exceeded",
        )
    temperature = 1.0 if body.temperature is None else body.temperature  # in range: _check_sampling_values
    top_p = 1.0 if body.top_p is None else body.top_p
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise APIError(400, f"'stop' holds at most 4 sequences, got {len(stop)}", param="stop", code="invalid_value")
    if any(s == "" for s in stop):
        raise APIError(400, "'stop' sequences must not be empty", param="stop", code="invalid_value")
    seed = None if body.seed is None else body.seed % (2**63)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        stop=tuple(stop),
        seed=seed,
        ignore_eos=bool(body.ignore_eos),
    )


# -- running a request -------------------------------------------------------------------------------------
async def _run(
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
    sampling = _sampling(ctx, body, prompts, max_tokens, default_max, max_tokens_param)
    ereq = EngineRequest(prompts, n, sampling, routing, ctx.request_timeout)
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
        except _ClientGone:
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
    except _ClientGone:
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
        self.done = 0
        self.want_routing = bool(body.return_routing)
        self.checked = time.monotonic()

    async def next_event(self):
        """The next engine event; raises _ClientGone if the client left, APIError for an error event."""
        ereq = self.ereq
        while True:
            now = time.monotonic()
            if now - self.checked > POLL_S:  # events may flow without pause: check the client every POLL_S
                self.checked = now
                if await self.request.is_disconnected():
                    self.ctx.engine.cancel(ereq)
                    raise _ClientGone()
            if now > ereq.deadline + 5.0:  # the engine is stuck in a long step: give up here
                self.ctx.engine.cancel(ereq)
                raise _timeout_error("the request ran past the server's time limit")
            try:
                event = await asyncio.wait_for(ereq.events.get(), POLL_S)
            except asyncio.TimeoutError:
                continue
            if event[0] == "error":
                _, status, type_, code, message = event
                err = _timeout_error(message) if status == 408 else APIError(status, message, type_, None, code)
                raise err
            if event[0] == "text":
                self.texts[event[1]] += event[2]
            elif event[0] == "done":
                _, i, reason, ntok, counts = event
                self.reasons[i], self.tokens[i], self.counts[i] = reason, ntok, counts
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
        except _ClientGone:
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
    their share (the `top` largest by name, the rest as 'other'), and the entropy of the shares in nats."""
    out = {}
    for lib, desc in routing.describe().items():
        entry = dict(desc)
        c = counts.get(lib)
        total = int(c.sum()) if c is not None else 0
        entry["routed_tokens"] = total
        if total:
            idx = c.nonzero().squeeze(1)
            vals, order = torch.sort(c[idx], descending=True, stable=True)
            idx = idx[order]
            p = vals.double() / total
            entry["adapters_used"] = len(idx)
            shares = {names[lib][i]: round(float(s), 6) for i, s in zip(idx[:top].tolist(), p[:top])}
            if len(idx) > top:
                shares["other"] = round(float(p[top:].sum()), 6)
            entry["shares"] = shares
            entry["entropy"] = round(abs(float((p * p.log()).sum())), 6)
        else:
            entry["adapters_used"] = 0
            entry["shares"] = {}
        out[lib] = entry
    return out


class _MetricsMiddleware:
    """Counts every HTTP request by endpoint and final status; latency of the generation endpoints."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.monotonic()
        status = [500]

        async def _send(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, _send)
        finally:
            path = scope.get("path", "")
            endpoint = path if path in ENDPOINTS else ("/v1/models/<id>" if path.startswith("/v1/models/") else "other")
            outcome = scope.get("loralag_outcome", status[0])
            self.metrics.requests.inc(endpoint=endpoint, status=outcome)
            if endpoint in ("/v1/completions", "/v1/chat/completions"):
                self.metrics.latency.observe(time.monotonic() - t0, endpoint=endpoint)


class _KeyMiddleware:
    """`Authorization: Bearer KEY` on every path but `open_paths`, compared in constant time; 401 otherwise."""

    def __init__(self, app, key: str, metrics: ServerMetrics, open_paths: set[str]):
        self.app, self.key, self.metrics, self.open_paths = app, key.encode(), metrics, open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            return await self.app(scope, receive, send)
        given = None
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                given = token.strip() if scheme.lower() == b"bearer" else b""
        if given is not None and hmac.compare_digest(given, self.key):
            return await self.app(scope, receive, send)
        if given is None:
            message, code = (
                (
                    "You didn't provide an API key. You need to provide your API key in an Authorization "
                    "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
                ),
                None,
            )
        else:
            message, code = "Incorrect API key provided.", "invalid_api_key"
        self.metrics.rejected.inc(code="invalid_api_key" if code else "missing_api_key")
        err = APIError(401, message, code=code, headers={"WWW-Authenticate": "Bearer"})
        await err.response()(scope, receive, send)


class _TimedH11Protocol(_h11_protocol()):
    """uvicorn's h11 protocol, plus a limit on the time a client takes to send a request's headers: uvicorn's
    keep-alive timer stops at the first byte, so a client sending its headers a byte at a time (or nothing at
    all after connecting) would hold the connection forever."""

    header_timeout = HEADER_TIMEOUT_S

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm_header_timer()

    def _arm_header_timer(self):
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_header_timer(self):
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
            self._header_timer = None

    def _header_timed_out(self):
        self._header_timer = None
        if self.conn.their_state is _h11().IDLE and not self.transport.is_closing():
            self.transport.close()  # nothing was answered yet: just hang up

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not _h11().IDLE:  # the headers are in
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is _h11().IDLE:
            self._arm_header_timer()  # the next request's headers

    def connection_lost(self, exc):
        self._cancel_header_timer()
        super().connection_lost(exc)


def server_config(
    app,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_level: str = "info",
    header_timeout: float = HEADER_TIMEOUT_S,
    keep_alive: int = KEEP_ALIVE_S,
    max_connections: int = MAX_CONNECTIONS,
    **kwargs,
):
    """The uvicorn.Config `serve` runs `app` with: h11 with a header timeout, a keep-alive limit, at most
    `max_connections` connections (503 beyond), request headers of at most 64 KiB."""
    import uvicorn

    protocol = type("TimedH11Protocol", (_TimedH11Protocol,), {"header_timeout": header_timeout})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol,
        timeout_keep_alive=keep_alive,
        limit_concurrency=max_connections,
        h11_max_incomplete_event_size=64 * 1024,
        **kwargs,
    )


def warn_if_exposed(host: str, api_key: str | None) -> str | None:
    """The warning to give when serving beyond this machine without an API key (None otherwise)."""
    if api_key or host in LOCAL_HOSTS or host.startswith("127."):
        return None
    return (
        f"serving on {host} without an API key: anyone who reaches this port can generate and read /metrics; "
        "set --api-key or LORALAG_API_KEY"
    )


# -- entry point -------------------------------------------------------------------------------------------
def serve(
    model_spec: str = "default",
    libraries: list[str] = (),
    router: str = "lag",
    k: int = 20,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int = 16,
    max_queue: int = 64,
    request_timeout: float = 120.0,
    max_model_len: int | None = None,
    default_max_tokens: int = 512,
    model_name: str | None = None,
    log_level: str = "info",
    api_key: str | None = None,
    metrics_public: bool = False,
    max_body_bytes: int = MAX_BODY_BYTES,
    body_timeout: float = BODY_TIMEOUT_S,
    header_timeout: float = HEADER_TIMEOUT_S,
    keep_alive: int = KEEP_ALIVE_S,
    max_connections: int = MAX_CONNECTIONS,
) -> None:
    """Load the model (loralag.models.load_model), open and attach the libraries, and serve until interrupted.

    api_key: None reads LORALAG_API_KEY (unset or empty: no key)."""
    import uvicorn

    from loralag.models import load_model

    if api_key is None:
        api_key = os.environ.get("LORALAG_API_KEY") or None
    warning = warn_if_exposed(host, api_key)
    if warning:
        log.warning(warning)
        warnings.warn(warning, stacklevel=2)
    model, tokenizer = load_model(model_spec)
    libs = [open_library(p) for p in libraries]
    name = model_name or _served_name(model, model_spec)
    app = create_app(
        model,
        tokenizer,
        libs,
        router=router,
        k=k,
        max_batch=max_batch,
        max_queue=max_queue,
        request_timeout=request_timeout,
        model_name=name,
        max_model_len=max_model_len,
        default_max_tokens=default_max_tokens,
        aliases={model_spec},
        api_key=api_key,
        metrics_public=metrics_public,
        max_body_bytes=max_body_bytes,
        body_timeout=body_timeout,
    )
    uvicorn.Server(
        server_config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            header_timeout=header_timeout,
            keep_alive=keep_alive,
            max_connections=max_connections,
        )
    ).run()
