"""What the downstream learns about the caller: identity headers and the route's downstream credential."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from oauthproxy.routes import Route

IDENTITY_HEADERS = ("X-Forwarded-User", "X-Forwarded-Email", "X-Forwarded-Name", "X-Forwarded-Access-Token")
ACCESS_TOKEN_HEADER = IDENTITY_HEADERS[3]

#: C0 controls (CR and LF among them) and DEL: a value containing them could end the header and start
#: another one (header injection), or is refused by the downstream's parser.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Caller:
    """The user behind a validated access token, as the downstream may see them."""

    user_id: str
    email: str | None
    name: str | None
    upstream_access_token: str | None = field(default=None, repr=False)
    #: The user's own credential for a per-user route (downstream_connections.py): a connection's access token or
    #: the user's API key. None on every other route.
    connection_secret: str | None = field(default=None, repr=False)
    #: The route's signed identity assertion for this request (identity_assertions.py), on routes that send one.
    identity_assertion: str | None = field(default=None, repr=False)


def header_value(value: str) -> str | bytes:
    """A safe header value: control characters removed; non-ASCII text sent as UTF-8 bytes.

    http.client would refuse a non-Latin-1 `str`; raw UTF-8 is what other identity-aware proxies send, and a
    downstream can decode it (Starlette hands it over as Latin-1: `value.encode("latin-1").decode()`).
    """
    cleaned = _CONTROL_CHARACTERS.sub("", value).strip()
    return cleaned if cleaned.isascii() else cleaned.encode("utf-8")


def downstream_auth_headers(route: Route, caller: Caller) -> list[tuple[str, str | bytes]]:
    """The headers the route adds: identity headers (modes 1-3), then at most one credential header (2 or 3).

    The modes: identity headers only (the default); the user's upstream token as a Bearer token; a static
    operator-configured secret in a named header; the user's own credential for the downstream (a connection's
    access token, or their API key) in the route's header, after its scheme; nothing. Identity headers combine with either credential; the
    upstream token as `X-Forwarded-Access-Token` is added only where the route's `forward_access_token` says so.
    """
    headers: list[tuple[str, str | bytes]] = []
    if route.identity_headers:
        for name, value in zip(IDENTITY_HEADERS[:3], (caller.user_id, caller.email, caller.name), strict=True):
            if value:
                headers.append((name, header_value(value)))
    if route.identity_assertion_header and caller.identity_assertion:
        headers.append((route.identity_assertion_header, caller.identity_assertion))
    if route.forward_access_token and caller.upstream_access_token:
        # Only where the route asks for it: a downstream that merely needs to know who calls must not hold a token
        # that acts as the user at the provider.
        headers.append((ACCESS_TOKEN_HEADER, header_value(caller.upstream_access_token)))
    credential = route.credential
    if credential.kind == "upstream_token" and caller.upstream_access_token:
        token = header_value(caller.upstream_access_token)
        headers.append(("Authorization", b"Bearer " + token if isinstance(token, bytes) else "Bearer " + token))
    elif credential.kind == "static":
        headers.append((credential.header, credential.value))
    elif credential.per_user and caller.connection_secret:
        headers.append((credential.header, header_value(credential.header_value(caller.connection_secret))))
    return headers


def credential_header_names(route: Route) -> frozenset[str]:
    """Lower-cased names the route sets itself; a client's own copies of them are dropped before forwarding."""
    names = {name.lower() for name in IDENTITY_HEADERS}
    if route.credential.kind != "none":
        names.add(route.credential.header.lower())
    if route.identity_assertion_header:
        names.add(route.identity_assertion_header.lower())
    return frozenset(names)
