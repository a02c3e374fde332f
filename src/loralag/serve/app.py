"""`loralag serve`: an OpenAI-compatible HTTP server over a base model with routed LoRA libraries.

    loralag serve --model default --library lib/ [--library lib2/] --router lag --k 20 --port 8000

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both streaming, as
server-sent events ending with `data: [DONE]`, and not), GET /health, GET /metrics (Prometheus), GET /ui (the
routing explorer page).

Routing options go in the request body next to the OpenAI fields (`extra_body=` in the openai client):

    router          one of loralag.ROUTERS for the libraries in use (default: the server's --router)
    k               candidates of the lag / arrow-mix routers (default: the server's --k)
    libraries       names of the attached libraries to use; the others are off for this request
    adapters        fixed adapters instead of routing: "name", "library/name", a list of those (one per
                    library), or {"library": "name"}; libraries without one are off unless listed in
                    `libraries`
    return_routing  true: the response holds `routing`, per library the adapters used and their share
                    of the routed tokens (each token counts once per adapted module); "tokens": each choice
                    also holds `token_routing`, every position's winner and score per module, and the vote
    ignore_eos      true: keep generating past the end-of-sequence token (benchmarks)

Requests arriving together share forward passes (continuous batching, see engine.py); requests
with different routing settings run as separate groups within each step.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import warnings
from contextlib import asynccontextmanager

from fastapi import FastAPI

from loralag.library.store import Library, open_library
from loralag.routing.state import attach, state_of
from loralag.serve import endpoints
from loralag.serve.context import ServerContext, served_name
from loralag.serve.endpoints import add_error_handlers
from loralag.serve.engine import (
    Engine,
)
from loralag.serve.metrics import ServerMetrics
from loralag.serve.protocol import openapi_schema
from loralag.serve.transport import (
    BODY_TIMEOUT_S,
    HEADER_TIMEOUT_S,
    KEEP_ALIVE_S,
    MAX_BODY_BYTES,
    MAX_CONNECTIONS,
    KeyMiddleware,
    MetricsMiddleware,
    server_config,
    warn_if_exposed,
)

log = logging.getLogger("loralag.serve")


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
        if state_of(model) is not None:
            raise RuntimeError("the model already has libraries attached: pass libraries=() or detach it first")
        attach(model, libs, router=router, k=k)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    metrics = ServerMetrics()
    engine = Engine(
        model, tokenizer, max_batch=max_batch, max_queue=max_queue, max_model_len=max_model_len, metrics=metrics
    )
    name = model_name or served_name(model)
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
            ctx.close()

    app = FastAPI(title="loralag", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    schema = openapi_schema()
    app.openapi = lambda: schema
    app.state.ctx = ctx
    if api_key is not None:
        app.add_middleware(
            KeyMiddleware,
            key=api_key,
            metrics=metrics,
            open_paths={"/health"} | endpoints.UI_PATHS | ({"/metrics"} if metrics_public else set()),
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    add_error_handlers(app)
    app.include_router(endpoints.router)
    return app


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
    name = model_name or served_name(model, model_spec)
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
