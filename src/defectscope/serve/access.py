"""Who may use a station, and from where.

Two tokens: the *change* token (upload, correct, set the threshold, switch or pin a
model: every request that is not a read) and an optional *read* token (the review page
and the results, nothing else). The change token can read too. Off loopback every route
except ``/healthz`` and ``/login`` needs one of them; on loopback they are needed only if
they were given.

A token arrives in a header (``Authorization: Bearer T`` or ``X-Token: T``) or, for the
review page, in a session cookie that ``POST /login`` sets: HttpOnly, SameSite=Strict,
Secure behind HTTPS, holding an HMAC of the role under the token (never the token
itself), so changing the token ends every session. A token in a URL is refused: URLs end
up in logs, proxies and browser history.

The Host header must name this station (Starlette's TrustedHostMiddleware; this defeats
DNS rebinding, where a page on another site resolves its own name to 127.0.0.1), and a
change sent by a browser must come from the station's own origin.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from defectscope.errors import ConfigError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
COOKIE = "defectscope_session"
OPEN_PATHS = ("/healthz", "/login", "/logout")


class Role(IntEnum):
    """What a request may do; each role includes the ones below it."""

    NONE = 0
    READ = 1
    CHANGE = 2


def is_loopback(host: str) -> bool:
    """Only 127.0.0.1, localhost and ::1 count: a station on any other address (127.0.0.2
    included, which a test uses to stand in for a network interface) needs a token."""
    return host in LOOPBACK_NAMES


def local_names(host: str) -> list[str]:
    """Host names a station bound to ``host`` answers to: the loopback names, the bound
    address, and for a wildcard bind the machine's name and addresses."""
    names = [*LOOPBACK_NAMES, host]
    try:
        wildcard = ipaddress.ip_address(host).is_unspecified
    except ValueError:
        wildcard = False
    if wildcard:
        hostname = socket.gethostname()
        names += [hostname, socket.getfqdn()]
        try:
            names += [str(info[4][0]) for info in socket.getaddrinfo(hostname, None)]
        except OSError:
            pass
    return list(dict.fromkeys(n for n in names if n))


@dataclass(frozen=True)
class Access:
    """The station's tokens and the host names it answers to."""

    token: str | None = None
    read_token: str | None = None
    required: bool = False
    allowed_hosts: tuple[str, ...] = LOOPBACK_NAMES

    @classmethod
    def for_bind(
        cls, host: str, token: str | None = None, read_token: str | None = None, extra_hosts: Iterable[str] = ()
    ) -> Access:
        """The access rule for a station bound to ``host``; off loopback a token is required."""
        if read_token and not token:
            raise ConfigError("A read-only token needs a change token beside it: pass --token too.")
        if token and read_token and hmac.compare_digest(token, read_token):
            raise ConfigError("The read-only token must differ from the change token.")
        for name, value in (("--token", token), ("--read-token", read_token)):
            if value is not None and len(value) < 16:
                raise ConfigError(f"{name} is {len(value)} characters; use at least 16 (e.g. `python -c 'import secrets; print(secrets.token_urlsafe())'`).")
        if not is_loopback(host) and not token:
            raise ConfigError(
                f"A station bound to {host} (beyond 127.0.0.1) needs a token: pass --token or set DEFECTSCOPE_TOKEN."
            )
        return cls(token, read_token, bool(token), tuple(dict.fromkeys([*local_names(host), *extra_hosts])))

    def session_cookie(self, role: Role) -> str:
        """The cookie value for a logged-in page of ``role``: an HMAC of the role under the
        change token (never the token itself)."""
        secret = (self.token or "").encode()
        return hmac.new(secret, f"defectscope-session:{role.name}".encode(), hashlib.sha256).hexdigest()

    def role_of_token(self, value: str | None) -> Role:
        """The role a presented token grants (NONE for a wrong or missing one)."""
        if not value:
            return Role.NONE
        if self.token and hmac.compare_digest(value, self.token):
            return Role.CHANGE
        if self.read_token and hmac.compare_digest(value, self.read_token):
            return Role.READ
        return Role.NONE

    def role(self, conn: HTTPConnection) -> Role:
        """What this request may do: from its header token, else its session cookie."""
        if not self.required:
            return Role.CHANGE
        auth = conn.headers.get("authorization", "")
        presented = auth[7:].strip() if auth.lower().startswith("bearer ") else conn.headers.get("x-token")
        if presented:
            return self.role_of_token(presented)
        cookie = conn.cookies.get(COOKIE)
        if cookie:
            for role in (Role.CHANGE, Role.READ):
                if (role is Role.CHANGE or self.read_token) and hmac.compare_digest(cookie, self.session_cookie(role)):
                    return role
        return Role.NONE


def needed_role(method: str, path: str) -> Role:
    """Reads need READ, everything else CHANGE; /healthz and the login routes are open."""
    if path in OPEN_PATHS:
        return Role.NONE
    return Role.READ if method in ("GET", "HEAD") else Role.CHANGE


def token_in_url(conn: HTTPConnection) -> bool:
    """A query parameter that looks like a credential."""
    return any(k.lower() in ("token", "x-token", "access_token", "read_token") for k in conn.query_params)


def same_origin(conn: HTTPConnection) -> bool:
    """A browser's change request must come from a page of this station: its Origin (when
    the browser sends one) must name the host the request was sent to."""
    origin = conn.headers.get("origin")
    if origin is None:
        return True
    return urlsplit(origin).netloc.lower() == conn.headers.get("host", "").lower()
