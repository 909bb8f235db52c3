"""The plan catalog: create (scope ``admin``), list and read (``finance`` or ``admin``),
archive (``admin``). Prices are immutable: a new price is a new plan code."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from billing import catalog
from billing.api.auth import require_scope
from billing.api.dependencies import get_clock, get_deps, require_json_body
from billing.api.errors import ApiError
from billing.api.schemas import PlanIn, PlanListOut, PlanOut, error_responses
from billing.clock import Clock
from billing.worker import Dependencies

router = APIRouter(prefix="/v1/plans", tags=["plans"])

PlanCode = Annotated[
    str,
    Path(
        min_length=1,
        max_length=63,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$",
        description="Plan code, e.g. 'pro-monthly'.",
    ),
]


@router.post(
    "",
    status_code=201,
    dependencies=[require_scope("admin"), Depends(require_json_body)],
    responses={
        200: {"model": PlanOut, "description": "The same plan was already in the catalog."},
        **error_responses(400, 401, 403, 409, 413, 415, 422, 503),
    },
    summary="Create a plan",
)
async def create_plan(
    body: PlanIn,
    response: Response,
    deps: Annotated[Dependencies, Depends(get_deps)],
    clock: Annotated[Clock, Depends(get_clock)],
) -> PlanOut:
    """201 with the plan. The same plan again (same code and terms) answers 200 with header
    ``Idempotent-Replayed: true`` and writes nothing; the code with other terms is 409."""
    created = await asyncio.to_thread(
        catalog.create_plans, deps.session_factory, [body.as_raw()], clock=clock
    )
    if not created[0].created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return PlanOut.of(created[0].entry)


@router.get(
    "",
    dependencies=[require_scope("finance", "admin")],
    responses=error_responses(401, 403, 422, 503),
    summary="List plans",
)
async def list_plans(
    request: Request,
    deps: Annotated[Dependencies, Depends(get_deps)],
    active: Annotated[
        bool | None, Query(description="true: open to signups; false: archived.")
    ] = None,
) -> PlanListOut:
    """Every plan by code."""
    for name in request.query_params:
        if name != "active":
            raise ApiError(
                422, "invalid_input", f"unknown query parameter {name!r}; known: active", field=name
            )
    entries = await asyncio.to_thread(catalog.list_plans, deps.session_factory, active=active)
    return PlanListOut(items=[PlanOut.of(e) for e in entries])


@router.get(
    "/{code}",
    dependencies=[require_scope("finance", "admin")],
    responses=error_responses(401, 403, 404, 422, 503),
    summary="A plan",
)
async def get_plan(code: PlanCode, deps: Annotated[Dependencies, Depends(get_deps)]) -> PlanOut:
    return PlanOut.of(await asyncio.to_thread(catalog.get_plan, deps.session_factory, code))


@router.post(
    "/{code}/archive",
    dependencies=[require_scope("admin")],
    responses=error_responses(401, 403, 404, 422, 503),
    summary="Archive a plan",
)
async def archive_plan(code: PlanCode, deps: Annotated[Dependencies, Depends(get_deps)]) -> PlanOut:
    """No new signups or changes onto it; existing subscriptions keep billing. Archiving an
    archived plan answers it unchanged."""
    return PlanOut.of(await asyncio.to_thread(catalog.archive_plan, deps.session_factory, code))
