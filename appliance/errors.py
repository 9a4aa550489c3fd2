"""One error tree for the whole project.

Every failure a person can act on is an ApplianceError: a one-line message, an optional hint,
and on the class how each front end shows it. The CLI prints `error: ...` / `hint: ...` and exits
with the class's exit code, so scripts (and the USB import unit) can tell a forged bundle from a
full disk. The API answers with the class's HTTP status and OpenAI error code, in one exception
handler (appliance/api/app.py); a route only says which request field was at fault (`param`).
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base of every user-facing failure."""

    exit_code = 1
    status = 500
    code: str | None = None

    def __init__(self, message: str, hint: str | None = None, *, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.param = param
        self.headers = dict(headers or {})

    @property
    def type(self) -> str:
        return "server_error" if self.status >= 500 else "invalid_request_error"

    def body(self) -> dict[str, object]:
        """The OpenAI error object."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


# --- the device and the host (CLI exit codes) -----------------------------------------------

class UsageError(ApplianceError):
    """The command line or a setting is wrong."""

    exit_code = 2
    status = 400


class FormatError(ApplianceError):
    """A bundle, manifest, recipe or target file is malformed or breaks a format rule."""

    exit_code = 3
    status = 400


class SignatureError(ApplianceError):
    """Signatures are missing, invalid, from untrusted keys, or below the threshold."""

    exit_code = 4
    status = 400


class RollbackError(ApplianceError):
    """A bundle's sequence is not above the highest one installed (or it has expired)."""

    exit_code = 5
    status = 400


class AlreadyInstalled(RollbackError):
    """The very bundle (byte-identical signed manifest) is installed already: nothing to do.
    A stick left in a device meets this at every boot; it is told apart from a replay."""


class IntegrityError(ApplianceError):
    """A payload's size or hash differs from what the signed manifest declares."""

    exit_code = 6
    status = 400


class StoreError(ApplianceError):
    """The device store or trust store cannot be read or written (I/O, permissions, lock)."""

    exit_code = 7


class FetchError(ApplianceError):
    """A model source (local path or PyPI package) could not be fetched or checked."""

    exit_code = 8


# --- requests (HTTP statuses) -----------------------------------------------------------------

class RequestError(ApplianceError):
    """A request the client must change: 400."""

    exit_code = 2
    status = 400


class Unsupported(RequestError):
    """A parameter this server does not implement, or a value it cannot honour: 400 naming
    the parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message, param=param)


class ContextTooLong(RequestError):
    """The prompt (with the tokens to generate) does not fit the model's context."""

    code = "context_length_exceeded"


class InvalidText(RequestError):
    code = "invalid_text"


class Unauthorized(RequestError):
    status = 401
    code = "invalid_api_key"


class Forbidden(RequestError):
    status = 403
    code = "origin_denied"


class NotFound(RequestError):
    status = 404
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class TooLarge(RequestError):
    status = 413
    code = "request_too_large"


class Misdirected(RequestError):
    status = 421
    code = "misdirected_request"


class RateLimited(RequestError):
    """An API key's own limit (requests in flight, or per minute) is reached: 429 with
    Retry-After."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class Busy(ApplianceError):
    """A queue or pool is full: 503 with Retry-After."""

    status = 503
    code = "server_busy"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class ModelUnavailable(ApplianceError):
    """The model is in the active bundle but failed to load on this device."""

    status = 503
    code = "model_unavailable"
