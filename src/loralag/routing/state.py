"""attach / detach: put routed layers on any Hugging Face model, and take them off bit for bit; RoutingState,
the one owner of a model's routing settings (a RouteSpec per library): set_router / fix change them, configure()
changes them for a block and puts the previous ones back. No module outside routing/ writes them."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import replace
from types import MappingProxyType

import torch
from torch import nn

from loralag.errors import LibraryError, ModelError
from loralag.library.store import Library, module_shapes
from loralag.routing.layer import RoutedLinear
from loralag.routing.prefix_evidence import PrefixEvidence
from loralag.routing.routers import RouteSpec
from loralag.routing.swap import ModuleSwaps
from loralag.routing.trace import RoutingTrace

STATE_ATTR = "_loralag_state"


class RoutingState:
    """Model-wide routing settings: one RouteSpec per library, and the active trace if any."""

    def __init__(self, model: nn.Module, libraries: dict[str, Library], specs: dict[str, RouteSpec]):
        self.model = model
        self.libraries = libraries
        self._specs = dict(specs)
        self.trace: RoutingTrace | None = None
        self.swaps = ModuleSwaps(model)
        self.layers: dict[str, RoutedLinear] = {}
        # lag-prefix: each sequence's LAG picks so far, per library (reset when a forward starts a fresh cache)
        self.evidence = {lib: PrefixEvidence(len(library.names)) for lib, library in libraries.items()}
        self.hooks: list = []

    @property
    def originals(self) -> dict[str, nn.Module]:
        """The modules the routed layers stand in for, by name (what detach puts back)."""
        return dict(self.swaps.originals)

    @property
    def specs(self) -> Mapping[str, RouteSpec]:
        """Each library's routing settings (read-only: change them through set_router, fix or configure)."""
        return MappingProxyType(self._specs)

    def members(self, library: str, bank) -> torch.Tensor | None:
        """The library indices of a bank's adapters, or None when the bank holds the library in its own order."""
        names = self.libraries[library].names
        if list(bank.names) == list(names):
            return None
        index = {n: i for i, n in enumerate(names)}
        return torch.tensor([index[n] for n in bank.names], dtype=torch.long)

    def _forward_starts(self, module, args, kwargs) -> None:
        """Model pre-hook: a forward without a cache, or with an empty one, starts fresh sequences; padding (the
        attention mask's columns of this call's tokens) does not count as evidence."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        fresh = cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0)
        mask = kwargs.get("attention_mask")
        token_mask = None
        if ids is not None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            token_mask = mask[:, -ids.shape[1] :]
        for ev in self.evidence.values():
            if fresh:
                ev.reset()
            ev.begin(token_mask)

    def _forward_ends(self, module, args, kwargs, output) -> None:
        for ev in self.evidence.values():
            ev.end()

    def set_router(self, library: str | None = None, router: str | None = None, **params) -> None:
        """Change the router or its parameters (k, temperature, ...) of one library, or of all. Adapters named in
        `fixed` must be in the library (see `fix`)."""
        for lib in self._libs(library):
            changes = {key: v for key, v in dict(router=router, **params).items() if v is not None}
            if changes.get("fixed") is not None:
                self._check_names(lib, changes["fixed"])
            elif router is not None and router != "fixed":
                changes["fixed"] = None  # adapters named for `fixed` do not outlive it
            self._specs[lib] = replace(self._specs[lib], **changes)

    @contextmanager
    def configure(
        self,
        specs: Mapping[str, RouteSpec] | None = None,
        library: str | None = None,
        router: str | None = None,
        **params,
    ):
        """Routing settings for the block only: `specs` (whole RouteSpecs by library, taken as given: the serving
        engine's per-request names are checked when the request arrives) and/or set_router's arguments (checked);
        every library's previous settings come back when the block ends, however it ends."""
        saved = dict(self._specs)
        try:
            for lib, spec in (specs or {}).items():
                self._libs(lib)
                if not isinstance(spec, RouteSpec):
                    raise TypeError(
                        f"configure: the settings of '{lib}' must be a RouteSpec, got {type(spec).__name__}"
                    )
                self._specs[lib] = spec
            if router is not None or params:
                self.set_router(library, router, **params)
            yield self
        finally:
            self._specs = saved

    def fix(self, library: str, adapters: list[str | None]) -> None:
        """Route each sequence of the batch to a named adapter of `library` (None: the base model).

        A name the library does not hold is refused, with the closest names and some of those it holds."""
        self.set_router(library, "fixed", fixed=list(self._check_names(library, adapters)))

    def _check_names(self, library: str, adapters) -> list:
        import difflib

        lib = self.libraries[self._libs(library)[0]]
        if isinstance(adapters, str):
            raise LibraryError(
                f"fixed adapters for '{library}' take a list with one adapter name per sequence, "
                f"e.g. ['{adapters}']; got the string '{adapters}'"
            )
        names = list(lib.names)
        known = set(names)
        unknown = [n for n in adapters if n is not None and n not in known]
        if unknown:
            close = sorted({c for n in unknown for c in difflib.get_close_matches(n, names, n=3)})
            shown = ", ".join(sorted(names)[:12]) + (f", … ({len(names)} in all)" if len(names) > 12 else "")
            raise LibraryError(
                f"library '{library}' ({lib.path}) holds no adapter named {', '.join(repr(n) for n in unknown)}"
                + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else "")
                + f"; it holds: {shown}"
            )
        return adapters

    def _libs(self, library):
        if library is None:
            return list(self.specs)
        if library not in self.specs:
            raise LibraryError(f"no library named '{library}' is attached; attached: {sorted(self.specs)}")
        return [library]

    @torch.no_grad()
    def vote(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        count_mask: torch.Tensor | None = None,
    ) -> dict[str, list[str | None]]:
        """Sequence-level routing: route the prompts per token and module as usual, and return for each
        library the adapter that won the most (token, module) decisions in each sequence (padding excluded).

        `count_mask` (batch, tokens): only these positions vote (e.g. the user's own words, not a chat
        template's tokens, `encode_prompts(content_mask=True)`); default: the attention mask."""
        with self.tracing() as trace:
            self.model(input_ids=input_ids, attention_mask=attention_mask)
        counted = count_mask if count_mask is not None else attention_mask
        votes = {}
        for lib in trace.libraries():
            votes[lib] = []
            for seq in range(len(input_ids)):
                counts = trace.counts(lib, seq, None if counted is None else counted[seq])
                # most votes; a tie goes to the name that sorts first, so the result never depends on order
                votes[lib].append(min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else None)
        return votes

    def fix_by_vote(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        count_mask: torch.Tensor | None = None,
    ) -> dict[str, list]:
        """Serve each whole sequence (prompt and decoding) with its libraries' most-voted adapters
        (`count_mask`: the positions that vote, as in `vote`)."""
        votes = self.vote(input_ids, attention_mask, count_mask)
        for lib, names in votes.items():
            self.set_router(lib, "fixed", fixed=names)
        return votes

    @contextmanager
    def tracing(self):
        """Record every routing decision made inside the block."""
        names = {(m, lib): bank.names for m, layer in self.layers.items() for lib, bank in layer.banks.items()}
        self.trace = RoutingTrace(names)
        try:
            yield self.trace
        finally:
            self.trace = None


def _library_dict(libraries) -> dict[str, Library]:
    if isinstance(libraries, Library):
        libraries = [libraries]
    if isinstance(libraries, dict):
        return dict(libraries)
    out = {}
    for lib in libraries:
        if lib.name in out:
            raise LibraryError(f"two attached libraries are named '{lib.name}'; pass a dict to name them")
        out[lib.name] = lib
    return out


def library_names(libraries: list[Library]) -> dict[str, Library]:
    """Libraries by the name they route under: the folder name, or the path where two folders share a name."""
    return {(str(lib.path) if sum(o.name == lib.name for o in libraries) > 1 else lib.name): lib for lib in libraries}


def _per_library(value, libs, what):
    if isinstance(value, dict):
        unknown = set(value) - set(libs)
        if unknown:
            raise LibraryError(f"{what} given for unknown libraries {sorted(unknown)}; attached: {sorted(libs)}")
        return value
    return {lib: value for lib in libs}


def attach(model: nn.Module, libraries, router="lag", k=20, temperature=1.0, nprobe=None) -> RoutingState:
    """Wrap exactly the modules the libraries target.

    `router`, `k`, `temperature`, `nprobe` (clusters the arrow index scans; None = exact arrow stage)
    take one value for every library or a dict per library name."""
    if hasattr(model, STATE_ATTR):
        raise RuntimeError("model already has libraries attached; detach(model) first")
    # the banks and their kernels are CPU tensors: a model elsewhere would fail at its first forward, deep inside
    # a router, with a device mismatch
    off = next((p.device for p in model.parameters() if p.device.type != "cpu"), None)
    if off is not None:
        raise ModelError(
            f"loralag routes on the CPU, but the model's weights are on {off}; load the model on the CPU "
            "(model.to('cpu')) before attaching libraries"
        )
    libs = _library_dict(libraries)
    routers, ks, temps, probes = (
        _per_library(v, libs, w)
        for v, w in ((router, "router"), (k, "k"), (temperature, "temperature"), (nprobe, "nprobe"))
    )
    specs = {
        lib: RouteSpec(
            router=routers.get(lib, "lag"), k=ks.get(lib, 20), temperature=temps.get(lib, 1.0), nprobe=probes.get(lib)
        )
        for lib in libs
    }
    shapes = module_shapes(model)
    state = RoutingState(model, libs, specs)
    targets: dict[str, dict] = {}
    for lib_name, lib in libs.items():
        for module in lib.target_modules:
            want = lib.shapes[module][:2]
            if module not in shapes or shapes[module][:2] != want:
                have = f"shape {shapes[module][:2]}" if module in shapes else "no such module"
                raise LibraryError(
                    f"library '{lib_name}' ({lib.path}) targets '{module}' with shape {want}, but the model has {have};"
                    f" the library was built for '{lib.base_model}'"
                )
            targets.setdefault(module, {})[lib_name] = lib.bank(module)
    for module, banks in targets.items():
        layer = state.swaps.swap(module, lambda original, m=module, b=banks: RoutedLinear(original, m, b, state))
        state.layers[module] = layer
    state.hooks = [
        model.register_forward_pre_hook(state._forward_starts, with_kwargs=True),
        model.register_forward_hook(state._forward_ends, with_kwargs=True),
    ]
    object.__setattr__(model, STATE_ATTR, state)  # not a submodule: keeps state_dict() unchanged
    return state


def detach(model: nn.Module) -> nn.Module:
    """Put the original modules back; the model is then exactly what it was before `attach`."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        return model
    state.swaps.restore()
    for hook in state.hooks:
        hook.remove()
    object.__delattr__(model, STATE_ATTR)
    return model


def state_of(model: nn.Module) -> RoutingState | None:
    """The model's routing state, or None when no library is attached."""
    return getattr(model, STATE_ATTR, None)


def routing_state(model: nn.Module) -> RoutingState:
    state = state_of(model)
    if state is None:
        raise RuntimeError("no libraries are attached to this model; call loralag.attach first")
    return state
