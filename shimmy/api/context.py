"""What a handler reads from the app it runs in: its settings and model registry, and whether
its client is still there."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection, Request

from shimmy.api.security import presented_credentials
from shimmy.api.sse import wait_for_disconnect
from shimmy.errors import InvalidRequest

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Hashable

    from shimmy.registry import ModelRegistry
    from shimmy.serving.lanes import Lanes
    from shimmy.settings import Settings

# A code-completion request carrying the same value as a running one replaces it.
CLIENT_ID_HEADER = "X-Client-Id"
CLIENT_ID_DESCRIPTION = (
    "Cancel-and-replace: a completion sent with the same value (from the same address and API "
    "key) cancels the one still running, so a stale completion never holds a slot"
)
MAX_CLIENT_ID_CHARS = 200


def registry_of(connection: HTTPConnection) -> ModelRegistry:
    registry: ModelRegistry = connection.app.state.registry
    return registry


def settings_of(connection: HTTPConnection) -> Settings:
    settings: Settings = connection.app.state.settings
    return settings


def client_gone(request: Request) -> Callable[[], Awaitable[None]]:
    """Waits until the client closes the connection (start it once the body has been read)."""
    return functools.partial(wait_for_disconnect, request.receive)


def lanes_of(connection: HTTPConnection) -> Lanes:
    lanes: Lanes = connection.app.state.lanes
    return lanes


def replace_key(connection: HTTPConnection) -> Hashable | None:
    """The ``X-Client-Id`` lane of this request, or None. It is scoped by the client's address
    and API key, so one client cannot cancel another's completions by guessing its id."""
    value = connection.headers.get(CLIENT_ID_HEADER)
    if value is None:
        return None
    if not value or len(value) > MAX_CLIENT_ID_CHARS:
        raise InvalidRequest(
            f"{CLIENT_ID_HEADER} must hold 1 to {MAX_CLIENT_ID_CHARS} characters",
            param=CLIENT_ID_HEADER,
        )
    host = connection.client.host if connection.client is not None else None
    return ("http", host, tuple(presented_credentials(connection.headers)), value)
