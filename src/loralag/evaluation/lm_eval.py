"""The `loralag` model of lm-evaluation-harness (0.4.x): a base model with loralag libraries attached.

Importing this module registers it with lm-eval's model registry, so that after `import loralag.evaluation.lm_eval`
both `lm_eval.simple_evaluate(model="loralag", model_args="pretrained=default,libraries=LIB,router=lag,k=20", ...)`
and `loralag lm-eval --model loralag --model_args ... --tasks ...` (lm-eval's own command line, with the model
registered first) evaluate LAG.

The model is lm-eval's own `hf` model (HFLM) with the libraries attached after it loads the base model:
tokenisation, batching, the loglikelihood and rolling-loglikelihood arithmetic, stop sequences and caching are all
lm-eval's, so with no library attached it scores exactly as `--model hf` on the same folder, and with libraries
every token of every request is routed as in `loralag generate` (per token and layer, each library by its own
router). Model arguments, beyond HFLM's own (batch_size, dtype, device, max_length, ...):

- `pretrained`: a loralag model spec: `default`, another bundled model (`gemma3-270m`), a folder or a hub id;
- `libraries`: `NAME:PATH;NAME:PATH` (e.g. `task:LIB1;knowledge:LIB2`), or a bare `PATH` named by the library;
- `router`, `k`, `temperature`, `nprobe`: one value for every library, or `NAME:VALUE;NAME:VALUE`;
- `fixed`: `NAME:ADAPTER;...`: route every sequence of that library to one named adapter (e.g. to score one
  adapter of the library alone, the Oracle of a one-task benchmark).
"""

from __future__ import annotations

import sys
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from loralag.errors import LoralagError

MODEL_NAME = "loralag"


def _split(value, what: str) -> dict[str | None, str]:
    """'a:x;b:y' -> {'a': 'x', 'b': 'y'}; a value with no name (one for every library) is keyed by None."""
    out: dict[str | None, str] = {}
    for part in str(value).split(";"):
        part = part.strip()
        if not part:
            continue
        name, sep, rest = part.partition(":")
        # a name is a plain identifier; anything else (a path with a colon, a bare value) is one unnamed value
        if sep and name and name.replace("-", "_").replace(".", "_").isidentifier() and rest:
            key, item = name, rest
        else:
            key, item = None, part
        if key in out:
            raise LoralagError(f"model_args {what}: '{key or part}' is given twice in {value!r}")
        out[key] = item
    if not out:
        raise LoralagError(f"model_args {what}: empty value {value!r}")
    return out


def parse_libraries(value) -> dict:
    """`libraries=NAME:PATH;NAME:PATH` (or one bare PATH) -> {name: opened Library}."""
    from loralag.library.store import open_library

    libs = {}
    for name, path in _split(value, "libraries").items():
        if not Path(path).expanduser().is_dir():
            raise LoralagError(f"model_args libraries: no library at {path} (the folder does not exist)")
        lib = open_library(Path(path).expanduser())
        name = name or lib.name
        if name in libs:
            raise LoralagError(f"model_args libraries: two libraries are named '{name}'; name them NAME:PATH")
        libs[name] = lib
    return libs


def _per_library(value, libs: dict, what: str, cast):
    """One value for every library, or NAME:VALUE;... (libraries not named keep attach's default)."""
    if value is None:
        return None
    if not isinstance(value, str):
        return cast(value, what)
    parts = _split(value, what)
    if list(parts) == [None]:
        return cast(parts[None], what)
    if None in parts:
        raise LoralagError(f"model_args {what}: mix of named and unnamed values in {value!r}; use NAME:VALUE;...")
    unknown = sorted(set(parts) - set(libs))
    if unknown:
        raise LoralagError(f"model_args {what}: unknown libraries {unknown}; attached: {sorted(libs)}")
    return {name: cast(v, what) for name, v in parts.items()}


def _router(value, what):
    from loralag.routing.routers import ROUTERS

    if value not in ROUTERS or value == "fixed":
        raise LoralagError(
            f"model_args {what}: unknown router {value!r}; choose one of {sorted(set(ROUTERS) - {'fixed'})}"
            " (or fixed=NAME:ADAPTER)"
        )
    return value


def _positive_int(value, what):
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise LoralagError(f"model_args {what}: must be a positive integer, got {value!r}")
    return number


def _positive_float(value, what):
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = 0.0
    if not number > 0:
        raise LoralagError(f"model_args {what}: must be a positive number, got {value!r}")
    return number


@register_model(MODEL_NAME)
class LoralagLM(HFLM):
    """lm-eval's HFLM over a loralag model spec, with libraries attached (see the module docstring)."""

    def __init__(
        self,
        pretrained="default",
        libraries=None,
        router="lag",
        k=20,
        temperature=1.0,
        nprobe=None,
        fixed=None,
        device=None,
        dtype="float32",
        **kwargs,
    ) -> None:
        from loralag.models import model_source

        # everything a user can get wrong is checked before the model loads
        libs = parse_libraries(libraries) if libraries not in (None, "") else {}
        if not libs and any(v is not None for v in (fixed,)):
            raise LoralagError("model_args fixed: no libraries given (libraries=NAME:PATH;...)")
        settings = dict(
            router=_per_library(router, libs, "router", _router),
            k=_per_library(k, libs, "k", _positive_int),
            temperature=_per_library(temperature, libs, "temperature", _positive_float),
            nprobe=_per_library(nprobe, libs, "nprobe", _positive_int),
        )
        self._fixed = {}
        if fixed is not None:
            parts = _split(fixed, "fixed")
            if None in parts:
                raise LoralagError(
                    f"model_args fixed: name the library of each adapter, NAME:ADAPTER;..., got {fixed!r}"
                )
            unknown = sorted(set(parts) - set(libs))
            if unknown:
                raise LoralagError(f"model_args fixed: unknown libraries {unknown}; attached: {sorted(libs)}")
            self._fixed = parts
        if device is None:  # lm-eval's own default, except that libraries route on the CPU (routing.state.attach)
            import torch

            device = "cuda" if torch.cuda.is_available() and not libs else "cpu"
        elif libs and not str(device).startswith("cpu"):
            raise LoralagError(
                f"device {device}: loralag routes its libraries on the CPU; leave device out or set device=cpu"
            )
        source = model_source(pretrained) if isinstance(pretrained, str) else pretrained
        super().__init__(pretrained=source, device=device, dtype=dtype, **kwargs)
        self.routing = None
        self.libraries = libs
        if libs:
            from loralag.routing.state import attach

            routing_args = {key: v for key, v in settings.items() if v is not None}
            self.routing = attach(self._model, libs, **routing_args)
            for lib, adapter in self._fixed.items():
                self.routing.fix(lib, [adapter])  # checks the name (a wrong one is refused with the closest ones)

    # -- `fixed`: one adapter per library for every sequence of whatever batch lm-eval forms --------------------
    def _fixed_for(self, batch: int) -> ExitStack:
        stack = ExitStack()
        if self.routing is not None and self._fixed:
            specs = {lib: replace(self.routing.specs[lib], fixed=(name,) * batch) for lib, name in self._fixed.items()}
            stack.enter_context(self.routing.configure(specs=specs))
        return stack

    def _model_call(self, inps, attn_mask=None, labels=None):
        with self._fixed_for(inps.shape[0]):
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _model_generate(self, context, max_length, stop, **generation_kwargs):
        with self._fixed_for(context.shape[0]):
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        if self.routing is not None:
            info["loralag"] = {
                lib: {
                    "path": str(library.path),
                    "adapters": len(library.names),
                    "router": self.routing.specs[lib].router,
                    "k": self.routing.specs[lib].k,
                    "fixed": self._fixed.get(lib),
                }
                for lib, library in self.libraries.items()
            }
        return info


def run_cli(argv: list[str]) -> None:
    """lm-eval's command line with the `loralag` model registered; `--model loralag` unless another is given."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(argv)
    subcommands = {"run", "ls", "validate"}
    wants_run = not argv or argv[0] not in subcommands or argv[0] == "run"
    if wants_run and argv and not any(a == "--model" or a.startswith("--model=") for a in argv):
        argv = ([argv[0]] if argv[0] == "run" else []) + ["--model", MODEL_NAME] + argv[1 if argv[0] == "run" else 0 :]
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
