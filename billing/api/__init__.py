"""The HTTP API (FastAPI): ``create_app`` builds it."""

from billing.api.app import create_app

__all__ = ["create_app"]
