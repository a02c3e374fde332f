"""loralag: LoRA-Augmented Generation over large libraries of PEFT LoRA adapters.

Names are imported on first use, so `import loralag` (and the CLI's --help) does not load torch.
"""

from importlib import import_module

_EXPORTS = {
    "AdapterError": "errors", "LibraryError": "errors", "LoralagError": "errors", "ModelError": "errors",
    "LoraAdapter": "adapters", "read_adapter": "adapters",
    "align": "alignment",
    "Library": "library", "build_library": "library", "open_library": "library",
    "attach": "routed_model", "detach": "routed_model", "routing_state": "routed_model",
    "ROUTERS": "routers", "RouteSpec": "routers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'loralag' has no attribute {name!r}")
