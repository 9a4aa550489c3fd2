"""GET /v1/models (cards: api/cards.py), /healthz and /metrics. A key scoped to some models
sees only those."""

from __future__ import annotations

import ipaddress
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from appliance.api.cards import model_card
from appliance.api.generation import allowed_models, runtime
from appliance.errors import ModelNotFound

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    rt = runtime(request)
    return {"object": "list",
            "data": [model_card(m, rt.settings) for m in rt.served(allowed_models(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    rt = runtime(request)
    for m in rt.served(allowed_models(request)):
        if m.id == model_id:
            return model_card(m, rt.settings)
    raise ModelNotFound(f"The model `{model_id}` does not exist", param="model")


@router.get("/healthz")
async def healthz(request: Request) -> JSONResponse:
    """No key needed, so the LAN learns only the status; the engines and the ids of models
    that failed to load are for tools on the device itself (loopback)."""
    report = runtime(request).health()
    code = 503 if report["status"] == "unhealthy" else 200
    if not _loopback(request.client.host if request.client else ""):
        report = {"status": report["status"]}
    return JSONResponse(report, status_code=code)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    rt = runtime(request)
    lines = [f"appliance_{k} {v}" for k, v in rt.lanes.report().items()]
    allowed = allowed_models(request)
    for model, load in rt.load_report().items():
        if allowed is not None and model not in allowed:
            continue  # a scoped key learns nothing of the other models
        task = load.pop("task")
        for key, value in load.items():
            lines.append(f'appliance_{task}_{key}{{model="{model}"}} {value}')
    return PlainTextResponse("\n".join(lines) + "\n")
