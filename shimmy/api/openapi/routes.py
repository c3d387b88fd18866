"""``GET /openapi.json``: the OpenAPI 3.1 description of the routes this app serves."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from shimmy.api.openapi.document import build_openapi
from shimmy.api.protocol.responses import ResponseModel
from shimmy.api.routing import api_route


class OpenAPIDocument(ResponseModel):
    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]
    components: dict[str, Any]


async def openapi_json(request: Request) -> Response:
    # The app's own route table: the document describes exactly what this app serves.
    return JSONResponse(build_openapi(request.app.state.settings, request.app.routes))


routes: list[BaseRoute] = [
    api_route(
        "/openapi.json",
        openapi_json,
        methods=["GET"],
        summary="This description",
        response=OpenAPIDocument,
        response_description="OpenAPI 3.1",
        # It reveals nothing the open source server does not.
        public=True,
        tags=["server"],
    )
]
