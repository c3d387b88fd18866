"""``GET /openapi.json``: an OpenAPI 3.1 description of the HTTP API, generated from the route
table (``document``) and the models the routes declare (``components``)."""

from shimmy.api.openapi.document import build_openapi
from shimmy.api.openapi.routes import openapi_json, routes

__all__ = ["build_openapi", "openapi_json", "routes"]
