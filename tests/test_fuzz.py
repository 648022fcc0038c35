"""Fuzz the HTTP API from its own OpenAPI document: no input gets a 5xx or stops the server."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from dnet.local_ring import LocalRing

pytestmark = pytest.mark.slow  # starts real processes


@pytest.fixture(scope="module")
def fuzzed_ring(tmp_path_factory: pytest.TempPathFactory, make_model) -> Iterator[LocalRing]:
    from tests.conftest import QWEN3_BF16

    # A short context bounds every generation the fuzzer asks for.
    ring = LocalRing(str(make_model(QWEN3_BF16)), [[0, 1, 2, 3], [4, 5, 6, 7]],
                     log_dir=tmp_path_factory.mktemp("fuzz"), api_args=["--max-context", "48"])
    ring.start(timeout_s=90)
    try:
        yield ring
    finally:
        ring.stop()


@pytest.fixture(scope="module")
def api_schema(fuzzed_ring: LocalRing):
    document = httpx.get(f"{fuzzed_ring.url}/openapi.json", timeout=10).json()
    return schemathesis.openapi.from_dict(document)


OPERATIONS = ["POST /v1/chat/completions", "POST /v1/completions", "POST /v1/messages",
              "POST /v1/messages/count_tokens", "POST /v1/responses", "GET /v1/models",
              "GET /v1/models/{model_id}", "GET /health"]


@pytest.mark.parametrize("label", OPERATIONS)
def test_no_input_gets_a_server_error(label: str, api_schema, fuzzed_ring: LocalRing) -> None:
    operation = api_schema.find_operation_by_label(label)

    @given(case=operation.as_strategy())
    @settings(max_examples=25, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def no_server_error(case) -> None:
        response = case.call(base_url=fuzzed_ring.url, timeout=60)
        assert response.status_code < 500, (case.as_curl_command(), response.text[:500])

    no_server_error()
    # The server keeps answering.
    assert httpx.get(f"{fuzzed_ring.url}/health", timeout=10).status_code == 200


def test_fuzzing_covers_the_endpoints(api_schema) -> None:
    paths = set(api_schema.raw_schema["paths"])
    assert {"/v1/chat/completions", "/v1/completions", "/v1/messages", "/v1/responses",
            "/v1/messages/count_tokens", "/v1/models", "/v1/models/{model_id}",
            "/health"} <= paths


