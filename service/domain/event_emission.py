"""Which event a change makes, and its payload: pure functions both stores call inside the
transaction of the change (so the two stores cannot drift apart)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from service.domain.enums import OutgoingStatus, RetrievalStatus
from service.domain.event_payloads import (
    AccountPause,
    MessageReceived,
    OutgoingOutcome,
    RecipientDetail,
    RetrievalEnded,
    payload,
)
from service.domain.events import EventType, NewEvent, new_event
from service.domain.retrievals import MessageSummary, Retrieval, RetrievalError, RetrievalProgress

#: Delivery outcomes reported as events (a message queued again after an interrupted
#: attempt, or cancelled by the caller, is not).
REPORTED = frozenset({OutgoingStatus.SENT, OutgoingStatus.DEFERRED, OutgoingStatus.FAILED})
_OUTGOING_TYPES = {
    OutgoingStatus.SENT.value: EventType.OUTGOING_SENT,
    OutgoingStatus.DEFERRED.value: EventType.OUTGOING_DEFERRED,
    OutgoingStatus.FAILED.value: EventType.OUTGOING_FAILED,
}
#: Retrieval ends reported as events (a cancelled retrieval is the caller's own doing).
_RETRIEVAL_TYPES = {
    RetrievalStatus.SUCCEEDED.value: EventType.RETRIEVAL_SUCCEEDED,
    RetrievalStatus.FAILED.value: EventType.RETRIEVAL_FAILED,
}
#: The direction of the only pauses a person must end today: delivery (SMTP) pauses.
OUTGOING = "outgoing"


def messages_received(
    tenant: str, retrieval_id: str, summaries: Sequence[MessageSummary]
) -> list[NewEvent]:
    """One ``message.received`` per stored message."""
    return [
        new_event(
            EventType.MESSAGE_RECEIVED,
            tenant=tenant,
            account_id=s.account_id,
            created_at=s.retrieved_at,
            data=payload(
                MessageReceived(
                    message_id=s.id,
                    retrieval_id=retrieval_id,
                    uidl=s.uidl or "",  # every stored message has one
                    internet_message_id=s.message_id,
                    from_=s.from_,
                    subject=s.subject,
                    date=s.date,
                    size=s.size,
                    has_attachments=s.has_attachments,
                    thread_id=s.thread_id,
                )
            ),
        )
        for s in summaries
    ]


def ended_retrieval_event(tenant: str, r: Retrieval) -> NewEvent | None:
    """:func:`retrieval_ended` for a retrieval stored only once it is over (``r`` as it
    ended)."""
    at = r.finished_at or r.created_at
    return retrieval_ended(tenant, r.account_id, r.id, r.status.value, at, r.progress(), r.error)


def retrieval_ended(
    tenant: str,
    account_id: str,
    retrieval_id: str,
    status: str,
    at: datetime,
    progress: RetrievalProgress,
    error: RetrievalError | None,
) -> NewEvent | None:
    """``retrieval.succeeded`` or ``retrieval.failed``; None for other ends."""
    type = _RETRIEVAL_TYPES.get(str(status))
    if type is None:
        return None
    return new_event(
        type,
        tenant=tenant,
        account_id=account_id,
        created_at=at,
        data=payload(
            RetrievalEnded(
                retrieval_id=retrieval_id,
                status=str(status),
                finished_at=at,
                messages_on_server=progress.messages_on_server,
                messages_downloaded=progress.messages_downloaded,
                bytes_downloaded=progress.bytes_downloaded,
                messages_deleted=progress.messages_deleted,
                messages_skipped=progress.messages_skipped,
                error_code=error.code if error else None,
                error_detail=error.detail if error else None,
            )
        ),
    )


def outgoing_outcome(
    *,
    tenant: str,
    account_id: str,
    outgoing_id: str,
    message_id: str,
    status: str,
    attempt_count: int,
    next_attempt_at: datetime | None,
    sent_at: datetime | None,
    error_code: str | None,
    error_detail: str | None,
    at: datetime,
    recipients: list[RecipientDetail],
    metadata: dict[str, str] | None = None,
    tags: list[str] | None = None,
) -> NewEvent | None:
    """``outgoing.sent``/``deferred``/``failed`` for a message in that state now, with the
    metadata and tags it was sent with."""
    type = _OUTGOING_TYPES.get(status)
    if type is None:
        return None
    sent = status == OutgoingStatus.SENT.value
    return new_event(
        type,
        tenant=tenant,
        account_id=account_id,
        created_at=at,
        data=payload(
            OutgoingOutcome(
                outgoing_id=outgoing_id,
                internet_message_id=message_id,
                status=status,
                attempt_count=attempt_count,
                next_attempt_at=next_attempt_at if status == "deferred" else None,
                sent_at=sent_at,
                error_code=None if sent else error_code,
                error_detail=None if sent else error_detail,
                recipients=recipients,
                metadata=metadata or {},
                tags=tags or [],
            )
        ),
    )


def account_pauses(
    pauses: Sequence[tuple[str, str, str, str | None, datetime | None]],
    *,
    resumed: bool,
    at: datetime,
) -> list[NewEvent]:
    """``account.paused`` (or ``account.resumed``) for each (account id, tenant, code,
    detail, since) of a delivery pause that began (or ended)."""
    return [
        new_event(
            EventType.ACCOUNT_RESUMED if resumed else EventType.ACCOUNT_PAUSED,
            tenant=tenant,
            account_id=account_id,
            created_at=at,
            data=payload(
                AccountPause(direction=OUTGOING, code=code, detail=detail, paused_at=since)
            ),
        )
        for account_id, tenant, code, detail, since in pauses
    ]
