"""Swapping a model's submodules for wrappers and putting the originals back: the one way attach (routed
layers), frozen rows and grouped training replace a Linear in a Hugging Face model."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


class ModuleSwaps:
    """Wrappers put in place of named submodules, remembered so that `restore` puts every original back (in
    reverse order, so a module swapped twice ends as it began)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.originals: list[tuple[str, nn.Module]] = []

    def swap(self, name: str, make: Callable[[nn.Module], nn.Module]) -> nn.Module:
        """Replace submodule `name` (e.g. "model.layers.0.mlp.up_proj") with make(original); return the new one."""
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name)
        original = getattr(parent, child)
        new = make(original)
        setattr(parent, child, new)
        self.originals.append((name, original))
        return new

    def restore(self) -> None:
        for name, original in reversed(self.originals):
            parent_name, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent_name), child, original)
        self.originals.clear()
