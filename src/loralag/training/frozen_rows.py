"""Frozen LoRA adapters applied per batch row, differentiably, while another adapter trains.

A task adapter that must learn to *read* what a knowledge adapter injects (say, to check a claim against
the facts a document's adapter holds) is trained with that document's adapter attached to each of its
examples: row b of a batch gets base(x) + B_j A_j x for its own frozen adapter j (or nothing). The frozen
factors get no gradient; the activations do, so the adapter being trained upstream learns through them.
Unlike the routers (inference only, written for speed with `out=` buffers), this is plain autograd.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from loralag.errors import LoralagError
from loralag.library.adapters import LoraAdapter
from loralag.routing.swap import ModuleSwaps


class _Rows:
    """The frozen adapter of each row of the current batch (-1: none), shared by every wrapped layer."""

    index: torch.Tensor | None = None


class _FrozenRowsLinear(nn.Module):
    """base(x) + B[j] (A[j] x) for each row's adapter j; A (F, r, d_in), B (F, d_out, r) with the scale folded
    into B and ranks zero-padded to the largest (exact: the padding adds zero)."""

    def __init__(self, base: nn.Module, A: torch.Tensor, B: torch.Tensor, rows: _Rows):
        super().__init__()
        self.base = base
        self.register_buffer("A", A, persistent=False)
        self.register_buffer("B", B, persistent=False)
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        index = self.rows.index
        if index is None or x.dim() != 3 or len(index) != x.shape[0]:
            raise RuntimeError(
                f"frozen adapters expect a (batch, tokens, dim) input with one adapter index per "
                f"row; got {tuple(x.shape)} for {None if index is None else len(index)} rows"
            )
        use = index >= 0
        j = index.clamp(min=0)
        z = torch.einsum("btd,brd->btr", x.to(self.A.dtype), self.A[j])
        delta = torch.einsum("btr,bor->bto", z, self.B[j]) * use.view(-1, 1, 1).to(z.dtype)
        return out + delta.to(out.dtype)


@contextmanager
def frozen_adapters(model: nn.Module, adapters: list[LoraAdapter]):
    """Wrap every module any of `adapters` targets for the block; yields the rows object whose `index`
    (a (batch,) long tensor of positions in `adapters`, -1 for none) must be set before each forward."""
    modules = sorted({m for a in adapters for m in a.modules})
    named = dict(model.named_modules())
    rows = _Rows()
    swaps = ModuleSwaps(model)
    try:
        for module in modules:
            if module not in named:
                owner = next(a for a in adapters if module in a.modules)
                raise LoralagError(
                    f"frozen adapter '{owner.name}' ({owner.source}) targets '{module}', which "
                    f"{type(model).__name__} does not have"
                )
            base = named[module]
            r = max(a.modules[module].rank for a in adapters if module in a.modules)
            d_out, d_in = _shape(base, module)
            A = torch.zeros(len(adapters), r, d_in)
            B = torch.zeros(len(adapters), d_out, r)
            for f, adapter in enumerate(adapters):
                lora = adapter.modules.get(module)
                if lora is None:
                    continue
                if tuple(lora.A.shape[1:]) != (d_in,) or lora.B.shape[0] != d_out:
                    raise LoralagError(
                        f"frozen adapter '{adapter.name}' ({adapter.source}) has {module} factors "
                        f"{tuple(lora.B.shape)}·{tuple(lora.A.shape)}, but the module is {d_out}×{d_in}"
                    )
                A[f, : lora.rank] = lora.A
                B[f, :, : lora.rank] = lora.B * lora.scale
            swaps.swap(
                module, lambda base, A=A, B=B: _FrozenRowsLinear(base, A.to(_device(base)), B.to(_device(base)), rows)
            )
        yield rows
    finally:
        swaps.restore()
        rows.index = None


def _shape(module: nn.Module, name: str) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    raise LoralagError(f"frozen adapters apply to nn.Linear modules only; '{name}' is a {type(module).__name__}")


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device
