"""The `loralag` command line: build and manage adapter libraries, train adapters, generate with LAG.

Heavy modules (torch, transformers, matplotlib) are imported inside the commands, so `--help`
stays quick. Errors a user can act on (LoralagError, and ValueError from router settings)
print one red line and exit with code 2.
"""

from __future__ import annotations

import os

# Torch's OpenMP threads spin while waiting; on a machine shared with other busy processes that made
# small ops 5-15x slower. Passive waiting costs a dedicated machine little. Only our own CLI process
# is changed (a library must not touch its host's environment), and only if the user has not chosen.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import functools  # noqa: E402
import time  # noqa: E402
from enum import Enum  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import List, Optional  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

from .errors import LoralagError

app = typer.Typer(
    name="loralag",
    help="LoRA-Augmented Generation: route every token and layer to the right adapter of a large LoRA library.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = Console()
err_console = Console(stderr=True)

EXIT_USER_ERROR = 2


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(EXIT_USER_ERROR)


def user_errors(fn):
    """Turn LoralagError / ValueError into one red line and exit code 2, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (LoralagError, ValueError) as e:
            fail(str(e))
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]")
            raise typer.Exit(130)

    return wrapper


def _quiet_warnings() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars on every model load are noise here


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _open(path: Path):
    from .library import open_library

    return open_library(path)


def _model_shapes(model: str) -> dict:
    from .library import shapes_for_model

    try:
        return shapes_for_model(model)
    except LoralagError:
        raise
    except (OSError, ValueError) as e:
        raise LoralagError(f"cannot read the configuration of model '{model}': {e}") from e


# -- library commands -------------------------------------------------------------------------------------
@app.command()
@user_errors
def build(
    out: Path = typer.Argument(..., help="Library folder to create (or resume, or extend)."),
    adapters: List[Path] = typer.Argument(..., help="PEFT LoRA folders, or folders holding them."),
    model: str = typer.Option("default", "--model", "-m", help="Base model: 'default', a local folder or a hub id."),
    dtype: Dtype = typer.Option(Dtype.float32, "--dtype", help="Storage dtype of the aligned factors."),
    replace: bool = typer.Option(False, "--replace", help="Replace adapters of the same name that differ."),
    chunk_size: int = typer.Option(128, "--chunk-size", min=1, help="Adapters aligned per segment file."),
):
    """Align PEFT LoRA adapters and store them as a library for MODEL."""
    from .library import build_library

    _quiet_warnings()
    lib = build_library(out, adapters, base_model=model, shapes=_model_shapes(model), dtype=dtype.value,
                        replace=replace, chunk_size=chunk_size, progress=True)
    console.print(f"[green]library[/] {lib.path}: {len(lib)} adapters for base model '{lib.base_model}'")


@app.command()
@user_errors
def add(
    library: Path = typer.Argument(..., help="Library folder."),
    adapters: List[Path] = typer.Argument(..., help="PEFT LoRA folders, or folders holding them."),
    replace: bool = typer.Option(False, "--replace", help="Replace adapters of the same name that differ."),
    chunk_size: int = typer.Option(128, "--chunk-size", min=1),
):
    """Add adapters to a library (identical ones already there are skipped)."""
    lib = _open(library)
    added = lib.add(adapters, replace=replace, chunk_size=chunk_size, progress=True)
    console.print(f"added {len(added)} adapter(s); {lib.path} now holds {len(lib)}")


@app.command()
@user_errors
def remove(
    library: Path = typer.Argument(..., help="Library folder."),
    names: List[str] = typer.Argument(..., help="Adapter names to remove."),
):
    """Remove adapters from a library (run `compact` to reclaim their space)."""
    lib = _open(library)
    lib.remove(names)
    console.print(f"removed {len(names)} adapter(s); {lib.path} now holds {len(lib)}")


@app.command()
@user_errors
def compact(library: Path = typer.Argument(..., help="Library folder.")):
    """Rewrite a library's segments without the space held by removed adapters."""
    lib = _open(library)
    before = lib.summary()["bytes_on_disk"]
    lib.compact()
    after = lib.summary()["bytes_on_disk"]
    console.print(f"compacted {lib.path}: {_human_bytes(before)} -> {_human_bytes(after)}")


@app.command()
@user_errors
def info(
    library: Path = typer.Argument(..., help="Library folder."),
    adapters: bool = typer.Option(False, "--adapters", "-a", help="Also list every adapter."),
):
    """What a library holds: base model, adapters, modules, ranks, size on disk."""
    from rich.table import Table

    lib = _open(library)
    s = lib.summary()
    table = Table(title=f"Library {lib.path}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    ranks = s["ranks"]
    table.add_row("base model", s["base_model"])
    table.add_row("adapters", str(s["adapters"]))
    table.add_row("modules", f"{s['modules']} targeted of {len(lib.shapes)} adaptable")
    table.add_row("ranks", ", ".join(map(str, ranks)) if ranks else "—")
    table.add_row("dtype", s["dtype"])
    table.add_row("segments", str(s["segments"]))
    table.add_row("size on disk", _human_bytes(s["bytes_on_disk"]))
    kinds = sorted({m.rsplit(".", 1)[-1] for m in lib.target_modules})
    if kinds:
        table.add_row("module kinds", ", ".join(kinds))
    console.print(table)
    if adapters:
        rows = Table(title="Adapters", header_style="bold", title_justify="left")
        for col, just in (("name", "left"), ("rank", "right"), ("alpha", "right"), ("modules", "right"), ("source", "left")):
            rows.add_column(col, justify=just, overflow="fold")
        for a in lib.adapters:
            alpha = a.get("alpha")
            rows.add_row(a["name"], str(a["rank"]), "—" if alpha is None else f"{alpha:g}" + (" (rs)" if a.get("use_rslora") else ""),
                         str(len(a["target_modules"])), str(a.get("source", "")))
        console.print(rows)


@app.command()
@user_errors
def export(
    library: Path = typer.Argument(..., help="Library folder."),
    out: Path = typer.Argument(..., help="Folder to write PEFT adapter folders into."),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", "-n", help="Adapter to export (repeatable; default all)."),
):
    """Write adapters back out as PEFT LoRA folders."""
    lib = _open(library)
    for name in adapter or []:
        lib.entry(name)  # unknown names fail before anything is written
    paths = lib.export(out, adapter or None)
    console.print(f"exported {len(paths)} adapter(s) to {out}")


# -- training ----------------------------------------------------------------------------------------------
@app.command()
@user_errors
def train(
    out: Path = typer.Argument(..., help="Folder to write one PEFT adapter folder per input into."),
    inputs: List[Path] = typer.Argument(..., help=".txt documents, .jsonl files (prompt/answer or name/text lines), or folders of them."),
    model: str = typer.Option("default", "--model", "-m", help="Base model: 'default', a local folder or a hub id."),
    target_modules: str = typer.Option("gate_proj,up_proj,down_proj", "--target-modules", "-t",
                                       help="Comma-separated module names to adapt."),
    r: int = typer.Option(6, "--r", "-r", min=1, help="LoRA rank."),
    alpha: int = typer.Option(12, "--alpha", min=1, help="LoRA alpha."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimizer steps per adapter (default 30)."),
    epochs: Optional[float] = typer.Option(None, "--epochs", min=0.0,
                                           help="Instead of --steps: passes over each input's examples."),
    batch_size: int = typer.Option(4, "--batch-size", min=1),
    lr: float = typer.Option(2e-3, "--lr", min=0.0, help="Learning rate."),
    max_length: int = typer.Option(256, "--max-length", min=2, help="Tokens per training window."),
    group_size: int = typer.Option(1, "--group-size", min=1,
                                   help="Adapters trained together per forward/backward, each row through its own "
                                        "LoRA (the same adapters as one at a time; not faster on CPU, see "
                                        "benchmarks/results/train.md)."),
):
    """Train one LoRA adapter per document or prompt/answer file (finished ones are skipped)."""
    if steps is not None and epochs is not None:
        raise LoralagError("give --steps or --epochs, not both")
    _quiet_warnings()
    import math

    from .models import load_model
    from .train import TrainConfig, build_examples, read_training_inputs, train_adapters

    items = read_training_inputs(inputs)
    targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    if not targets:
        raise LoralagError("--target-modules names no module")
    model_, tokenizer = load_model(model)
    base = TrainConfig(target_modules=targets, r=r, alpha=alpha, batch_size=batch_size, lr=lr, max_length=max_length)
    if steps is not None:
        base.steps = steps
    by_steps: dict[int, list] = {}  # a group shares one config: bucket the items by their step count
    for item in items:
        n_steps = base.steps
        if epochs is not None:  # steps from the item's own number of examples
            n = len(build_examples(tokenizer, item, base))
            n_steps = max(1, math.ceil(epochs * n / min(n, batch_size)))
        by_steps.setdefault(n_steps, []).append(item)
    done = {}
    for n_steps, bucket in by_steps.items():
        cfg = TrainConfig(**{**base.__dict__, "steps": n_steps})
        trained = train_adapters(model_, tokenizer, bucket, out, cfg, progress=True, group_size=group_size)
        done.update({item.name: path for item, path in zip(bucket, trained)})
    paths = [done[item.name] for item in items]
    console.print(f"[green]{len(paths)} adapter(s)[/] in {out}: " + ", ".join(p.name for p in paths))


# -- generation --------------------------------------------------------------------------------------------
@app.command()
@user_errors
def generate(
    prompt: List[str] = typer.Argument(..., help="Prompt(s); several are generated as one batch."),
    model: str = typer.Option("default", "--model", "-m", help="Base model: 'default', a local folder or a hub id."),
    library: Optional[List[Path]] = typer.Option(None, "--library", "-l", help="Library to route over (repeatable)."),
    router: str = typer.Option("lag", "--router", help="lag, arrow, arrow-mix, spectral, uniform, none."),
    k: int = typer.Option(20, "--k", help="Arrow candidates per token for LAG / arrow-mix."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", "--arrow-index", help="Use the library's arrow index (`loralag index`), scanning this many clusters per token."),
    granularity: str = typer.Option("token", "--granularity", help="token (the paper) or sequence (majority vote)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1),
    show_routing: bool = typer.Option(False, "--show-routing", help="Print the adapter chosen per prompt token."),
    heatmap: Optional[Path] = typer.Option(None, "--heatmap", help="Write a routing heatmap PNG here (first prompt)."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Use the tokenizer's chat template."),
    sample: bool = typer.Option(False, "--sample", help="Sample instead of greedy decoding."),
    dtype: Dtype = typer.Option(Dtype.float32, "--dtype", help="Model dtype."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch (on a busy machine 1 is often fastest)."),
):
    """Generate with LAG over one or more libraries (or with the plain base model when none is given)."""
    _quiet_warnings()
    import torch

    from . import generate as gen
    from .models import load_model
    from .routed_model import attach, detach
    from .routers import RouteSpec

    _set_threads(threads)
    if router == "fixed":
        raise LoralagError("router 'fixed' needs adapters per sequence; use the Python API (RoutingState.fix)")
    RouteSpec(router=router, k=k, nprobe=nprobe)  # bad router settings fail before the model loads
    libs = [_open(p) for p in library or []]
    if (show_routing or heatmap) and not libs:
        raise LoralagError("--show-routing and --heatmap need at least one --library")
    model_, tokenizer = load_model(model, dtype=getattr(torch, dtype.value))
    if libs:
        attach(model_, {_unique_name(lib, libs): lib for lib in libs}, router=router, k=k, nprobe=nprobe)
    try:
        want_trace = bool(libs) and (show_routing or heatmap is not None)
        result = gen.generate(model_, tokenizer, list(prompt), max_new_tokens=max_new_tokens, chat=chat,
                              greedy=not sample, trace=want_trace, granularity=granularity)
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


def _unique_name(lib, libs) -> str:
    """A library's name for routing: its folder name, or its path where two folders share a name."""
    if sum(other.name == lib.name for other in libs) > 1:
        return str(lib.path)
    return lib.name


@app.command()
@user_errors
def index(
    library: Path = typer.Argument(..., help="Library folder."),
    nlist: Optional[int] = typer.Option(None, "--nlist", help="Clusters per module (default about 2·sqrt(N))."),
    iters: int = typer.Option(12, "--iters", min=1, help="k-means iterations."),
):
    """Build the sub-linear arrow index (sign-invariant clusters of the arrows); use it with --nprobe."""
    info = _open(library).build_index(nlist=nlist, iters=iters)
    console.print(f"arrow index {info['file']}: up to {info['nlist']} clusters per module")


@app.command()
@user_errors
def serve(
    model: str = typer.Option("default", "--model", "-m", help="Base model: 'default', a local folder or a hub id."),
    library: Optional[List[Path]] = typer.Option(None, "--library", "-l", help="Library to route over (repeatable)."),
    router: str = typer.Option("lag", "--router"),
    k: int = typer.Option(20, "--k"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Sequences decoded together."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Waiting requests before answering 429."),
    request_timeout: float = typer.Option(120.0, "--request-timeout", help="Seconds before a request is ended."),
):
    """An OpenAI-compatible server (/v1/completions, /v1/chat/completions) routing every request."""
    _quiet_warnings()
    from .routers import RouteSpec
    from .serve import serve as run_server

    RouteSpec(router=router, k=k)
    run_server(model, [str(p) for p in library or []], router=router, k=k, host=host, port=port,
               max_batch=max_batch, max_queue=max_queue, request_timeout=request_timeout)


@app.command()
@user_errors
def bench(
    size: str = typer.Option("tiny", "--size", help="tiny (minutes, in the test suite) or full (200+ knowledge adapters)."),
    data: Path = typer.Option(Path("../shared/data/lama-trex"), "--data", help="Folder of LAMA T-REx relation files."),
    out: Path = typer.Option(Path("results/lama"), "--out", help="Results folder (tables, plots, predictions)."),
    model: str = typer.Option("default", "--model", "-m"),
    threads: Optional[int] = typer.Option(None, "--threads"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Processes answering the questions "
                                          "(default: 2 when torch has 2+ threads and there are 8+ batches)."),
    eval_dtype: Optional[str] = typer.Option(None, "--eval-dtype",
                                             help="The model's dtype while answering (default: the size's; full: bfloat16)."),
):
    """The LAMA knowledge benchmark: every routing method against base model and Oracle, KILT metrics."""
    _quiet_warnings()
    from .lama_bench import print_summary, run_bench

    results = run_bench(size, data_dir=data, out_dir=out, model_spec=model, threads=threads, workers=workers,
                        console=console, eval_dtype=eval_dtype)
    print_summary(results, console)


# -- evaluation --------------------------------------------------------------------------------------------
@app.command("eval")
@user_errors
def eval_command(
    data: List[Path] = typer.Argument(..., help="Data files: KILT jsonl (any task), NQ-open, FEVER (original), LAMA T-REx."),
    predictions: Optional[List[str]] = typer.Option(
        None, "--predictions", "-p",
        help="KILT-format predictions: a file (one data file) or a folder of <data-file-stem>.jsonl; "
             "NAME=PATH to name the method (repeatable, to compare methods)."),
    oracle: Optional[str] = typer.Option(None, "--oracle",
                                         help="Method to normalise by (Eq. 9); default 'oracle' when one is named so."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="Write scores.json and scores.md here (and, with --model, the predictions)."),
    task: Optional[List[str]] = typer.Option(None, "--task", help="Force the task of KILT files: TASK, or STEM=TASK (repeatable)."),
    strict: bool = typer.Option(False, "--strict", help="A missing prediction is an error (as in the official scorer), not a wrong answer."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Only the first N examples of each data file."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Generate predictions with this model ('default', a folder or a hub id)."),
    name: Optional[str] = typer.Option(None, "--name", help="Method name of the generated predictions (default: the router, or 'base')."),
    library: Optional[List[Path]] = typer.Option(None, "--library", "-l", help="Library to route over (repeatable)."),
    router: str = typer.Option("lag", "--router", help="lag, arrow, arrow-mix, spectral, uniform, none, fixed."),
    k: int = typer.Option(20, "--k", help="Arrow candidates per token for LAG / arrow-mix."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", "--arrow-index", help="Use the library's arrow index (`loralag index`), scanning this many clusters per token."),
    granularity: str = typer.Option("token", "--granularity", help="token (the paper) or sequence (majority vote)."),
    adapter: Optional[List[str]] = typer.Option(None, "--adapter", "-a",
                                                help="Fix a library to this adapter (LIB/NAME or NAME) for every example."),
    adapter_map: Optional[Path] = typer.Option(None, "--adapter-map",
                                               help="JSON {example id: LIB/NAME or [..]}: fixed adapters per example (an Oracle)."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1),
    batch_size: int = typer.Option(8, "--batch-size", min=1),
    prompt_template: Optional[str] = typer.Option(None, "--prompt-template", help="Prompt for every example, with {input}."),
    max_input_chars: int = typer.Option(2000, "--max-input-chars", min=1, help="Cut longer inputs (around the mention for entity linking)."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Use the tokenizer's chat template."),
    dtype: Dtype = typer.Option(Dtype.float32, "--dtype", help="Model dtype."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch."),
):
    """Score KILT-format predictions with the official KILT metrics (and the paper's normalised score), or
    generate them first with --model."""
    from . import evaluate as ev

    if not predictions and model is None:
        raise LoralagError("give --predictions PATH (or NAME=PATH, repeatable), or --model to generate predictions")
    if model is not None and out is None:
        raise LoralagError("--model needs --out DIR, where the predictions are written as DIR/<data-file-stem>.jsonl")
    if model is None and (library or adapter or adapter_map):
        raise LoralagError("--library, --adapter and --adapter-map need --model")
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
        gen_name = name or (router if library else "base")
        if gen_name in preds:
            raise LoralagError(f"the generated predictions and a --predictions are both named {gen_name!r}; use --name")
        preds = {gen_name: _eval_generate(ev, datasets, model, library, router, k, nprobe, granularity, adapter,
                                          adapter_map, max_new_tokens, batch_size, prompt_template, max_input_chars,
                                          chat, dtype, threads, out), **preds}
    if oracle is not None and oracle not in preds:
        raise LoralagError(f"--oracle {oracle!r} names no method; methods: {', '.join(preds)}")
    report = ev.evaluate(datasets, preds, oracle=oracle, strict=strict)
    for table in ev.rich_tables(report):
        console.print(table)
    for m_name, per in report["scores"].items():
        for ds_name, res in per.items():
            if res["n_missing"]:
                err_console.print(f"[yellow]warning:[/] {m_name}: {res['n_missing']} of {res['n']} examples of "
                                  f"{ds_name} have no prediction; scored as wrong", highlight=False, soft_wrap=True)
    if "normalised_error" in report:
        err_console.print(f"[yellow]warning:[/] no normalised table: {report['normalised_error']}", highlight=False,
                          soft_wrap=True)
    if out is not None:
        js, md = ev.write_report(out, report)
        console.print(f"scores written to {js} and {md}")


def _eval_generate(ev, datasets, model, library, router, k, nprobe, granularity, adapter, adapter_map,
                   max_new_tokens, batch_size, prompt_template, max_input_chars, chat, dtype, threads, out):
    """`eval --model`: generate every dataset's predictions, write them to OUT/<stem>.jsonl, return them."""
    _quiet_warnings()
    import torch

    from .kilt import write_kilt_predictions
    from .models import load_model
    from .routed_model import attach, detach
    from .routers import RouteSpec

    _set_threads(threads)
    RouteSpec(router=router, k=k, nprobe=nprobe)  # bad router settings fail before the model loads
    if granularity not in ("token", "sequence"):
        raise LoralagError(f"granularity must be 'token' or 'sequence', got {granularity!r}")
    if prompt_template is not None and "{input}" not in prompt_template:
        raise LoralagError("--prompt-template must contain {input}")
    libs = [_open(p) for p in library or []]
    named = {_unique_name(lib, libs): lib for lib in libs}
    if router == "fixed" and not libs:
        raise LoralagError("--router fixed needs --library and --adapter or --adapter-map")
    fixed, per_example = ev.fixed_adapters(named, adapter or [],
                                           ev.read_adapter_map(adapter_map) if adapter_map is not None else None)
    if router == "fixed" and not fixed and not per_example:
        raise LoralagError("--router fixed needs --adapter LIB/NAME or --adapter-map FILE")
    fixed_libs = set(fixed) | {lib for m in per_example.values() for lib in m}
    model_, tokenizer = load_model(model, dtype=getattr(torch, dtype.value))
    if libs:
        routers = {lib: ("fixed" if lib in fixed_libs or router == "fixed" else router) for lib in named}
        attach(model_, named, router=routers, k=k, nprobe=nprobe)
    out_preds = {}
    try:
        for ds in datasets:
            start = time.perf_counter()
            answers = ev.generate_predictions(model_, tokenizer, ds, batch_size=batch_size,
                                              max_new_tokens=max_new_tokens, template=prompt_template, chat=chat,
                                              granularity=granularity, max_input_chars=max_input_chars,
                                              fixed=fixed, fixed_per_example=per_example)
            path = write_kilt_predictions(Path(out) / f"{ds.name}.jsonl", answers)
            out_preds[ds.name] = answers
            console.print(f"{ds.name}: {len(answers)} predictions in {time.perf_counter() - start:.1f} s -> {path}",
                          highlight=False)
    finally:
        detach(model_)
    return out_preds


# -- demo --------------------------------------------------------------------------------------------------
@app.command()
@user_errors
def demo(
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Where adapters and library are cached (default: under the loralag cache)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training steps per adapter."),
    router: str = typer.Option("lag", "--router", help="Router for the LAG column."),
    k: int = typer.Option(20, "--k", help="Arrow candidates per token."),
    heatmap: Optional[Path] = typer.Option(None, "--heatmap", help="Also write LAG's routing heatmap of the first question."),
    model: str = typer.Option("default", "--model", "-m", help="Base model (the demo is tuned for the default one)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for torch (on a busy machine 1 is often fastest)."),
):
    """Train knowledge adapters on invented entities, then compare base model, LAG and Oracle on questions."""
    _quiet_warnings()
    from .routers import RouteSpec

    RouteSpec(router=router, k=k)
    if router == "fixed":
        raise LoralagError("the demo's LAG column needs a routing router; 'fixed' is what the Oracle column does")
    from .demo import print_results, run_demo

    _set_threads(threads)

    start = time.perf_counter()
    results = run_demo(workdir, steps=steps, router=router, k=k, model_spec=model, console=console)
    print_results(results, console)
    if heatmap is not None and results["trace"] is not None:
        from . import generate as gen

        path = gen.routing_heatmap(results["trace"], results["tokenizer"], results["trace"].input_ids, heatmap, seq=0,
                                   prompt_only=False)
        console.print(f"routing heatmap written to {path}")
    console.print(f"total {time.perf_counter() - start:.1f} s")


def main() -> None:  # pragma: no cover - python -m loralag.cli
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
