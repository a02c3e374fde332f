"""Adapter files -> an aligned, memory-mapped library: PEFT adapter folders (adapters), the offline SVD
(alignment), crash-safe files (storage), the library itself (store: manifest, segments, names), the per-module
banks the routers read (bank) and the optional arrow index (arrow_index).

Imports only loralag.errors and loralag.models (where a named base model lives); never routing or above.
"""
