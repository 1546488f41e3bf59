"""Inline parts (``content_id``): multipart/related with the html, and their rules."""

from __future__ import annotations

import email
import email.policy
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest

from service.mail import Attachment, Draft, MailErrorCode, MailInputError, compose

DATE = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
IMAGE = Attachment("logo.png", "image/png", b"\x89PNG-not-really", content_id="logo")


def draft(**overrides: object) -> Draft:
    values: dict[str, object] = {
        "from_address": "alice@example.com",
        "to": ["bob@example.org"],
        "subject": "Hi",
        "message_id": "<1@example.com>",
        "date": DATE,
        "html": '<img src="cid:logo">',
    }
    values.update(overrides)
    return Draft(**values)  # type: ignore[arg-type]


def parse(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def test_html_only_with_an_inline_image_is_multipart_related() -> None:
    message = parse(compose(draft(attachments=[IMAGE])).data)
    assert message.get_content_type() == "multipart/related"
    html, image = message.iter_parts()
    assert html.get_content_type() == "text/html"
    assert image["Content-ID"] == "<logo>"
    assert image.get_content_disposition() == "inline"
    assert image.get_content() == IMAGE.data
    assert message["MIME-Version"] == "1.0" and image["MIME-Version"] is None


def test_attachments_without_content_id_are_unchanged() -> None:
    plain = Attachment("a.txt", "text/plain", b"x")
    message = parse(compose(draft(text="hi\n", attachments=[plain])).data)
    assert [p.get_content_type() for p in message.walk()] == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "text/plain",
    ]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"html": None, "text": "hi", "attachments": [IMAGE]}, "attachments[0].content_id"),
        ({"attachments": [IMAGE, IMAGE]}, "attachments[1].content_id"),
        (
            {"attachments": [Attachment("a.png", "image/png", b"x", content_id="<logo>")]},
            "attachments[0].content_id",
        ),
        (
            {"attachments": [Attachment("a.png", "image/png", b"x", content_id="a b")]},
            "attachments[0].content_id",
        ),
        (
            {"attachments": [Attachment("a.png", "image/png", b"x", content_id="a\r\nX: y")]},
            "attachments[0].content_id",
        ),
    ],
)
def test_bad_inline_parts_are_refused(overrides: dict[str, object], field: str) -> None:
    with pytest.raises(MailInputError) as caught:
        compose(draft(**overrides))
    assert caught.value.code is MailErrorCode.INVALID_ATTACHMENT
    assert caught.value.field == field
