"""loralag: LoRA-Augmented Generation over large libraries of PEFT LoRA adapters."""

from .adapters import LoraAdapter, read_adapter
from .alignment import align
from .errors import AdapterError, LibraryError, LoralagError, ModelError
from .library import Library, build_library, open_library
from .routed_model import attach, detach, routing_state
from .routers import ROUTERS, RouteSpec

__all__ = [
    "AdapterError", "Library", "LibraryError", "LoraAdapter", "LoralagError", "ModelError", "ROUTERS", "RouteSpec",
    "align", "attach", "build_library", "detach", "open_library", "read_adapter", "routing_state",
]
