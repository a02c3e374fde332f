"""A linear layer (nn.Linear or GPT-2 Conv1D) plus the routed deltas of one or more libraries."""

from __future__ import annotations

import torch
from torch import nn

from loralag.errors import LoralagError, ModelError
from loralag.library.bank import ModuleBank
from loralag.routing.routers import ROUTERS, SINGLE_PICK, STATEFUL

GRAD_CHUNK = 1024  # tokens whose adapters' factors one backward step gathers (T × d_out × r floats each)


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
        if x.device.type != "cpu":  # moved after attach (which refuses such a model): say so, not a device mismatch
            raise ModelError(
                f"loralag routes on the CPU, but module '{self.name}' got inputs on {x.device}; keep the model on the "
                "CPU while libraries are attached"
            )
        h = self.base(x)
        batch = x.shape[0] if x.dim() > 2 else 1
        X = x.reshape(-1, x.shape[-1])
        # Training something upstream (a task adapter over a routed knowledge library): the routers run on
        # a detached x, their kernels keep no graph, and _ThroughPick gives the delta its gradient to x.
        grad = torch.is_grad_enabled() and X.requires_grad
        Xr = X.detach() if grad else X
        delta = None
        for lib, bank in self.banks.items():
            spec = self.state.specs[lib]
            if spec.router == "none":
                continue
            if grad and spec.router not in SINGLE_PICK:
                raise LoralagError(
                    f"library '{lib}': router '{spec.router}' mixes adapters and passes no gradient; train under "
                    f"one of {sorted(SINGLE_PICK - {'none'})}"
                )
            if spec.router in STATEFUL:
                routed = ROUTERS[spec.router](
                    bank, Xr.to(bank.dtype), spec, batch, self.state.evidence[lib], self.members[lib]
                )
            else:
                routed = ROUTERS[spec.router](bank, Xr.to(bank.dtype), spec, batch)
            if routed.delta is not None:
                d = _ThroughPick.apply(X, routed.delta, bank, routed.winner) if grad else routed.delta
                delta = d if delta is None else delta + d
            if self.state.trace is not None:
                self.state.trace.record(self.name, lib, routed.winner.view(batch, -1), routed.score.view(batch, -1))
        if delta is None:
            return h
        return h.add_(delta.view(h.shape).to(h.dtype))  # h is base's fresh output: no second (T, d_out) tensor

    def extra_repr(self) -> str:
        return f"{self.name}: " + ", ".join(f"{lib}[{b.n}]" for lib, b in self.banks.items())


class _ThroughPick(torch.autograd.Function):
    """A single-pick router's delta B*_w A*_w x (computed by its kernels, without a graph) with its gradient to
    x: A*_wᵀ B*_wᵀ g per token, the adapters' factors frozen. The factors are gathered per token, GRAD_CHUNK
    tokens at a time, in the backward pass only: nothing per token is kept between the passes but w."""

    @staticmethod
    def forward(ctx, X, delta, bank: ModuleBank, winner):
        ctx.bank = bank
        ctx.x_dtype = X.dtype
        ctx.save_for_backward(winner)
        return delta.view_as(delta)

    @staticmethod
    def backward(ctx, g):
        (winner,) = ctx.saved_tensors
        bank = ctx.bank
        gX = g.new_zeros(len(g), bank.d_in, dtype=bank.dtype)
        for s in range(0, len(g), GRAD_CHUNK):
            w = winner[s : s + GRAD_CHUNK]
            A, B = bank.gather(w.clamp(min=0))  # (t, r, d_in), (t, d_out, r)
            u = torch.einsum("to,tor->tr", g[s : s + GRAD_CHUNK].to(bank.dtype), B) * (w >= 0).unsqueeze(1)
            gX[s : s + GRAD_CHUNK] = torch.einsum("tr,trd->td", u, A)
        return gX.to(ctx.x_dtype), None, None, None
