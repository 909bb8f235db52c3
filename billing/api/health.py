"""``GET /healthz`` and ``GET /readyz`` on the API (see billing.health). No API key: a load
balancer calls them, and they tell nothing but up or down."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from billing.api.dependencies import get_deps, get_temporal
from billing.health import liveness_body, readiness

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict[str, Any]:
    return liveness_body()


@router.get(
    "/readyz",
    summary="Readiness: the database and Temporal answer",
    responses={503: {"description": "A dependency does not answer; the body says which."}},
)
async def readyz(request: Request) -> JSONResponse:
    ready, body = await readiness(get_deps(request).session_factory, get_temporal(request))
    return JSONResponse(body, status_code=200 if ready else 503)
