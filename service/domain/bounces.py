"""Bounces: a delivery status notification (DSN) tied back to the outgoing message it reports.

A retrieval stores a DSN like any message; right after its batch commits, the DSN is read
(``service.mail.dsn``), matched to an outgoing message of the same account (by the
original envelope id, which Mailroom sets to the outgoing id, else by the returned
Message-ID), and linked in one transaction: ``bounce_of`` on the stored message, the
recipients reported ``failed`` marked ``bounced`` with the reported status and diagnostic,
and one ``outgoing.bounced`` event. The pure parts (which recipients, the event) live here
so both stores apply the same rules.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime

import msgspec

from service.domain.enums import RecipientStatus
from service.domain.event_payloads import BouncedRecipient as BouncedDetail
from service.domain.event_payloads import OutgoingBounced, payload
from service.domain.events import EventType, NewEvent, new_event
from service.mail.dsn import DsnRecipient

# Only a recipient the server accepted can bounce later: one still pending, deferred or
# refused at RCPT keeps its status (a DSN cannot be about a delivery that has not happened).
BOUNCEABLE = frozenset({RecipientStatus.SENT})


class DsnCandidate(msgspec.Struct, frozen=True, kw_only=True):
    """A stored message that may be a DSN and has not been looked at yet."""

    message_id: str  # the stored message (msg_...)
    account_id: str
    tenant: str


class BounceLink(msgspec.Struct, frozen=True, kw_only=True):
    """What to write for one DSN: the outgoing message it is about and who failed."""

    dsn_message_id: str
    outgoing_id: str
    failed: tuple[DsnRecipient, ...]


class StoredRecipient(msgspec.Struct, frozen=True):
    position: int
    address: str
    status: RecipientStatus


class BouncedRecipient(msgspec.Struct, frozen=True, kw_only=True):
    """A recipient marked bounced, with what the DSN said of it."""

    position: int
    address: str
    report: DsnRecipient


_SMTP_REPLY = re.compile(r"^\s*smtp\s*;\s*([2-5]\d\d)[\s-]", re.IGNORECASE)


def smtp_code(diagnostic_code: str | None) -> int | None:
    """The SMTP reply code in a ``smtp; 550 5.1.1 ...`` Diagnostic-Code, if it is one."""
    match = _SMTP_REPLY.match(diagnostic_code or "")
    return int(match.group(1)) if match else None


def _key(address: str) -> str:
    return address.strip().lower()


def match_recipients(
    recipients: Sequence[StoredRecipient], failed: Sequence[DsnRecipient]
) -> list[BouncedRecipient]:
    """The stored recipients the DSN reports failed: matched by address (ASCII case
    ignored), Original-Recipient before Final-Recipient, each recipient at most once, and
    only those the server had accepted (``sent``)."""
    by_address: dict[str, StoredRecipient] = {}
    for recipient in recipients:
        by_address.setdefault(_key(recipient.address), recipient)
    matched: list[BouncedRecipient] = []
    taken: set[int] = set()
    for report in failed:
        for address in report.addresses():
            found = by_address.get(_key(address))
            if found is None:
                continue
            if found.position not in taken and found.status in BOUNCEABLE:
                taken.add(found.position)
                matched.append(
                    BouncedRecipient(position=found.position, address=found.address, report=report)
                )
            break
    return matched


def bounced_event(
    *,
    tenant: str,
    account_id: str,
    outgoing_id: str,
    message_id: str,
    dsn_message_id: str,
    bounced: Sequence[BouncedRecipient],
    at: datetime,
) -> NewEvent:
    """The ``outgoing.bounced`` event for recipients just marked bounced (its payload:
    ``service.domain.event_payloads.OutgoingBounced``)."""
    data = payload(
        OutgoingBounced(
            outgoing_id=outgoing_id,
            internet_message_id=message_id,
            bounce_message_id=dsn_message_id,
            recipients=[
                BouncedDetail(
                    address=b.address,
                    status=RecipientStatus.BOUNCED.value,
                    smtp_code=smtp_code(b.report.diagnostic_code),
                    dsn_status=b.report.status,
                    diagnostic=b.report.diagnostic_code,
                    remote_mta=b.report.remote_mta,
                )
                for b in bounced
            ],
        )
    )
    return new_event(
        EventType.OUTGOING_BOUNCED,
        tenant=tenant,
        account_id=account_id,
        created_at=at,
        data=data,
    )
