"""Per token and layer, which adapter: the routers (routers: LAG, Arrow, SpectR, ...; the ROUTERS registry),
the native kernels, the routed linear layer, attaching libraries to a model and its routing state (state, the
one owner of routing settings), lag-prefix's per-sequence evidence and routing traces.

Imports loralag.library and loralag.errors; never generation, serving, evaluation or experiments.
"""
