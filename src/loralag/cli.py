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

import ast  # noqa: E402
import functools  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from enum import Enum  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.markup import escape  # noqa: E402
from typer.core import TyperCommand  # noqa: E402

from loralag.errors import LoralagError

console = Console()
err_console = Console(stderr=True)

EXIT_USER_ERROR = 2
_BOOL_WORDS = {"true", "false", "yes", "no", "on", "off", "1", "0", "y", "n"}


class _Command(TyperCommand):
    """Help and parsing a newcomer can read: `OUT ADAPTERS...` in the usage line (not `{out} {adapters}...`),
    flags without a `<bool>` value column, and `--flag true` refused (it would make `true` the next argument)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for param in self.params:
            if getattr(param, "is_flag", False):
                param.metavar = ""
            if param.help:  # help is text: rich would eat `loralag[ray]` as a markup tag
                param.help = escape(param.help)

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    def collect_usage_pieces(self, ctx) -> list[str]:
        return [re.sub(r"^\{(.+)\}((?:\.\.\.)?)$", r"\1\2", piece) for piece in super().collect_usage_pieces(ctx)]

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        args = _ray_value(args)
        flags = {opt for p in self.params if getattr(p, "is_flag", False) for opt in (*p.opts, *p.secondary_opts)}
        for flag, value in zip(args, args[1:]):
            if flag == "--":
                break
            if flag in flags and value.lower() in _BOOL_WORDS:
                raise typer.BadParameter(
                    f"a flag takes no value: write '{flag}' alone, not '{flag} {value}'", ctx=ctx, param_hint=flag
                )
        return super().parse_args(ctx, args)


def _ray_value(args: list[str]) -> list[str]:
    """`--ray` takes an optional ADDRESS (HOST:PORT, ray://HOST:PORT: always with a colon); alone it means "auto"."""
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg == "--":
            return out + args[i + 1 :]
        if arg == "--ray" and (i + 1 == len(args) or ":" not in args[i + 1]):
            out.append("auto")
    return out


class _App(typer.Typer):
    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", _Command)
        return super().command(*args, **kwargs)


app = _App(
    name="loralag",
    help="LoRA-Augmented Generation: route every token and layer to the right adapter of a large LoRA library.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class FcForm(str, Enum):  # lama_data.FC_FORMS
    label = "label"
    recall = "recall"


class Init(str, Enum):  # loralag.training.INITS
    peft = "peft"
    activations = "activations"
    contrast = "contrast"


INIT_HELP = (
    "LoRA A's init: 'peft' (PEFT's random one, from the adapter's own seed), 'activations' (the top-r "
    "directions of the base model's inputs over the adapter's own text) or 'contrast' (those with the most "
    "energy relative to generic text); see the README's 'Distinct inits'."
)


class Granularity(str, Enum):
    token = "token"
    sequence = "sequence"


def fail(message: str) -> None:
    from rich.markup import escape

    # escaped: a message's own brackets (pip install "loralag[ray]", a list of names) are text, not markup
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
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
            raise typer.Exit(130) from None

    return wrapper


# -- checks made before anything heavy is imported or loaded ------------------------------------------------
@functools.cache
def router_names() -> tuple[str, ...]:
    """The keys of loralag.routing.routers.ROUTERS, read from routers.py's source: checking a router name then costs no
    torch import (1-2 s). Falls back to importing the module if ROUTERS is not a plain dict literal there."""
    try:
        tree = ast.parse((Path(__file__).parent / "routing" / "routers.py").read_text(encoding="utf-8"))
        for node in tree.body:
            target = (
                node.targets[0]
                if isinstance(node, ast.Assign) and len(node.targets) == 1
                else getattr(node, "target", None)
            )
            if isinstance(target, ast.Name) and target.id == "ROUTERS" and isinstance(node.value, ast.Dict):
                names = tuple(k.value for k in node.value.keys if isinstance(k, ast.Constant))
                if len(names) == len(node.value.keys):
                    return names
    except (OSError, SyntaxError):
        pass
    from loralag.routing.routers import ROUTERS

    return tuple(ROUTERS)


# Routers a command cannot use, and why (every other name of ROUTERS is offered).
NO_FIXED_CLI = (
    "it needs the adapter of every sequence, which this command cannot be given (use "
    "`loralag eval --adapter/--adapter-map`, or RoutingState.fix in Python)"
)
NO_FIXED_SERVE = "it is chosen per request: send router 'fixed' with 'adapters' in the request body"
NO_FIXED_DEMO = "the demo's Oracle column is what 'fixed' does; its LAG column needs a routing router"


def _router_help(what: str, refused: str | None = None) -> str:
    names = [n for n in router_names() if refused is None or n != "fixed"]
    return f"{what}: {', '.join(names)}." + (f" Not 'fixed': {refused}." if refused else "")


def _check_router(router: str, refused: str | None = None) -> None:
    """An unknown router name, or 'fixed' where the command cannot use it (`refused` says why), fails at once."""
    names = router_names()
    if router not in names:
        fail(
            f"unknown router '{router}'; choose one of {', '.join(n for n in names if refused is None or n != 'fixed')}"
        )
    if router == "fixed" and refused is not None:
        fail(f"--router fixed cannot be used here: {refused}")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _check_model(spec: str) -> None:
    """A model that is clearly missing fails before torch and transformers load: a folder without config.json,
    or a path (absolute, ./, ../, ~) that does not exist. Anything else may be a hub id."""
    if spec == "default":
        return
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            fail(f"model {spec} is a file; give a model folder (with config.json), a hub id or 'default'")
        if not (path / "config.json").is_file():
            fail(f"model folder {spec} has no config.json; is it a saved Hugging Face model?")
    elif not _HUB_ID.match(spec) or spec.startswith((".", "~")):
        fail(f"model {spec}: no such folder (give a model folder, a hub id or 'default')")


def _check_library(path: Path) -> None:
    """A missing library (or a folder that is not one) fails at once; library.MANIFEST names the same file."""
    if not path.is_dir():
        fail(f"no library at {path}: the folder does not exist (make one with `loralag build`)")
    if not (path / "manifest.json").is_file():
        fail(f"{path} is not a loralag library: no manifest.json")


@contextmanager
def waiting(message: str):
    """A spinner with a message on stderr while something slow runs (nothing is drawn when stderr is no terminal).
    Yields the rich Status, whose message `.update(...)` changes."""
    with err_console.status(message, spinner="dots") as status:
        yield status


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


def _prepare_model(spec: str, status) -> None:
    """Import torch and transformers and, for the default model on first use, convert its GGUF (about half a
    minute), saying so on the spinner."""
    status.update(f"Loading torch and transformers for model '{spec}' …")
    _quiet_warnings()
    from loralag import models

    if spec in models.BUNDLED:
        target = models.cache_dir() / "models" / models.BUNDLED[spec].name
        if not all((target / name).is_file() for name in models._CONVERTED_FILES):
            status.update(
                f"First use of model '{spec}': converting the bundled {models.BUNDLED[spec].gguf_file} "
                f"into {target} (once, about half a minute) …"
            )
            models.bundled_model_dir(spec)


def load_model_waiting(spec: str, dtype: str = "float32"):
    """loralag.models.load_model behind a spinner (the first load of the default model converts it)."""
    with waiting(f"Loading model '{spec}' …") as status:
        _prepare_model(spec, status)
        import torch

        from loralag.models import load_model

        status.update(f"Loading model '{spec}' …")
        return load_model(spec, dtype=getattr(torch, dtype))


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _open(path: Path):
    _check_library(path)
    from loralag.library.store import open_library

    return open_library(path)


def _model_shapes(model: str) -> dict:
    with waiting(f"Reading the configuration of model '{model}' …") as status:
        _prepare_model(model, status)
        from loralag.library.store import shapes_for_model

        try:
            return shapes_for_model(model)
        except LoralagError:
            raise
        except (OSError, ValueError) as e:
            raise LoralagError(f"cannot read the configuration of model '{model}': {e}") from e


# -- library commands -------------------------------------------------------------------------------------
MODEL_HELP = "Base model: 'default' (SmolLM2-135M-Instruct), a local Hugging Face folder or a hub id."
LIBRARY_HELP = "Library folder (made by `loralag build`)."
ADAPTERS_HELP = "PEFT LoRA folders, or folders holding them."
REPLACE_HELP = "Replace adapters of the same name whose weights differ (default: refuse them)."
CHUNK_HELP = "Adapters aligned and stored per segment file."


def _ray_option(what: str):
    """`--ray [ADDRESS]`: run on a Ray cluster (loralag.cluster); alone, the one in $RAY_ADDRESS or on this machine."""
    return typer.Option(
        None,
        "--ray",
        metavar="[ADDRESS]",
        help=f"{what} on a Ray cluster: its ADDRESS (HOST:PORT or ray://HOST:10001), or alone for $RAY_ADDRESS, "
        'a cluster started here with `ray start`, else a local one. Needs pip install "loralag[ray]".',
    )


def _check_ray(address: str | None) -> None:
    if address is not None:
        from loralag.cluster.connect import require_ray

        require_ray()


@app.command()
@user_errors
def build(
    out: Path = typer.Argument(..., metavar="LIB", help="Library folder to create (or resume, or extend)."),
    adapters: list[Path] = typer.Argument(..., metavar="ADAPTERS", exists=True, help=ADAPTERS_HELP),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    dtype: Dtype = typer.Option(Dtype.float32, "--dtype", help="Storage dtype of the aligned factors."),
    replace: bool = typer.Option(False, "--replace", help=REPLACE_HELP),
    chunk_size: int = typer.Option(128, "--chunk-size", min=1, help=CHUNK_HELP),
    ray: Optional[str] = _ray_option("Align the adapters (this process alone writes the library)"),
):
    """Align PEFT LoRA adapters and store them as a library for the base model (--model)."""
    _check_ray(ray)
    _check_model(model)
    shapes = _model_shapes(model)
    from loralag.cluster.build import chunk_map
    from loralag.library.store import build_library

    lib = build_library(
        out,
        adapters,
        base_model=model,
        shapes=shapes,
        dtype=dtype.value,
        replace=replace,
        chunk_size=chunk_size,
        progress=True,
        map_chunks=chunk_map(ray),
    )
    console.print(f"[green]library[/] {lib.path}: {len(lib)} adapters for base model '{lib.base_model}'")


@app.command()
@user_errors
def add(
    library: Path = typer.Argument(..., metavar="LIB", help=LIBRARY_HELP),
    adapters: list[Path] = typer.Argument(..., metavar="ADAPTERS", exists=True, help=ADAPTERS_HELP),
    replace: bool = typer.Option(False, "--replace", help=REPLACE_HELP),
    chunk_size: int = typer.Option(128, "--chunk-size", min=1, help=CHUNK_HELP),
):
    """Add adapters to a library (identical ones already there are skipped)."""
    lib = _open(library)
    added = lib.add(adapters, replace=replace, chunk_size=chunk_size, progress=True)
    console.print(f"added {len(added)} adapter(s); {lib.path} now holds {len(lib)}")


@app.command()
@user_errors
def remove(
    library: Path = typer.Argument(..., metavar="LIB", help=LIBRARY_HELP),
    names: list[str] = typer.Argument(..., metavar="NAMES", help="Adapter names to remove."),
):
    """Remove adapters from a library (run `compact` to reclaim their space)."""
    lib = _open(library)
    lib.remove(names)
    console.print(f"removed {len(names)} adapter(s); {lib.path} now holds {len(lib)}")


@app.command()
@user_errors
def compact(library: Path = typer.Argument(..., metavar="LIB", help=LIBRARY_HELP)):
    """Rewrite a library's segments without the space held by removed adapters."""
    lib = _open(library)
    before = lib.summary()["bytes_on_disk"]
    lib.compact()
    after = lib.summary()["bytes_on_disk"]
    console.print(f"compacted {lib.path}: {_human_bytes(before)} -> {_human_bytes(after)}")


@app.command()
@user_errors
def info(
    library: Path = typer.Argument(..., metavar="LIB", help=LIBRARY_HELP),
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
        for col, just in (
            ("name", "left"),
            ("rank", "right"),
            ("alpha", "right"),
            ("modules", "right"),
            ("source", "left"),
        ):
            rows.add_column(col, justify=just, overflow="fold")
        for a in lib.adapters:
            alpha = a.get("alpha")
            rows.add_row(
                a["name"],
                str(a["rank"]),
                "—" if alpha is None else f"{alpha:g}" + (" (rs)" if a.get("use_rslora") else ""),
                str(len(a["target_modules"])),
                str(a.get("source", "")),
            )
        console.print(rows)


@app.command()
@user_errors
def export(
    library: Path = typer.Argument(..., metavar="LIB", help=LIBRARY_HELP),
    out: Path = typer.Argument(..., metavar="OUT", help="Folder to write PEFT adapter folders into."),
    adapter: Optional[list[str]] = typer.Option(
        None, "--adapter", "-n", help="Adapter to export (repeatable; default all)."
    ),
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
    workers: int = typer.Option(
        1,
        "--workers",
        min=1,
        help="Adapters trained at a time, each in its own process with threads / N torch threads (the same "
        "adapters up to float rounding; for many cores: on 2, two train no faster than one process).",
    ),
    ray: Optional[str] = _ray_option("Train the adapters"),
):
    """Train one LoRA adapter per document or prompt/answer file (finished ones are skipped)."""
    if steps is not None and epochs is not None:
        raise LoralagError("give --steps or --epochs, not both")
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
        from loralag.training.train import read_training_inputs

        items = read_training_inputs(inputs)
    from loralag.training.train import TrainConfig, train_for_epochs

    model_, tokenizer = load_model_waiting(model)
    config = TrainConfig(
        target_modules=targets,
        r=rank,
        alpha=alpha,
        batch_size=batch_size,
        lr=lr,
        max_length=max_length,
        init=init.value,
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


# -- generation --------------------------------------------------------------------------------------------
LIBRARIES_HELP = "Library to route over (repeatable; each is routed by its own router)."
K_HELP = "Arrow candidates per token for lag / arrow-mix."
NPROBE_HELP = "Use the library's arrow index (`loralag index`), scanning this many clusters per token."
GRANULARITY_HELP = (
    "token: every token routed on its own (the paper); sequence: each library's majority adapter over the prompt "
    "serves the whole answer."
)
CHAT_HELP = "Wrap each prompt in the tokenizer's chat template (--no-chat: plain completion)."
THREADS_HELP = "CPU threads for torch (default torch's; on a busy machine 1 is often fastest)."


@app.command()
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


@app.command()
@user_errors
def index(
    library: Path = typer.Argument(..., metavar="LIB", help=LIBRARY_HELP),
    nlist: Optional[int] = typer.Option(None, "--nlist", min=1, help="Clusters per module (default about 2·sqrt(N))."),
    iters: int = typer.Option(12, "--iters", min=1, help="k-means iterations."),
):
    """Build the sub-linear arrow index (sign-invariant clusters of the arrows); use it with --nprobe."""
    lib = _open(library)
    with waiting(f"Clustering the arrows of {len(lib)} adapters …"):
        info = lib.build_index(nlist=nlist, iters=iters)
    console.print(f"arrow index {info['file']}: up to {info['nlist']} clusters per module")


@app.command()
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


@app.command()
@user_errors
def bench(
    size: str = typer.Option(
        "tiny",
        "--size",
        help="tiny (minutes, in the test suite), small (12 entities) or full "
        "(200 knowledge adapters, the README's run).",
    ),
    data: Optional[Path] = typer.Option(
        None,
        "--data",
        help="Folder of LAMA T-REx relation files (default $LORALAG_LAMA_DATA, else ../shared/data/lama-trex).",
    ),
    out: Path = typer.Option(Path("results/lama"), "--out", help="Results folder (tables, plots, predictions)."),
    entities: Optional[int] = typer.Option(
        None,
        "--entities",
        min=2,
        help="Knowledge adapters (one per subject entity, one question per entity and family) instead of the "
        "size's (small 12, full 200); the size's other settings stay.",
    ),
    model: str = typer.Option("default", "--model", "-m", help=MODEL_HELP),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help=THREADS_HELP),
    workers: Optional[int] = typer.Option(
        None,
        "--workers",
        min=1,
        help="Processes training the knowledge adapters (default 1) and answering the questions (default: 2 when "
        "torch has 2+ threads and there are 8+ batches).",
    ),
    eval_dtype: Optional[Dtype] = typer.Option(
        None, "--eval-dtype", help="The model's dtype while answering (default: the size's; full: bfloat16)."
    ),
    fc_form: FcForm = typer.Option(
        FcForm.label,
        "--fc-form",
        help="Fact checking's answer: the bare label, as KILT's "
        "FEVER is scored (default), or 'recall': the object, then the verdict (harder for "
        "per-token routing).",
    ),
    fc_steps: Optional[int] = typer.Option(
        None,
        "--fc-steps",
        min=1,
        help="The fact-checking task adapter's training steps (default: twice the other task adapters', 160 at "
        "full size); another count trains into its own folder.",
    ),
    shared_init: bool = typer.Option(
        False,
        "--shared-init",
        help="Train every adapter from one LoRA init (loralag 0.1's way), to measure what distinct inits do.",
    ),
    know_init: Init = typer.Option(Init.contrast, "--know-init", help="The knowledge adapters' " + INIT_HELP),
    task_init: Init = typer.Option(Init.contrast, "--task-init", help="The task adapters' " + INIT_HELP),
    know_qa: bool = typer.Option(
        False,
        "--know-qa",
        help="The knowledge adapters also learn each fact restated as a question and answer (README, LAMA).",
    ),
    task_seed: Optional[int] = typer.Option(
        None,
        "--task-seed",
        help="The task adapters' training seed (default: the run's seed, 0); another retrains only them, into "
        "their own folder, to measure how much their training moves the scores.",
    ),
    methods: Optional[str] = typer.Option(
        None,
        "--methods",
        help="Only these methods, comma-separated (default: all): base, oracle, arrow, lag, lag-prefix, spectral, "
        "arrow-mix, rag, prag, r-lag, p-lag, k-sweep.",
    ),
    ray: Optional[str] = _ray_option("Train the adapters and answer the questions (--workers shares)"),
):
    """The LAMA knowledge benchmark: every routing method against base model and Oracle, KILT metrics."""
    from loralag.experiments.lama.config import default_data_dir, size_config
    from loralag.experiments.lama.report import print_summary
    from loralag.experiments.lama.run import run_bench

    chosen = tuple(m.strip() for m in methods.split(",") if m.strip()) if methods is not None else None
    if chosen is not None and not chosen:
        raise LoralagError("--methods needs at least one method")
    size_config(size, methods=chosen)  # an unknown size or method fails here
    _check_ray(ray)
    data = data if data is not None else default_data_dir()
    if not data.is_dir():
        raise LoralagError(
            f"no LAMA data folder at {data} (give --data DIR or set LORALAG_LAMA_DATA; see the README's 'Test data')"
        )
    _check_model(model)
    with waiting(f"Loading torch and model '{model}' …") as status:
        _prepare_model(model, status)
    results = run_bench(
        size,
        data_dir=data,
        out_dir=out,
        model_spec=model,
        threads=threads,
        workers=workers,
        console=console,
        eval_dtype=eval_dtype.value if eval_dtype else None,
        fc_form=fc_form.value,
        fc_steps=fc_steps,
        shared_init=shared_init or None,
        know_init=know_init.value,
        task_init=task_init.value,
        know_qa=know_qa or None,
        task_seed=task_seed,
        n_entities=entities,
        methods=chosen,
        ray=ray,
    )
    print_summary(results, console)


# -- evaluation --------------------------------------------------------------------------------------------
@app.command("eval")
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


# -- lm-evaluation-harness -------------------------------------------------------------------------------------
@app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
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


# -- demo --------------------------------------------------------------------------------------------------
@app.command()
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


def main() -> None:  # pragma: no cover - python -m loralag.cli
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
