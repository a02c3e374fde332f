"""The endpoints, one small handler each, composed into the app by create_app: each reads the server's shared
state from `request.app.state.ctx`, checks the request (requests.py) and hands it to the engine (responses.py).
Errors are answered in OpenAI's shape by the handlers `add_error_handlers` installs."""

from __future__ import annotations

import logging
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, RedirectResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from loralag.serve.context import ServerContext
from loralag.serve.protocol import APIError, ChatRequest, CompletionRequest
from loralag.serve.requests import (
    chat_prompt,
    check_model,
    check_sampling_values,
    completion_prompts,
    model_card,
    model_not_found,
    read_request,
    refuse_unsupported,
    resolve_routing,
)
from loralag.serve.responses import run_request
from loralag.serve.scoring import check_scoring, score_request
from loralag.serve.transport import ClientGone, read_body

log = logging.getLogger("loralag.serve")  # one logger for the whole server
router = APIRouter()

COMPLETION_DEFAULTS = {  # OpenAI fields this server does not implement, with the values that mean "not used"
    "suffix": None,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logit_bias": {},
}
CHAT_DEFAULTS = {
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
    "top_logprobs": None,
    "tools": None,
    "functions": None,
    "logit_bias": {},
}


# The routing explorer (GET /ui): static files shipped in the package, no data of their own. They are served without
# the API key (a browser cannot send one when it opens a page); everything the page shows comes from the API, to
# which it sends the key the user types as `Authorization: Bearer`.
UI_DIR = Path(__file__).parent / "ui"
UI_FILES = {"index.html": "text/html", "app.js": "text/javascript", "style.css": "text/css"}
UI_PATHS = {"/ui", "/ui/"} | {f"/ui/{name}" for name in UI_FILES}


def _ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


@router.get("/health")
async def health(request: Request):
    ctx = _ctx(request)
    engine = ctx.engine
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


@router.get("/metrics")
async def metrics(request: Request):
    body, content_type = _ctx(request).metrics.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)


@router.get("/ui", include_in_schema=False)
async def ui_redirect():
    return RedirectResponse("/ui/", status_code=307)  # relative links (app.js, style.css) resolve under /ui/


@router.get("/ui/", include_in_schema=False)
@router.get("/ui/{name}", include_in_schema=False)
async def ui(name: str = "index.html"):
    if name not in UI_FILES:
        raise APIError(404, f"Unknown path /ui/{name}: the routing explorer is GET /ui", code="not_found")
    return FileResponse(UI_DIR / name, media_type=UI_FILES[name], headers={"Cache-Control": "no-cache"})


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [model_card(_ctx(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    ctx = _ctx(request)
    if model_id not in ctx.aliases:
        raise model_not_found(model_id)
    return model_card(ctx)


@router.post("/v1/completions")
async def completions(request: Request):
    ctx = _ctx(request)
    body = await ctx.off_loop(read_request, ctx, CompletionRequest, await read_body(request, ctx))
    check_model(ctx, body.model)
    check_sampling_values(body)
    refuse_unsupported(body, COMPLETION_DEFAULTS)
    if body.best_of is not None and body.best_of != (body.n or 1):
        raise APIError(
            400, "best_of is not supported (only best_of = n)", param="best_of", code="unsupported_parameter"
        )
    scoring = check_scoring(body)  # echo + logprobs: the prompt's token logprobs (lm-eval's local-completions)
    routing = resolve_routing(ctx, body)
    prompts = await ctx.off_loop(completion_prompts, ctx, body.prompt)
    if scoring:
        return await score_request(ctx, body, prompts, routing)
    return await run_request(request, ctx, "text_completion", body, prompts, body.max_tokens, 16, routing)


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    ctx = _ctx(request)
    body = await ctx.off_loop(read_request, ctx, ChatRequest, await read_body(request, ctx))
    check_model(ctx, body.model)
    check_sampling_values(body)
    refuse_unsupported(body, CHAT_DEFAULTS)
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
    prompts = [await ctx.off_loop(chat_prompt, ctx, body.messages)]
    explicit = body.max_completion_tokens is not None
    max_tokens = body.max_completion_tokens if explicit else body.max_tokens
    param = "max_completion_tokens" if explicit else "max_tokens"
    return await run_request(
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


def add_error_handlers(app: FastAPI) -> None:
    """Every error answered in OpenAI's shape: ours (APIError), unknown paths and methods, bodies FastAPI itself
    could not read, clients that hung up (499, for the metrics) and anything unexpected (500, logged)."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = {
            404: f"Unknown path {request.url.path}: see GET /v1/models, POST /v1/completions, "
            "POST /v1/chat/completions, GET /health, GET /metrics, GET /openapi.json, GET /ui",
            405: f"Method {request.method} is not allowed on {request.url.path}",
        }.get(exc.status_code, str(exc.detail))
        return APIError(exc.status_code, message, type_, None, None, dict(exc.headers or {})).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return APIError(400, "invalid request").response()

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone):
        request.scope["loralag_outcome"] = 499
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, "The server had an error while processing your request.", "server_error").response()
