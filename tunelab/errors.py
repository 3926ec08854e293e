"""Errors that reach the user as one clear line and exit code 2 (bad input or usage)."""

from __future__ import annotations


class TunelabError(Exception):
    """Bad input, config or usage. The CLI prints ``str(err)`` as one line and exits with ``exit_code``.

    ``where`` is a location such as ``path:line`` or a YAML field path; it is prefixed to the message.
    """

    exit_code = 2

    def __init__(self, message: str, *, where: str | None = None):
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class ConfigError(TunelabError):
    """A YAML/JSON config that does not validate."""


class DataError(TunelabError):
    """A dataset file that cannot be read (missing file, malformed line, missing field)."""


class ModelError(TunelabError):
    """A model that cannot be found or loaded, or an endpoint that cannot be reached."""
