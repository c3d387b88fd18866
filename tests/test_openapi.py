"""``/openapi.json`` against the app it describes: every route, request model and access rule.

test_schemathesis.py checks that the answers match the document; the tests here check that the
document is complete (the route table walked, mounts included), that its request schemas are
the validating models, and that the routes it marks as needing no key or not rate limited are
the ones the middleware really lets through.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from conftest import isolated_settings
from openapi_spec_validator import OpenAPIV31SpecValidator
from pydantic import AliasChoices, BaseModel
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from shimmy.api.app import create_app
from shimmy.api.llamacpp.protocol import InfillRequest
from shimmy.api.locallab.protocol import BatchBody, ChatBody, GenerateBody, LoadBody
from shimmy.api.native.protocol import GenerateRequest
from shimmy.api.openai.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from shimmy.api.openapi import build_openapi
from shimmy.settings import Settings

# The chat page's scripts, styles and icon are left out of the document on purpose: they are
# files the page at / loads, not an interface anyone calls. They are the only routes that may
# be missing from it.
UNDESCRIBED_PREFIX = "/ui/"


def routed(settings: Settings) -> tuple[set[str], set[str]]:
    """The app's HTTP operations ("METHOD /path", OpenAPI-style parameters) and its WebSocket
    paths, from the route table the app really serves."""
    operations: set[str] = set()
    websockets: set[str] = set()

    def walk(routes: list[BaseRoute], prefix: str) -> None:
        for route in routes:
            if isinstance(route, Mount):
                walk(list(route.routes), prefix + route.path)
                continue
            if not isinstance(route, Route | WebSocketRoute):
                raise AssertionError(f"unexpected route type {type(route).__name__}")
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", prefix + route.path)
            if isinstance(route, WebSocketRoute):
                websockets.add(path)
                continue
            # Starlette answers HEAD wherever it answers GET; OpenAPI leaves that implied.
            operations.update(f"{m} {path}" for m in route.methods or () if m != "HEAD")

    walk(list(create_app(settings).routes), "")
    return operations, websockets


def described(document: dict[str, Any]) -> set[str]:
    return {
        f"{method.upper()} {path}"
        for path, operations in document["paths"].items()
        for method in operations
    }


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"web_ui": True},
        {"api_keys": ["k"]},
        {"rate_limit": 60},
        {"web_ui": True, "api_key": "k", "rate_limit": 1e-6, "rate_burst": 1},
    ],
)
def test_the_document_is_valid_openapi_3_1(overrides: dict[str, Any]) -> None:
    document = build_openapi(Settings(**overrides))
    errors = [error.message for error in OpenAPIV31SpecValidator(document).iter_errors()]
    assert not errors
    # Every $ref names a schema that is there.
    schemas = document["components"]["schemas"]
    refs = set(re.findall(r'"#/components/schemas/([^"]+)"', json.dumps(document)))
    assert refs <= set(schemas), refs - set(schemas)


def test_the_served_document_is_the_one_built_from_the_route_table(tiny_server: str) -> None:
    served = httpx.get(f"{tiny_server}/openapi.json").json()
    assert served == json.loads(json.dumps(build_openapi(Settings())))


@pytest.mark.parametrize("web_ui", [True, False])
def test_every_route_is_described_and_nothing_else(web_ui: bool) -> None:
    settings = Settings(web_ui=web_ui)
    document = build_openapi(settings)
    operations, websockets = routed(settings)
    documented = described(document)
    assert documented <= operations, "described but not served"
    missing = {
        op for op in operations - documented if not op.split()[1].startswith(UNDESCRIBED_PREFIX)
    }
    assert not missing, "served but not described"
    assert ("GET /" in documented) == web_ui
    # OpenAPI 3.1 cannot describe a WebSocket: the API's description explains each one.
    assert websockets
    for path in websockets:
        assert f"`{path}`" in document["info"]["description"], path


def test_the_route_walk_sees_every_family() -> None:
    """Guards the test above: an empty or partial walk would make it pass vacuously."""
    operations, _ = routed(Settings())
    expected = {
        "POST /api/generate",
        "POST /v1/chat/completions",
        "GET /v1/models/{model_id}",
        "DELETE /api/models/{id}",
        "POST /generate",
        "POST /chat",
        "GET /health",
        "GET /metrics",
        "GET /",
        "GET /ui/app.js",
    }
    assert expected <= operations


def wire_names(model: type[BaseModel]) -> set[str]:
    """The names a client sends: a field's first alias (llama.cpp's ``speculative.n_max`` is
    no Python name), else the field's own name."""
    names = set()
    for field_name, info in model.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            first = alias.choices[0]
            names.add(first if isinstance(first, str) else field_name)
        else:
            names.add(alias if isinstance(alias, str) else field_name)
    return names


def test_request_schemas_are_the_validating_models() -> None:
    document = build_openapi(Settings())
    schemas = document["components"]["schemas"]
    validating: list[tuple[type[BaseModel], str]] = [
        (GenerateRequest, "GenerateRequest"),
        (ChatCompletionRequest, "ChatCompletionRequest"),
        (CompletionRequest, "CompletionRequest"),
        (EmbeddingRequest, "EmbeddingRequest"),
        (GenerateBody, "LocalLabGenerateRequest"),
        (ChatBody, "LocalLabChatRequest"),
        (BatchBody, "LocalLabBatchRequest"),
        (LoadBody, "LocalLabLoadRequest"),
        (InfillRequest, "InfillRequest"),
    ]
    for model, name in validating:
        assert set(schemas[name]["properties"]) == wire_names(model), name
    bodies = {
        "/api/generate": "GenerateRequest",
        "/generate": "LocalLabGenerateRequest",
        "/chat": "LocalLabChatRequest",
        "/generate/batch": "LocalLabBatchRequest",
        "/models/load": "LocalLabLoadRequest",
        "/infill": "InfillRequest",
    }
    for path, name in bodies.items():
        body_schema = document["paths"][path]["post"]["requestBody"]["content"]
        assert body_schema["application/json"]["schema"] == {"$ref": f"#/components/schemas/{name}"}
    # /api/generate/batch validates its shared options as a GenerateRequest.
    batch = set(schemas["BatchRequest"]["properties"])
    alone = {"prompt", "messages", "prefix", "stream"}  # one per prompt, or not batched
    assert batch == wire_names(GenerateRequest) - alone | {"prompts"}


# Requests that succeed on the tiny model, in an order that leaves something to report (a loaded
# model, a current LocalLab model): schemathesis mostly draws requests that fail.
SUCCESSFUL_CALLS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/api/generate", {"prompt": "hi", "max_tokens": 2}),
    ("POST", "/api/generate", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("POST", "/api/generate/batch", {"prompts": ["a", "b"], "max_tokens": 2}),
    ("POST", "/api/models/tiny/load", None),
    ("GET", "/api/models/loaded", None),
    ("POST", "/api/models/discover", None),
    ("GET", "/api/system", None),
    ("GET", "/api/health", None),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True},
    ),
    ("POST", "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 2, "logprobs": 1}),
    ("POST", "/v1/embeddings", {"input": ["a"]}),
    ("POST", "/v1/embeddings", {"input": "a", "encoding_format": "base64"}),
    ("GET", "/v1/models/tiny", None),
    ("POST", "/generate", {"prompt": "hi", "max_length": 2}),
    ("POST", "/chat", {"messages": [{"role": "user", "content": "hi"}], "max_length": 2}),
    ("POST", "/generate/batch", {"prompts": ["a"], "max_length": 2}),
    ("POST", "/models/load", {"model_id": "tiny"}),
    ("GET", "/models/current", None),
    ("GET", "/models/available", None),
    ("GET", "/system/info", None),
    ("POST", "/models/unload", None),
    ("POST", "/api/models/tiny/unload", None),
]


def test_successful_answers_match_their_declared_schemas(tiny_server: str) -> None:
    document = httpx.get(f"{tiny_server}/openapi.json").json()
    templates = {
        re.compile("^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(path)) + "$"): path
        for path in document["paths"]
    }
    with httpx.Client(base_url=tiny_server, timeout=60) as client:
        for method, path, body in SUCCESSFUL_CALLS:
            response = client.request(method, path, json=body)
            assert response.status_code == 200, (method, path, response.text)
            # The first that matches, as the router matches routes in this order.
            template = next(
                t
                for pattern, t in templates.items()
                if pattern.match(path) and method.lower() in document["paths"][t]
            )
            ok = document["paths"][template][method.lower()]["responses"]["200"]
            schema = ok["content"]["application/json"]["schema"]
            jsonschema.validate(
                response.json(),
                {**schema, "components": document["components"]},
                cls=jsonschema.Draft202012Validator,
            )


def test_locallab_errors_use_the_native_error_body() -> None:
    paths = build_openapi(Settings())["paths"]
    for path in ("/generate", "/chat", "/generate/batch", "/models/load"):
        responses = paths[path]["post"]["responses"]
        for status in ("400", "404", "503", "default"):
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/NativeError"}, (path, status)


def test_llamacpp_routes_use_llamacpps_error_body() -> None:
    responses = build_openapi(Settings())["paths"]["/infill"]["post"]["responses"]
    for status in ("400", "404", "503", "default"):
        schema = responses[status]["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/LlamaCppError"}, status


def test_security_and_limits_are_described_only_when_configured() -> None:
    plain = build_openapi(Settings())
    assert "security" not in plain and "securitySchemes" not in plain["components"]
    generate = plain["paths"]["/api/generate"]["post"]["responses"]
    assert "401" not in generate and "429" not in generate and "403" in generate
    guarded = build_openapi(Settings(api_keys=["k"], rate_limit=60))
    assert {"bearer", "apiKeyHeader"} == set(guarded["components"]["securitySchemes"])
    responses = guarded["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert responses["401"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/OpenAIError"
    )
    assert "429" in responses
    health = guarded["paths"]["/api/health"]["get"]
    assert health["security"] == [] and "401" not in health["responses"]


def call_every_operation(url: str, document: dict[str, Any]) -> dict[str, int]:
    """Each described operation called without a key or a body: "METHOD /path" -> status."""
    statuses: dict[str, int] = {}
    with httpx.Client(base_url=url) as client:
        for path, operations in document["paths"].items():
            concrete = re.sub(r"\{\w+\}", "tiny", path)
            for method in operations:
                response = client.request(method.upper(), concrete)
                statuses[f"{method.upper()} {path}"] = response.status_code
    return statuses


def test_operations_marked_public_are_the_ones_served_without_a_key(
    server_factory: Callable[[Settings], str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # Every operation is tried without a key: more failed checks than an address may make.
    settings = isolated_settings(
        tiny_model_dir, tmp_path, api_keys=["secret-key"], auth_failures_per_minute=10_000
    )
    url = server_factory(settings)
    document = httpx.get(f"{url}/openapi.json").json()
    statuses = call_every_operation(url, document)
    public = set()
    for label, status in statuses.items():
        method, path = label.split()
        operation = document["paths"][path][method.lower()]
        marked_public = operation.get("security") == []
        assert (status != 401) == marked_public, (label, status)
        assert ("401" in operation["responses"]) != marked_public, label
        if marked_public:
            public.add(label)
    assert public == {"GET /api/health", "GET /health", "GET /openapi.json", "GET /"}


def test_operations_listing_429_are_the_ones_rate_limited(
    server_factory: Callable[[Settings], str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    # One request at once and (practically) no refill: once the first request has taken the
    # only token, every rate-limited route answers 429 and runs nothing.
    settings = isolated_settings(tiny_model_dir, tmp_path, rate_limit=1e-6, rate_burst=1)
    url = server_factory(settings)
    document = build_openapi(settings)
    assert httpx.get(f"{url}/api/models").status_code == 200
    statuses = call_every_operation(url, document)
    exempt = set()
    for label, status in statuses.items():
        method, path = label.split()
        listed = "429" in document["paths"][path][method.lower()]["responses"]
        assert (status == 429) == listed, (label, status)
        if not listed:
            exempt.add(label)
    assert exempt == {"GET /api/health", "GET /health", "GET /"}


def test_openapi_json_is_public_even_with_keys(
    server_factory: Callable[[Settings], str], tiny_model_dir: Path, tmp_path: Path
) -> None:
    url = server_factory(isolated_settings(tiny_model_dir, tmp_path, api_keys=["secret-key"]))
    response = httpx.get(f"{url}/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.1")
    assert "secret-key" not in response.text
    assert document["security"] == [{"bearer": []}, {"apiKeyHeader": []}]
