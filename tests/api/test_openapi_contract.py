"""The committed OpenAPI document is what generators and linters need (issue 13).

Clean component names, plain nullable types, declared response headers, typed error codes,
binary downloads, links from creating operations, a real server URL; the document passes
openapi-spec-validator and datamodel-code-generator makes one module of it. (Redocly's
`recommended` lint runs in scripts/test.sh: it needs Node.)
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from openapi_spec_validator import validate

from service.codes import ErrorCode

SPEC_PATH = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text(encoding="utf-8"))
METHODS = {"get", "put", "post", "patch", "delete"}
PASCAL_CASE = re.compile(r"[A-Z][A-Za-z0-9]*")


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in SPEC["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield path, method, op


def by_id(operation_id: str) -> tuple[str, dict[str, Any]]:
    for path, _, op in operations():
        if op["operationId"] == operation_id:
            return path, op
    raise KeyError(operation_id)


def walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from walk(value)


def test_the_document_is_valid_openapi() -> None:
    validate(SPEC)  # raises on any violation of the OpenAPI 3.1 schema


def test_component_names_are_pascal_case() -> None:
    names = list(SPEC["components"]["schemas"])
    assert [n for n in names if not PASCAL_CASE.fullmatch(n)] == []
    for name in ("AccountList", "MessageSummaryList", "RetrievalList", "OutgoingMessageList"):
        assert SPEC["components"]["schemas"][name]["required"] == ["items", "next_cursor"]


def test_no_one_item_unions_and_plain_nullable_types() -> None:
    wrappers = [n for n in walk(SPEC) if isinstance(n.get("oneOf"), list) and len(n["oneOf"]) < 2]
    assert wrappers == []
    patch = SPEC["components"]["schemas"]["OutgoingPatch"]["properties"]
    assert patch["port"]["type"] == "integer" and "oneOf" not in patch["port"]
    assert patch["username"]["type"] == ["string", "null"]
    assert SPEC["components"]["schemas"]["AccountPatch"]["properties"]["incoming"] == {
        "$ref": "#/components/schemas/IncomingPatch"
    }


def test_always_sent_fields_are_required() -> None:
    schemas = SPEC["components"]["schemas"]
    retrieval = schemas["Retrieval"]
    assert set(retrieval["required"]) == set(retrieval["properties"])
    # Problem leaves empty optional fields out (never null); its core is always there.
    problem = schemas["Problem"]
    assert problem["required"] == ["code", "status", "title", "type"]
    assert problem["properties"]["resource_id"] == {"type": "string"}
    assert problem["properties"]["code"] == {"$ref": "#/components/schemas/ErrorCode"}
    readiness = schemas["Readiness"]
    assert "code" not in readiness["required"]
    assert readiness["properties"]["code"] == {"$ref": "#/components/schemas/ErrorCode"}


def test_servers_name_a_real_url() -> None:
    (server,) = SPEC["servers"]
    assert server["url"].startswith("http://") and server["description"]


def test_headers_the_server_sends_are_declared() -> None:
    headers = SPEC["components"]["headers"]
    assert {"X-Request-ID", "Location", "Idempotency-Replayed", "Content-Disposition"} <= set(
        headers
    )
    _, send = by_id("SendMessage")
    assert set(send["responses"]["202"]["headers"]) == {"X-Request-ID", "Location"}
    assert set(send["responses"]["200"]["headers"]) == {
        "X-Request-ID",
        "Location",
        "Idempotency-Replayed",
    }
    for operation_id in ("GetRawMessage", "GetRawOutgoingMessage", "GetAttachment"):
        _, op = by_id(operation_id)
        assert "Content-Disposition" in op["responses"]["200"]["headers"], operation_id
    for path, method, op in operations():
        for status, response in op["responses"].items():
            if status == "401":
                assert "WWW-Authenticate" in response["headers"], (path, method)
            if status == "429":
                assert "Retry-After" in response["headers"], (path, method)


def test_downloads_are_binary_for_every_type_served() -> None:
    binary = {"type": "string", "format": "binary"}
    for operation_id, types in (
        ("GetRawMessage", {"message/rfc822", "application/octet-stream"}),
        ("GetRawOutgoingMessage", {"message/rfc822", "application/octet-stream"}),
        ("GetAttachment", {"*/*", "application/octet-stream"}),
    ):
        _, op = by_id(operation_id)
        content = op["responses"]["200"]["content"]
        assert set(content) == types, operation_id
        for media in content.values():
            assert binary.items() <= media["schema"].items(), operation_id


def test_error_responses_declare_their_codes() -> None:
    catalogue = {code.value for code in ErrorCode}
    narrowed: dict[tuple[str, str], list[str]] = {}
    for _, _, op in operations():
        for status, response in op["responses"].items():
            media = response.get("content", {}).get("application/problem+json")
            if media is None:
                continue
            examples = [e["value"]["code"] for e in media.get("examples", {}).values()]
            assert examples, (op["operationId"], status)  # every problem names its codes
            assert set(examples) <= catalogue
            assert all(e["value"]["status"] == int(status) for e in media["examples"].values())
            schema = media["schema"]
            if "allOf" in schema:
                base, narrowing = schema["allOf"]
                assert base == {"$ref": "#/components/schemas/Problem"}
                codes = narrowing["properties"]["code"]["enum"]
                assert sorted(examples) == codes
                narrowed[(op["operationId"], status)] = codes
            else:
                assert schema == {"$ref": "#/components/schemas/Problem"}
    assert narrowed[("StartRetrieval", "409")] == ["retrieval_running"]
    assert narrowed[("StartRetrieval", "429")] == ["too_many_retrievals"]
    assert narrowed[("CancelRetrieval", "409")] == ["retrieval_finished"]
    assert narrowed[("CancelOutgoingMessage", "409")] == ["not_cancellable"]
    assert narrowed[("SendMessage", "409")] == ["conflict", "idempotency_key_reused"]


def test_links_lead_from_creating_operations() -> None:
    ids = {op["operationId"]: (path, op) for path, _, op in operations()}
    expected = {
        ("CreateAccount", "201"): "GetAccount",
        ("SendMessage", "202"): "GetOutgoingMessage",
        ("StartRetrieval", "202"): "GetRetrieval",
    }
    for (source, status), target in expected.items():
        assert target in links_of(source, status), (source, target)
    under_account = {
        op["operationId"]
        for path, _, op in operations()
        if path.startswith("/v1/accounts/{account_id}")
        and path.count("{") == 1
        and op["operationId"] != "CreateAccount"
    }
    assert set(links_of("CreateAccount", "201")) == under_account
    for (source, _), _target in expected.items():
        for _status, response in by_id(source)[1]["responses"].items():
            for link in response.get("links", {}).values():
                path, _ = ids[link["operationId"]]
                # Every parameter of the target path is given, and only those.
                assert set(link["parameters"]) == set(re.findall(r"\{(\w+)\}", path)), link


def links_of(operation_id: str, status: str) -> dict[str, Any]:
    links: dict[str, Any] = by_id(operation_id)[1]["responses"][status].get("links", {})
    return links


def test_open_routes_say_so() -> None:
    for path in ("/health", "/ready", "/metrics"):
        assert SPEC["paths"][path]["get"]["security"] == []


def test_datamodel_code_generator_makes_one_module(tmp_path: Path) -> None:
    out = tmp_path / "mailroom_models.py"
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("datamodel-codegen")),
            "--input",
            str(SPEC_PATH),
            "--input-file-type",
            "openapi",
            "--output",
            str(out),
            "--output-model-type",
            "pydantic_v2.BaseModel",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert out.is_file()  # one module, not a package (module paths in names made a package)
    spec = importlib.util.spec_from_file_location("mailroom_models", out)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["mailroom_models"] = module
    try:
        spec.loader.exec_module(module)
        for name in SPEC["components"]["schemas"]:
            assert hasattr(module, name), name
        # No numbered classes such as `DisplayName2` from one-item unions: only a schema
        # that is itself a composition (rules such as "at least one of") is split in parts.
        compositions = tuple(
            name
            for name, schema in SPEC["components"]["schemas"].items()
            if {"anyOf", "oneOf", "allOf"} & set(schema)
        )
        numbered = [
            n
            for n in vars(module)
            if re.fullmatch(r"[A-Z]\w*\d", n) and not n.startswith(compositions or ("\0",))
        ]
        assert numbered == []
        page = module.RetrievalList.model_validate({"items": [], "next_cursor": None})
        assert page.items == []
    finally:
        del sys.modules["mailroom_models"]
