"""Errors a user can act on: each names the file, adapter or field at fault."""


class LoralagError(Exception):
    """Base class for every error loralag raises on bad input."""


class AdapterError(LoralagError):
    """An adapter folder that cannot be read or does not fit the base model."""


class LibraryError(LoralagError):
    """A library on disk that is missing, malformed, or asked for something it does not hold."""


class ModelError(LoralagError):
    """A base model that cannot be found or loaded."""
