"""Route facts (``shimmy.api.routing``): declared once on each route, read by the middleware
and by ``/openapi.json``."""

from __future__ import annotations

import dataclasses
from typing import Any, get_args

import pytest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.types import Scope

from shimmy.api.app import route_table
from shimmy.api.locallab.protocol import UNLOADED_STATUS, LocalLabUnloadResult
from shimmy.api.native.protocol import ModelInfo
from shimmy.api.openapi import build_openapi
from shimmy.api.protocol.responses import ResponseModel
from shimmy.api.routing import (
    STATUS_TEXT,
    WEBSOCKET,
    ApiRoute,
    ApiWebSocketRoute,
    RouteAccess,
    api_route,
    walk_routes,
)
from shimmy.settings import Settings

PAGE_FILES = {"/", "/ui/app.js", "/ui/sse.js", "/ui/app.css", "/ui/favicon.svg"}


async def endpoint(request: Request) -> Response:
    return PlainTextResponse("ok")


def http_scope(method: str, path: str) -> Scope:
    return {"type": "http", "method": method, "path": path}


def test_every_route_declares_its_facts() -> None:
    for route in walk_routes(route_table(Settings(web_ui=True))):
        assert route.facts is not None, route.path
        assert route.facts.summary, route.path


def test_the_walk_sees_into_mounts() -> None:
    entries = {entry.path: entry for entry in walk_routes(route_table(Settings(web_ui=False)))}
    model = entries["/v1/models/{model_id:path}"]
    assert model.template == "/v1/models/{model_id}" and model.path_params == ("model_id",)
    assert model.methods == {"GET", "HEAD"}
    assert entries["/ws/generate"].websocket and not entries["/ws/generate"].methods
    assert "/" not in entries  # the chat page is only routed when it is served


def test_access_comes_from_the_facts() -> None:
    access = RouteAccess.of(route_table(Settings(web_ui=True)))
    reads = {"/api/health", "/health", "/openapi.json"} | PAGE_FILES
    assert access.public == {(method, path) for path in reads for method in ("GET", "HEAD")}
    unlimited = reads - {"/openapi.json"}
    assert access.unlimited == {(m, path) for path in unlimited for m in ("GET", "HEAD")}
    assert access.is_public(http_scope("GET", "/ui/app.js"))
    assert not access.is_public(http_scope("POST", "/"))  # only reads are public
    assert not access.is_public(http_scope("GET", "/ui/missing.js"))
    assert not access.is_public({"type": "websocket", "path": "/ws/generate"})
    assert access.is_rate_limited({"type": "websocket", "path": "/ws/generate"})
    assert not access.is_rate_limited(http_scope("HEAD", "/health"))
    assert access.is_rate_limited(http_scope("GET", "/openapi.json"))


def test_without_the_page_its_files_are_not_public() -> None:
    access = RouteAccess.of(route_table(Settings(web_ui=False)))
    assert not access.is_public(http_scope("GET", "/"))
    assert access.is_public(http_scope("GET", "/api/health"))


def test_nothing_is_public_or_unlimited_by_default() -> None:
    access = RouteAccess()
    assert not access.is_public(http_scope("GET", "/api/health"))
    assert access.is_rate_limited(http_scope("GET", "/api/health"))
    plain = RouteAccess.of([Route("/health", endpoint, methods=["GET"])])  # no facts
    assert plain == RouteAccess()


def test_a_public_route_must_have_a_fixed_path() -> None:
    route = api_route("/x/{id}", endpoint, methods=["GET"], summary="x", public=True)
    with pytest.raises(ValueError, match="fixed paths"):
        RouteAccess.of([Mount("/m", routes=[route])])


def test_websocket_facts_reach_the_access_rules() -> None:
    ws = [r for r in route_table(Settings()) if isinstance(r, ApiWebSocketRoute)]
    assert [r.path for r in ws] == ["/ws/generate"]
    public_ws = ApiWebSocketRoute(
        "/ws/x", ws[0].endpoint, facts=dataclasses.replace(ws[0].facts, public=True)
    )
    assert RouteAccess.of([public_ws]).public == {(WEBSOCKET, "/ws/x")}


def test_facts_are_frozen_and_bare_statuses_get_their_meaning() -> None:
    route = api_route("/x", endpoint, methods=["POST"], summary="x", errors=(404, 400))
    assert isinstance(route, ApiRoute)
    assert route.facts.errors == ((400, STATUS_TEXT[400]), (404, STATUS_TEXT[404]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        route.facts.public = True  # type: ignore[misc]


def test_the_document_refuses_a_route_without_facts() -> None:
    routes = [*route_table(Settings()), Route("/plain", endpoint, methods=["GET"])]
    with pytest.raises(ValueError, match="/plain"):
        build_openapi(Settings(), routes)
    hidden = api_route("/hidden", endpoint, methods=["GET"], summary="x", include_in_schema=False)
    assert "/hidden" not in build_openapi(Settings(), [*route_table(Settings()), hidden])["paths"]


def test_response_models_allow_additions_and_state_no_defaults() -> None:
    info: dict[str, Any] = {
        "id": "m",
        "name": "m",
        "description": None,
        "path": "/m.gguf",
        "size_bytes": 1,
        "architecture": None,
        "quantization": None,
        "parameter_count": None,
        "context_length": None,
        "has_chat_template": False,
        "loaded": False,
        "source": "model_paths",
        "usable": True,
        "verified": False,
        "added_later": 1,
    }
    assert ModelInfo.model_validate(info).model_dump(exclude_none=True)["added_later"] == 1
    schemas = build_openapi(Settings())["components"]["schemas"]
    assert schemas["ModelInfo"]["additionalProperties"] is True
    assert "error" not in schemas["ModelInfo"]["required"]
    assert schemas["ModelInfo"]["properties"]["error"] == {
        "description": "Why the file cannot be served",
        "title": "Error",
        "type": "string",
    }
    assert issubclass(LocalLabUnloadResult, ResponseModel)
    assert get_args(LocalLabUnloadResult.model_fields["status"].annotation) == (UNLOADED_STATUS,)
