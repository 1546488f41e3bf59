"""A real Postfix SMTP server on loopback, as its own instance in a temporary directory.

Fixture (registered for the whole suite by ``tests/conftest.py``):

- ``postfix`` (session): Postfix with its own configuration and queue directories, an
  ``smtpd`` on a free port of 127.0.0.1 (plain, no AUTH), ``smtpd_helo_required = yes`` and
  ``smtpd_helo_restrictions = reject_non_fqdn_helo_hostname``, as many submission servers
  are set up. Mail for :data:`POSTFIX_DOMAIN` is delivered into Maildirs under the
  directory; nothing leaves the machine (the default, relay and local transports are
  ``error:``). Clients on 127.0.0.0/8 may send (``mynetworks``).

API::

    server.host, server.port            "127.0.0.1", the smtpd port
    server.add_mailbox(local=None) -> str   a new address @POSTFIX_DOMAIN that accepts mail
    server.messages(address) -> list[bytes] what Postfix delivered to it (its Delivered-To)
    server.log() -> str                     Postfix's log (for failure messages)

Postfix is started with ``postfix -c DIR start`` (its master daemonizes) and stopped with
``postfix -c DIR stop``; a master still alive after that is killed by the pid it wrote,
so no daemon is left behind. Without the ``postfix`` binary the tests using it are skipped
(``scripts/test.sh`` installs the Debian package ``postfix``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from tests.servers.dovecot import DovecotUnavailable, ensure_vmail_user

POSTFIX_DOMAIN = "postfix.mailroom.test"
POSTFIX_HOSTNAME = "mx.postfix.mailroom.test"
STARTUP_SECONDS = 30.0
STOP_SECONDS = 15.0
PORT_ATTEMPTS = 3  # another process may take the free port before Postfix binds it
_counter = itertools.count()
_LOCAL_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
MAILDIR = "inbox"  # under DIR/mail: every message for POSTFIX_DOMAIN

# Only the services this instance needs, none chrooted (the queue is in a temporary
# directory, not under a chroot jail).
_MASTER_CF = """\
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixUnavailable(RuntimeError):
    """Postfix could not be started."""


def _main_cf(d: Path, uid: int, gid: int) -> str:
    return f"""\
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
maillog_file = {d}/log/maillog
maillog_file_prefixes = {d}/log
myhostname = {POSTFIX_HOSTNAME}
mydomain = postfix.mailroom.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtp_dns_support_level = disabled
default_transport = error:mail for other domains is not accepted here
relay_transport = error:mail for other domains is not accepted here
local_transport = error:no local delivery here
alias_maps =
alias_database =
local_recipient_maps =
virtual_mailbox_domains = {POSTFIX_DOMAIN}
virtual_mailbox_base = {d}/mail
virtual_mailbox_maps = regexp:{d}/conf/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
smtpd_helo_required = yes
smtpd_helo_restrictions = reject_non_fqdn_helo_hostname
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
"""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _greets(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2) as sock:
            return sock.recv(64).startswith(b"220")
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Postfix:
    """A running Postfix instance (see the module docstring for the API)."""

    directory: Path
    port: int
    binary: str
    uid: int = field(repr=False)
    gid: int = field(repr=False)
    host: str = "127.0.0.1"
    # The submission port (implicit TLS, SASL from Dovecot): running_postfix(submission=...).
    submission_port: int | None = None

    def add_mailbox(self, local: str | None = None) -> str:
        """A new address at :data:`POSTFIX_DOMAIN` whose mail lands in its own Maildir."""
        local = local or f"user{next(_counter)}x{os.getpid()}"
        if not re.fullmatch(_LOCAL_PART, local):
            raise ValueError(f"local part {local!r} does not match {_LOCAL_PART}")
        return f"{local}@{POSTFIX_DOMAIN}"

    def messages(self, address: str) -> list[bytes]:
        """Messages delivered to ``address`` (its Maildir's new/ and cur/), oldest first."""
        base = self.directory / "mail" / MAILDIR
        found: list[Path] = []
        for sub in ("new", "cur"):
            if (base / sub).is_dir():
                found += [p for p in (base / sub).iterdir() if p.is_file()]
        marker = f"Delivered-To: {address}\n".encode()
        ordered = sorted(found, key=lambda p: p.stat().st_mtime_ns)
        return [data for data in (p.read_bytes() for p in ordered) if marker in data]

    def log(self) -> str:
        """Postfix's log so far."""
        with contextlib.suppress(OSError):
            return (self.directory / "log" / "maillog").read_text(errors="replace")
        return ""

    def master_pid(self) -> int | None:
        """The pid of this instance's master process, if it wrote one."""
        try:
            text = (self.directory / "queue" / "pid" / "master.pid").read_text()
        except OSError:
            return None
        return int(text.strip()) if text.strip().isdigit() else None

    def stop(self) -> None:
        """``postfix stop``; kill the master if it is still alive afterwards."""
        pid = self.master_pid()
        subprocess.run(
            [self.binary, "-c", str(self.directory / "conf"), "stop"],
            capture_output=True,
            timeout=STOP_SECONDS,
            check=False,
        )
        if pid is None:
            return
        deadline = time.monotonic() + STOP_SECONDS
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _postfix_binary() -> str | None:
    found = shutil.which("postfix") or (
        "/usr/sbin/postfix" if os.access("/usr/sbin/postfix", os.X_OK) else None
    )
    return found


def _submission(d: Path, auth_socket: Path, port: int) -> tuple[str, str]:
    """main.cf and master.cf additions: a 465-style port where only SASL clients may send,
    authenticated by Dovecot (smtpd_sasl_type = dovecot) at ``auth_socket``."""
    main = f"""\
smtpd_sasl_type = dovecot
smtpd_sasl_path = {auth_socket}
smtpd_tls_cert_file = {d}/conf/cert.pem
smtpd_tls_key_file = {d}/conf/key.pem
"""
    master = (
        "tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n"
        f"127.0.0.1:{port} inet n - n - - smtpd\n"
        "  -o smtpd_tls_wrappermode=yes\n"
        "  -o smtpd_tls_security_level=encrypt\n"
        "  -o smtpd_sasl_auth_enable=yes\n"
        "  -o smtpd_tls_auth_only=yes\n"
        "  -o mynetworks=\n"
        "  -o smtpd_client_restrictions=permit_sasl_authenticated,reject\n"
        "  -o smtpd_relay_restrictions=permit_sasl_authenticated,reject\n"
        "  -o smtpd_recipient_restrictions=permit_sasl_authenticated,reject\n"
    )
    return main, master


def _with_submission(directory: Path, submission: tuple[Path, trustme.CA]) -> tuple[str, str, int]:
    """The certificate for the submission port (issued by the given CA) written to conf/,
    and :func:`_submission`'s additions for a new port, with that port."""
    auth_socket, ca = submission
    conf = directory / "conf"
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(conf / "cert.pem"))
    cert.private_key_pem.write_to_path(str(conf / "key.pem"))
    (conf / "key.pem").chmod(0o600)
    port = _free_port()
    main_extra, master_extra = _submission(directory, auth_socket, port)
    return main_extra, master_extra, port


def _start(
    directory: Path, binary: str, submission: tuple[Path, trustme.CA] | None = None
) -> Postfix:
    try:
        vmail = ensure_vmail_user()
    except DovecotUnavailable as exc:
        raise PostfixUnavailable(str(exc)) from exc
    # conf/ holds only root's files (``postfix check`` wants it so); Maildirs are apart.
    conf = directory / "conf"
    for sub in ("conf", "queue", "data", "mail", "log"):
        (directory / sub).mkdir(mode=0o755, exist_ok=True)
    shutil.chown(directory / "data", "postfix")
    os.chown(directory / "mail", vmail.pw_uid, vmail.pw_gid)
    # One Maildir (trailing slash) for every address of the domain, so no map is ever
    # reloaded when a test adds an address (virtual(8) allows no $1 in a regexp map).
    domain = re.escape(POSTFIX_DOMAIN)
    (conf / "vmailbox").write_text(f"/@{domain}$/ {MAILDIR}/\n", encoding="utf-8")
    port = _free_port()
    main_cf = _main_cf(directory, vmail.pw_uid, vmail.pw_gid)
    master_cf = _MASTER_CF.format(listen=f"127.0.0.1:{port}")
    submission_port = None
    if submission is not None:
        main_extra, master_extra, submission_port = _with_submission(directory, submission)
        main_cf += main_extra
        master_cf += master_extra
    (conf / "main.cf").write_text(main_cf)
    (conf / "master.cf").write_text(master_cf)
    started = subprocess.run(
        [binary, "-c", str(conf), "start"], capture_output=True, text=True, check=False
    )
    server = Postfix(directory, port, binary, vmail.pw_uid, vmail.pw_gid)
    server.submission_port = submission_port
    if started.returncode != 0:
        server.stop()
        raise PostfixUnavailable(f"postfix start failed:\n{started.stdout}{started.stderr}")
    deadline = time.monotonic() + STARTUP_SECONDS
    while not _greets(server.host, port):
        if time.monotonic() > deadline:
            server.stop()
            raise PostfixUnavailable(f"Postfix did not answer on {port}:\n{server.log()}")
        time.sleep(0.05)
    return server


@contextlib.contextmanager
def running_postfix(submission: tuple[Path, trustme.CA] | None = None) -> Iterator[Postfix]:
    """Start a Postfix instance in a temporary directory; stop it and remove the directory.

    ``submission`` (a Dovecot auth socket, a CA): also a submission port with implicit TLS
    (``server.submission_port``) where only clients authenticated by that Dovecot send
    (the OAuth2 tests: XOAUTH2 and OAUTHBEARER through Dovecot's ``oauth2`` passdb).
    """
    binary = _postfix_binary()
    if binary is None:
        raise PostfixUnavailable("the postfix binary is missing: install the package postfix")
    if os.geteuid() != 0:
        raise PostfixUnavailable("Postfix instances need root to start")
    attempts = 0
    while True:
        # World-traversable: Postfix's unprivileged daemons must reach the queue.
        directory = Path(tempfile.mkdtemp(prefix="mailroom-postfix-"))
        directory.chmod(0o755)
        try:
            server = _start(directory, binary, submission)
            break
        except PostfixUnavailable:
            _remove(directory)
            attempts += 1
            if attempts >= PORT_ATTEMPTS:
                raise
    try:
        yield server
    finally:
        server.stop()
        _remove(directory)


def _remove(directory: Path) -> None:
    # Daemons still exiting after their master may write a last file while the tree is
    # being removed: try again a few times.
    deadline = time.monotonic() + STOP_SECONDS
    while True:
        shutil.rmtree(directory, ignore_errors=True)
        if not directory.exists() or time.monotonic() > deadline:
            return
        time.sleep(0.1)


@pytest.fixture(scope="session")
def postfix() -> Iterator[Postfix]:
    """A Postfix instance that refuses unqualified EHLO names (see the module docstring)."""
    if _postfix_binary() is None:
        pytest.skip("the postfix binary is missing (scripts/test.sh installs the package postfix)")
    with running_postfix() as server:
        yield server


# -- a Postfix that accepts mail and bounces it later (bounce tests) -----------------------


@contextlib.contextmanager
def bouncing_postfix_for_test(
    mail_base: Path,
    maildir: str,
    routes: Mapping[str, str] | None = None,
    submission: tuple[Path, trustme.CA] | None = None,
) -> Iterator[Postfix]:
    """:func:`running_bouncing_postfix` for a test: skipped when Postfix is not installed,
    failed with Postfix's own account when it cannot start."""
    if _postfix_binary() is None:
        pytest.skip("the postfix binary is missing (scripts/test.sh installs the package postfix)")
    try:
        with running_bouncing_postfix(mail_base, maildir, routes, submission) as server:
            yield server
    except PostfixUnavailable as exc:  # pragma: no cover - a broken setup, shown in full
        pytest.fail(str(exc))


#: Mail for this domain is accepted at RCPT, then fails in Postfix's queue: a pipe transport
#: whose command exits 67 (EX_NOUSER), so Postfix returns a DSN (5.1.1) to the sender.
BOUNCE_DOMAIN = "bounce.mailroom.test"
BOUNCE_SCRIPT = """\
#!/bin/sh
echo "550 5.1.1 <$1>: Recipient address rejected: no such user here"
exit 67
"""


@contextlib.contextmanager
def running_bouncing_postfix(
    mail_base: Path,
    maildir: str,
    routes: Mapping[str, str] | None = None,
    submission: tuple[Path, trustme.CA] | None = None,
) -> Iterator[Postfix]:
    """A Postfix that delivers mail for :data:`POSTFIX_DOMAIN` (the DSNs it sends back
    included) into ``mail_base/maildir/`` and bounces mail for :data:`BOUNCE_DOMAIN` after
    accepting it. ``mail_base`` is typically a Dovecot's mail directory and ``maildir`` one
    of its users, so the DSNs can be retrieved over POP3. ``routes`` (local part: maildir)
    delivers those addresses into their own maildirs instead (several recipients, each
    reading their own mail); ``submission``: also a submission port, as
    :func:`running_postfix` has."""
    routes = dict(routes or {})
    binary = _postfix_binary()
    if binary is None:
        raise PostfixUnavailable("the postfix binary is missing: install the package postfix")
    if os.geteuid() != 0:
        raise PostfixUnavailable("Postfix instances need root to start")
    for name in (maildir, *routes, *routes.values()):
        if not re.fullmatch(_LOCAL_PART, name):
            raise ValueError(f"{name!r} does not match {_LOCAL_PART}")
    attempts = 0
    while True:
        directory = Path(tempfile.mkdtemp(prefix="mailroom-postfix-bounce-"))
        directory.chmod(0o755)
        try:
            server = _start_bouncing(directory, binary, mail_base, maildir, routes, submission)
            break
        except PostfixUnavailable:
            _remove(directory)
            attempts += 1
            if attempts >= PORT_ATTEMPTS:
                raise
    try:
        yield server
    finally:
        server.stop()
        _remove(directory)


def _start_bouncing(
    directory: Path,
    binary: str,
    mail_base: Path,
    maildir: str,
    routes: Mapping[str, str],
    submission: tuple[Path, trustme.CA] | None,
) -> Postfix:
    try:
        vmail = ensure_vmail_user()
    except DovecotUnavailable as exc:
        raise PostfixUnavailable(str(exc)) from exc
    conf = directory / "conf"
    for sub in ("conf", "queue", "data", "log"):
        (directory / sub).mkdir(mode=0o755, exist_ok=True)
    shutil.chown(directory / "data", "postfix")
    domain = re.escape(POSTFIX_DOMAIN)
    # The first matching pattern wins: the routed addresses, then everything else.
    lines = [f"/^{re.escape(local)}@{domain}$/ {target}/\n" for local, target in routes.items()]
    lines.append(f"/@{domain}$/ {maildir}/\n")
    (conf / "vmailbox").write_text("".join(lines), encoding="utf-8")
    (conf / "transport").write_text(f"{BOUNCE_DOMAIN} bouncer:\n", encoding="utf-8")
    script = conf / "bouncer.sh"
    script.write_text(BOUNCE_SCRIPT, encoding="utf-8")
    script.chmod(0o755)
    port = _free_port()
    # The base configuration with the Maildirs elsewhere and a transport for the domain.
    base = _main_cf(directory, vmail.pw_uid, vmail.pw_gid).splitlines(keepends=True)
    main_cf = "".join(line for line in base if not line.startswith("virtual_mailbox_base")) + (
        f"virtual_mailbox_base = {mail_base}\n"
        f"transport_maps = texthash:{conf}/transport\n"
        # One recipient per run of the command, so each gets its own diagnostic.
        "bouncer_destination_recipient_limit = 1\n"
    )
    master_cf = _MASTER_CF.format(listen=f"127.0.0.1:{port}") + (
        f"bouncer   unix  -       n       n       -       -       pipe\n"
        f"  flags=q user=nobody argv={script} ${{recipient}}\n"
    )
    submission_port = None
    if submission is not None:
        main_extra, master_extra, submission_port = _with_submission(directory, submission)
        main_cf += main_extra
        master_cf += master_extra
    (conf / "main.cf").write_text(main_cf)
    (conf / "master.cf").write_text(master_cf)
    started = subprocess.run(
        [binary, "-c", str(conf), "start"], capture_output=True, text=True, check=False
    )
    server = Postfix(directory, port, binary, vmail.pw_uid, vmail.pw_gid)
    server.submission_port = submission_port
    if started.returncode != 0:
        server.stop()
        raise PostfixUnavailable(f"postfix start failed:\n{started.stdout}{started.stderr}")
    deadline = time.monotonic() + STARTUP_SECONDS
    while not _greets(server.host, port):
        if time.monotonic() > deadline:
            server.stop()
            raise PostfixUnavailable(f"Postfix did not answer on {port}:\n{server.log()}")
        time.sleep(0.05)
    return server
