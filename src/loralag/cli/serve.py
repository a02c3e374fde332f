"""`loralag serve`: the OpenAI-compatible server (loralag.serve), or its replicas on Ray Serve."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from loralag.cli.app import console, fail, user_errors
from loralag.cli.checks import _check_library, _check_model, _check_ray, _check_router
from loralag.cli.loading import _prepare_model, waiting
from loralag.cli.options import K_HELP, LIBRARIES_HELP, MODEL_HELP, NO_FIXED_SERVE, _ray_option, _router_help


@user_errors
def serve(
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    library: Optional[list[Path]] = typer.Option(None, "--library", "-l", help=LIBRARIES_HELP),
    router: str = typer.Option(
        "lag",
        "--router",
        help=_router_help("Default router of every request (a request may name its own)", refused=NO_FIXED_SERVE),
    ),
    k: int = typer.Option(20, "--k", min=1, help=K_HELP),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Sequences decoded together."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Waiting requests before answering 429."),
    request_timeout: float = typer.Option(
        120.0, "--request-timeout", min=0.0, help="Seconds before a request is ended."
    ),
    api_key: Optional[str] = typer.Option(
        None,
        "--api-key",
        help="Require 'Authorization: Bearer KEY' on every endpoint but /health (default: $LORALAG_API_KEY; "
        "unset: no key, with a warning when --host is not this machine).",
        show_default=False,
    ),
    metrics_public: bool = typer.Option(False, "--metrics-public", help="Serve /metrics without the API key."),
    max_body_mib: float = typer.Option(
        2.0, "--max-body-mib", min=0.001, help="Largest request body, in MiB (413 beyond, checked as it streams in)."
    ),
    body_timeout: float = typer.Option(
        30.0, "--body-timeout", min=0.1, help="Seconds a client may take to send a request's body (408 after)."
    ),
    ray_replicas: Optional[int] = typer.Option(
        None,
        "--ray-replicas",
        min=1,
        help="Serve N replicas with Ray Serve behind one endpoint (each loads the model and maps the libraries; "
        'the --ray cluster, else $RAY_ADDRESS or a local one). Needs pip install "loralag[ray]".',
    ),
    ray: Optional[str] = _ray_option("With --ray-replicas: serve"),
):
    """An OpenAI-compatible server (/v1/completions, /v1/chat/completions) routing every request."""
    _check_router(router, refused=NO_FIXED_SERVE)
    for path in library or []:
        _check_library(path)
    _check_model(model)
    if api_key is not None and (not api_key or not api_key.isprintable() or api_key != api_key.strip()):
        fail("--api-key must be a non-empty printable key without surrounding spaces")
    if ray is not None and ray_replicas is None:
        fail("--ray needs --ray-replicas N")
    if ray_replicas is not None:
        _check_ray("auto")
        from loralag.cluster.serve import serve_forever

        console.print(
            f"Ray Serve: {ray_replicas} replica(s) of model '{model}' on http://{host}:{port}", highlight=False
        )
        return serve_forever(
            model,
            [str(p) for p in library or []],
            ray_replicas,
            host=host,
            port=port,
            address=ray or True,
            router=router,
            k=k,
            max_batch=max_batch,
            max_queue=max_queue,
            request_timeout=request_timeout,
            api_key=api_key or os.environ.get("LORALAG_API_KEY") or None,
            metrics_public=metrics_public,
            max_body_bytes=int(max_body_mib * 2**20),
            body_timeout=body_timeout,
        )
    with waiting(f"Loading the server and model '{model}' …") as status:
        _prepare_model(model, status)
        import uvicorn  # noqa: F401  (imported here, behind the spinner)

        from loralag.serve.app import serve as run_server
    console.print(
        f"loading model '{model}' and {len(library or [])} library(ies), then serving on http://{host}:{port} "
        f"(the routing explorer: http://{host}:{port}/ui)",
        highlight=False,
    )
    run_server(
        model,
        [str(p) for p in library or []],
        router=router,
        k=k,
        host=host,
        port=port,
        max_batch=max_batch,
        max_queue=max_queue,
        request_timeout=request_timeout,
        api_key=api_key,
        metrics_public=metrics_public,
        max_body_bytes=int(max_body_mib * 2**20),
        body_timeout=body_timeout,
    )
