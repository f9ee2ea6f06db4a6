"""User-facing errors.

A `T2IError` is bad input or a bad environment, not a bug: the CLI prints its message as one
line (naming the file, shard, key or option at fault) and exits non-zero, with no traceback
unless `--debug`. Everything else is a bug and keeps its traceback.
"""


class T2IError(Exception):
    """An error whose message is complete and meant for the user."""


class ConfigError(T2IError):
    """A config file, job file or option is invalid."""


class StorageError(T2IError):
    """A storage URL cannot be read or written (missing, unreachable, no credentials)."""


class IntegrityError(T2IError):
    """A file's digest does not match the one recorded for it."""
