"""Property-based tests of the live server against its own ``/openapi.json`` (schemathesis).

Schemathesis generates requests from the description the server publishes and checks that no
answer is a 5xx and that every answer matches the response schema declared for it.
The pulls (``/api/pull``, ``/ollama/api/pull``, ``/rkllama/pull``: they would fetch URLs)
and DELETE (it removes files) are left out; example counts
are small so the module stays well under a minute on the tiny model.

The operations are listed at collection time from ``build_openapi`` (no server is running
then); each test then draws its cases from the document the live server serves.
schemathesis' own lazy pytest fixture is not used: it relies on a pytest internal
(``Node._nodeid``) that pytest 9 no longer has. That the document lists every route the app
serves is checked in test_openapi.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from conftest import isolated_settings, run_server
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance
from schemathesis.core.result import Ok

from shimmy.api.openapi import build_openapi
from shimmy.settings import Settings

MAX_EXAMPLES = 20
# schemathesis itself skips the operation that serves the schema it was loaded from.
EXCLUDED_PATHS = {"/api/pull", "/ollama/api/pull", "/rkllama/pull", "/openapi.json"}
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
