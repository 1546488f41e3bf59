"""A real Dovecot POP3 server for tests and benchmarks, on free loopback ports.

Fixtures (registered for the whole suite by ``tests/conftest.py``):

- ``dovecot`` (session): Dovecot with ``ssl = yes``: the plain port offers STLS and a second
  port speaks implicit TLS. Certificates come from a trustme CA; clients verify with
  ``dovecot.ca_file`` and the host name ``dovecot.hostname`` (or ``dovecot.host``).
- ``dovecot_plain`` (session): a second Dovecot with ``ssl = no`` (no STLS, no TLS port),
  for "the account asks for STLS and the server does not offer it".
- ``mailbox`` (function): a fresh user with its own Maildir on ``dovecot``.

Outside pytest (``bench/``), use ``with running_dovecot() as server: ...``.

API::

    server.host, server.hostname       "127.0.0.1", "localhost" (both in the certificate)
    server.pop3_port, server.pop3s_port
    server.ca_file                      PEM file of the CA that signed the server certificate
    server.add_user(name=None, password=None) -> Mailbox
    mailbox.user, mailbox.password
    mailbox.deliver(message: bytes) -> str        one message into Maildir new/ (as LF)
    mailbox.deliver_many(messages) -> list[str]
    mailbox.count() -> int                        messages still on disk (new/ + cur/)

Dovecot refuses to run logins as root and mail uids below ``first_valid_uid``; the
recipe (``/work/shared/TESTING.md``) runs it as root from a temporary directory with the
login processes as ``dovenull`` and mail owned by the ``vmail`` system user, which is
created here if missing. A missing Dovecot binary is an error, never a skip: CI installs
``dovecot-pop3d``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

VMAIL_USER = "vmail"
#: How long Dovecot may take to start answering on its ports.
STARTUP_SECONDS = 20.0
STOP_SECONDS = 10.0
_counter = itertools.count()


class DovecotUnavailable(RuntimeError):
    """Dovecot could not be found or started."""


@dataclass
class Mailbox:
    """One POP3 user of a running :class:`Dovecot`, with its Maildir."""

    server: Dovecot
    user: str
    password: str
    path: Path
    _uid: int = field(repr=False)
    _gid: int = field(repr=False)

    def deliver(self, message: bytes) -> str:
        """Drop one message into ``new/`` (stored with LF line ends); return its file name.

        Dovecot serves it with CRLF line ends, so a message written with CRLF comes back
        byte for byte. Deliver messages ending with a line end.
        """
        name = f"{time.time_ns()}.M{next(_counter):09d}P{os.getpid()}.mailroom"
        tmp = self.path / "tmp" / name
        tmp.write_bytes(message.replace(b"\r\n", b"\n"))
        os.chown(tmp, self._uid, self._gid)
        # tmp/ then rename, as Maildir wants: Dovecot never sees a half-written file.
        tmp.rename(self.path / "new" / name)
        return name

    def deliver_many(self, messages: Iterable[bytes]) -> list[str]:
        """Deliver several messages, in order."""
        return [self.deliver(message) for message in messages]

    def count(self) -> int:
        """Messages still on disk (``new/`` and ``cur/``), whatever Dovecot did with them."""
        return sum(
            1
            for sub in ("new", "cur")
            for entry in os.scandir(self.path / sub)
            if entry.is_file() and not entry.name.startswith(".")
        )


@dataclass
class Dovecot:
    """A running Dovecot POP3 server (see the module docstring for the API)."""

    directory: Path
    pop3_port: int
    pop3s_port: int | None
    ca: trustme.CA
    ca_file: str
    ssl: str
    process: subprocess.Popen[bytes] = field(repr=False)
    vmail: pwd.struct_passwd = field(repr=False)
    host: str = "127.0.0.1"
    hostname: str = "localhost"

    def add_user(self, name: str | None = None, password: str | None = None) -> Mailbox:
        """Create a user with an empty Maildir; names and passwords are random by default."""
        name = name or f"user{next(_counter)}x{secrets.token_hex(3)}"
        password = password or secrets.token_urlsafe(12)
        for value in (name, password):
            if any(ch in value for ch in ":\r\n\0"):
                raise ValueError("passwd-file fields cannot contain ':', CR, LF or NUL")
        path = self.directory / "mail" / name
        for sub in ("", "new", "cur", "tmp"):
            (path / sub).mkdir(mode=0o700, exist_ok=True)
            os.chown(path / sub, self.vmail.pw_uid, self.vmail.pw_gid)
        # One passwd-file per user: Dovecot opens it at login, so a user added a moment
        # ago can log in at once (a shared file is re-read lazily and races with tests).
        entry = self.directory / "users" / name
        entry.write_text(f"{name}:{{PLAIN}}{password}\n", encoding="utf-8")
        entry.chmod(0o644)
        return Mailbox(self, name, password, path, self.vmail.pw_uid, self.vmail.pw_gid)

    @property
    def auth_socket(self) -> Path:
        """The auth listener for Postfix's SASL (the OAuth2 variant only)."""
        return self.directory / "run" / "auth-postfix"

    def log(self) -> str:
        """Dovecot's log so far (for failure messages)."""
        parts = []
        for name in ("dovecot.log", "stderr.log"):
            with contextlib.suppress(OSError):
                parts.append((self.directory / name).read_text(errors="replace"))
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the server (the process this module started) and wait for it."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_SECONDS)


def ensure_vmail_user() -> pwd.struct_passwd:
    """Return the ``vmail`` user, creating it (``useradd -r -M``) when missing."""
    try:
        return pwd.getpwnam(VMAIL_USER)
    except KeyError:
        pass
    if os.geteuid() != 0:
        raise DovecotUnavailable("the 'vmail' user is missing and only root can create it")
    subprocess.run(
        ["useradd", "-r", "-M", "-s", "/usr/sbin/nologin", VMAIL_USER],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(VMAIL_USER)


def _dovecot_binary() -> str:
    found = shutil.which("dovecot") or (
        "/usr/sbin/dovecot" if os.access("/usr/sbin/dovecot", os.X_OK) else None
    )
    if not found:
        raise DovecotUnavailable(
            "the dovecot binary is missing: install the Debian package dovecot-pop3d"
        )
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(
    directory: Path,
    *,
    ssl: str,
    pop3_port: int,
    pop3s_port: int | None,
    uid: int,
    listen: str = "127.0.0.1",
    plaintext_auth: bool = True,
    introspection_url: str | None = None,
    oauth_mechanisms: str = "xoauth2 oauthbearer",
) -> str:
    d = directory
    mechanisms = "plain login"
    passdb = f"""passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users/%u
}}"""
    # An auth socket for Postfix's SASL (smtpd_sasl_type = dovecot): a Postfix submission
    # port accepts the logins this Dovecot accepts.
    auth_service = "service auth {\n  unix_listener auth-postfix {\n    mode = 0666\n  }\n}\n"
    if introspection_url is not None:
        # OAuth2 only: bearer tokens checked at the provider's introspection endpoint.
        (d / "oauth2.conf").write_text(
            f"introspection_mode = post\nintrospection_url = {introspection_url}\n"
            "username_attribute = username\nactive_attribute = active\nactive_value = true\n"
            "force_introspection = yes\n"
        )
        mechanisms = oauth_mechanisms
        passdb = (
            f"passdb {{\n  driver = oauth2\n  mechanisms = {oauth_mechanisms}\n"
            f"  args = {d}/oauth2.conf\n}}"
        )
    tls = ""
    if ssl != "no":
        tls = f"ssl_cert = <{d}/cert.pem\nssl_key = <{d}/key.pem\n"
    pop3s = ""
    if pop3s_port is not None:
        pop3s = f"  inet_listener pop3s {{\n    port = {pop3s_port}\n    ssl = yes\n  }}\n"
    return f"""\
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = pop3
listen = {listen}
ssl = {ssl}
{tls}disable_plaintext_auth = {"no" if plaintext_auth else "yes"}
auth_mechanisms = {mechanisms}
auth_failure_delay = 0
default_internal_user = dovecot
default_internal_group = dovecot
default_login_user = dovenull
first_valid_uid = {min(100, uid)}
mail_location = maildir:{d}/mail/%u
pop3_uidl_format = %g
{passdb}
userdb {{
  driver = static
  args = uid=vmail gid=vmail home={d}/mail/%u
}}
service pop3-login {{
  chroot =
  inet_listener pop3 {{
    port = {pop3_port}
  }}
{pop3s}}}
{auth_service}service anvil {{
  chroot =
  # No per-IP auth penalty: wrong-password tests would slow every later login (2-15 s).
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""


def _greets(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            return sock.recv(64).startswith(b"+OK")
    except OSError:
        return False


def _start(
    directory: Path,
    ca: trustme.CA,
    ssl: str,
    listen: str = "127.0.0.1",
    plaintext_auth: bool = True,
    cert_names: tuple[str, ...] = (),
    introspection_url: str | None = None,
    oauth_mechanisms: str = "xoauth2 oauthbearer",
) -> Dovecot:
    binary = _dovecot_binary()
    vmail = ensure_vmail_user()
    for sub in ("run", "state", "mail"):
        (directory / sub).mkdir(mode=0o755, exist_ok=True)
    os.chown(directory / "mail", vmail.pw_uid, vmail.pw_gid)
    (directory / "users").mkdir(mode=0o755)
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    if ssl != "no":
        cert = ca.issue_cert("localhost", "127.0.0.1", "::1", *cert_names)
        cert.private_key_pem.write_to_path(str(directory / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
        (directory / "key.pem").chmod(0o600)  # read by the master process, as root
    pop3_port = _free_port()
    pop3s_port = _free_port() if ssl != "no" else None
    config = directory / "dovecot.conf"
    config.write_text(
        _config(
            directory,
            ssl=ssl,
            pop3_port=pop3_port,
            pop3s_port=pop3s_port,
            uid=vmail.pw_uid,
            listen=listen,
            plaintext_auth=plaintext_auth,
            introspection_url=introspection_url,
            oauth_mechanisms=oauth_mechanisms,
        )
    )
    with open(directory / "stderr.log", "wb") as stderr:
        # -F: stay in the foreground as our child, so it is stopped by its own pid.
        process = subprocess.Popen(
            [binary, "-F", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            start_new_session=True,
        )
    server = Dovecot(directory, pop3_port, pop3s_port, ca, str(ca_file), ssl, process, vmail)
    deadline = time.monotonic() + STARTUP_SECONDS
    while not _greets(server.host, pop3_port):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise DovecotUnavailable(f"Dovecot did not start:\n{server.log()}")
        time.sleep(0.05)
    return server


@contextlib.contextmanager
def running_dovecot(
    *,
    ssl: str = "yes",
    ca: trustme.CA | None = None,
    listen: str = "127.0.0.1",
    plaintext_auth: bool = True,
    cert_names: tuple[str, ...] = (),
    introspection_url: str | None = None,
    oauth_mechanisms: str = "xoauth2 oauthbearer",
) -> Iterator[Dovecot]:
    """Start Dovecot (``ssl``: ``yes``, ``required`` or ``no``) in a temporary directory.

    ``cert_names``: more names the server certificate is valid for (autoconfig tests).

    ``introspection_url``: an OAuth2 variant: logins only with XOAUTH2 or OAUTHBEARER,
    the bearer token checked at this RFC 7662 endpoint (``tests/servers/oauth.py``);
    ``oauth_mechanisms`` narrows the
    mechanisms offered (to POP3 clients and through Postfix).

    Its auth socket for a Postfix's SASL is ``server.auth_socket`` (every variant).

    ``listen`` takes Dovecot's syntax (``"127.0.0.1, 127.0.0.2"``); with
    ``plaintext_auth=False`` it refuses logins before TLS on connections it does not
    consider secure (from 127.0.0.1 to 127.0.0.2, but not from 127.0.0.1 to itself).

    The directory is world-traversable (Dovecot's unprivileged processes must reach it),
    so it is made with ``tempfile`` rather than pytest's private ``tmp_path``.
    """
    directory = Path(tempfile.mkdtemp(prefix="mailroom-dovecot-"))
    directory.chmod(0o755)
    try:
        attempts = 3  # a free port can be taken between probing and Dovecot's bind
        for attempt in range(attempts):
            try:
                server = _start(
                    directory,
                    ca or trustme.CA(),
                    ssl,
                    listen,
                    plaintext_auth,
                    cert_names,
                    introspection_url,
                    oauth_mechanisms,
                )
                break
            except DovecotUnavailable:
                if attempt == attempts - 1 or not (directory / "dovecot.conf").exists():
                    raise
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def dovecot() -> Iterator[Dovecot]:
    """Dovecot with STLS on ``pop3_port`` and implicit TLS on ``pop3s_port``."""
    with running_dovecot(ssl="yes") as server:
        yield server


@pytest.fixture(scope="session")
def dovecot_plain() -> Iterator[Dovecot]:
    """Dovecot with ``ssl = no``: neither STLS nor a TLS port."""
    with running_dovecot(ssl="no") as server:
        yield server


@pytest.fixture
def mailbox(dovecot: Dovecot) -> Mailbox:
    """A fresh user with an empty Maildir on the session's ``dovecot``."""
    return dovecot.add_user()
