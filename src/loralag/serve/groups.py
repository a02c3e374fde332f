"""Routing groups: sequences whose routing settings agree share forward passes. A request's Routing says, per
library, "route with router and k" or "fixed to this adapter (or none)"; sequences with equal keys form one
RoutingGroup (fixed adapters may differ row by row), and group_specs gives the RouteSpecs its forward pass runs
under (RoutingState.configure)."""

from __future__ import annotations

from dataclasses import dataclass, replace

ROUTERS_WITH_K = ("lag", "lag-prefix", "arrow-mix")  # routers whose k a request may set


@dataclass(frozen=True)
class Routing:
    """Per attached library, in attach order: ("route", router, k) or ("fixed", adapter name or None)."""

    modes: tuple[tuple[str, tuple], ...]

    @property
    def key(self) -> tuple:
        """Sequences with equal keys share forward passes (fixed adapters may differ row by row)."""
        return tuple((lib, mode if mode[0] == "route" else ("fixed",)) for lib, mode in self.modes)

    def fixed(self, lib: str) -> str | None:
        for name, mode in self.modes:
            if name == lib and mode[0] == "fixed":
                return mode[1]
        return None

    def describe(self) -> dict[str, dict]:
        out = {}
        for lib, mode in self.modes:
            if mode[0] == "route":
                out[lib] = {"router": mode[1]} | ({"k": mode[2]} if mode[1] in ROUTERS_WITH_K else {})
            elif mode[1] is None:
                out[lib] = {"router": "none"}
            else:
                out[lib] = {"router": "fixed", "adapter": mode[1]}
        return out


class RoutingGroup:
    """The running sequences of one routing key, with their batched KV cache."""

    def __init__(self, key):
        self.key = key
        self.seqs: list = []  # the engine's sequences (engine._Seq)
        self.cache = None
        self.members: list[int] = []  # uids of the cache's rows, in order
        self.cache_len = 0


def group_specs(key: tuple, routings: list[Routing], base_specs: dict) -> dict:
    """The RouteSpec of every library for one group's forward pass: its routed libraries as the key says, its
    fixed ones with each row's adapter (router "none" when no row has one); other settings (temperature,
    nprobe) stay the server's."""
    specs = {}
    for lib, mode in key:
        base = base_specs[lib]
        if mode[0] == "route":
            specs[lib] = replace(base, router=mode[1], k=mode[2], fixed=None)
        else:
            names = [r.fixed(lib) for r in routings]
            if all(n is None for n in names):
                specs[lib] = replace(base, router="none", fixed=None)
            else:
                specs[lib] = replace(base, router="fixed", fixed=names)
    return specs
