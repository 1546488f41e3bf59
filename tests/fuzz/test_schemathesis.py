"""Schemathesis over the committed OpenAPI document, against the real process.

Every operation gets a bounded number of generated requests (valid and invalid); each
response must not be a 5xx and must match what the document says (status code, content
type, body schema, headers). Authentication is sent as a real client would.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.process import start, stop

SPEC = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
KEY = "fuzz-key-0123456789abcdef"
EXAMPLES_PER_OPERATION = 20
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]

schema = schemathesis.openapi.from_path(SPEC)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    directory = tmp_path_factory.mktemp("fuzz")
    proc, base = start(
        {
            "MAILROOM_DATABASE": str(directory / "mailroom.db"),
            "MAILROOM_API_KEYS": KEY,
            "MAILROOM_ALLOWED_NETWORKS": str(ipaddress.ip_network("127.0.0.0/8")),
        }
    )
    try:
        yield base
    finally:
        stop(proc)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_5xx_and_responses_match_the_document(case: Any, live: str) -> None:
    case.call_and_validate(base_url=live, headers={"Authorization": f"Bearer {KEY}"}, checks=CHECKS)
