"""The OpenAPI 3.1 document, generated from the route table and the models its routes declare.

Every route declared with ``shimmy.api.routing.api_route`` becomes an operation: its summary,
request body, answers and error statuses are the route's facts, its error body is the one
``shimmy.api.errors`` renders for its path (OpenAI's under ``/v1``, the native one elsewhere).
A route without facts is an error, so nothing the server serves goes undescribed; routes
declared with ``include_in_schema=False`` (the chat page's assets) are left out on purpose.

The document follows the running configuration: the security schemes and the 401 and 429
answers are only listed when API keys or a rate limit are set, and the chat page only when it
is served (it is only in the route table then). OpenAPI cannot describe a WebSocket: those
routes are described in the API's description.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from pydantic import BaseModel
from starlette.routing import BaseRoute

from shimmy import __version__
from shimmy.api.errors import (
    has_flat_errors,
    is_anthropic_path,
    is_llamacpp_path,
    is_openai_path,
)
from shimmy.api.openapi.components import Schema, model_schemas, ref
from shimmy.api.protocol.errors import (
    AnthropicError,
    FlatError,
    LlamaCppError,
    NativeError,
    OpenAIError,
)
from shimmy.api.routing import RouteEntry, RouteFacts, walk_routes
from shimmy.api.security import keys_configured
from shimmy.settings import Settings

OPENAPI_VERSION = "3.1.0"

DESCRIPTION = """\
shimmy serves GGUF models through llama.cpp. Several dialects share one port: the native API
under `/api`, the OpenAI-compatible API under `/v1`, LocalLab's routes (`/generate`,
`/chat`, `/generate/batch`, `/models/...`, `/system/info`, `/health`), which answer errors in
the native format, Ollama's API under `/ollama` and RKLLama's under `/rkllama`, which
answer errors as `{"error": "message"}` (`shimmy serve --ollama` also serves Ollama's API on a
port of its own, 11434 by default), and llama.cpp's server routes (`/infill`), which answer
them as llama.cpp does. `/metrics` serves Prometheus metrics and, unless turned
off, `/` a chat page (its assets under `/ui/` are not listed here).

Streaming (`"stream": true`) answers with server-sent events (`text/event-stream`) that end
with `data: [DONE]` (Ollama's routes: one JSON object per line, `application/x-ndjson`;
llama.cpp's end with their final event, as llama.cpp's do); a failure after the stream started
is sent as an event holding the error. Each streaming operation says what its events hold.
"""

_WEBSOCKETS = "WebSockets (OpenAPI cannot describe them):"


def _description(websockets: Sequence[RouteEntry]) -> str:
    if not websockets:
        return DESCRIPTION
    lines = [DESCRIPTION, _WEBSOCKETS, ""]
    for entry in websockets:
        assert entry.facts is not None
        text = f"- `{entry.path}`: {entry.facts.summary}."
        if entry.facts.description:
            text += " " + entry.facts.description
        lines.append(text)
    return "\n".join(lines) + "\n"


class _Operations:
    """Builds operations with the error answers this configuration can give."""

    def __init__(self, settings: Settings, names: dict[type[BaseModel], str]) -> None:
        self.auth = keys_configured(settings)
        self.rate_limited = settings.rate_limit is not None
        self.names = names

    def _json(self, model: type[BaseModel]) -> Schema:
        return {"application/json": {"schema": ref(self.names[model])}}

    def errors(self, entry: RouteEntry, facts: RouteFacts) -> Schema:
        answers = dict(facts.errors)
        answers[403] = "The Host or the browser Origin is not allowed"
        if self.auth and not facts.public:
            answers[401] = "A valid API key is missing (code `unauthorized`)"
        if self.rate_limited and facts.rate_limited:
            answers[429] = "Too many requests (code `rate_limited`); see Retry-After"
        body = self._json(_error_model(entry.path))
        responses: Schema = {
            str(status): {"description": text, "content": body}
            for status, text in sorted(answers.items())
        }
        responses["default"] = {"description": "Any other error", "content": body}
        return responses

    def ok(self, facts: RouteFacts) -> Schema:
        content: Schema = self._json(facts.response) if facts.response is not None else {}
        # No schema for a stream: OpenAPI 3.1 cannot describe its events (3.2's itemSchema
        # can), and validators would read a schema as the shape of every event.
        content.update({media_type: {} for media_type in facts.streams})
        content.update({media_type: {"schema": {"type": "string"}} for media_type in facts.texts})
        ok: Schema = {"description": facts.response_description}
        if content:
            ok["content"] = content
        return ok

    def operation(self, entry: RouteEntry, facts: RouteFacts, method: str) -> Schema:
        responses: Schema = {"200": self.ok(facts)}
        responses.update({str(status): {"description": text} for status, text in facts.responses})
        responses.update(self.errors(entry, facts))
        operation: Schema = {
            "operationId": _operation_id(method, entry.template),
            "summary": facts.summary,
        }
        if facts.description:
            operation["description"] = facts.description
        if facts.tags:
            operation["tags"] = list(facts.tags)
        parameters = [_path_param(name) for name in entry.path_params] + [
            _header_param(name, text) for name, text in facts.headers
        ]
        if parameters:
            operation["parameters"] = parameters
        if facts.body is not None:
            operation["requestBody"] = {
                "required": facts.body_required,
                "content": self._json(facts.body),
            }
        operation["responses"] = responses
        if facts.public and self.auth:
            operation["security"] = []
        return operation


def _operation_id(method: str, template: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", template)
    return "_".join([method.lower(), *words]) if words else f"{method.lower()}_root"


def _path_param(name: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _header_param(name: str, description: str) -> Schema:
    return {
        "name": name,
        "in": "header",
        "required": False,
        "schema": {"type": "string"},
        "description": description,
    }


def _declared(entries: Iterable[RouteEntry]) -> list[tuple[RouteEntry, RouteFacts]]:
    declared: list[tuple[RouteEntry, RouteFacts]] = []
    for entry in entries:
        if entry.facts is None:
            raise ValueError(f"{entry.path}: the route declares no facts (use api_route)")
        declared.append((entry, entry.facts))
    return declared


def build_openapi(settings: Settings, routes: Iterable[BaseRoute] | None = None) -> Schema:
    """The document for ``routes``; by default the route table ``create_app(settings)``
    serves."""
    if routes is None:
        from shimmy.api.app import route_table  # the app imports this module

        routes = route_table(settings)
    entries = list(walk_routes(routes))
    http = _declared(e for e in entries if not e.websocket and e.include_in_schema)
    websockets = [entry for entry, _ in _declared(e for e in entries if e.websocket)]
    requests = [facts.body for _, facts in http if facts.body is not None]
    responses = [facts.response for _, facts in http if facts.response is not None]
    names, schemas = model_schemas(
        requests, [*responses, NativeError, OpenAIError, FlatError, AnthropicError, LlamaCppError]
    )
    ops = _Operations(settings, names)
    paths: dict[str, Schema] = {}
    for entry, facts in http:
        item = paths.setdefault(entry.template, {})
        # Starlette answers HEAD wherever it answers GET; OpenAPI leaves that implied.
        for method in sorted(entry.methods - {"HEAD"}):
            item[method.lower()] = ops.operation(entry, facts, method)
    document: Schema = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "shimmy",
            "version": __version__,
            "description": _description(websockets),
        },
        "paths": paths,
        "components": {"schemas": dict(sorted(schemas.items()))},
    }
    if keys_configured(settings):
        document["components"]["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
        }
        document["security"] = [{"bearer": []}, {"apiKeyHeader": []}]
    return document


def _error_model(path: str) -> type[BaseModel]:
    # The error body of a path, as shimmy.api.errors chooses it.
    if is_anthropic_path(path):
        return AnthropicError
    if is_openai_path(path):
        return OpenAIError
    if is_llamacpp_path(path):
        return LlamaCppError
    return FlatError if has_flat_errors(path) else NativeError
