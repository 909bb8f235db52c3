"""What the app says about its own routes.

``operation_scopes`` reads the API-key scopes each operation takes from the OpenAPI document
(``require_scope`` lists them in the operation's security requirements); ``every_route``
walks the app's router itself, hidden routes included, so a route left out of the document
is found too."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI

HTTP_METHODS = ("get", "put", "post", "delete", "patch", "head", "options", "trace")


def operation_scopes(document: dict[str, Any]) -> dict[tuple[str, str], tuple[str, ...]]:
    """``{("GET", "/v1/invoices"): ("finance", "admin"), ...}``; () for an operation that
    declares no security requirement."""
    found: dict[tuple[str, str], tuple[str, ...]] = {}
    for path, item in document["paths"].items():
        for method in HTTP_METHODS:
            operation = item.get(method)
            if operation is None:
                continue
            scopes: list[str] = []
            for requirement in operation.get("security", []):
                for names in requirement.values():
                    scopes.extend(s for s in names if s not in scopes)
            found[(method.upper(), path)] = tuple(scopes)
    return found


@dataclass(frozen=True)
class RouteInfo:
    path: str
    methods: frozenset[str]
    include_in_schema: bool


def every_route(app: FastAPI) -> Iterator[RouteInfo]:
    """Every HTTP route the app serves. FastAPI (0.165) keeps included routers as branches;
    ``effective_route_contexts`` flattens them with their prefixes."""
    for route in app.router.routes:
        contexts = getattr(route, "effective_route_contexts", None)
        for candidate in contexts() if contexts is not None else [route]:
            path = getattr(candidate, "path", None)
            methods = getattr(candidate, "methods", None)
            if path is None or methods is None:
                continue  # a mount or websocket route: none here
            original = getattr(candidate, "original_route", candidate)
            yield RouteInfo(
                path, frozenset(methods), bool(getattr(original, "include_in_schema", True))
            )
