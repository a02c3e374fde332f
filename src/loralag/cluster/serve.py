"""`loralag serve --ray-replicas N`: N replicas of the OpenAI-compatible server as one Ray Serve deployment, behind
Ray Serve's one HTTP endpoint (its proxy spreads the requests over the replicas).

Each replica is the app `loralag serve` runs (`serve.app.create_app`: the same endpoints, engine, streaming,
metrics and API key), built on the replica itself: it loads the model by its spec and opens the libraries by
memory map from the same paths (a shared filesystem, or the same files on every node). Ray Serve runs the app's
lifespan, which starts and stops the replica's engine.
"""

from __future__ import annotations

from pathlib import Path

from loralag.cluster.connect import connect, setup_worker

DEPLOYMENT = "loralag"


def _builder(model_spec: str, libraries: list[str], threads: int, options: dict):
    """The function Ray Serve calls on each replica to build its ASGI app."""

    def build():
        setup_worker(threads)
        from loralag.library.store import open_library
        from loralag.models import load_model
        from loralag.serve.app import create_app
        from loralag.serve.context import served_name

        model, tokenizer = load_model(model_spec)
        libs = [open_library(p) for p in libraries]
        name = options.pop("model_name", None) or served_name(model, model_spec)
        return create_app(model, tokenizer, libs, model_name=name, aliases={model_spec}, **options)

    return build


class _Replica:
    """One replica: its app comes from the builder."""


def deployment(model_spec: str, libraries=(), replicas: int = 2, threads: int = 1, **options):
    """The Ray Serve application: `replicas` replicas of create_app(model, libraries, **options), each reserving
    `threads` CPUs (and torch threads)."""
    from ray import serve

    paths = [str(Path(p).resolve()) for p in libraries]
    ingress = serve.ingress(_builder(model_spec, paths, threads, dict(options)))(_Replica)
    return serve.deployment(
        ingress, name=DEPLOYMENT, num_replicas=replicas, ray_actor_options={"num_cpus": threads}
    ).bind()


def start(
    model_spec: str,
    libraries=(),
    replicas: int = 2,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    address: str | bool | None = True,
    threads: int = 1,
    **options,
):
    """Deploy the replicas on the cluster at `address` behind http://HOST:PORT and return once all of them serve
    (a DeploymentHandle); `stop()` takes them down."""
    from loralag.errors import LoralagError

    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise LoralagError(f"--ray-replicas must be a positive integer, got {replicas!r}")
    connect(address)
    from ray import serve

    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})  # one endpoint
    app = deployment(model_spec, libraries, replicas, threads, **options)
    return serve.run(app, name=DEPLOYMENT, route_prefix="/")


def stop() -> None:
    from ray import serve

    serve.delete(DEPLOYMENT)
    serve.shutdown()


def serve_forever(*args, **kwargs) -> None:
    """`start`, then wait until interrupted, then `stop`."""
    import time

    start(*args, **kwargs)
    try:
        while True:
            time.sleep(3600)
    finally:
        stop()
