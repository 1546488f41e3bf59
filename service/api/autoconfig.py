"""Account setup: discover settings from an address, test settings before saving, presets."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, get, post
from litestar.params import JSONBody, QueryParameter

from service.api.dependencies import Accounts, Tenant, Verifier
from service.api.problems import ACCOUNT_INPUT_ERRORS, BAD_BODY, COMMON_ERRORS
from service.domain.inputs import AccountInput
from service.services.autoconfig import AutoconfigResult, Autoconfigurator
from service.services.presets import PresetCatalog, PresetList
from service.services.verify import VerifyResult

EMAIL_PATTERN = r"^[^\s@\x00-\x1f\x7f-\x9f]+@[A-Za-z0-9.-]+$"


class SetupController(Controller):
    tags = ["Setup"]

    @get(
        "/autoconfig",
        operation_id="DiscoverSettings",
        summary="Find the POP3 and SMTP servers of an address",
        description="Like a mail client's account wizard: asks, at once, a provider preset,"
        " the domain's autoconfig documents (Thunderbird config-v1.1), the ISPDB"
        " (`MAILROOM_ISPDB_URL`, by domain and by the MX's base domain), DNS SRV records"
        " (RFC 6186/8314) and guesses (`pop.`, `pop3.`, `mail.`, `smtp.` of the domain and of"
        " the MX's base domain), then probes each candidate live (connect, TLS with the"
        " certificate verified, CAPA or EHLO: STLS/STARTTLS, SASL/AUTH mechanisms,"
        " PIPELINING, UIDL). Candidates come ranked: working first, then implicit TLS,"
        " STARTTLS, plain text (never plain text where TLS is offered). Answers within"
        " `MAILROOM_AUTOCONFIG_TIMEOUT` seconds; `sources` says what each source gave. Hosts"
        " are fetched and probed through the outbound guard. No password is used.",
        responses={**COMMON_ERRORS},
    )
    async def discover_settings(
        self,
        request: Request[Any, Any, Any],
        email: Annotated[
            str,
            QueryParameter(
                min_length=3,
                max_length=254,
                pattern=EMAIL_PATTERN,
                description="The address to find settings for",
            ),
        ],
    ) -> AutoconfigResult:
        autoconfig: Autoconfigurator = request.app.state.autoconfig
        return await autoconfig.discover(email)

    @post(
        "/verify",
        operation_id="VerifySettings",
        summary="Test account settings before saving them",
        description="Takes the body of `CreateAccount` (a `preset` included) and runs the"
        " same step-by-step test as `VerifyAccount` (`connect`, `tls`, `auth`, then"
        " `mailbox` for POP3 and `envelope` for SMTP), storing nothing and logging no"
        " password. Invalid settings are refused as `CreateAccount` refuses them.",
        status_code=200,
        responses={**COMMON_ERRORS, **ACCOUNT_INPUT_ERRORS, **BAD_BODY},
    )
    async def verify_settings(
        self,
        data: JSONBody[AccountInput],
        tenant: Tenant,
        accounts: Accounts,
        verifier: Verifier,
    ) -> VerifyResult:
        return await verifier.check(await accounts.draft(tenant, data))

    @get(
        "/presets",
        operation_id="ListPresets",
        summary="List provider presets",
        description="Every preset a `preset` field may name: the provider's POP3 and SMTP"
        " hosts, ports and security, the address domains it serves, and its OAuth2"
        " endpoints where it has them.",
        responses=COMMON_ERRORS,
    )
    async def list_presets(self, request: Request[Any, Any, Any]) -> PresetList:
        presets: PresetCatalog = request.app.state.presets
        return PresetList(items=presets.all())
