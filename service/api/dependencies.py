"""Names the handlers ask for, provided by the app (see ``service.app``)."""

from __future__ import annotations

from typing import Annotated

from litestar.di import NamedDependency
from litestar.params import PathParameter

from service.services.accounts import AccountService
from service.services.messages import MessageService
from service.services.retrieval import RetrievalService
from service.services.sending import SendingService
from service.services.verify import AccountVerifier

ID_MAX = 64
MAX_ATTACHMENT_INDEX = 10_000

Tenant = NamedDependency[str]
Accounts = NamedDependency[AccountService]
Retrievals = NamedDependency[RetrievalService]
Messages = NamedDependency[MessageService]
Verifier = NamedDependency[AccountVerifier]
Outbox = NamedDependency[SendingService]

AccountId = Annotated[str, PathParameter(max_length=ID_MAX, description="An account id")]
RetrievalId = Annotated[str, PathParameter(max_length=ID_MAX, description="A retrieval id")]
MessageId = Annotated[str, PathParameter(max_length=ID_MAX, description="A stored message id")]
OutgoingId = Annotated[
    str, PathParameter(max_length=ID_MAX, description="An outgoing message id (`out_...`)")
]
AttachmentIndex = Annotated[
    int,
    PathParameter(
        ge=0,
        le=MAX_ATTACHMENT_INDEX,
        description="`index` from the attachment list",
        # Litestar leaves a bound of 0 out of the schema (it tests truthiness).
        schema_extra={"minimum": 0},
    ),
]
