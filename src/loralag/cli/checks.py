"""Checks made before anything heavy is imported or loaded: a router name, a model, a library, Ray; each fails
with one red line (loralag.cli.app.fail)."""

from __future__ import annotations

import re
from pathlib import Path

from loralag.cli.app import fail
from loralag.cli.options import router_names


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


def _check_ray(address: str | None) -> None:
    if address is not None:
        from loralag.cluster.connect import require_ray

        require_ray()


def _open(path: Path):
    _check_library(path)
    from loralag.library.store import open_library

    return open_library(path)
