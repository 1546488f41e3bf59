"""The one catalogue of error codes a caller can see.

Every ``code`` that reaches a caller (a problem+json body, a retrieval's ``error.code``, an
outgoing message's ``error.code``, an attempt's ``error_code``, a verify step's ``code``) is
a member of :class:`ErrorCode`. POP3 and SMTP share a code wherever the cause is the same
(a TLS-mode mismatch is ``tls_failed`` on both). ``DESCRIPTIONS`` says what each means; the
README's catalogue and the OpenAPI document are checked against it by the tests.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # Requests
    VALIDATION_ERROR = "validation_error"
    BAD_REQUEST = "bad_request"
    MALFORMED_JSON = "malformed_json"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    AMBIGUOUS_HEADER = "ambiguous_header"
    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "conflict"
    REQUEST_TOO_LARGE = "request_too_large"
    TOO_MANY_REQUESTS = "too_many_requests"
    INTERNAL_ERROR = "internal_error"
    UNAVAILABLE = "unavailable"
    STORAGE_FULL = "storage_full"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    STORAGE_ERROR = "storage_error"
    CREDENTIALS_UNREADABLE = "credentials_unreadable"
    HOST_NOT_ALLOWED = "host_not_allowed"
    UNKNOWN_PRESET = "unknown_preset"
    # Retrievals
    RETRIEVAL_RUNNING = "retrieval_running"
    RETRIEVAL_FINISHED = "retrieval_finished"
    TOO_MANY_RETRIEVALS = "too_many_retrievals"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"
    # Composing and the outbox
    MESSAGE_TOO_LARGE = "message_too_large"
    ATTACHMENT_TOO_LARGE = "attachment_too_large"
    TOO_MANY_RECIPIENTS = "too_many_recipients"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    NOT_CANCELLABLE = "not_cancellable"
    INVALID_ADDRESS = "invalid_address"
    INVALID_DISPLAY_NAME = "invalid_display_name"
    HEADER_INJECTION = "header_injection"
    INVALID_HEADER_NAME = "invalid_header_name"
    PROTECTED_HEADER = "protected_header"
    DUPLICATE_HEADER = "duplicate_header"
    TOO_LONG = "too_long"
    TOO_MANY = "too_many"
    NO_RECIPIENTS = "no_recipients"
    NO_BODY = "no_body"
    INVALID_BASE64 = "invalid_base64"
    INVALID_ATTACHMENT = "invalid_attachment"
    INVALID_BODY = "invalid_body"
    INVALID_MESSAGE_ID = "invalid_message_id"
    INVALID_DATE = "invalid_date"
    FROM_NOT_ALLOWED = "from_not_allowed"
    INVALID_METADATA = "invalid_metadata"
    INVALID_TAG = "invalid_tag"
    INVALID_SEND_AT = "invalid_send_at"
    CONFLICTING_FIELDS = "conflicting_fields"
    EXPIRED = "expired"
    # Mail servers (POP3 and SMTP alike)
    HOST_UNRESOLVABLE = "host_unresolvable"
    CONNECT_FAILED = "connect_failed"
    CONNECTION_LOST = "connection_lost"
    TIMEOUT = "timeout"
    TLS_REQUIRED = "tls_required"
    TLS_FAILED = "tls_failed"
    TLS_CERTIFICATE_INVALID = "tls_certificate_invalid"
    AUTH_FAILED = "auth_failed"
    AUTH_NOT_SUPPORTED = "auth_not_supported"
    OAUTH_REFRESH_FAILED = "oauth_refresh_failed"
    INSECURE_AUTH_REFUSED = "insecure_auth_refused"
    MAILBOX_LOCKED = "mailbox_locked"
    PROTOCOL_ERROR = "protocol_error"
    LINE_TOO_LONG = "line_too_long"
    RESPONSE_TOO_LARGE = "response_too_large"
    COMMAND_REJECTED = "command_rejected"
    UPDATE_FAILED = "update_failed"
    INVALID_ARGUMENT = "invalid_argument"
    EXTENSION_NOT_SUPPORTED = "extension_not_supported"
    SMTPUTF8_NOT_SUPPORTED = "smtputf8_not_supported"
    # SMTP replies
    REJECTED = "rejected"
    DEFERRED = "deferred"
    RECIPIENTS_REFUSED = "recipients_refused"
    RECIPIENTS_DEFERRED = "recipients_deferred"
    # Webhooks
    HTTPS_REQUIRED = "https_required"
    WEBHOOK_DISABLED = "webhook_disabled"


DESCRIPTIONS: dict[ErrorCode, str] = {
    ErrorCode.VALIDATION_ERROR: "422: input rejected; `errors` lists each bad field",
    ErrorCode.BAD_REQUEST: "400: the request cannot be read as sent (no more precise code)",
    ErrorCode.MALFORMED_JSON: "400: the body cannot be decoded (bad JSON, nested too deep)",
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: "415: the body of a JSON route is not `application/json`",
    ErrorCode.AMBIGUOUS_HEADER: "400: a header that must appear once appears several times",
    ErrorCode.UNAUTHORIZED: "401: missing or wrong API key",
    ErrorCode.NOT_FOUND: "404: no such route, or no such resource for this caller",
    ErrorCode.METHOD_NOT_ALLOWED: "405: the route exists but not with this method",
    ErrorCode.CONFLICT: "409: the resource's state forbids the request",
    ErrorCode.REQUEST_TOO_LARGE: "413: the request body is over `MAILROOM_MAX_REQUEST_BYTES`",
    ErrorCode.TOO_MANY_REQUESTS: "429: a rate or concurrency limit is reached",
    ErrorCode.INTERNAL_ERROR: "500: a bug; it has been logged with the request id",
    ErrorCode.UNAVAILABLE: "503: a dependency is not ready",
    ErrorCode.STORAGE_FULL: "507: the disk is full; nothing was stored (503 on `/ready`)",
    ErrorCode.STORAGE_UNAVAILABLE: "503: the database cannot be reached; nothing was stored",
    ErrorCode.STORAGE_ERROR: "the message store failed during a retrieval; nothing deleted",
    ErrorCode.CREDENTIALS_UNREADABLE: "stored credentials cannot be decrypted with the keys",
    ErrorCode.HOST_NOT_ALLOWED: "a host resolves into a network the outbound guard refuses",
    ErrorCode.UNKNOWN_PRESET: "422: no provider preset has this name (see GET /v1/presets)",
    ErrorCode.RETRIEVAL_RUNNING: "409: a retrieval already runs for the account",
    ErrorCode.RETRIEVAL_FINISHED: "409: the retrieval has already ended",
    ErrorCode.TOO_MANY_RETRIEVALS: "429: the service's or the tenant's retrieval slots are full",
    ErrorCode.INTERRUPTED: "the process stopped during the retrieval or delivery attempt",
    ErrorCode.CANCELLED: "the retrieval was cancelled by a caller",
    ErrorCode.MESSAGE_TOO_LARGE: "a message over the size limit (413 on send; skipped on POP3)",
    ErrorCode.ATTACHMENT_TOO_LARGE: "413: a decoded attachment over the limit",
    ErrorCode.TOO_MANY_RECIPIENTS: "422: to + cc + bcc over `MAILROOM_MAX_RECIPIENTS`",
    ErrorCode.IDEMPOTENCY_KEY_REUSED: "409: the Idempotency-Key was used for another body",
    ErrorCode.NOT_CANCELLABLE: "409: the outgoing message is no longer queued",
    ErrorCode.INVALID_ADDRESS: "422: not exactly one plain address",
    ErrorCode.INVALID_DISPLAY_NAME: "422: a display name with forbidden characters",
    ErrorCode.HEADER_INJECTION: "422: CR, LF, NUL or a line separator in a header value",
    ErrorCode.INVALID_HEADER_NAME: "422: a header name that is not RFC 5322 text",
    ErrorCode.PROTECTED_HEADER: "422: a header that Mailroom sets itself",
    ErrorCode.DUPLICATE_HEADER: "422: the same header twice",
    ErrorCode.TOO_LONG: "422: a value over its length limit",
    ErrorCode.TOO_MANY: "422: a list over its count limit",
    ErrorCode.NO_RECIPIENTS: "422: to, cc and bcc are all empty",
    ErrorCode.NO_BODY: "422: neither `text` nor `html` is given",
    ErrorCode.INVALID_BASE64: "422: an attachment's `content_base64` is not valid base64",
    ErrorCode.INVALID_ATTACHMENT: "422: a bad attachment filename, type or base64",
    ErrorCode.INVALID_BODY: "422: NUL or unencodable characters in a body",
    ErrorCode.INVALID_MESSAGE_ID: "422: a Message-ID that is not `<left@right>`",
    ErrorCode.INVALID_DATE: "422: a date without a time zone",
    ErrorCode.FROM_NOT_ALLOWED: "422: a raw message's From is missing, not one address, or"
    " not the account's address",
    ErrorCode.INVALID_METADATA: "422: `metadata` over its limits (keys, key or value length,"
    " total size) or a key or value with forbidden characters",
    ErrorCode.INVALID_TAG: "422: a tag with forbidden characters or length, or too many tags",
    ErrorCode.INVALID_SEND_AT: "422: `send_at` without a time zone or beyond"
    " `MAILROOM_SEND_AT_HORIZON`",
    ErrorCode.CONFLICTING_FIELDS: "422: fields that exclude each other (`reply_to_message` and"
    " `forward_message`)",
    ErrorCode.EXPIRED: "not delivered before the retry schedule or the message age ran out",
    ErrorCode.HOST_UNRESOLVABLE: "the server's host name does not resolve",
    ErrorCode.CONNECT_FAILED: "the TCP connection was refused or unreachable",
    ErrorCode.CONNECTION_LOST: "the server closed the connection mid-session",
    ErrorCode.TIMEOUT: "the server was too slow (a step, the whole session, or the rate)",
    ErrorCode.TLS_REQUIRED: "TLS was required but not offered or refused; no password sent",
    ErrorCode.TLS_FAILED: "the TLS handshake failed, often a TLS mode that does not fit the port",
    ErrorCode.TLS_CERTIFICATE_INVALID: "the server's certificate is untrusted or for another host",
    ErrorCode.AUTH_FAILED: "the server refused the user name or password",
    ErrorCode.AUTH_NOT_SUPPORTED: "the server offers no authentication method Mailroom can use",
    ErrorCode.OAUTH_REFRESH_FAILED: "the OAuth2 provider refused to refresh the access token",
    ErrorCode.INSECURE_AUTH_REFUSED: "a password would travel without TLS; not sent",
    ErrorCode.MAILBOX_LOCKED: "the mailbox is in use by another session (temporary)",
    ErrorCode.PROTOCOL_ERROR: "the server broke the protocol",
    ErrorCode.LINE_TOO_LONG: "the server sent a line longer than the protocol allows",
    ErrorCode.RESPONSE_TOO_LARGE: "a POP3 listing over the size Mailroom reads",
    ErrorCode.COMMAND_REJECTED: "the POP3 server answered -ERR to a command",
    ErrorCode.UPDATE_FAILED: "the POP3 server refused QUIT: deletions may not have happened",
    ErrorCode.INVALID_ARGUMENT: "a command argument was refused before it was sent",
    ErrorCode.EXTENSION_NOT_SUPPORTED: "the message needs an SMTP extension the server lacks",
    ErrorCode.SMTPUTF8_NOT_SUPPORTED: "a non-ASCII address needs SMTPUTF8 and the server lacks"
    " it (permanent; nothing sent)",
    ErrorCode.REJECTED: "the SMTP server refused with a 5xx reply (permanent)",
    ErrorCode.DEFERRED: "the SMTP server answered with a 4xx reply (tried again)",
    ErrorCode.RECIPIENTS_REFUSED: "recipients refused with 5xx; the others were sent",
    ErrorCode.RECIPIENTS_DEFERRED: "recipients deferred with 4xx; only they are tried again",
    ErrorCode.HTTPS_REQUIRED: "422: a webhook URL must use https unless its host is in"
    " MAILROOM_ALLOWED_NETWORKS",
    ErrorCode.WEBHOOK_DISABLED: "409: the webhook endpoint is disabled; enable it first",
}
