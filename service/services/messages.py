"""Reading the message store: lists, the parsed view, raw bytes, attachments, delete."""

from __future__ import annotations

import asyncio

from service.domain.retrievals import MessageFilter, MessageSummary
from service.errors import NotFound
from service.mail.parse import Attachment, AttachmentNotFound, ParsedMessage, attachment, parse
from service.repository.bounces import BounceRepository, with_bounce_of
from service.repository.messages import MessageRepository
from service.repository.pages import Page
from service.services.accounts import AccountService

# Parsing a large message takes long enough to stall other requests: do it in a thread.
PARSE_IN_THREAD_BYTES = 256 * 1024


class MessageService:
    def __init__(
        self,
        accounts: AccountService,
        messages: MessageRepository,
        bounces: BounceRepository | None = None,
    ) -> None:
        """``bounces``: fills in ``bounce_of`` (the outgoing message a stored DSN reports)."""
        self._accounts = accounts
        self._messages = messages
        self._bounces = bounces

    async def page(
        self, tenant: str, account_id: str, flt: MessageFilter, *, after: str | None, limit: int
    ) -> Page[MessageSummary]:
        await self._accounts.get(tenant, account_id)
        page = await self._messages.page(account_id, flt, after=after, limit=limit)
        if self._bounces is None or not page.items:
            return page
        links = await self._bounces.bounce_of(account_id, [m.id for m in page.items])
        return Page(items=with_bounce_of(page.items, links), next_after=page.next_after)

    async def summary(self, tenant: str, account_id: str, message_id: str) -> MessageSummary:
        await self._accounts.get(tenant, account_id)
        summary = await self._messages.get(account_id, message_id)
        if summary is None:
            raise NotFound(f"no message {message_id!r}")
        if self._bounces is not None:
            links = await self._bounces.bounce_of(account_id, [summary.id])
            [summary] = with_bounce_of([summary], links)
        return summary

    async def raw(self, tenant: str, account_id: str, message_id: str) -> bytes:
        await self._accounts.get(tenant, account_id)
        raw = await self._messages.raw(account_id, message_id)
        if raw is None:
            raise NotFound(f"no message {message_id!r}")
        return raw

    async def parsed(
        self, tenant: str, account_id: str, message_id: str
    ) -> tuple[MessageSummary, ParsedMessage]:
        summary = await self.summary(tenant, account_id, message_id)
        # The account check is done; read the body straight from the store.
        raw = await self._messages.raw(account_id, message_id)
        if raw is None:  # deleted in between
            raise NotFound(f"no message {message_id!r}")
        if len(raw) >= PARSE_IN_THREAD_BYTES:
            return summary, await asyncio.to_thread(parse, raw)
        return summary, parse(raw)

    async def attachment(
        self, tenant: str, account_id: str, message_id: str, index: int
    ) -> Attachment:
        raw = await self.raw(tenant, account_id, message_id)
        try:
            if len(raw) >= PARSE_IN_THREAD_BYTES:
                return await asyncio.to_thread(attachment, raw, index)
            return attachment(raw, index)
        except AttachmentNotFound:
            raise NotFound(f"message {message_id!r} has no attachment {index}") from None

    async def delete(self, tenant: str, account_id: str, message_id: str) -> None:
        await self._accounts.get(tenant, account_id)
        if not await self._messages.delete(account_id, message_id):
            raise NotFound(f"no message {message_id!r}")
