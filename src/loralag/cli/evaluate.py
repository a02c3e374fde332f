"""`loralag eval` (KILT scoring, and generating the predictions first with --model) and `loralag lm-eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loralag.cli.app import console, err_console, fail, user_errors
from loralag.cli.checks import _check_library, _check_model, _check_ray, _check_router, _open
from loralag.cli.loading import _set_threads, load_model_waiting
from loralag.cli.options import (
    CHAT_HELP,
    GRANULARITY_HELP,
    K_HELP,
    LIBRARIES_HELP,
    NPROBE_HELP,
    THREADS_HELP,
    Dtype,
    Granularity,
    _ray_option,
    _router_help,
)
from loralag.errors import LoralagError


@user_errors
def eval_command(
    data: list[Path] = typer.Argument(
        ..., metavar="DATA", help="Data files: KILT jsonl (any task), NQ-open, FEVER (original), LAMA T-REx."
    ),
    predictions: Optional[list[str]] = typer.Option(
        None,
        "--predictions",
        "-p",
        help="KILT-format predictions: a file (one data file) or a folder of <data-file-stem>.jsonl; "
        "NAME=PATH to name the method (repeatable, to compare methods).",
    ),
    oracle: Optional[str] = typer.Option(
        None, "--oracle", help="Method to normalise by (Eq. 9); default 'oracle' when one is named so."
    ),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="Write scores.json and scores.md here (and, with --model, the predictions)."
    ),
    task: Optional[list[str]] = typer.Option(
        None, "--task", help="Force the task of KILT files: TASK, or STEM=TASK (repeatable)."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="A missing prediction is an error (as in the official scorer), not a wrong answer."
    ),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N examples of each data file."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help="Generate predictions with this model ('default', a folder or a hub id)."
    ),
    name: Optional[str] = typer.Option(
        None, "--name", help="Method name of the generated predictions (default: the router, or 'base')."
    ),
    library: Optional[list[Path]] = typer.Option(None, "--library", "-l", help=LIBRARIES_HELP),
    router: str = typer.Option(
        "lag",
        "--router",
        help=_router_help("Router of the generated predictions ('fixed' with --adapter or --adapter-map)"),
    ),
    k: int = typer.Option(20, "--k", min=1, help=K_HELP),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", "--arrow-index", min=1, help=NPROBE_HELP),
    granularity: Granularity = typer.Option(Granularity.token, "--granularity", help=GRANULARITY_HELP),
    adapter: Optional[list[str]] = typer.Option(
        None, "--adapter", "-a", help="Fix a library to this adapter (LIB/NAME or NAME) for every example."
    ),
    adapter_map: Optional[Path] = typer.Option(
        None,
        "--adapter-map",
        exists=True,
        help="JSON {example id: LIB/NAME or [..]}: fixed adapters per example (an Oracle).",
    ),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="Most tokens generated per answer."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Examples generated together."),
    prompt_template: Optional[str] = typer.Option(
        None, "--prompt-template", help="Prompt for every example, with {input}."
    ),
    max_input_chars: int = typer.Option(
        2000, "--max-input-chars", min=1, help="Cut longer inputs (around the mention for entity linking)."
    ),
    chat: bool = typer.Option(True, "--chat/--no-chat", help=CHAT_HELP),
    dtype: Dtype = typer.Option(Dtype.float32, "--dtype", help="Model dtype."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    ray: Optional[str] = _ray_option("With --model, answer the batches (--threads per worker)"),
):
    """Score KILT-format predictions with the official KILT metrics (and the paper's normalised score), or
    generate them first with --model."""
    if not predictions and model is None:
        raise LoralagError("give --predictions PATH (or NAME=PATH, repeatable), or --model to generate predictions")
    if model is not None and out is None:
        raise LoralagError("--model needs --out DIR, where the predictions are written as DIR/<data-file-stem>.jsonl")
    if model is None and (library or adapter or adapter_map):
        raise LoralagError("--library, --adapter and --adapter-map need --model")
    if model is None and ray is not None:
        raise LoralagError("--ray needs --model: only generating predictions runs on a cluster")
    _check_ray(ray)
    if model is not None:  # everything generation needs is checked before the data or the model is read
        _check_router(router)
        if router == "fixed" and not library:
            raise LoralagError("--router fixed needs --library and --adapter or --adapter-map")
        if router == "fixed" and not adapter and adapter_map is None:
            raise LoralagError("--router fixed needs --adapter LIB/NAME or --adapter-map FILE")
        if prompt_template is not None and "{input}" not in prompt_template:
            raise LoralagError("--prompt-template must contain {input}")
        for path in library or []:
            _check_library(path)
        _check_model(model)
    from loralag.evaluation import evaluate as ev

    tasks: dict[str, str] | str | None = None
    for spec in task or []:
        stem, sep, value = spec.rpartition("=")
        if not sep and len(task) == 1:
            tasks = spec
        elif not sep or not stem:
            raise LoralagError(f"--task {spec!r}: with several --task options each must be STEM=TASK")
        else:
            tasks = tasks if isinstance(tasks, dict) else {}
            tasks[stem] = value
    datasets = ev.load_datasets(data, task=tasks, limit=limit)

    methods: dict[str, Path] = {}
    for spec in predictions or []:
        m_name, path = ev.parse_method(spec)
        if m_name in methods:
            raise LoralagError(f"two --predictions are named {m_name!r}; name them NAME=PATH")
        methods[m_name] = path
    preds = {m_name: ev.read_method_predictions(path, datasets) for m_name, path in methods.items()}

    if model is not None:
        options = ev.GenerationOptions(
            router=router,
            k=k,
            nprobe=nprobe,
            granularity=granularity.value,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            template=prompt_template,
            max_input_chars=max_input_chars,
            chat=chat,
        )
        gen_name = name or (router if library else "base")
        if gen_name in preds:
            raise LoralagError(f"the generated predictions and a --predictions are both named {gen_name!r}; use --name")
        preds = {
            gen_name: _eval_generate(
                ev, datasets, model, library, options, adapter, adapter_map, dtype, threads, out, ray
            ),
            **preds,
        }
    if oracle is not None and oracle not in preds:
        raise LoralagError(f"--oracle {oracle!r} names no method; methods: {', '.join(preds)}")
    report = ev.evaluate(datasets, preds, oracle=oracle, strict=strict)
    for table in ev.rich_tables(report):
        console.print(table)
    for m_name, per in report["scores"].items():
        for ds_name, res in per.items():
            if res["n_missing"]:
                err_console.print(
                    f"[yellow]warning:[/] {m_name}: {res['n_missing']} of {res['n']} examples of "
                    f"{ds_name} have no prediction; scored as wrong",
                    highlight=False,
                    soft_wrap=True,
                )
    if "normalised_error" in report:
        err_console.print(
            f"[yellow]warning:[/] no normalised table: {report['normalised_error']}", highlight=False, soft_wrap=True
        )
    if out is not None:
        js, md, png = ev.write_report(out, report)
        console.print(f"scores written to {js} and {md}, plotted in {png}")


def _eval_generate(ev, datasets, model: str, library, options, adapter, adapter_map, dtype, threads, out, ray):
    """`eval --model`: load the model behind a spinner, then generate every dataset's predictions with a
    progress bar (loralag.evaluation.evaluate.generate_method does the work)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    libs = [_open(p) for p in library or []]
    mapping = ev.read_adapter_map(adapter_map) if adapter_map is not None else None
    model_, tokenizer = load_model_waiting(model, dtype.value)
    remote = None
    if ray is not None:  # the batches on a Ray cluster, `threads` per worker
        from functools import partial

        from loralag.cluster.evaluate import RayAnswerer

        remote = partial(RayAnswerer, address=ray, threads=threads or 1)
    else:
        _set_threads(threads)
    columns = (
        TextColumn("answering {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),  # rich's speed columns are in bytes: examples/s from the task's speed
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks = {ds.name: bar.add_task(ds.name, total=len(ds.examples), visible=False, rate="") for ds in datasets}

        def progress(ds, n):
            bar.update(tasks[ds.name], completed=n, visible=True)
            speed = next(t.speed for t in bar.tasks if t.id == tasks[ds.name])
            bar.update(tasks[ds.name], rate="" if speed is None else f"{speed:.2f} ex/s")

        def done(ds, answers, path, seconds):
            bar.update(tasks[ds.name], visible=False)
            console.print(f"{ds.name}: {len(answers)} predictions in {seconds:.1f} s -> {path}", highlight=False)

        return ev.generate_method(
            model_, tokenizer, datasets, libs, options, adapter or [], mapping, out, progress, done, remote
        )


# lm-eval parses its own arguments, -h included
LM_EVAL_SETTINGS = {
    "context_settings": {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    "add_help_option": False,
}


@user_errors
def lm_eval_command(ctx: typer.Context):
    """lm-evaluation-harness with the `loralag` model registered (`--model loralag` unless another is given): every
    argument goes to lm-eval, e.g. --model_args pretrained=default,libraries=task:LIB1;knowledge:LIB2,router=lag,k=20
    --tasks TASKS. `loralag lm-eval -h` shows lm-eval's own help."""
    try:
        from loralag.evaluation.lm_eval import run_cli
    except ImportError as e:
        fail(f"lm-eval is not installed ({e}); install it with: pip install 'loralag[lm-eval]'")
    run_cli(ctx.args)
