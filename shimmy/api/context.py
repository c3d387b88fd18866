"""What a handler reads from the app it runs in: its settings and model registry, and whether
its client is still there."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection, Request

from shimmy.api.sse import wait_for_disconnect

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from shimmy.registry import ModelRegistry
    from shimmy.settings import Settings


def registry_of(connection: HTTPConnection) -> ModelRegistry:
    registry: ModelRegistry = connection.app.state.registry
    return registry


def settings_of(connection: HTTPConnection) -> Settings:
    settings: Settings = connection.app.state.settings
    return settings


def client_gone(request: Request) -> Callable[[], Awaitable[None]]:
    """Waits until the client closes the connection (start it once the body has been read)."""
    return functools.partial(wait_for_disconnect, request.receive)
