"""A linear layer (nn.Linear or GPT-2 Conv1D) plus the routed deltas of one or more libraries."""

from __future__ import annotations

import torch
from torch import nn

from loralag.library.bank import ModuleBank
from loralag.routing.routers import ROUTERS, STATEFUL


class RoutedLinear(nn.Module):
    """h = base(x) + Σ_libraries router(library)(x). The base module is kept as is, for `detach`."""

    def __init__(self, base: nn.Module, name: str, banks: dict[str, ModuleBank], state):
        super().__init__()
        self.base = base
        self.name = name
        self.banks = banks  # library name -> this module's bank
        self.state = state  # the model-wide RoutingState: specs per library, trace, prefix evidence
        # per library: this bank's adapters as library indices, for stateful routers (None: the library's own order)
        self.members = {lib: state.members(lib, bank) for lib, bank in banks.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base(x)
        batch = x.shape[0] if x.dim() > 2 else 1
        X = x.reshape(-1, x.shape[-1])
        delta = None
        for lib, bank in self.banks.items():
            spec = self.state.specs[lib]
            if spec.router == "none":
                continue
            if spec.router in STATEFUL:
                routed = ROUTERS[spec.router](
                    bank, X.to(bank.dtype), spec, batch, self.state.evidence[lib], self.members[lib]
                )
            else:
                routed = ROUTERS[spec.router](bank, X.to(bank.dtype), spec, batch)
            if routed.delta is not None:
                delta = routed.delta if delta is None else delta + routed.delta
            if self.state.trace is not None:
                self.state.trace.record(self.name, lib, routed.winner.view(batch, -1), routed.score.view(batch, -1))
        if delta is None:
            return h
        return h.add_(delta.view(h.shape).to(h.dtype))  # h is base's fresh output: no second (T, d_out) tensor

    def extra_repr(self) -> str:
        return f"{self.name}: " + ", ".join(f"{lib}[{b.n}]" for lib, b in self.banks.items())
