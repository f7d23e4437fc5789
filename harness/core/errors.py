"""Errors a user can act on.

Every error caused by the user's input (a suite, an annotation file, an image)
is a :class:`DetbenchError`: the CLI prints its one-line message and exits
with code 2, without a traceback and without leaving a run directory behind.
The message always names *where* the problem is (file, record, field) so the
user can fix it without reading our code.
"""
from __future__ import annotations

from pathlib import Path

EXIT_USER_ERROR = 2


class DetbenchError(Exception):
    """A problem with the user's input: clear message, exit code 2."""

    exit_code = EXIT_USER_ERROR

    def __init__(self, message: str, *, file: str | Path | None = None,
                 record: str | None = None, field: str | None = None):
        self.message = message
        self.file = str(file) if file is not None else None
        self.record = record
        self.field = field
        super().__init__(self.__str__())

    def __str__(self) -> str:
        where = [p for p in (self.file, self.record,
                             f"field '{self.field}'" if self.field else None) if p]
        return (": ".join(where) + ": " + self.message) if where else self.message


class ConfigError(DetbenchError):
    """An invalid suite file or CLI option."""


class DataError(DetbenchError):
    """Invalid dataset files: annotations, images, data roots."""


class StorageError(DetbenchError):
    """A run directory's storage that cannot be used: unreachable, missing, refused, not a run.

    The message names the URI (never a credential) and the cause.
    """

    def __init__(self, message: str, *, uri: str):
        super().__init__(message, file=uri)
