"""Bounce tests: DSNs built like Postfix's, and the stores they are linked in (both)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from service.config import Settings
from service.repository.store import Store, create_store
from tests.repository.conftest import store_settings


@pytest.fixture(params=["sqlite", "postgres"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store_database(store_kind: str, tmp_path: Path) -> str:
    """One database for the test: several stores may open it (restarts, replicas)."""
    return store_settings(store_kind, tmp_path).database


def open_store(database: str) -> Store:
    """A store on ``database`` (not opened yet): another process's view of it."""
    return create_store(Settings(database=database, secret_keys=(os.urandom(32),)))


@pytest.fixture
async def store(store_database: str) -> AsyncIterator[Store]:
    opened = open_store(store_database)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def dsn_bytes(
    failed: Sequence[str],
    *,
    original_message_id: str | None,
    envelope_id: str | None = None,
    delayed: Sequence[str] = (),
    sender: str = "alice@example.com",
) -> bytes:
    """A DSN in Postfix's format about the message ``original_message_id`` (no returned
    headers part when None), ``failed`` refused with 5.1.1 and ``delayed`` delayed."""
    envid = f"Original-Envelope-Id: {envelope_id}\n" if envelope_id else ""
    blocks = "".join(
        f"\nFinal-Recipient: rfc822; {address}\nOriginal-Recipient: rfc822;{address}\n"
        "Action: failed\nStatus: 5.1.1\nRemote-MTA: dns; mx.example.org\n"
        f"Diagnostic-Code: smtp; 550 5.1.1 <{address}>: Recipient address\n"
        "    rejected: User unknown\n"
        for address in failed
    ) + "".join(
        f"\nFinal-Recipient: rfc822; {address}\nAction: delayed\nStatus: 4.4.1\n"
        for address in delayed
    )
    returned = (
        "--BOUNDARY\nContent-Description: Undelivered Message Headers\n"
        f"Content-Type: text/rfc822-headers\n\nMessage-ID: {original_message_id}\n"
        f"From: {sender}\nSubject: Hello\n\n"
        if original_message_id
        else ""
    )
    text = (
        "Return-Path: <>\n"
        "From: Mail Delivery System <MAILER-DAEMON@mx.example.com>\n"
        f"To: {sender}\n"
        "Subject: Undelivered Mail Returned to Sender\n"
        "MIME-Version: 1.0\n"
        "Content-Type: multipart/report; report-type=delivery-status;\n"
        '\tboundary="BOUNDARY"\n'
        "Message-Id: <dsn.1@mx.example.com>\n\n"
        "--BOUNDARY\nContent-Type: text/plain\n\nYour message could not be delivered.\n\n"
        "--BOUNDARY\nContent-Type: message/delivery-status\n\n"
        f"Reporting-MTA: dns; mx.example.com\n{envid}"
        f"{blocks}\n{returned}--BOUNDARY--\n"
    )
    return text.replace("\n", "\r\n").encode()
