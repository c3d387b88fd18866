"""Routes that carry their facts: what they do, what they take and answer, who may call them.

A route is declared once, with ``api_route`` (or ``websocket_route``): its summary, request and
response models, streamed media types, error statuses, whether it needs an API key and whether
the rate limit counts it. Everything that needs those facts reads them from the route table:

- ``/openapi.json`` (``shimmy.api.openapi``) describes every route from them;
- ``RouteAccess.of(routes)`` gives the API key and rate-limit middleware the requests that need
  no key and the ones the limit lets through.

``walk_routes`` flattens a route table, mounts included, into ``RouteEntry``s with full paths.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

if TYPE_CHECKING:
    from pydantic import BaseModel
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.types import Scope
    from starlette.websockets import WebSocket

Endpoint = Callable[["Request"], Awaitable["Response"]]
WebSocketEndpoint = Callable[["WebSocket"], Awaitable[None]]

SSE = "text/event-stream"
NDJSON = "application/x-ndjson"
# The "method" of a WebSocket handshake in ``RouteAccess``'s sets.
WEBSOCKET = "WEBSOCKET"

# What each error status means, unless a route says more precisely.
STATUS_TEXT: Mapping[int, str] = {
    400: "The request is invalid (code `invalid_request` and others)",
    403: "Forbidden (code `forbidden`)",
    404: "Not found (code `not_found`)",
    409: "Conflict (code `already_exists`)",
    413: "The body is too large (code `payload_too_large`)",
    422: "The model file cannot be loaded (code `model_unusable`)",
    502: "An upstream download failed",
    503: "Busy or loading (codes `server_busy`, `model_loading`); see Retry-After",
    507: "Not enough memory",
}
BAD_REQUEST: Mapping[int, str] = {400: STATUS_TEXT[400]}
MODEL_ERRORS: Mapping[int, str] = {
    404: "No such model (code `model_not_found`)",
    413: STATUS_TEXT[413],
    422: STATUS_TEXT[422],
    503: STATUS_TEXT[503],
}
GENERATION_ERRORS: Mapping[int, str] = {**BAD_REQUEST, **MODEL_ERRORS}

Errors = Mapping[int, str] | Iterable[int]


@dataclass(frozen=True)
class RouteFacts:
    """Everything the server states about a route besides its path, methods and handler.

    ``response`` is the model of the JSON answer (None: no JSON answer); ``streams`` the media
    types of its streamed answers (``SSE``, ``NDJSON``), ``texts`` those of other non-JSON
    answers (``text/html``). ``errors`` are the statuses the handler itself answers, with what
    they mean; the middleware's (401, 403, 429) are added by whoever describes the route.
    ``responses`` are other answers without a body (``304``), ``headers`` the optional request
    headers it reads. ``public``: no API key needed; ``rate_limited``: counted by the limit.
    """

    summary: str
    description: str | None = None
    body: type[BaseModel] | None = None
    body_required: bool = True
    response: type[BaseModel] | None = None
    response_description: str = "OK"
    streams: tuple[str, ...] = ()
    texts: tuple[str, ...] = ()
    errors: tuple[tuple[int, str], ...] = ()
    responses: tuple[tuple[int, str], ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    public: bool = False
    rate_limited: bool = True
    tags: tuple[str, ...] = ()


class ApiRoute(Route):
    """A starlette ``Route`` with its ``RouteFacts``."""

    def __init__(
        self,
        path: str,
        endpoint: Endpoint,
        *,
        methods: Sequence[str],
        facts: RouteFacts,
        name: str | None = None,
        include_in_schema: bool = True,
    ) -> None:
        super().__init__(
            path, endpoint, methods=list(methods), name=name, include_in_schema=include_in_schema
        )
        self.facts = facts


class ApiWebSocketRoute(WebSocketRoute):
    """A starlette ``WebSocketRoute`` with its ``RouteFacts``."""

    def __init__(
        self, path: str, endpoint: WebSocketEndpoint, *, facts: RouteFacts, name: str | None = None
    ) -> None:
        super().__init__(path, endpoint, name=name)
        self.facts = facts


def _error_table(errors: Errors) -> tuple[tuple[int, str], ...]:
    if isinstance(errors, Mapping):
        table = {int(status): str(text) for status, text in errors.items()}
    else:
        table = {status: STATUS_TEXT.get(status, "An error") for status in errors}
    return tuple(sorted(table.items()))


def api_route(
    path: str,
    endpoint: Endpoint,
    *,
    methods: Sequence[str],
    summary: str,
    description: str | None = None,
    body: type[BaseModel] | None = None,
    body_required: bool = True,
    response: type[BaseModel] | None = None,
    response_description: str = "OK",
    streams: Sequence[str] = (),
    texts: Sequence[str] = (),
    errors: Errors = (),
    responses: Mapping[int, str] | None = None,
    headers: Mapping[str, str] | None = None,
    public: bool = False,
    rate_limited: bool = True,
    tags: Sequence[str] = (),
    include_in_schema: bool = True,
) -> ApiRoute:
    """An HTTP route and its facts (see ``RouteFacts``). ``errors`` maps statuses to what they
    mean; a bare status takes its meaning from ``STATUS_TEXT``."""
    facts = RouteFacts(
        summary=summary,
        description=description,
        body=body,
        body_required=body_required,
        response=response,
        response_description=response_description,
        streams=tuple(streams),
        texts=tuple(texts),
        errors=_error_table(errors),
        responses=tuple(sorted((responses or {}).items())),
        headers=tuple((headers or {}).items()),
        public=public,
        rate_limited=rate_limited,
        tags=tuple(tags),
    )
    return ApiRoute(
        path, endpoint, methods=methods, facts=facts, include_in_schema=include_in_schema
    )


def websocket_route(
    path: str,
    endpoint: WebSocketEndpoint,
    *,
    summary: str,
    description: str,
    public: bool = False,
    rate_limited: bool = True,
    tags: Sequence[str] = (),
) -> ApiWebSocketRoute:
    """A WebSocket route and its facts. OpenAPI 3.1 cannot describe one: ``description`` goes
    into the API's description instead."""
    facts = RouteFacts(
        summary=summary,
        description=description,
        public=public,
        rate_limited=rate_limited,
        tags=tuple(tags),
    )
    return ApiWebSocketRoute(path, endpoint, facts=facts)


# --- walking a route table ----------------------------------------------------------------------

_PARAM = re.compile(r"\{(\w+)(?::\w+)?\}")


@dataclass(frozen=True)
class RouteEntry:
    """One route of a table, with its full path (mount prefixes included)."""

    path: str  # as Starlette writes it: ``/api/models/{id:path}``
    methods: frozenset[str]  # HTTP methods (HEAD included where GET is); empty for a WebSocket
    facts: RouteFacts | None  # None: a plain starlette route, declared without facts
    websocket: bool = False
    include_in_schema: bool = True

    @property
    def template(self) -> str:
        """The path as OpenAPI writes it: ``/api/models/{id}``."""
        return _PARAM.sub(r"{\1}", self.path)

    @property
    def path_params(self) -> tuple[str, ...]:
        return tuple(match[1] for match in _PARAM.finditer(self.path))


def walk_routes(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[RouteEntry]:
    """Every route of ``routes``, in order, mounts walked into."""
    for route in routes:
        if isinstance(route, Mount):
            yield from walk_routes(route.routes, prefix + route.path)
        elif isinstance(route, Route):
            yield RouteEntry(
                prefix + route.path,
                frozenset(route.methods or ()),
                route.facts if isinstance(route, ApiRoute) else None,
                include_in_schema=route.include_in_schema,
            )
        elif isinstance(route, WebSocketRoute):
            facts = route.facts if isinstance(route, ApiWebSocketRoute) else None
            yield RouteEntry(prefix + route.path, frozenset(), facts, websocket=True)
        else:
            raise TypeError(f"cannot walk a route of type {type(route).__name__}")


# --- access rules for the middleware ------------------------------------------------------------


@dataclass(frozen=True)
class RouteAccess:
    """Which requests need no API key (``public``) and which the rate limit lets through
    (``unlimited``), as ``(method, path)`` pairs; a WebSocket handshake's method is
    ``WEBSOCKET``. Empty by default: every request needs a key and is counted, which is also
    what a route without facts gets. Unknown paths are neither public nor unlimited."""

    public: frozenset[tuple[str, str]] = frozenset()
    unlimited: frozenset[tuple[str, str]] = frozenset()

    @classmethod
    def of(cls, routes: Iterable[BaseRoute]) -> RouteAccess:
        public: set[tuple[str, str]] = set()
        unlimited: set[tuple[str, str]] = set()
        for entry in walk_routes(routes):
            facts = entry.facts
            if facts is None or (not facts.public and facts.rate_limited):
                continue
            if entry.path_params:
                # Exact paths only: a pattern that is public by accident would be a hole.
                raise ValueError(f"{entry.path}: only fixed paths can be public or unlimited")
            methods = {WEBSOCKET} if entry.websocket else entry.methods
            pairs = {(method, entry.path) for method in methods}
            if facts.public:
                public |= pairs
            if not facts.rate_limited:
                unlimited |= pairs
        return cls(frozenset(public), frozenset(unlimited))

    @staticmethod
    def _key(scope: Scope) -> tuple[str, str]:
        method = WEBSOCKET if scope["type"] == "websocket" else str(scope.get("method", ""))
        return method, str(scope["path"])

    def is_public(self, scope: Scope) -> bool:
        return self._key(scope) in self.public

    def is_rate_limited(self, scope: Scope) -> bool:
        return self._key(scope) not in self.unlimited
