"""What route handlers need, read from ``app.state`` (set by ``create_app``):
``settings``, ``deps`` (session factory, gateway, clock), ``temporal``, ``clock`` and
``signups``. Other routers (e.g. webhooks) can use these too."""

from __future__ import annotations

from email.message import Message

from fastapi import Request
from sqlalchemy.orm import Session, sessionmaker
from temporalio.client import Client

from billing.api.errors import ApiError
from billing.clock import Clock
from billing.settings import Settings
from billing.signup import SignupService
from billing.worker import Dependencies


def get_settings(request: Request) -> Settings:
    settings = request.app.state.settings
    assert isinstance(settings, Settings)
    return settings


def get_deps(request: Request) -> Dependencies:
    deps = request.app.state.deps
    assert isinstance(deps, Dependencies)
    return deps


def get_session_factory(request: Request) -> sessionmaker[Session]:
    return get_deps(request).session_factory


def get_temporal(request: Request) -> Client:
    client = request.app.state.temporal
    assert isinstance(client, Client)
    return client


def get_clock(request: Request) -> Clock:
    clock: Clock = request.app.state.clock
    return clock


def get_signups(request: Request) -> SignupService:
    service = request.app.state.signups
    assert isinstance(service, SignupService)
    return service


async def require_json_body(request: Request) -> None:
    """A request with a body must declare it as JSON (an empty body needs no type)."""
    if not await request.body():
        return
    declared = request.headers.get("content-type")
    if declared:
        parsed = Message()
        parsed["content-type"] = declared
        subtype = parsed.get_content_subtype()
        if parsed.get_content_maintype() == "application" and (
            subtype == "json" or subtype.endswith("+json")
        ):
            return
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type must be application/json; got {declared or 'none'!r}",
    )
