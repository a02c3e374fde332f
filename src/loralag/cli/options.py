"""Options and help texts shared by several commands: the option enums, the router names (read without importing
torch), what each command refuses of them, and `--ray [ADDRESS]`."""

from __future__ import annotations

import ast
import functools
from enum import Enum
from pathlib import Path

import typer


class Dtype(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class FcForm(str, Enum):  # lama_data.FC_FORMS
    label = "label"
    recall = "recall"


class TaskUnder(str, Enum):  # lama config.TASK_UNDER
    none = "none"
    lag = "lag"
    lag_bare = "lag-bare"
    lag_fact = "lag-fact"


class TaskContrast(str, Enum):  # lama config.TASK_CONTRAST
    generic = "generic"
    families = "families"


class Init(str, Enum):  # loralag.training.INITS
    peft = "peft"
    activations = "activations"
    contrast = "contrast"
    salient = "salient"


INIT_HELP = (
    "LoRA A's init: 'peft' (PEFT's random one, from the adapter's own seed), 'activations' (the top-r "
    "directions of the base model's inputs over the adapter's own text), 'contrast' (those with the most "
    "energy relative to generic text) or 'salient' (contrast, each token weighted by the base model's loss on "
    "the token it predicts); see the README's 'Distinct inits'."
)


class Granularity(str, Enum):
    token = "token"
    sequence = "sequence"


MODEL_HELP = "Base model: 'default' (SmolLM2-135M-Instruct), a local Hugging Face folder or a hub id."
LIBRARY_HELP = "Library folder (made by `loralag build`)."
LIBRARIES_HELP = "Library to route over (repeatable; each is routed by its own router)."
K_HELP = "Arrow candidates per token for lag / arrow-mix."
NPROBE_HELP = "Use the library's arrow index (`loralag index`), scanning this many clusters per token."
GRANULARITY_HELP = (
    "token: every token routed on its own (the paper); sequence: each library's majority adapter over the prompt "
    "serves the whole answer."
)
CHAT_HELP = "Wrap each prompt in the tokenizer's chat template (--no-chat: plain completion)."
THREADS_HELP = "CPU threads for torch (default torch's; on a busy machine 1 is often fastest)."


@functools.cache
def router_names() -> tuple[str, ...]:
    """The keys of loralag.routing.routers.ROUTERS, read from routers.py's source: checking a router name then costs no
    torch import (1-2 s). Falls back to importing the module if ROUTERS is not a plain dict literal there."""
    try:
        tree = ast.parse((Path(__file__).parents[1] / "routing" / "routers.py").read_text(encoding="utf-8"))
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


def _ray_option(what: str):
    """`--ray [ADDRESS]`: run on a Ray cluster (loralag.cluster); alone, the one in $RAY_ADDRESS or on this machine."""
    return typer.Option(
        None,
        "--ray",
        metavar="[ADDRESS]",
        help=f"{what} on a Ray cluster: its ADDRESS (HOST:PORT or ray://HOST:10001), or alone for $RAY_ADDRESS, "
        'a cluster started here with `ray start`, else a local one. Needs pip install "loralag[ray]".',
    )
