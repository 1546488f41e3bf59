"""Names the handlers ask for, provided by the app (see ``service.app``)."""

from __future__ import annotations

from typing import Annotated

from litestar.di import NamedDependency
from litestar.params import PathParameter

from service.services.accounts import AccountService

ID_MAX = 64

Tenant = NamedDependency[str]
Accounts = NamedDependency[AccountService]
AccountId = Annotated[str, PathParameter(max_length=ID_MAX, description="An account id")]
