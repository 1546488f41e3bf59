"""Accounts: CRUD and the settings test (verify)."""

from __future__ import annotations

from litestar import Controller, delete, get, patch, post
from litestar.params import JSONBody

from service.api.dependencies import AccountId, Accounts, Tenant, Verifier
from service.api.pagination import DEFAULT_PAGE_SIZE, Cursor, Limit, after_of, list_response
from service.api.problems import ACCOUNT_INPUT_ERRORS, BAD_BODY, COMMON_ERRORS, NOT_FOUND
from service.api.schemas import AccountList, AccountOut
from service.domain.inputs import AccountInput, AccountPatch
from service.services.verify import VerifyResult


class AccountController(Controller):
    path = "/accounts"
    tags = ["Accounts"]

    @post(
        operation_id="CreateAccount",
        summary="Create a mail account",
        description="Stores the POP3 and SMTP settings; passwords are encrypted at rest and"
        " never returned. Ports default from `security`. A `preset` (`ListPresets`) fills"
        " the hosts, ports and security the body leaves out; an unknown one is 422"
        " `unknown_preset`.",
        responses={**COMMON_ERRORS, **ACCOUNT_INPUT_ERRORS, **BAD_BODY},
    )
    async def create_account(
        self, data: JSONBody[AccountInput], tenant: Tenant, accounts: Accounts
    ) -> AccountOut:
        return AccountOut.of(await accounts.create(tenant, data))

    @get(
        operation_id="ListAccounts",
        summary="List accounts",
        description="A page of the caller's accounts; follow `next_cursor` for the next page.",
        responses=COMMON_ERRORS,
    )
    async def list_accounts(
        self,
        tenant: Tenant,
        accounts: Accounts,
        limit: Limit = DEFAULT_PAGE_SIZE,
        cursor: Cursor = None,
    ) -> AccountList:
        page = await accounts.page(tenant, after=after_of(cursor), limit=limit)
        return list_response(AccountList, page, AccountOut.of)

    @get(
        "/{account_id:str}",
        operation_id="GetAccount",
        summary="Get an account",
        description="The account's settings (passwords only as `password_set`) and whether"
        " delivery is paused (`smtp_status`, `smtp_pause`).",
        responses={**COMMON_ERRORS, **NOT_FOUND},
    )
    async def get_account(
        self, account_id: AccountId, tenant: Tenant, accounts: Accounts
    ) -> AccountOut:
        return AccountOut.of(await accounts.get(tenant, account_id))

    @patch(
        "/{account_id:str}",
        operation_id="UpdateAccount",
        summary="Update an account",
        description="Only the fields given change; nested objects merge. Changing `security`"
        " without `port` moves a default port to the new mode's default.",
        responses={**COMMON_ERRORS, **ACCOUNT_INPUT_ERRORS, **NOT_FOUND, **BAD_BODY},
    )
    async def update_account(
        self,
        account_id: AccountId,
        data: JSONBody[AccountPatch],
        tenant: Tenant,
        accounts: Accounts,
    ) -> AccountOut:
        return AccountOut.of(await accounts.update(tenant, account_id, data))

    @delete(
        "/{account_id:str}",
        operation_id="DeleteAccount",
        summary="Delete an account with its stored mail, retrievals and outbox",
        description="Nothing is deleted on the mail servers; messages still queued are not sent.",
        responses={**COMMON_ERRORS, **NOT_FOUND},
    )
    async def delete_account(
        self, account_id: AccountId, tenant: Tenant, accounts: Accounts
    ) -> None:
        await accounts.delete(tenant, account_id)

    @post(
        "/{account_id:str}/verify",
        operation_id="VerifyAccount",
        summary="Test the account's settings: connect, TLS and log in to POP3 and SMTP",
        description="Like a mail client's \"Test Account Settings\": each server's steps in"
        " order (`connect`, `tls`, `auth`, then for POP3 `mailbox` and for SMTP `envelope`:"
        " MAIL FROM and RCPT TO with the account's address, then RSET), the first failure with"
        " its `code` (`connect_failed`, `tls_required`, `tls_certificate_invalid`, `auth_failed`,"
        " `rejected`, `host_not_allowed`, ...). A TLS mode that does not fit the port fails with"
        " `tls_failed` and a hint. Both servers are checked at once, within"
        " `MAILROOM_VERIFY_TIMEOUT` seconds; a step cut short fails with `timeout`. Nothing is"
        " retrieved, sent or deleted.",
        status_code=200,
        responses={**COMMON_ERRORS, **NOT_FOUND},
    )
    async def verify_account(
        self, account_id: AccountId, tenant: Tenant, verifier: Verifier
    ) -> VerifyResult:
        return await verifier.verify(tenant, account_id)
