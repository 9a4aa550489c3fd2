"""Every error becomes HTTP here, and only here: an ApplianceError carries its status, code,
param and headers (appliance/errors.py); framework errors are turned into one first."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.errors import ApplianceError, NotFound, RequestError

log = logging.getLogger(__name__)


def error_response(exc: ApplianceError) -> JSONResponse:
    body = exc.body()
    if exc.hint:  # e.g. which models exist
        body["error"]["message"] = f"{exc.message}; {exc.hint}"  # type: ignore[index]
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


@contextmanager
def blame(param: str) -> Iterator[None]:
    """Name the request field behind a client error raised inside (unless it names one)."""
    try:
        yield
    except ApplianceError as exc:
        if exc.param is None and exc.status < 500:
            exc.param = param
        raise


def _validation_error(exc: RequestValidationError) -> RequestError:
    first = exc.errors()[0] if exc.errors() else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif kind == "json_invalid":
        message, param = "the request body is not valid JSON", None
    else:
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
    return RequestError(message, param=param)


def install(app: FastAPI) -> None:
    """The handlers: ours, the framework's turned into ours, and the last resort."""

    @app.exception_handler(ApplianceError)
    async def _ours(request: Request, exc: ApplianceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = NotFound(str(exc.detail)) if exc.status_code == 404 else RequestError(
            str(exc.detail))
        error.status = exc.status_code
        error.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return error_response(error)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(ApplianceError("internal error; see the appliance's journal"))
