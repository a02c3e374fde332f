"""What every endpoint shares: the model, tokenizer, engine, metrics, limits and the libraries' names."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loralag.library.store import Library
from loralag.routing.state import state_of
from loralag.serve.engine import (
    Engine,
)
from loralag.serve.metrics import ServerMetrics
from loralag.serve.transport import BODY_TIMEOUT_S, MAX_BODY_BYTES

CHARS_PER_TOKEN_SLACK = 4  # a string prompt may hold this many times (longest token) characters per context token


class ServerContext:
    def __init__(
        self,
        model,
        tokenizer,
        engine: Engine,
        metrics: ServerMetrics,
        model_name: str,
        aliases: set[str],
        request_timeout: float,
        default_max_tokens: int,
        max_body_bytes: int = MAX_BODY_BYTES,
        body_timeout: float = BODY_TIMEOUT_S,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.metrics = metrics
        self.model_name = model_name
        self.aliases = aliases | {model_name}
        self.request_timeout = request_timeout
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        state = state_of(model)
        self.libraries: dict[str, Library] = dict(state.libraries) if state is not None else {}
        self.adapter_sets = {lib: set(L.names) for lib, L in self.libraries.items()}
        self.default_specs = dict(engine.base_specs)
        self.vocab_size = (
            int(model.get_output_embeddings().weight.shape[0])
            if model.get_output_embeddings() is not None
            else len(tokenizer)
        )
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.max_prompt_chars = self.max_model_len * CHARS_PER_TOKEN_SLACK * _longest_token(tokenizer)

        # Tokenizing (a long prompt, a chat template) runs here, one call at a time, off the event loop.
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loralag-tokenize")

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    async def off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, fn, *args)

    def close(self) -> None:
        """The tokenizing thread ends with the server (a process that starts many servers keeps none of them)."""
        self._tokenizing.shutdown(wait=False)


def _longest_token(tokenizer) -> int:
    """Characters of the tokenizer's longest vocabulary entry (at least 16): a bound on the characters one token
    stands for (byte-level BPE writes one character per byte)."""
    try:
        return max(16, max((len(t) for t in tokenizer.get_vocab()), default=16))
    except Exception:  # a tokenizer without get_vocab
        return 64


def served_name(model, spec: str | None = None) -> str:
    if spec == "default":
        from loralag.models import DEFAULT_MODEL_NAME

        return DEFAULT_MODEL_NAME
    if spec:
        p = Path(spec)
        return p.name if p.exists() else spec
    name = getattr(model.config, "name_or_path", "") or ""
    return Path(name).name or "loralag"
