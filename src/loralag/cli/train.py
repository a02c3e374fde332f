"""`loralag train`: one LoRA adapter per document or prompt/answer file, here, in processes or on Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loralag.cli.app import console, user_errors
from loralag.cli.checks import _check_model, _check_ray
from loralag.cli.loading import _prepare_model, load_model_waiting, waiting
from loralag.cli.options import INIT_HELP, MODEL_HELP, Init, _ray_option
from loralag.errors import LoralagError
from loralag.training import CONTRAST_INITS


@user_errors
def train(
    out: Path = typer.Argument(..., metavar="OUT", help="Folder to write one PEFT adapter folder per input into."),
    inputs: list[Path] = typer.Argument(
        ...,
        metavar="INPUTS",
        exists=True,
        help=".txt documents, .jsonl files (prompt/answer or name/text lines), or folders of them.",
    ),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    target_modules: str = typer.Option(
        "gate_proj,up_proj,down_proj", "--target-modules", "-t", help="Comma-separated module names to adapt."
    ),
    rank: int = typer.Option(6, "--rank", "--r", "-r", min=1, help="LoRA rank r of each adapter."),
    alpha: int = typer.Option(12, "--alpha", min=1, help="LoRA alpha (the update is scaled by alpha / rank)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimizer steps per adapter (default 30)."),
    epochs: Optional[float] = typer.Option(
        None, "--epochs", min=0.0, help="Instead of --steps: passes over each input's examples."
    ),
    batch_size: int = typer.Option(4, "--batch-size", min=1, help="Training examples per optimizer step."),
    lr: float = typer.Option(2e-3, "--lr", min=0.0, help="Learning rate."),
    max_length: int = typer.Option(256, "--max-length", min=2, help="Tokens per training window."),
    group_size: int = typer.Option(
        1,
        "--group-size",
        min=1,
        help="Adapters trained together per forward/backward, each row through its own "
        "LoRA (the same adapters as one at a time; not faster on CPU, see "
        "benchmarks/results/train.md).",
    ),
    init: Init = typer.Option(Init.peft, "--init", help=INIT_HELP),
    contrast_against: Optional[list[Path]] = typer.Option(
        None,
        "--contrast-against",
        exists=True,
        help="Training inputs (files or folders, as INPUTS; repeatable) whose texts pooled are the contrast/salient "
        "init's reference instead of generic text: give the whole library (e.g. INPUTS again) to start each "
        "adapter on what tells its input from the rest; another set of texts retrains every adapter.",
    ),
    workers: int = typer.Option(
        1,
        "--workers",
        min=1,
        help="Adapters trained at a time, each in its own process with threads / N torch threads (the same "
        "adapters up to float rounding; for many cores: on 2, two train no faster than one process).",
    ),
    under_library: Optional[Path] = typer.Option(
        None,
        "--under-library",
        help="A loralag library attached, frozen, under every prompt/answer pair and routed per token as at "
        "inference (e.g. a knowledge library under a task adapter); for prompt/answer inputs only.",
    ),
    under_router: str = typer.Option(
        "lag", "--under-router", help="How --under-library routes: lag, lag-prefix, arrow or spectral."
    ),
    under_k: int = typer.Option(20, "--under-k", min=1, help="The --under-library router's k (Arrow's top k)."),
    ray: Optional[str] = _ray_option("Train the adapters"),
):
    """Train one LoRA adapter per document or prompt/answer file (finished ones are skipped)."""
    if steps is not None and epochs is not None:
        raise LoralagError("give --steps or --epochs, not both")
    if contrast_against and init.value not in CONTRAST_INITS:
        raise LoralagError(
            f"--contrast-against is a reference for --init {' or '.join(CONTRAST_INITS)}, not {init.value}"
        )
    _check_ray(ray)
    if workers > 1 and (group_size > 1 or ray is not None):
        raise LoralagError("--workers trains here in processes: not with --group-size or --ray")
    targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    if not targets:
        raise LoralagError("--target-modules names no module")
    _check_model(model)
    with waiting("Reading the training inputs …") as status:
        _prepare_model(model, status)
        status.update("Reading the training inputs …")
        from loralag.training.train import item_texts, read_training_inputs

        items = read_training_inputs(inputs)
        reference = (
            [t for item in read_training_inputs(contrast_against) for t in item_texts(item)] if contrast_against else []
        )
    from loralag.training.train import TrainConfig, train_for_epochs

    if under_library is not None:
        items = _under_library(items, under_library, under_router, under_k)

    model_, tokenizer = load_model_waiting(model)
    config = TrainConfig(
        target_modules=targets,
        r=rank,
        alpha=alpha,
        batch_size=batch_size,
        lr=lr,
        max_length=max_length,
        init=init.value,
        contrast_against=reference,
    )
    if steps is not None:
        config.steps = steps
    from functools import partial

    train = None
    if ray is not None:  # the same adapters, trained on the cluster
        from loralag.cluster.train import train_adapters as train_on_cluster

        train = partial(train_on_cluster, address=ray)
    elif workers > 1:
        from loralag.training.train import train_adapters

        train = partial(train_adapters, workers=workers)
    paths = train_for_epochs(model_, tokenizer, items, out, config, epochs, group_size=group_size, train=train)
    console.print(f"[green]{len(paths)} adapter(s)[/] in {out}: " + ", ".join(p.name for p in paths))


def _under_library(items, library: Path, router: str, k: int):
    """Every prompt/answer item trained under the routed library; a document cannot be (it has no answers)."""
    from dataclasses import replace

    from loralag.training.train import QAPairs, UnderLibrary

    documents = [item.name for item in items if not isinstance(item, QAPairs)]
    if documents:
        more = f" and {len(documents) - 3} more" if len(documents) > 3 else ""
        raise LoralagError(
            f"--under-library trains prompt/answer inputs only, not documents: {', '.join(documents[:3])}{more}"
        )
    return [replace(item, library=UnderLibrary(library, router, k)) for item in items]
