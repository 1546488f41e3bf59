"""Testing an SMTP account's settings: open a session, try an envelope, report each step.

::

    steps = await verify(server, envelope=("me@example.com", "me@example.com"), timeout_s=30)

The steps are ``connect`` (TCP, greeting, EHLO), ``tls`` (implicit TLS or STARTTLS, the
certificate verified), ``auth`` (credentials accepted) and ``envelope`` (MAIL FROM and RCPT
TO accepted, then RSET: no DATA, nothing is sent). The envelope step shows what only a real
transaction shows: a server that refuses the EHLO name (Postfix's
``reject_non_fqdn_helo_hostname`` answers 504 at RCPT), the sender or the recipient.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from service.domain.enums import Security
from service.smtp.config import SMTPServer
from service.smtp.errors import SMTPDeliveryError, SMTPErrorCode

if TYPE_CHECKING:
    from service.smtp.session import SMTPSession


class VerifyStepName(StrEnum):
    """The steps :func:`verify` reports, in order."""

    CONNECT = "connect"  # TCP, greeting, EHLO
    TLS = "tls"  # implicit TLS or STARTTLS, certificate verified
    AUTH = "auth"  # credentials accepted
    ENVELOPE = "envelope"  # MAIL FROM + RCPT TO accepted, then RSET (no DATA)


@dataclass(frozen=True, slots=True)
class VerifyStep:
    """Outcome of one step; ``code`` is an SMTPErrorCode on failure."""

    step: VerifyStepName
    ok: bool
    code: str | None
    detail: str


def planned_steps(server: SMTPServer, *, envelope: bool) -> list[VerifyStepName]:
    """The steps a verify of ``server`` goes through when everything works."""
    steps = [VerifyStepName.CONNECT]
    if server.security is not Security.NONE:
        steps.append(VerifyStepName.TLS)
    if server.has_credentials:
        steps.append(VerifyStepName.AUTH)
    if envelope:
        steps.append(VerifyStepName.ENVELOPE)
    return steps


async def verify(
    server: SMTPServer,
    *,
    envelope: tuple[str, str] | None = None,
    timeout_s: float | None = None,
    time_limit_s: float | None = None,
) -> list[VerifyStep]:
    """Open a session to ``server`` and report each step (connect, tls, auth, envelope).

    ``envelope`` is ``(mail_from, recipient)``: after authenticating, MAIL FROM and RCPT TO
    are tried and the transaction is reset (no DATA). ``timeout_s`` bounds the whole check:
    the step it cuts short fails with ``timeout``, its detail naming ``time_limit_s`` (the
    caller's whole budget, of which ``timeout_s`` may be what is left). Steps appear in
    order; the last one failed if the account cannot send. Credentials are never in any detail.
    """
    # Imported here: the session module records its steps with the types above.
    from service.smtp.session import SMTPSession

    session = SMTPSession(server)
    steps: list[VerifyStep] = []
    try:
        async with asyncio.timeout(timeout_s) as deadline:
            await _run(session, steps, envelope)
    except TimeoutError:
        if not deadline.expired():
            raise
        steps = list(session.steps) + steps
        done = {s.step for s in steps if s.ok}
        pending = [
            name
            for name in planned_steps(server, envelope=envelope is not None)
            if name not in done
        ]
        if pending and (not steps or steps[-1].ok):  # a step was running when time ran out
            step = pending[0]
            steps.append(
                VerifyStep(
                    step,
                    False,
                    SMTPErrorCode.TIMEOUT,
                    f"the {step} step did not finish within the verify time limit "
                    f"of {time_limit_s or timeout_s:g} s",
                )
            )
        return steps
    return list(session.steps) + steps


async def _run(
    session: SMTPSession, steps: list[VerifyStep], envelope: tuple[str, str] | None
) -> None:
    # Every failure or cancellation inside the session drops its connection, so only the
    # way that succeeds says QUIT.
    try:
        await session.open()
    except SMTPDeliveryError:
        return  # the session recorded the failed step
    if envelope is not None:
        steps.append(await _envelope(session, *envelope))
    await session.close()


async def _envelope(session: SMTPSession, mail_from: str, recipient: str) -> VerifyStep:
    try:
        reply = await session.check_envelope(mail_from, recipient)
    except SMTPDeliveryError as exc:
        detail = exc.detail
        if exc.smtp_code is not None:
            detail = f"{detail}: {exc.smtp_code} {exc.smtp_message or ''}".rstrip()
        return VerifyStep(VerifyStepName.ENVELOPE, False, str(exc.code), detail)
    except ValueError as exc:  # an address unsafe on a command line: nothing was sent
        return VerifyStep(VerifyStepName.ENVELOPE, False, SMTPErrorCode.PROTOCOL_ERROR, str(exc))
    return VerifyStep(
        VerifyStepName.ENVELOPE,
        True,
        None,
        f"MAIL FROM:<{mail_from}> and RCPT TO:<{recipient}> accepted "
        f"({reply.code} {reply.message.splitlines()[0] if reply.message else ''}".rstrip()
        + "); reset, nothing sent",
    )
