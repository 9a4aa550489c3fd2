"""GET /openapi.json: the API described from its routes and request types, behind the API key
like the API itself. No docs page: FastAPI's loads its scripts from a CDN, which a device
without internet cannot reach (and should not try to).

FastAPI's document is corrected where this service answers otherwise: a bad request is a 400
with an OpenAI error object (api/errors.py; Anthropic's on /v1/messages), never FastAPI's 422,
and every path but /healthz wants the key, as a bearer token or in `x-api-key`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from appliance import __version__
from appliance.api.errors import anthropic_path
from appliance.api.guard import OPEN_PATHS

router = APIRouter()
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type"], "properties": {
        "message": {"type": "string"}, "type": {"type": "string"},
        "param": {"type": ["string", "null"], "description": "the request field at fault"},
        "code": {"type": ["string", "null"]}}}}}
ANTHROPIC_ERROR = {"type": "object", "required": ["type", "error"], "properties": {
    "type": {"const": "error"}, "error": {
        "type": "object", "required": ["type", "message"], "properties": {
            "type": {"type": "string", "description": "invalid_request_error, ..."},
            "message": {"type": "string", "description": "names the request field at fault"}}}}}
REFUSALS = {"400": "Invalid request (the field at fault in error.param)",
            "401": "No valid API key", "403": "Cross-origin request from an origin not allowed",
            "404": "No such model (or not one this key may use)",
            "429": "This key's limits reached (Retry-After)",
            "503": "Busy or unavailable (Retry-After)"}


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request) -> JSONResponse:
    state = request.app.state
    if getattr(state, "openapi", None) is None:  # built once: the routes do not change
        state.openapi = document(request.app.openapi())
    return JSONResponse(state.openapi)


def document(doc: dict[str, Any]) -> dict[str, Any]:
    """FastAPI's document, corrected as the module docstring says."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["Error"] = ERROR
    schemas["AnthropicError"] = ANTHROPIC_ERROR
    doc["components"]["securitySchemes"] = {
        "apiKey": {"type": "http", "scheme": "bearer",
                   "description": "An API key from `appliance-ctl apikey create`"},
        "xApiKey": {"type": "apiKey", "in": "header", "name": "x-api-key",
                    "description": "The same key, as Anthropic's clients send it"}}
    doc["security"] = [{"apiKey": []}, {"xApiKey": []}]
    doc["info"]["description"] = f"appliance {__version__}: an OpenAI-compatible API on the LAN"
    for path, operations in doc.get("paths", {}).items():
        for op in operations.values():
            responses = op.setdefault("responses", {})
            responses.pop("422", None)
            if path in OPEN_PATHS:
                op["security"] = []
                continue
            error = "AnthropicError" if anthropic_path(path) else "Error"
            for status, said in REFUSALS.items():
                responses.setdefault(status, {"description": said, "content": {
                    "application/json": {"schema": {"$ref": f"#/components/schemas/{error}"}}}})
    return doc
