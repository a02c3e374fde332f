"""The library commands: build, add, remove, compact, info, export and index (registered in loralag.cli)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from loralag.cli.app import console, user_errors
from loralag.cli.checks import _check_model, _check_ray, _open
from loralag.cli.loading import _prepare_model, waiting
from loralag.cli.options import LIBRARY_HELP, MODEL_HELP, Dtype, _ray_option
from loralag.errors import LoralagError

ADAPTERS_HELP = "PEFT LoRA folders, or folders holding them."
REPLACE_HELP = "Replace adapters of the same name whose weights differ (default: refuse them)."
CHUNK_HELP = "Adapters aligned and stored per segment file."


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


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


@user_errors
def remove(
    library: Path = typer.Argument(..., metavar="LIB", help=LIBRARY_HELP),
    names: list[str] = typer.Argument(..., metavar="NAMES", help="Adapter names to remove."),
):
    """Remove adapters from a library (run `compact` to reclaim their space)."""
    lib = _open(library)
    lib.remove(names)
    console.print(f"removed {len(names)} adapter(s); {lib.path} now holds {len(lib)}")


@user_errors
def compact(library: Path = typer.Argument(..., metavar="LIB", help=LIBRARY_HELP)):
    """Rewrite a library's segments without the space held by removed adapters."""
    lib = _open(library)
    before = lib.summary()["bytes_on_disk"]
    lib.compact()
    after = lib.summary()["bytes_on_disk"]
    console.print(f"compacted {lib.path}: {_human_bytes(before)} -> {_human_bytes(after)}")


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
