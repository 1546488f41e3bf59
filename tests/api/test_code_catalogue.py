"""Every error code the service can emit is a member of the one catalogue (``ErrorCode``).

The source of ``service/`` is read for codes written as literals (a ``code`` class
attribute, a ``code=`` argument, a ``..._CODE`` constant) and for ``ErrorCode.X`` uses;
the mail and SMTP code enums must be subsets of the catalogue; the OpenAPI document lists
the catalogue as the enum of ``Problem.code``.
"""

from __future__ import annotations

import re
from pathlib import Path

from service.api.problems import CODE_OF_STATUS, catalogued, code_for_status
from service.codes import ErrorCode
from service.mail.errors import MailErrorCode
from service.openapi import openapi_document
from service.smtp.errors import SMTPErrorCode

SERVICE = Path(__file__).resolve().parents[2] / "service"
CATALOGUE = {member.value for member in ErrorCode}
LITERAL_CODE = re.compile(
    r"""\b(?:code|[A-Z_]*_CODE)\s*(?::\s*[\w\[\]|. ]+)?=\s*["']([A-Za-z0-9_]+)["']"""
)
# A code passed as the last argument of a helper that builds an error: `_invalid(f, m, "x")`.
CODE_ARGUMENT = re.compile(
    r"""_invalid\((?:[^"'()]|"[^"]*"|'[^']*'|\([^()]*\))*?,\s*["']([A-Za-z0-9_]+)["']\s*,?\s*\)"""
)
MEMBER = re.compile(r"\bErrorCode\.([A-Z0-9_]+)\b")


def sources() -> list[tuple[Path, str]]:
    return [(p, p.read_text(encoding="utf-8")) for p in sorted(SERVICE.rglob("*.py"))]


def test_the_source_scan_sees_codes() -> None:
    found = {m for _, text in sources() for m in LITERAL_CODE.findall(text)}
    assert {"not_found", "host_not_allowed", "attachment_too_large"} <= found
    passed = {m for _, text in sources() for m in CODE_ARGUMENT.findall(text)}
    assert {"no_recipients", "no_body"} <= passed


def test_every_literal_code_in_the_source_is_catalogued() -> None:
    missing = {
        f"{path.relative_to(SERVICE.parent)}: {code}"
        for path, text in sources()
        for code in LITERAL_CODE.findall(text) + CODE_ARGUMENT.findall(text)
        if code not in CATALOGUE
    }
    assert not missing, sorted(missing)


def test_every_member_used_exists() -> None:
    names = {member.name for member in ErrorCode}
    used = {(path.name, name) for path, text in sources() for name in MEMBER.findall(text)}
    assert {u for u in used if u[1] not in names} == set()


def test_mail_and_smtp_codes_are_catalogued() -> None:
    assert {c.value for c in MailErrorCode} <= CATALOGUE
    assert {c.value for c in SMTPErrorCode} <= CATALOGUE


def test_fallbacks_map_into_the_catalogue() -> None:
    for status in (*CODE_OF_STATUS, 400, 403, 418, 431, 500, 502, 504):
        assert code_for_status(status) in ErrorCode
    assert catalogued("storage_full", 507) is ErrorCode.STORAGE_FULL
    assert catalogued("no_such_code", 418) is ErrorCode.BAD_REQUEST
    assert catalogued("no_such_code", 502) is ErrorCode.INTERNAL_ERROR


def test_the_document_lists_the_catalogue() -> None:
    schemas = openapi_document()["components"]["schemas"]
    assert schemas["Problem"]["properties"]["code"] == {"$ref": "#/components/schemas/ErrorCode"}
    assert set(schemas["ErrorCode"]["enum"]) == CATALOGUE
