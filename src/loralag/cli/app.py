"""The Typer app and what every command shares of it: help a newcomer can read (`_Command`), `--ray`'s optional
value, and errors a user can act on (LoralagError, and ValueError from router settings) printed as one red line
with exit code 2 (`fail`, `user_errors`). The commands themselves are registered in loralag.cli."""

from __future__ import annotations

import functools
import re

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand

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


def fail(message: str) -> None:
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
