"""`loralag demo`: knowledge adapters trained on invented entities; base model, LAG and Oracle compared."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from loralag.cli.app import console, user_errors
from loralag.cli.checks import _check_model, _check_router
from loralag.cli.loading import _prepare_model, _set_threads, waiting
from loralag.cli.options import INIT_HELP, NO_FIXED_DEMO, THREADS_HELP, Init, _router_help


@user_errors
def demo(
    workdir: Optional[Path] = typer.Option(
        None, "--workdir", help="Where adapters and library are cached (default: under the loralag cache)."
    ),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training steps per adapter (default 20)."),
    router: str = typer.Option("lag", "--router", help=_router_help("Router of the LAG column", refused=NO_FIXED_DEMO)),
    k: int = typer.Option(20, "--k", min=1, help="Arrow candidates per token."),
    init: Init = typer.Option(Init.contrast, "--init", help="The adapters' " + INIT_HELP),
    heatmap: Optional[Path] = typer.Option(
        None, "--heatmap", help="Also write LAG's routing heatmap of the first question."
    ),
    model: str = typer.Option("default", "--model", "-m", help="Base model (the demo is tuned for the default one)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
):
    """Train knowledge adapters on invented entities, then compare base model, LAG and Oracle on questions."""
    _check_router(router, refused=NO_FIXED_DEMO)
    _check_model(model)
    start = time.perf_counter()
    with waiting(f"Loading torch and model '{model}' …") as status:
        _prepare_model(model, status)
    from loralag.experiments.demo import print_results, run_demo

    _set_threads(threads)
    results = run_demo(workdir, steps=steps, router=router, k=k, init=init.value, model_spec=model, console=console)
    print_results(results, console)
    if heatmap is not None and results["trace"] is not None:
        from loralag import generate as gen

        path = gen.routing_heatmap(
            results["trace"], results["tokenizer"], results["trace"].input_ids, heatmap, seq=0, prompt_only=False
        )
        console.print(f"routing heatmap written to {path}")
    console.print(f"total {time.perf_counter() - start:.1f} s")
