"""Property-based tests of the live server against its own ``/openapi.json`` (schemathesis).

Schemathesis generates requests from the description the server publishes and checks that no
answer is a 5xx and that every answer matches the response schema declared for it.
``/api/pull`` (it would fetch URLs) and DELETE (it removes files) are left out; example counts
are small so the module stays well under a minute on the tiny model.

The operations are listed at collection time from ``build_openapi`` (no server is running
then); each test then draws its cases from the document the live server serves.
schemathesis' own lazy pytest fixture is not used: it relies on a pytest internal
(``Node._nodeid``) that pytest 9 no longer has.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from conftest import isolated_settings, run_server
from hypothesis import HealthCheck, given, settings
from pydantic import BaseModel
from schemathesis.checks import not_a_server_error, response_schema_conformance
from schemathesis.core.result import Ok
from starlette.routing import BaseRoute, Mount, Route

from shimmy.api.app import create_app
from shimmy.api.openai_schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from shimmy.api.openapi import build_openapi
from shimmy.api.schemas import GenerateRequest
from shimmy.settings import Settings

MAX_EXAMPLES = 20
# schemathesis itself skips the operation that serves the schema it was loaded from.
EXCLUDED_PATHS = {"/api/pull", "/openapi.json"}
EXCLUDED_METHODS = {"delete"}


def operation_labels() -> list[str]:
    document = build_openapi(Settings())
    return [
        f"{method.upper()} {path}"
        for path, operations in document["paths"].items()
        for method in operations
        if path not in EXCLUDED_PATHS and method not in EXCLUDED_METHODS
    ]


@pytest.fixture(scope="module")
def live_schema(
    tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[schemathesis.BaseSchema]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    # A small cap keeps generated huge max_tokens cheap; the limits themselves are tested in
    # test_hostile.py.
    server_settings = isolated_settings(
        tiny_model_dir, tmp, max_tokens_cap=16, ctx_size=512, threads=1
    )
    with run_server(server_settings) as url:
        yield schemathesis.openapi.from_url(f"{url}/openapi.json")


def test_every_route_is_described(live_schema: schemathesis.BaseSchema) -> None:
    served = {
        result.ok().label for result in live_schema.get_all_operations() if isinstance(result, Ok)
    }
    assert set(operation_labels()) <= served
    assert "POST /api/pull" in served and "DELETE /api/models/{id}" in served


@pytest.mark.parametrize("label", operation_labels())
def test_no_server_errors_and_declared_responses(
    live_schema: schemathesis.BaseSchema, label: str
) -> None:
    operation = live_schema.find_operation_by_label(label)
    assert operation is not None, label

    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        database=None,
        # The same examples on every run: CI stays reproducible; explore more by running with
        # a higher MAX_EXAMPLES locally.
        derandomize=True,
    )
    @given(case=operation.as_strategy())
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(checks=[not_a_server_error, response_schema_conformance])

    check()


# --- the description itself ---------------------------------------------------------------------


def app_operations(settings: Settings) -> set[str]:
    """Every HTTP operation the app routes, as "METHOD /path" with OpenAPI-style parameters."""
    found: set[str] = set()

    def walk(routes: list[BaseRoute], prefix: str) -> None:
        for route in routes:
            if isinstance(route, Mount):
                walk(list(route.routes), prefix + route.path)
            elif isinstance(route, Route):
                path = re.sub(r"\{(\w+):\w+\}", r"{\1}", prefix + route.path)
                found.update(f"{m} {path}" for m in route.methods or () if m != "HEAD")

    walk(list(create_app(settings).routes), "")
    return found


def test_the_description_covers_the_api_and_describes_only_real_routes() -> None:
    settings = Settings()
    document = build_openapi(settings)
    described = {
        f"{method.upper()} {path}"
        for path, operations in document["paths"].items()
        for method in operations
    }
    routed = app_operations(settings)
    assert described <= routed
    # The native and OpenAI dialects are described in full; compatibility routes are not.
    assert {op for op in routed if op.split()[1].startswith(("/api/", "/v1/"))} <= described


def test_request_schemas_are_the_validating_models() -> None:
    schemas = build_openapi(Settings())["components"]["schemas"]
    validating: list[tuple[type[BaseModel], str]] = [
        (GenerateRequest, "GenerateRequest"),
        (ChatCompletionRequest, "ChatCompletionRequest"),
        (CompletionRequest, "CompletionRequest"),
        (EmbeddingRequest, "EmbeddingRequest"),
    ]
    for model, name in validating:
        assert set(schemas[name]["properties"]) == set(model.model_fields), name
    generate = build_openapi(Settings())["paths"]["/api/generate"]["post"]
    body_schema = generate["requestBody"]["content"]["application/json"]["schema"]
    assert body_schema == {"$ref": "#/components/schemas/GenerateRequest"}


def test_security_and_limits_are_described_only_when_configured(tmp_path: Path) -> None:
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
