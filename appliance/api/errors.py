"""Every error becomes HTTP here, and only here: an ApplianceError carries its status, code,
param and headers (appliance/errors.py); framework errors are turned into one first. Errors
are OpenAI JSON, except on Anthropic's Messages routes, which answer in Anthropic's shape."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from appliance.errors import ApplianceError, NotFound, RequestError

log = logging.getLogger(__name__)


# Anthropic's error types by status; anything else is an invalid_request_error, or an
# api_error from 500 up.
_ANTHROPIC_TYPES = {401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                    503: "overloaded_error"}


def anthropic_path(path: str) -> bool:
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def anthropic_body(exc: ApplianceError) -> dict[str, object]:
    """Anthropic's error object. It has no `param`: the message names the field instead."""
    kind = _ANTHROPIC_TYPES.get(exc.status, "api_error" if exc.status >= 500
                                else "invalid_request_error")
    message = exc.message
    if exc.param and exc.param not in message:
        message = f"{exc.param}: {message}"
    if exc.hint:
        message = f"{message}; {exc.hint}"
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(exc: ApplianceError, path: str = "") -> JSONResponse:
    """The error as HTTP for a request to `path` (its shape depends on the API)."""
    if anthropic_path(path):
        return JSONResponse(anthropic_body(exc), status_code=exc.status, headers=exc.headers)
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


@contextmanager
def renamed(names: list[tuple[str, str]]) -> Iterator[None]:
    """Name fields as the client sent them, for a request translated into a chat completion:
    an error raised inside that names a chat field (`response_format.json_schema.schema`) is
    renamed, message too, by the first (regex, replacement) in `names` that matches."""
    try:
        yield
    except ApplianceError as exc:
        for pattern, replacement in names:
            if exc.param and (new := re.sub(f"^{pattern}(?=\\.|$)", replacement,
                                            exc.param)) != exc.param:
                exc.message = exc.message.replace(exc.param, new)
                exc.param = new
                break
        raise


def _validation_error(exc: RequestValidationError) -> RequestError:
    errors = []
    for e in exc.errors():
        loc = tuple(e.get("loc", ()))
        loc = loc[1:] if loc[:1] == ("body",) else loc
        errors.append({**e, "loc": loc, "labels": _labels(loc, e.get("type"), exc.body)})
    found = _relevant(errors) if errors else [{"loc": (), "labels": set()}]
    first = found[0]
    loc = first["loc"]
    if len(found) > 1:  # no branch of a union took the value: say what each wanted
        loc = loc[:min(len(e["loc"]) for e in found) - 1]
    param = ".".join(str(p) for i, p in enumerate(loc) if i not in first["labels"]) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    elif kind == "json_invalid":
        message, param = "the request body is not valid JSON", None
    else:
        wants = list(dict.fromkeys(_CLASS_NAME.sub("", e.get("msg", "invalid value"))
                                   for e in found))
        said = " or ".join([wants[0], *(w.removeprefix("Input should be ") for w in wants[1:])])
        message = f"{param or 'body'}: {said}"
    return RequestError(message, param=param)


# Where a value matches no branch of a union, pydantic reports each branch, and puts the
# branch's name in the error's location ('str', 'list[TextPart]', 'NamedToolChoice'): never a
# field the client sent, so it is left out of `param`.
_CLASS_NAME = re.compile(r" or instance of \w+")


def _labels(loc: tuple[Any, ...], kind: Any, body: Any) -> set[int]:
    """The positions in `loc` that name a union's branch: those that are no key or index of
    the body where they stand (but for a `missing` error's last, the field not sent)."""
    labels, node = set(), body
    for i, part in enumerate(loc):
        key = isinstance(node, dict) and isinstance(part, str) and part in node
        index = isinstance(node, list) and type(part) is int and 0 <= part < len(node)
        if key or index:
            node = node[part]
        elif not (kind == "missing" and i == len(loc) - 1):
            labels.add(i)
    return labels


def _relevant(errors: list[Any], start: int = 0) -> list[Any]:
    """The errors that say what is wrong with the first bad value. Of a union's branches, the
    one that got furthest into the value is the one the client meant (a list of content parts,
    not a string); a value that no branch took at all gets every branch's message."""
    first = errors[0]
    loc = first["loc"]
    for i in range(start, len(loc)):
        if i not in first["labels"]:
            continue
        site = [e for e in errors if e["loc"][:i] == loc[:i] and i in e["labels"]]
        if len({e["loc"][i] for e in site}) < 2:
            continue
        deepest = max(len(e["loc"]) for e in site)
        if deepest == i + 1:
            return site
        branch = next(e["loc"][i] for e in site if len(e["loc"]) == deepest)
        return _relevant([e for e in site if e["loc"][i] == branch], i + 1)
    return [first]


def install(app: FastAPI) -> None:
    """The handlers: ours, the framework's turned into ours, and the last resort."""

    @app.exception_handler(ApplianceError)
    async def _ours(request: Request, exc: ApplianceError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(exc), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = NotFound(str(exc.detail)) if exc.status_code == 404 else RequestError(
            str(exc.detail))
        error.status = exc.status_code
        error.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return error_response(error, request.url.path)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(ApplianceError("internal error; see the appliance's journal"),
                              request.url.path)
