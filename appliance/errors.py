"""One error tree for the whole project.

Every failure a person can act on is an ApplianceError carrying a one-line message and an optional
hint. The CLI prints them as `error: ...` / `hint: ...` and exits with the class's exit code, so
scripts (and the USB import unit) can tell a forged bundle from a full disk.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every user-facing failure."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(ApplianceError):
    """The command line or a setting is wrong."""

    exit_code = 2


class FormatError(ApplianceError):
    """A bundle, manifest, recipe or target file is malformed or breaks a format rule."""

    exit_code = 3


class SignatureError(ApplianceError):
    """Signatures are missing, invalid, from untrusted keys, or below the threshold."""

    exit_code = 4


class RollbackError(ApplianceError):
    """A bundle's sequence is not above the highest one installed (or it has expired)."""

    exit_code = 5


class IntegrityError(ApplianceError):
    """A payload's size or hash differs from what the signed manifest declares."""

    exit_code = 6


class StoreError(ApplianceError):
    """The device store or trust store cannot be read or written (I/O, permissions, lock)."""

    exit_code = 7


class FetchError(ApplianceError):
    """A model source (local path or PyPI package) could not be fetched or checked."""

    exit_code = 8
