"""MCP authorization discovery of a downstream that does its own (route `oauth = "discover"`): its authorization
server, the proxy's client identity there, and the provider the connect step signs users in at.

The proxy walks the chain as any MCP client would (MCP authorization 2025-11-25, "Authorization Server Discovery"):
an unauthenticated `initialize` → 401 with `WWW-Authenticate: Bearer resource_metadata="…"` (or, without one, the
RFC 9728 well-known URLs, path-inserted then root) → the protected resource metadata, whose `resource` must be the
downstream's URL (RFC 9728 §3.3) → its first authorization server → that server's metadata (RFC 8414 path-inserted,
then OpenID Connect Discovery), which must offer PKCE S256. The proxy then identifies itself there: a registration
stored from before, else its own client metadata document (served at `CLIENT_METADATA_PATH`) when the server takes
them and PUBLIC_URL is https, else dynamic client registration (RFC 7591), stored for every worker and restart.

Every request is bounded (PROVIDER_HTTP_TIMEOUT per request, a byte limit per answer, a budget for the whole walk),
follows no redirect, and goes to https only (plain http on loopback). A downstream that is not on loopback may not
send the proxy to a loopback, private, link-local, unspecified or multicast address (`PublicAddressGuard`). The result is cached per app and route; a
failure is remembered for `FAILURE_TTL` seconds so that a page reloaded in a loop does not walk it again each time.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
from flask import Flask, Response, current_app, jsonify
from requests.structures import CaseInsensitiveDict
from sqlalchemy import Row, Table, delete, insert, select
from sqlalchemy.exc import IntegrityError

from oauthproxy.components import components, current_application
from oauthproxy.config import Settings
from oauthproxy.connection_providers import CONNECT_CALLBACK_PATH, ConnectionProvider
from oauthproxy.crypto import DecryptionError, hash_token
from oauthproxy.mcp_initialize import initialize_request
from oauthproxy.models import DownstreamRegistration, db
from oauthproxy.providers import ConnectionProviderSettings, OAuthProvider, ProviderError, discovery
from oauthproxy.providers.base import OFFLINE_ACCESS
from oauthproxy.providers.errors import ErrorKind, clip
from oauthproxy.routes import Route
from oauthproxy.urls import MalformedURL, canonical_resource, is_loopback_host, is_loopback_url, split_url

log = logging.getLogger(__name__)

REGISTRATIONS = cast(Table, DownstreamRegistration.__table__)

#: Where the proxy serves its own client metadata document (draft-ietf-oauth-client-id-metadata-document): its URL
#: is the proxy's client id at every authorization server that takes such documents.
CLIENT_METADATA_PATH = "/connect/client-metadata.json"
#: How long authorization servers may cache the document (it changes only with PUBLIC_URL).
CLIENT_METADATA_MAX_AGE = 3600
#: The largest answer read from a downstream or its authorization server: real metadata documents are 1-10 KB.
MAX_DOCUMENT_BYTES = 64 * 1024
#: The longest URL or client id kept (the stored columns' size).
MAX_URL_LENGTH = 2048
#: Bounds on what a protected resource may ask users to grant.
MAX_SCOPES = 100
MAX_SCOPE_LENGTH = 200
#: RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"^[\x21\x23-\x5b\x5d-\x7e]+$")
#: The whole walk (at most 9 requests) within this many times PROVIDER_HTTP_TIMEOUT.
BUDGET_TIMEOUTS = 3
#: Seconds a failed discovery is answered from memory before the next attempt walks the chain again.
FAILURE_TTL = 10.0
#: The revision the unauthenticated `initialize` speaks; a server answers 401 before it reads the body anyway.
MCP_PROTOCOL_VERSION = "2025-11-25"
INITIALIZE = initialize_request("oauthproxy", MCP_PROTOCOL_VERSION)
_TOKEN_AUTH_METHODS = frozenset({"none", "client_secret_post", "client_secret_basic"})
#: Fields of a registration response that are secrets: sealed (client_secret) or not kept at all.
_SECRET_FIELDS = ("client_secret", "registration_access_token")
_EXTENSION = "oauthproxy.downstream_discovery"


# -- WWW-Authenticate ---------------------------------------------------------------------------------------------

#: RFC 9110 §5.6.2 token characters.
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: A parameter value that is neither a token nor a quoted string but is what lenient servers send (an unquoted URL).
_BARE_VALUE = re.compile(r'[^\s,"]+')


def _skip_spaces(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t":
        index += 1
    return index


def _next_comma(text: str, index: int) -> int:
    comma = text.find(",", index)
    return len(text) if comma < 0 else comma + 1


def _quoted_string(text: str, index: int) -> tuple[str | None, int]:
    """RFC 9110 §5.6.4 quoted-string starting at the quote at `index`: (value, end), or (None, end of text)."""
    out: list[str] = []
    index += 1
    while index < len(text):
        char = text[index]
        if char == "\\" and index + 1 < len(text):
            out.append(text[index + 1])
            index += 2
        elif char == '"':
            return "".join(out), index + 1
        else:
            out.append(char)
            index += 1
    return None, len(text)  # unterminated


def parse_challenges(header: str) -> list[tuple[str, dict[str, str]]]:
    """The challenges of a `WWW-Authenticate` value (RFC 9110 §11.6.1): [(scheme lower-cased, {param: value})].

    Several challenges may share one value (comma-separated, as several header lines are joined); parameter names
    are lower-cased, values unquoted, the first of a repeated parameter kept (RFC 6750 §3 forbids repeats). What
    cannot be read (token68 credentials, stray quotes, bytes outside the grammar) is skipped up to the next comma:
    garbage never raises, and never hides a well-formed challenge after it."""
    challenges: list[tuple[str, dict[str, str]]] = []
    params: dict[str, str] | None = None
    index, length = 0, len(header)
    while index < length:
        if header[index] in " \t,":
            index += 1
            continue
        token = _TOKEN.match(header, index)
        if token is None:
            index = _next_comma(header, index)
            continue
        after = _skip_spaces(header, token.end())
        if after < length and header[after] == "=":
            start = _skip_spaces(header, after + 1)
            if start < length and header[start] == '"':
                value, end = _quoted_string(header, start)
            else:
                bare = _BARE_VALUE.match(header, start)
                value, end = (bare.group(), bare.end()) if bare else (None, start)
            if value is None:  # token68 padding, or nothing readable
                index = _next_comma(header, end)
                continue
            if params is not None:
                params.setdefault(token.group().lower(), value)
            index = end
        else:
            params = {}
            challenges.append((token.group().lower(), params))
            index = after
    return challenges


def bearer_parameter(header: str, name: str) -> str | None:
    """A parameter of the first Bearer challenge that has it (RFC 6750 §3, RFC 9728 §5.1), or None."""
    for scheme, params in parse_challenges(header):
        if scheme == "bearer" and name in params:
            return params[name]
    return None


# -- where the documents are ----------------------------------------------------------------------------------------


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def protected_resource_metadata_urls(resource_url: str) -> list[str]:
    """RFC 9728 §3.1 well-known URLs of a resource, in MCP's order: path-inserted, then the root."""
    parts = urlsplit(resource_url)
    origin, path = _origin(resource_url), parts.path.rstrip("/")
    urls = [f"{origin}/.well-known/oauth-protected-resource{path}"] if path else []
    return [*urls, f"{origin}/.well-known/oauth-protected-resource"]


def authorization_server_metadata_urls(issuer: str) -> list[str]:
    """MCP 2025-11-25's order for an authorization server's metadata: RFC 8414 §3.1 path-inserted, OpenID Connect
    Discovery path-inserted (RFC 8414 §5), then appended (OIDC Discovery §4); for an issuer without a path, RFC 8414
    then OIDC Discovery at the root."""
    origin, path = _origin(issuer), urlsplit(issuer).path.rstrip("/")
    if not path:
        return [f"{origin}/.well-known/oauth-authorization-server", f"{origin}/.well-known/openid-configuration"]
    return [
        f"{origin}/.well-known/oauth-authorization-server{path}",
        f"{origin}/.well-known/openid-configuration{path}",
        f"{origin}{path}/.well-known/openid-configuration",
    ]


def resource_covers(resource: str, downstream_url: str) -> bool:
    """Whether a protected resource metadata `resource` names the downstream: the same URL (RFC 9728 §3.3, in RFC
    8707's comparison form), or a parent path of it on a segment boundary, as the MCP SDKs accept. It is sent as
    `resource` in every authorization and token request: bounded, without a fragment (RFC 8707 §2)."""
    if len(resource) > MAX_URL_LENGTH or "#" in resource:
        return False
    wanted, advertised = canonical_resource(downstream_url), canonical_resource(resource)
    if not advertised or _origin(advertised) != _origin(wanted):
        return False
    return wanted == advertised or wanted.startswith(advertised + "/")


# -- bounded requests -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int
    headers: CaseInsensitiveDict[str]
    #: None when the answer was larger than MAX_DOCUMENT_BYTES.
    body: bytes | None

    def json_object(self) -> tuple[dict[str, Any] | None, str]:
        """(the body as a JSON object, "") or (None, what is wrong with it)."""
        if self.body is None:
            return None, f"larger than {MAX_DOCUMENT_BYTES} bytes"
        try:
            document = json.loads(self.body)
        except (ValueError, RecursionError):  # RecursionError: nesting deeper than the parser's stack
            return None, "not JSON"
        if not isinstance(document, dict):
            return None, "not a JSON object"
        return document, ""


class _TooSlow(Exception):
    """A body trickling in, each piece within the timeout, past the request's whole allowance."""


class BoundedHttp:
    """Every request discovery sends: no redirect followed (a metadata URL that moves is not the one named), the
    CA_BUNDLE, each request within `timeout` per wait and twice that in all, the whole walk within `budget`."""

    def __init__(self, *, timeout: float, ca_bundle: str | None, budget: float):
        self.timeout = timeout
        self.deadline = time.monotonic() + budget
        self.budget = budget
        self.session = requests.Session()
        if ca_bundle:
            # Without trust_env, REQUESTS_CA_BUNDLE cannot override CA_BUNDLE (as for the providers).
            self.session.verify, self.session.trust_env = ca_bundle, False

    def close(self) -> None:
        self.session.close()

    def request(self, method: str, url: str, what: str, **kwargs: Any) -> Answer:
        """Send one request; a network failure, a timeout or a spent budget raises `ProviderError("transient")`."""
        started = time.monotonic()
        remaining = self.deadline - started
        if remaining <= 0:
            raise ProviderError(
                "transient", f"discovery took longer than {self.budget:g} s in all; stopped before {what} at {url}"
            )
        wait = min(self.timeout, remaining)
        allowed = min(remaining, 2 * self.timeout)
        try:
            headers = {"Accept-Encoding": "identity", **kwargs.pop("headers", {})}
            response = self.session.request(
                method, url, timeout=wait, allow_redirects=False, stream=True, headers=headers, **kwargs
            )
            with response:
                body = self._read(response, started + allowed)
        except _TooSlow:
            raise ProviderError("transient", f"{what} at {url} took longer than {allowed:g} s to answer") from None
        except (requests.RequestException, urllib3.exceptions.HTTPError) as error:
            raise ProviderError(
                "transient", f"could not reach {what} at {url}: {clip(type(error).__name__ + ': ' + str(error))}"
            ) from error
        return Answer(response.status_code, response.headers, body)

    @staticmethod
    def _read(response: requests.Response, until: float) -> bytes | None:
        """The body, or None when it is larger than the limit; `_TooSlow` when it trickles on past `until`."""
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > MAX_DOCUMENT_BYTES:
            return None
        body = bytearray()
        while True:
            # read1 returns after one socket read, so a server dripping bytes cannot hold us past `until`.
            chunk = response.raw.read1(4096, decode_content=True)
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > MAX_DOCUMENT_BYTES:
                return None
            if time.monotonic() > until:
                raise _TooSlow


def _is_transient_status(status: int) -> bool:
    return status >= 500 or status == 429


def _address_kind(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """What makes `address` internal (a phrase), or None for a publicly routable one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 reaches 127.0.0.1
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (169.254.0.0/16, fe80::/10: cloud metadata services live there)"
    if address.is_multicast:
        return "a multicast address"
    if address.is_private:
        return "a private address (RFC 1918, fc00::/7 and other non-public ranges)"
    if not address.is_global:
        return "an address that is not publicly routable"
    return None


def _resolve(host: str, timeout: float) -> list[str]:
    """The addresses `host` resolves to, within `timeout` (getaddrinfo itself has no timeout: a thread waits for it).

    A failure or a timeout raises `ProviderError("transient")`: the request to that host would fail the same way."""
    outcome: list[Any] = []

    def lookup() -> None:
        try:
            outcome.append(socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
        except (OSError, UnicodeError) as error:
            outcome.append(error)

    worker = threading.Thread(target=lookup, name="discovery-resolve", daemon=True)
    worker.start()
    worker.join(timeout)
    if not outcome:
        raise ProviderError("transient", f"resolving {clip(host, 200)} took longer than {timeout:g} s")
    if isinstance(outcome[0], Exception):
        raise ProviderError("transient", f"could not resolve {clip(host, 200)}: {clip(str(outcome[0]))}")
    return [str(info[4][0]) for info in outcome[0]]


def internal_address_problem(host: str, *, timeout: float) -> str | None:
    """Why `host` is no place a remote downstream's metadata may send the proxy (blind SSRF), or None.

    Refused: loopback (urls.is_loopback_host, the one definition), then any IP literal or resolved address that is
    loopback, private, link-local, unspecified, multicast or otherwise not publicly routable. A name is resolved (as
    the request would) and refused when ANY of its addresses is internal; a spelling only the resolver reads as an
    address (`127.1`, `2130706433`) is resolved too. An IPv6 zone id is refused outright. DNS may answer differently
    at the request (rebinding): this stops a metadata document that names an internal host, not a hostile resolver.
    """
    host = host.lower().strip("[]")
    if "%" in host:
        return "has an IPv6 zone id, which only names an interface of this machine"
    if is_loopback_host(host):
        return "is a loopback host"
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = [ipaddress.ip_address(address.split("%")[0]) for address in _resolve(host, timeout)]
    for address in addresses:
        kind = _address_kind(address)
        if kind is not None:
            return f"is {kind}" if str(address) == host else f"resolves to {address}, {kind}"
    return None


class PublicAddressGuard:
    """Keeps discovery of a remote downstream on public addresses.

    The downstream's metadata names the URLs the proxy then calls: GETs for metadata, a registration, token requests
    carrying users' codes, revocations carrying users' tokens. When the operator's downstream URL is not on loopback,
    a URL there on an internal address is refused (ProviderError "misconfigured"), except on the downstream's own host,
    which the operator chose. A downstream that is itself on an internal address (loopback in tests and local setups,
    a private network inside a company, where its authorization server is internal too) may name anything, as
    before: the guard is for a downstream on the public internet, which is not the operator's to trust."""

    def __init__(self, downstream_url: str, *, timeout: float):
        self.timeout = timeout
        self.own_host = (urlsplit(downstream_url).hostname or "").lower()
        self._problems: dict[str, str | None] = {}
        try:
            self.active = not is_loopback_url(downstream_url) and (
                internal_address_problem(self.own_host, timeout=timeout) is None
            )
        except ProviderError:
            self.active = True  # the downstream's name does not resolve now: its walk fails anyway; guard it meanwhile

    def problem(self, url: str) -> str | None:
        """Why the proxy may not call `url` for this downstream, or None (one resolution per host per walk)."""
        if not self.active:
            return None
        try:
            host = (split_url(url).hostname or "").lower()
        except MalformedURL:
            return "is not a well-formed URL"
        if host == self.own_host:
            return None
        if host not in self._problems:
            found = internal_address_problem(host, timeout=self.timeout)
            self._problems[host] = (
                None
                if found is None
                else (
                    f"names a host that {found}: the downstream {self.own_host} is not on loopback, so its metadata may "
                    "not send the proxy (with users' codes and tokens) to an internal address"
                )
            )
        return self._problems[host]


def _secure_url_problem(
    url: object, plain_origin: str | None = None, guard: PublicAddressGuard | None = None
) -> str | None:
    """Why `url` may not be fetched or sent to: https, or http on loopback (OAuth 2.1 §1.5); absolute; bounded; not
    internal when `guard` says the downstream is remote.

    `plain_origin`: an origin where plain http is accepted too (the downstream's own, which the operator chose: the
    MCP traffic goes there the same way)."""
    if not isinstance(url, str) or not url:
        return "is not a URL"
    if len(url) > MAX_URL_LENGTH:
        return f"is longer than {MAX_URL_LENGTH} characters"
    try:
        parts = split_url(url)
    except MalformedURL:
        return "is not a well-formed URL"
    if "@" in parts.netloc or "#" in url:
        return "contains a user name, a password or a fragment"
    if not discovery.is_secure_url(url) and not (parts.scheme == "http" and _origin(url) == plain_origin):
        return "is not an https URL (plain http only on a loopback host)"
    return guard.problem(url) if guard is not None else None


# -- discovery ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscoveredAuthorization:
    """Where a downstream sends its users to sign in, as its metadata says."""

    downstream_url: str
    #: The protected resource metadata's `resource`: what tokens are asked for (RFC 8707 `resource`).
    resource: str
    resource_metadata_url: str
    #: The protected resource's `scopes_supported` (none: the authorization request names no scope).
    scopes: tuple[str, ...]
    issuer: str
    metadata: dict[str, Any]
    metadata_url: str

    @property
    def registration_endpoint(self) -> str | None:
        value = self.metadata.get("registration_endpoint")
        return value if isinstance(value, str) and value else None

    @property
    def takes_client_metadata_documents(self) -> bool:
        return self.metadata.get("client_id_metadata_document_supported") is True


def discover_authorization(
    downstream_url: str, *, timeout: float, ca_bundle: str | None, http: BoundedHttp | None = None
) -> DiscoveredAuthorization:
    """Walk the MCP discovery chain from `downstream_url` to its authorization server's metadata, checking each step.

    Raises `ProviderError`: `transient` when the downstream or a server cannot be reached or answers 5xx (retry
    later), `misconfigured` with what is wrong and where otherwise."""
    own = http is None
    http = http or BoundedHttp(timeout=timeout, ca_bundle=ca_bundle, budget=BUDGET_TIMEOUTS * timeout)
    guard = PublicAddressGuard(downstream_url, timeout=http.timeout)
    try:
        challenge_url, first_answer = _challenge(http, downstream_url, guard)
        document, resource_metadata_url = _protected_resource_metadata(
            http, downstream_url, challenge_url, first_answer
        )
        resource = document["resource"]
        if not resource_covers(resource, downstream_url):
            raise ProviderError(
                "misconfigured",
                f"the protected resource metadata at {resource_metadata_url} describes the resource "
                f"{clip(resource, 200)!r}, not the downstream {downstream_url} (RFC 9728 §3.3: a client must not use "
                "it): set the route's url to the URL the MCP server calls itself, or fix the server's resource URL",
            )
        issuer = _first_authorization_server(document, resource_metadata_url, guard)
        scopes = _scopes(document, resource_metadata_url)
        metadata, metadata_url = _authorization_server_metadata(http, issuer, guard)
        return DiscoveredAuthorization(
            downstream_url=downstream_url,
            resource=resource,
            resource_metadata_url=resource_metadata_url,
            scopes=scopes,
            issuer=issuer,
            metadata=metadata,
            metadata_url=metadata_url,
        )
    finally:
        if own:
            http.close()


def _challenge(http: BoundedHttp, downstream_url: str, guard: PublicAddressGuard) -> tuple[str | None, str]:
    """POST an unauthenticated `initialize`: the challenge's resource_metadata URL (or None), and how it answered."""
    answer = http.request(
        "POST",
        downstream_url,
        "the downstream MCP server",
        json=INITIALIZE,
        headers={
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
            "MCP-Protocol-Version": MCP_PROTOCOL_VERSION,
        },
    )
    if _is_transient_status(answer.status):
        raise ProviderError(
            "transient", f"the downstream MCP server at {downstream_url} answered HTTP {answer.status}; try again"
        )
    if answer.status < 300 and answer.headers.get("Mcp-Session-Id"):
        _end_session(http, downstream_url, answer.headers["Mcp-Session-Id"])
    described = f"answered an unauthenticated initialize with HTTP {answer.status}"
    if answer.status not in (401, 403):
        return None, described
    challenge = answer.headers.get("WWW-Authenticate", "")
    url = bearer_parameter(challenge, "resource_metadata")
    if url is None:
        return None, described + " without a Bearer resource_metadata challenge"
    problem = _secure_url_problem(url, plain_origin=_origin(downstream_url))
    if problem is not None:
        return None, described + f" naming resource_metadata {clip(url, 200)!r}, which {problem}"
    problem = guard.problem(url)
    if problem is not None:
        raise ProviderError(
            "misconfigured", f"the downstream {described} naming resource_metadata {clip(url, 200)!r}, which {problem}"
        )
    return url, described


def _end_session(http: BoundedHttp, downstream_url: str, session_id: str) -> None:
    """A downstream that let the probe in opened a session for it: close it (best effort)."""
    try:
        http.request("DELETE", downstream_url, "the downstream MCP server", headers={"Mcp-Session-Id": session_id})
    except ProviderError:
        pass


def _protected_resource_metadata(
    http: BoundedHttp, downstream_url: str, challenge_url: str | None, first_answer: str
) -> tuple[dict[str, Any], str]:
    """The first usable protected resource metadata: the challenge's URL, then the well-known ones (MCP 2025-11-25)."""
    candidates = [challenge_url] if challenge_url else []
    candidates += [url for url in protected_resource_metadata_urls(downstream_url) if url not in candidates]
    tried: list[str] = []
    transient = False
    for url in candidates:
        answer = http.request("GET", url, "the protected resource metadata", headers=_metadata_headers())
        if answer.status != 200:
            transient = transient or _is_transient_status(answer.status)
            tried.append(f"{url} (HTTP {answer.status})")
            continue
        document, reason = answer.json_object()
        if document is not None and not isinstance(document.get("resource"), str):
            document, reason = None, "names no resource"
        if document is None:
            tried.append(f"{url} ({reason})")
            continue
        return document, url
    raise ProviderError(
        "transient" if transient else "misconfigured",
        f"the downstream MCP server at {downstream_url} {first_answer}, and no protected resource metadata "
        f'(RFC 9728) was found: tried {", ".join(tried)}. A route with oauth = "discover" needs a server that does '
        "MCP authorization itself",
    )


def _metadata_headers() -> dict[str, str]:
    return {"Accept": "application/json", "MCP-Protocol-Version": MCP_PROTOCOL_VERSION}


def _first_authorization_server(document: Mapping[str, Any], source: str, guard: PublicAddressGuard) -> str:
    servers = document.get("authorization_servers")
    if not isinstance(servers, list) or not servers or not isinstance(servers[0], str):
        raise ProviderError(
            "misconfigured",
            f"the protected resource metadata at {source} names no authorization server (authorization_servers)",
        )
    issuer: str = servers[0]
    problem = _secure_url_problem(issuer, guard=guard)
    if problem is not None:
        raise ProviderError(
            "misconfigured",
            f"the protected resource metadata at {source} names the authorization server {clip(issuer, 200)!r}, "
            f"which {problem}",
        )
    return issuer


def _scopes(document: Mapping[str, Any], source: str) -> tuple[str, ...]:
    scopes = document.get("scopes_supported")
    if scopes is None:
        return ()
    if (
        not isinstance(scopes, list)
        or len(scopes) > MAX_SCOPES
        or not all(isinstance(s, str) and len(s) <= MAX_SCOPE_LENGTH and _SCOPE_TOKEN.match(s) for s in scopes)
    ):
        raise ProviderError(
            "misconfigured",
            f"the protected resource metadata at {source} has a scopes_supported that is not a list of at most "
            f"{MAX_SCOPES} scope names (RFC 6749 §3.3)",
        )
    return tuple(dict.fromkeys(scopes))


def _authorization_server_metadata(
    http: BoundedHttp, issuer: str, guard: PublicAddressGuard
) -> tuple[dict[str, Any], str]:
    tried: list[str] = []
    transient = False
    for url in authorization_server_metadata_urls(issuer):
        answer = http.request("GET", url, "the authorization server's metadata", headers=_metadata_headers())
        if answer.status != 200:
            transient = transient or _is_transient_status(answer.status)
            tried.append(f"{url} (HTTP {answer.status})")
            continue
        metadata, reason = answer.json_object()
        if metadata is None:
            tried.append(f"{url} ({reason})")
            continue
        _check_authorization_server(metadata, url, issuer, guard)
        return metadata, url
    raise ProviderError(
        "transient" if transient else "misconfigured",
        f"could not load the metadata of the authorization server {issuer} (RFC 8414, OpenID Connect Discovery): "
        f"tried {', '.join(tried)}",
    )


def _check_authorization_server(
    metadata: Mapping[str, Any], source: str, issuer: str, guard: PublicAddressGuard
) -> None:
    named = metadata.get("issuer")
    if not isinstance(named, str) or named.rstrip("/") != issuer.rstrip("/"):
        # RFC 8414 §3.3: another server's metadata (a mix-up attack, or a misconfigured proxy in front).
        raise ProviderError(
            "misconfigured",
            f"{source} names the issuer {clip(str(named), 200)!r}, not {issuer} (RFC 8414 §3.3: it must not be used)",
        )
    methods = metadata.get("code_challenge_methods_supported")
    if not isinstance(methods, list) or "S256" not in methods:
        raise ProviderError(
            "misconfigured",
            f"the authorization server {issuer} does not list S256 in code_challenge_methods_supported ({source}): "
            "MCP requires PKCE S256, and the proxy signs no one in without it",
        )
    discovery.check_metadata(metadata, source)
    # Every URL the provider may call (userinfo and jwks_uri too) or send the browser to.
    for key in (
        "issuer",
        "authorization_endpoint",
        "token_endpoint",
        "revocation_endpoint",
        "registration_endpoint",
        "userinfo_endpoint",
        "jwks_uri",
    ):
        value = metadata.get(key)
        problem = None if value is None else _secure_url_problem(value, guard=guard)
        if problem is not None:
            raise ProviderError("misconfigured", f"{source}: {key} {clip(str(value), 200)!r} {problem}")


# -- the proxy's identity at the authorization server ---------------------------------------------------------------


def client_metadata_document_url(settings: Settings) -> str | None:
    """The proxy's client id at servers that take client metadata documents: only an https URL can be one."""
    return settings.public_url + CLIENT_METADATA_PATH if settings.public_url.startswith("https://") else None


def client_metadata(settings: Settings) -> dict[str, Any]:
    """What the proxy says about itself as a client: in its metadata document and in a dynamic registration.

    A public client (no secret: it proves itself with PKCE) whose one redirect URI is the connect callback. No
    `scope`: a resource server's scopes are often unknown to its authorization server's registration endpoint, which
    then refuses the registration (oidc-provider does); the authorization request names them instead."""
    host = urlsplit(settings.public_url).netloc
    return {
        "client_name": f"oauthproxy at {host}",
        "client_uri": settings.public_url,
        "redirect_uris": [settings.public_url + CONNECT_CALLBACK_PATH],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }


def client_metadata_document_view() -> Response:
    """GET /connect/client-metadata.json: the document whose URL is the proxy's client id (CIMD draft §3)."""
    settings: Settings = current_app.config["SETTINGS"]
    document = {"client_id": settings.public_url + CLIENT_METADATA_PATH, **client_metadata(settings)}
    response = jsonify(document)
    response.headers["Cache-Control"] = f"public, max-age={CLIENT_METADATA_MAX_AGE}"
    return response


@dataclass(frozen=True)
class ClientIdentity:
    """Who the proxy is at a downstream's authorization server."""

    client_id: str
    client_secret: str = ""
    token_endpoint_auth_method: str = "none"
    source: Literal["stored", "metadata_document", "registered"] = "registered"


def registration_key(route_name: str, issuer: str) -> str:
    """The stored registration's key: one per route and authorization server (client ids are per server)."""
    return hash_token(f"{route_name}\n{issuer}")


def _secret_aad(key_hash: str) -> str:
    return f"downstream-registration:{key_hash}:client_secret"


def _stored_row(route_name: str, issuer: str) -> Row[Any] | None:
    """The stored registration's row, read on a connection of its own: the caller's ORM session is left as it was."""
    with db.engine.connect() as connection:
        return connection.execute(
            select(REGISTRATIONS).where(REGISTRATIONS.c.key_hash == registration_key(route_name, issuer))
        ).first()


def _stored_identity(row: Row[Any] | None, route_name: str, redirect_uri: str | None) -> ClientIdentity | None:
    """A stored registration, when it is still usable: it lists the current callback (PUBLIC_URL may have changed
    since) and its secret opens under the current keys."""
    if row is None:
        return None
    try:
        registered = json.loads(row.metadata_json or "{}")
    except ValueError:
        registered = None
    if not isinstance(registered, dict):
        registered = {}
    redirect_uris = registered.get("redirect_uris")
    if redirect_uri is not None and isinstance(redirect_uris, list) and redirect_uri not in redirect_uris:
        log.info("route %s: the registration at %s predates the callback %s", route_name, row.issuer, redirect_uri)
        return None
    secret = ""
    if row.client_secret:
        try:
            secret = components().secret_box.decrypt(row.client_secret, _secret_aad(row.key_hash))
        except DecryptionError as error:
            log.warning(
                "route %s: the client secret stored for %s cannot be opened (%s)", route_name, row.issuer, error
            )
            return None
    return ClientIdentity(
        client_id=row.client_id,
        client_secret=secret,
        token_endpoint_auth_method=_auth_method(registered.get("token_endpoint_auth_method"), secret),
        source="stored",
    )


def stored_registration(route_name: str, issuer: str, redirect_uri: str) -> ClientIdentity | None:
    """The registration stored for this route and server, when it is still usable."""
    return _stored_identity(_stored_row(route_name, issuer), route_name, redirect_uri)


def _auth_method(method: object, secret: str) -> str:
    if isinstance(method, str) and method in _TOKEN_AUTH_METHODS and (method == "none") == (not secret):
        return method
    return "client_secret_basic" if secret else "none"


def register_client(
    http: BoundedHttp, found: DiscoveredAuthorization, settings: Settings
) -> tuple[ClientIdentity, dict[str, Any]]:
    """Dynamic client registration (RFC 7591 §3) at the server's registration endpoint: the identity, and the
    registration response without its secrets."""
    endpoint = found.registration_endpoint
    assert endpoint is not None
    body = client_metadata(settings)
    answer = http.request(
        "POST",
        endpoint,
        "the authorization server's registration endpoint",
        json=body,
        headers={"Accept": "application/json", "Content-Type": "application/json"},
    )
    response, reason = answer.json_object()
    if answer.status not in (200, 201):
        detail = ""
        if response is not None and isinstance(response.get("error"), str):
            detail = f": {clip(response['error'], 100)}"
            if isinstance(response.get("error_description"), str):
                detail += f" ({clip(response['error_description'], 200)})"
        kind: ErrorKind = "transient" if _is_transient_status(answer.status) else "misconfigured"
        raise ProviderError(kind, f"registering the proxy at {endpoint} failed with HTTP {answer.status}{detail}")
    if response is None:
        raise ProviderError("misconfigured", f"the registration endpoint {endpoint} answered with a body {reason}")
    client_id = response.get("client_id")
    if not isinstance(client_id, str) or not client_id or len(client_id) > MAX_URL_LENGTH:
        raise ProviderError(
            "misconfigured", f"the registration endpoint {endpoint} answered without a usable client_id"
        )
    secret = response.get("client_secret")
    secret = secret if isinstance(secret, str) else ""
    kept = {key: value for key, value in response.items() if key not in _SECRET_FIELDS}
    # RFC 7591 §3.2.1 echoes the registered metadata; a server that does not still registered our callback.
    kept.setdefault("redirect_uris", body["redirect_uris"])
    identity = ClientIdentity(
        client_id=client_id,
        client_secret=secret,
        token_endpoint_auth_method=_auth_method(response.get("token_endpoint_auth_method"), secret),
        source="registered",
    )
    return identity, kept


def store_registration(
    route_name: str, issuer: str, identity: ClientIdentity, registered: Mapping[str, Any], *, replace: bool
) -> ClientIdentity:
    """Keep a registration for every worker and restart. Two workers that registered at once: the first insert wins,
    the others use it (their own registrations stay unused at the server). `replace`: over a stale stored one."""
    key_hash = registration_key(route_name, issuer)
    sealed = (
        components().secret_box.encrypt(identity.client_secret, _secret_aad(key_hash))
        if identity.client_secret
        else None
    )
    values = {
        "route": route_name,
        "issuer": issuer,
        "client_id": identity.client_id,
        "client_secret": sealed,
        "metadata_json": json.dumps(dict(registered)),
    }
    try:
        # A short transaction of its own, as mcp_sessions does: the request's ORM session has nothing to do with it.
        with db.engine.begin() as connection:
            if replace:
                connection.execute(delete(REGISTRATIONS).where(REGISTRATIONS.c.key_hash == key_hash))
            connection.execute(insert(REGISTRATIONS).values(key_hash=key_hash, **values))
    except IntegrityError:
        # Another worker stored its registration first: use that one, so that every worker is one client.
        row = _stored_row(route_name, issuer)
        # (registered a moment ago with the same settings: no need to check its callback)
        return _stored_identity(row, route_name, None) or identity
    return identity


def _requested_scopes(found: DiscoveredAuthorization) -> tuple[str, ...]:
    """The protected resource's scopes, plus `offline_access` when the server lists it (how many servers decide to
    issue a refresh token: the MCP SDKs ask for it the same way, SEP-2207)."""
    supported = found.metadata.get("scopes_supported")
    if found.scopes and isinstance(supported, list) and OFFLINE_ACCESS in supported:
        return tuple(dict.fromkeys([*found.scopes, OFFLINE_ACCESS]))
    return found.scopes


def client_identity(
    route: Route, found: DiscoveredAuthorization, settings: Settings, http: BoundedHttp
) -> ClientIdentity:
    """The proxy's identity at the server, in MCP's order (2025-11-25, "Client Registration Approaches"): a
    registration stored from before, else the client metadata document, else dynamic registration (stored)."""
    row = _stored_row(route.name, found.issuer)
    stored = _stored_identity(row, route.name, settings.public_url + CONNECT_CALLBACK_PATH)
    if stored is not None:
        return stored
    document_url = client_metadata_document_url(settings)
    if found.takes_client_metadata_documents and document_url:
        return ClientIdentity(client_id=document_url, source="metadata_document")
    if found.registration_endpoint is None:
        raise ProviderError("misconfigured", _no_identity(found, settings))
    identity, registered = register_client(http, found, settings)
    log.info("route %s: registered the proxy at %s as client %s", route.name, found.issuer, identity.client_id)
    return store_registration(route.name, found.issuer, identity, registered, replace=row is not None)


def _no_identity(found: DiscoveredAuthorization, settings: Settings) -> str:
    if found.takes_client_metadata_documents:
        why = (
            f"it takes client metadata documents, but PUBLIC_URL ({settings.public_url}) is not https, and a "
            "document's URL must be"
        )
    else:
        why = "it advertises no client_id_metadata_document_supported"
    return (
        f"the authorization server {found.issuer} offers the proxy no way to identify itself: its metadata "
        f"({found.metadata_url}) has no registration_endpoint (RFC 7591 dynamic registration), and {why}"
    )


def identity_plan(
    route: Route, found: DiscoveredAuthorization, settings: Settings
) -> tuple[ClientIdentity | None, str]:
    """How the proxy would identify itself at the server, without registering (for `oauthproxy check`): the identity
    when it has one already (stored, or its metadata document), and the words for it. Raises
    `ProviderError("misconfigured")` when it could not."""
    redirect_uri = settings.public_url + CONNECT_CALLBACK_PATH
    stored = stored_registration(route.name, found.issuer, redirect_uri)
    if stored is not None:
        return stored, f"as the client {stored.client_id} it registered before"
    document_url = client_metadata_document_url(settings)
    if found.takes_client_metadata_documents and document_url:
        return ClientIdentity(
            document_url, source="metadata_document"
        ), f"with its client metadata document {document_url}"
    if found.registration_endpoint is None:
        raise ProviderError("misconfigured", _no_identity(found, settings))
    return (
        None,
        f"by registering at {found.registration_endpoint} on first use (RFC 7591; the client id is then stored)",
    )


# -- the provider ---------------------------------------------------------------------------------------------------


class DiscoveredProvider(OAuthProvider):
    """A downstream's authorization server found by MCP discovery: plain OAuth 2.1 with PKCE (no ID token, nobody is
    identified by it), endpoints from the metadata as discovered, and `resource` on refreshes too (RFC 8707 §2.2)."""

    name = "mcp"
    default_scopes: tuple[str, ...] = ()

    def __init__(self, settings: ConnectionProviderSettings, found: DiscoveredAuthorization, identity: ClientIdentity):
        super().__init__(
            settings,
            timeout=settings.provider_http_timeout,
            token_endpoint_auth_method=identity.token_endpoint_auth_method,
        )
        self.discovered = found
        self.identity = identity
        self.metadata_url = found.metadata_url

    def _discover(self) -> dict[str, Any]:
        return dict(self.discovered.metadata)

    def _authorize_params(self, scopes: list[str]) -> dict[str, str]:
        # RFC 8707 §2.1: the token is for the downstream, whoever builds the request (the connect step, the check).
        params = {"resource": self.discovered.resource}
        if OFFLINE_ACCESS in scopes:
            # OIDC Core §11: without prompt=consent an OpenID provider must ignore offline_access (as the MCP SDKs do).
            params["prompt"] = "consent"
        return params

    def _refresh_params(self, scopes: list[str] | None) -> dict[str, str]:
        return {"resource": self.discovered.resource}


def build_discovered_provider(
    route: Route, found: DiscoveredAuthorization, identity: ClientIdentity, settings: Settings
) -> ConnectionProvider:
    """The route's ConnectionProvider for what discovery found. No network."""
    scopes = _requested_scopes(found)
    provider_settings = ConnectionProviderSettings(
        oauth_client_id=identity.client_id,
        oauth_client_secret=identity.client_secret,
        oauth_authorize_url=str(found.metadata["authorization_endpoint"]),
        oauth_token_url=None,
        oauth_userinfo_url=None,
        upstream_scopes=scopes,
        ca_bundle=settings.ca_bundle,
        github_api_url=None,
        provider_http_timeout=settings.provider_http_timeout,
    )
    provider = DiscoveredProvider(provider_settings, found, identity)
    provider.registration_name = f"connection_{route.name}"
    resource = {"resource": found.resource}
    return ConnectionProvider(
        provider=provider,
        scopes=scopes,
        authorize_params=dict(resource),
        token_params=dict(resource),
        display_name=provider.display_name,
        issuer=found.issuer,
    )


# -- per app and route, once -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Outcome:
    result: ConnectionProvider | None
    error: ProviderError | None
    until: float  # monotonic; inf for a success


class Discoveries:
    """What each route's discovery produced in this process, and one lock per route so that one request walks the
    chain while the others wait for its result (bounded: the walk has a budget)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._outcomes: dict[str, _Outcome] = {}
        self._locks: dict[str, threading.Lock] = {}

    def outcome(self, route_name: str) -> _Outcome | None:
        with self._guard:
            outcome = self._outcomes.get(route_name)
            if outcome is not None and outcome.until < time.monotonic():
                del self._outcomes[route_name]
                return None
            return outcome

    def remember(self, route_name: str, outcome: _Outcome) -> None:
        with self._guard:
            self._outcomes[route_name] = outcome

    def forget(self, route_name: str) -> None:
        with self._guard:
            self._outcomes.pop(route_name, None)

    @contextmanager
    def walking(self, route_name: str, timeout: float) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(route_name, threading.Lock())
        if not lock.acquire(timeout=timeout):
            raise ProviderError("transient", f"finding the authorization server of route {route_name} takes too long")
        try:
            yield
        finally:
            lock.release()


def init_downstream_discovery(app: Flask) -> None:
    """Serve the proxy's client metadata document, and give the app its discovery cache."""
    app.extensions[_EXTENSION] = Discoveries()
    app.add_url_rule(CLIENT_METADATA_PATH, "client_metadata_document", client_metadata_document_view, methods=["GET"])


def _discoveries(app: Flask) -> Discoveries:
    discoveries = app.extensions.get(_EXTENSION)
    if discoveries is None:
        discoveries = app.extensions.setdefault(_EXTENSION, Discoveries())
    return cast(Discoveries, discoveries)


def _answer(outcome: _Outcome) -> ConnectionProvider:
    if outcome.error is not None:
        raise outcome.error
    assert outcome.result is not None
    return outcome.result


def discover_connection_provider(route: Route) -> ConnectionProvider:
    """The route's downstream authorization server, found by MCP discovery on first use and kept by this process.

    Raises `ProviderError` (`transient`: retry later, 503; `misconfigured`: the operator must act), remembered for
    FAILURE_TTL seconds."""
    app = current_application()
    discoveries = _discoveries(app)
    outcome = discoveries.outcome(route.name)
    if outcome is not None:
        return _answer(outcome)
    settings: Settings = app.config["SETTINGS"]
    budget = BUDGET_TIMEOUTS * settings.provider_http_timeout
    with discoveries.walking(route.name, timeout=budget + 5):
        outcome = discoveries.outcome(route.name)
        if outcome is not None:  # found while this request waited for the lock
            return _answer(outcome)
        http = BoundedHttp(timeout=settings.provider_http_timeout, ca_bundle=settings.ca_bundle, budget=budget)
        try:
            found = discover_authorization(
                route.downstream_url, timeout=settings.provider_http_timeout, ca_bundle=settings.ca_bundle, http=http
            )
            identity = client_identity(route, found, settings, http)
        except ProviderError as error:
            log.warning("route %s: %s", route.name, error.description)
            discoveries.remember(route.name, _Outcome(None, error, time.monotonic() + FAILURE_TTL))
            raise
        finally:
            http.close()
        result = build_discovered_provider(route, found, identity, settings)
        result.provider.init_app(app)
        log.info(
            "route %s: the downstream's authorization server is %s (client %s, %s)",
            route.name,
            found.issuer,
            identity.client_id,
            identity.source.replace("_", " "),
        )
        discoveries.remember(route.name, _Outcome(result, None, float("inf")))
        return result


def forget_discovery(route_name: str, app: Flask | None = None) -> None:
    """Walk the chain again on next use (a failure remembered, or a server that changed)."""
    _discoveries(app or current_application()).forget(route_name)


def forget_registration(route: Route, issuer: str) -> None:
    """Drop the stored registration (the server answered `invalid_client`: it no longer knows the proxy) and the
    cached discovery, so that the next use registers again."""
    with db.engine.begin() as connection:
        connection.execute(
            delete(REGISTRATIONS).where(REGISTRATIONS.c.key_hash == registration_key(route.name, issuer))
        )
    forget_discovery(route.name)


__all__ = [
    "CLIENT_METADATA_PATH",
    "ClientIdentity",
    "DiscoveredAuthorization",
    "DiscoveredProvider",
    "bearer_parameter",
    "client_metadata",
    "discover_authorization",
    "discover_connection_provider",
    "forget_discovery",
    "forget_registration",
    "identity_plan",
    "init_downstream_discovery",
    "parse_challenges",
]
