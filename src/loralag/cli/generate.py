"""`loralag generate`: LAG over one or more libraries, with the routing shown as a table or a heatmap."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loralag.cli.app import console, user_errors
from loralag.cli.checks import _check_library, _check_model, _check_router, _open
from loralag.cli.loading import _set_threads, load_model_waiting, waiting
from loralag.cli.options import (
    CHAT_HELP,
    GRANULARITY_HELP,
    K_HELP,
    LIBRARIES_HELP,
    MODEL_HELP,
    NO_FIXED_CLI,
    NPROBE_HELP,
    THREADS_HELP,
    Dtype,
    Granularity,
    _router_help,
)
from loralag.errors import LoralagError


@user_errors
def generate(
    prompt: list[str] = typer.Argument(..., metavar="PROMPTS", help="Prompt(s); several are generated as one batch."),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    library: Optional[list[Path]] = typer.Option(None, "--library", "-l", help=LIBRARIES_HELP),
    router: str = typer.Option("lag", "--router", help=_router_help("Router", refused=NO_FIXED_CLI)),
    k: int = typer.Option(20, "--k", min=1, help=K_HELP),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", "--arrow-index", min=1, help=NPROBE_HELP),
    granularity: Granularity = typer.Option(Granularity.token, "--granularity", help=GRANULARITY_HELP),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Most tokens generated per prompt."),
    show_routing: bool = typer.Option(False, "--show-routing", help="Print the adapter chosen per prompt token."),
    heatmap: Optional[Path] = typer.Option(None, "--heatmap", help="Write a routing heatmap PNG here (first prompt)."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help=CHAT_HELP),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    dtype: Dtype = typer.Option(Dtype.float32, "--dtype", help="Model dtype."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
):
    """Generate with LAG over one or more libraries (or with the plain base model when none is given)."""
    _check_router(router, refused=NO_FIXED_CLI)
    if (show_routing or heatmap) and not library:
        raise LoralagError("--show-routing and --heatmap need at least one --library")
    for path in library or []:
        _check_library(path)
    _check_model(model)

    model_, tokenizer = load_model_waiting(model, dtype.value)
    from loralag import generate as gen
    from loralag.routing.state import attach, detach, library_names

    _set_threads(threads)
    libs = [_open(p) for p in library or []]
    if libs:
        attach(model_, library_names(libs), router=router, k=k, nprobe=nprobe)
    try:
        want_trace = bool(libs) and (show_routing or heatmap is not None)
        with waiting(f"Generating up to {max_new_tokens} tokens for {len(prompt)} prompt(s) …"):
            result = gen.generate(
                model_,
                tokenizer,
                list(prompt),
                max_new_tokens=max_new_tokens,
                chat=chat,
                greedy=not sample,
                trace=want_trace,
                granularity=granularity.value,
            )
        texts, trace = result if want_trace else (result, None)
    finally:
        detach(model_)
    for i, (p, text) in enumerate(zip(prompt, texts)):
        if len(prompt) > 1:
            console.print(f"[bold]\\[{i}] {p}[/]", highlight=False)
        console.print(text, highlight=False, markup=False)
    if trace is not None and show_routing:
        for seq in range(len(prompt)):
            console.print(gen.routing_table(trace, tokenizer, trace.input_ids, seq=seq))
    if trace is not None and heatmap is not None:
        path = gen.routing_heatmap(trace, tokenizer, trace.input_ids, heatmap, seq=0, prompt_only=False)
        console.print(f"routing heatmap written to {path}")
