"""loralag: LoRA-Augmented Generation over large libraries of PEFT LoRA adapters.

Names are imported on first use, so `import loralag` (and the CLI's --help) does not load torch.
"""

from importlib import import_module

_EXPORTS = {
    "AdapterError": "errors",
    "LibraryError": "errors",
    "LoralagError": "errors",
    "ModelError": "errors",
    "LoraAdapter": "library.adapters",
    "read_adapter": "library.adapters",
    "align": "library.alignment",
    "Library": "library.store",
    "build_library": "library.store",
    "open_library": "library.store",
    "attach": "routing.state",
    "detach": "routing.state",
    "routing_state": "routing.state",
    "ROUTERS": "routing.routers",
    "RouteSpec": "routing.routers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'loralag' has no attribute {name!r}")
