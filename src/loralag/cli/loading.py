"""Slow steps behind a spinner on stderr: importing torch and transformers, converting the bundled model on first
use, loading a model."""

from __future__ import annotations

from contextlib import contextmanager

from loralag.cli.app import err_console


@contextmanager
def waiting(message: str):
    """A spinner with a message on stderr while something slow runs (nothing is drawn when stderr is no terminal).
    Yields the rich Status, whose message `.update(...)` changes."""
    with err_console.status(message, spinner="dots") as status:
        yield status


def _quiet_warnings() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars on every model load are noise here


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _prepare_model(spec: str, status) -> None:
    """Import torch and transformers and, for the default model on first use, convert its GGUF (about half a
    minute), saying so on the spinner."""
    status.update(f"Loading torch and transformers for model '{spec}' …")
    _quiet_warnings()
    from loralag import models

    if spec in models.BUNDLED:
        target = models.cache_dir() / "models" / models.BUNDLED[spec].name
        if not all((target / name).is_file() for name in models._CONVERTED_FILES):
            status.update(
                f"First use of model '{spec}': converting the bundled {models.BUNDLED[spec].gguf_file} "
                f"into {target} (once, about half a minute) …"
            )
            models.bundled_model_dir(spec)


def load_model_waiting(spec: str, dtype: str = "float32"):
    """loralag.models.load_model behind a spinner (the first load of the default model converts it)."""
    with waiting(f"Loading model '{spec}' …") as status:
        _prepare_model(spec, status)
        import torch

        from loralag.models import load_model

        status.update(f"Loading model '{spec}' …")
        return load_model(spec, dtype=getattr(torch, dtype))
