"""Exceptions that end a run with a one-paragraph message instead of a traceback.

The CLI catches :class:`VLPError` and prints ``error: <message>``; library users get a
normal exception whose message names the offending key, path or sample.
"""


class VLPError(Exception):
    """Base class of errors the CLI reports without a traceback."""


class ConfigError(VLPError, ValueError):
    """A recipe or argument is wrong (unknown key, bad value, missing file)."""


class DataError(VLPError, RuntimeError):
    """Data cannot be read: missing shard, too many corrupt samples, bad manifest."""


class CheckpointError(VLPError, RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model."""


class NonFiniteError(VLPError, FloatingPointError):
    """A training loss or gradient became NaN or infinite."""
