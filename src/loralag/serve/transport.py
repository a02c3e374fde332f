"""HTTP below the endpoints: bodies read as they stream in (size and time limits), the API key and metrics
middlewares, uvicorn's configuration (h11 with a header timeout, keep-alive and connection limits) and the
warning when serving beyond this machine without a key.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import TYPE_CHECKING

from fastapi import Request

from loralag.serve.metrics import ServerMetrics
from loralag.serve.protocol import ENDPOINTS, APIError

if TYPE_CHECKING:  # the context imports this module's limits
    from loralag.serve.context import ServerContext

POLL_S = 0.25  # how often a waiting handler checks that its client is still there
DRAIN_BYTES, DRAIN_S = 8 * 2**20, 2.0  # what is read and dropped of a body over the limit before answering 413
MAX_BODY_BYTES = 2 * 2**20  # default body limit: 16 prompts of 8,192 token ids fit; json.loads of it takes ~50 ms
BODY_TIMEOUT_S = 30.0  # default time for a client to send its whole body
HEADER_TIMEOUT_S = 10.0  # default time for a client to send a request's headers (uvicorn has no such limit)
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this many seconds
MAX_CONNECTIONS = 512  # open connections and tasks beyond which uvicorn answers 503
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "ip6-localhost"}


class ClientGone(Exception):
    pass


def _h11():
    import h11

    return h11


def _h11_protocol():
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return H11Protocol


def timeout_error(message: str) -> APIError:
    # A retry would run into the same limit: tell the openai client not to.
    return APIError(408, message, "timeout_error", None, "request_timeout", {"x-should-retry": "false"})


def _too_large(limit: int) -> APIError:
    return APIError(
        413, f"the request body is larger than {limit} bytes", code="request_too_large", headers={"Connection": "close"}
    )


async def read_body(request: Request, ctx: ServerContext) -> bytes:
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
            raise ClientGone()
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


class MetricsMiddleware:
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


class KeyMiddleware:
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
