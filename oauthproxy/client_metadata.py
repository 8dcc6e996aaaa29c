"""Client ID Metadata Documents: recognising URL client ids, fetching them SSRF-safely, validating and caching them."""

from __future__ import annotations

import copy
import ipaddress
import json
import logging
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import requests.utils
from urllib3 import BaseHTTPResponse, HTTPConnectionPool, HTTPSConnectionPool, Timeout
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ProtocolError
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import SSLError as Urllib3SSLError
from urllib3.exceptions import TimeoutError as Urllib3Timeout

from oauthproxy.metadata_limits import metadata_size_problem
from oauthproxy.urls import MalformedURL, is_loopback_host, redirect_uri_problem, split_url

MAX_CLIENT_ID_LENGTH = 2048
USER_AGENT = "oauthproxy-client-metadata-fetcher"

log = logging.getLogger(__name__)

# `getaddrinfo`-shaped: (host, port, family, type) -> [(family, type, proto, canonname, sockaddr), ...]
Resolver = Callable[..., list[tuple[Any, ...]]]

_DOT_SEGMENTS = frozenset({".", "..", "%2e", "%2e%2e", ".%2e", "%2e."})
_HOSTNAME_RE = re.compile(r"^[a-z0-9_.-]+$")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_FORBIDDEN_AUTH_METHODS = frozenset({"client_secret_basic", "client_secret_post", "client_secret_jwt"})


class ClientMetadataError(Exception):
    """A client id metadata document could not be used; `error` is the OAuth error code, `description` says why."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(description)
        self.error = error  # "invalid_client" (cannot fetch / not a document) or "invalid_client_metadata"
        self.description = description


def _client_id_problem(client_id: object, allow_private_networks: bool) -> str | None:
    """Why `client_id` is not a metadata document URL under the draft's rules, or None when it is one."""
    if not isinstance(client_id, str) or not client_id:
        return "it is empty"
    if len(client_id) > MAX_CLIENT_ID_LENGTH:
        return f"it is longer than {MAX_CLIENT_ID_LENGTH} characters"
    if not client_id.isascii() or any(c <= " " or c in "\x7f\\" for c in client_id):
        return "it contains spaces, control characters, backslashes or non-ASCII characters"
    try:
        parts = split_url(client_id)
    except MalformedURL:
        return "it is not a well-formed URL"
    if parts.scheme not in ("https", "http"):
        return "it is not an https URL"
    if "#" in client_id:
        return "it contains a fragment (#)"
    if "@" in parts.netloc:
        return "it contains a username or password"
    host = parts.hostname
    if not host:
        return "it has no host"
    if parts.netloc.startswith("[") or ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return "its host is not a valid IPv6 address"
    elif not _HOSTNAME_RE.match(host):
        return "its host is not a valid host name"
    if parts.path in ("", "/"):
        return "it has no path (the document must live at a URL with a path, not the site root)"
    if any(segment.lower() in _DOT_SEGMENTS for segment in parts.path.split("/")):
        return "its path contains a '.' or '..' segment"
    if parts.scheme == "http" and not (allow_private_networks and is_loopback_host(host)):
        if allow_private_networks:
            return "it uses http for a host that is not loopback (http is allowed only for localhost in development)"
        return "it is not an https URL"
    return None


def is_metadata_document_client_id(client_id: str, allow_private_networks: bool = False) -> bool:
    """True when `client_id` is a URL this server would fetch as a Client ID Metadata Document.

    That is an https URL with a non-root path, no fragment, no userinfo and no dot segments; with
    `allow_private_networks` (development only) also an http URL whose host is loopback.
    """
    return _client_id_problem(client_id, allow_private_networks) is None


def _address_problem(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why a connection to `address` could reach something non-public, or None for a public unicast address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded: tuple[str, ipaddress.IPv4Address | None] = ("", None)
        if address.ipv4_mapped is not None:
            embedded = ("IPv4-mapped", address.ipv4_mapped)
        elif address.sixtofour is not None:
            embedded = ("6to4", address.sixtofour)
        elif address.teredo is not None:
            embedded = ("Teredo", address.teredo[1])
        elif address in _NAT64:
            embedded = ("NAT64", ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
        kind, inner = embedded
        if inner is not None:
            inner_problem = _address_problem(inner)
            if inner_problem is not None:
                return f"the {kind} form of {inner}, {inner_problem}"
            if kind in ("IPv4-mapped", "NAT64"):
                return None  # the packets go to the embedded IPv4 address, which is public
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address (cloud metadata services live here)"
    if address.is_multicast:
        return "a multicast address"
    if address in _CGNAT:
        return "a carrier-grade NAT (100.64.0.0/10) address"
    if address.is_reserved:
        return "a reserved address"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "a site-local address"
    if address.is_private:
        return "a private-network address"
    if not address.is_global:
        return "not a globally routable address"
    return None


def _pinned_pool(
    scheme: str, address: str, port: int, host: str, timeout: float, ca_bundle: str | None
) -> HTTPConnectionPool:
    """A connection pool whose connections go to `address`, one vetted beforehand, for the URL host `host`.

    Only the socket's destination is the address: the TLS SNI name and the certificate check are the host's
    (`server_hostname`, `assert_hostname`), so TLS is verified against the name, not the IP; the caller sends the
    host's Host header. Because the name is never looked up a second time, a DNS answer that changes between the
    SSRF check and the connection (DNS rebinding) cannot redirect the request. Built per fetch and address, so the
    pinned address of one fetch can never serve another.
    """
    options: dict[str, Any] = {"timeout": Timeout(connect=timeout, read=timeout), "maxsize": 1, "retries": False}
    if scheme != "https":
        return HTTPConnectionPool(address, port, **options)
    return HTTPSConnectionPool(
        address,
        port,
        server_hostname=host,
        assert_hostname=host,
        cert_reqs="CERT_REQUIRED",
        ca_certs=ca_bundle or requests.utils.DEFAULT_CA_BUNDLE_PATH,  # CA_BUNDLE, else what requests trusts (certifi)
        **options,
    )


def _host_header(scheme: str, host: str, port: int) -> str:
    """The Host header an HTTP client sends for the URL (RFC 9112 §3.2): the port only when it is not the default."""
    name = f"[{host}]" if ":" in host else host
    return name if port == (443 if scheme == "https" else 80) else f"{name}:{port}"


@dataclass(frozen=True)
class _CacheEntry:
    expires_at: float
    document: dict[str, Any] | None = None
    error: ClientMetadataError | None = None


def _parse_http_date(value: str) -> datetime | None:
    try:
        parsed = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _root_cause(exc: BaseException) -> str:
    """The underlying reason for a urllib3 error, without its wrappers."""
    cause: BaseException = exc
    if isinstance(cause, NewConnectionError) and isinstance(cause.__cause__, OSError):
        cause = cause.__cause__
    elif isinstance(cause, Urllib3SSLError) and cause.args and isinstance(cause.args[0], BaseException):
        cause = cause.args[0]
    return str(cause)


def validate_metadata_document(
    client_id: str, document: object, private_use_schemes: frozenset[str] | None = None
) -> dict[str, Any]:
    """Check a parsed document against the rules for a metadata document fetched from `client_id`.

    Its redirect URIs follow exactly the rules of dynamic registration (`urls.redirect_uri_problem`).
    """

    def invalid(problem: str) -> ClientMetadataError:
        return ClientMetadataError("invalid_client_metadata", f"The client metadata document at {client_id} {problem}.")

    if not isinstance(document, dict):
        raise ClientMetadataError(
            "invalid_client", f"The client metadata document at {client_id} is JSON but not a JSON object."
        )
    if document.get("client_id") != client_id:
        raise invalid(
            f"has client_id {document.get('client_id')!r}; it must be exactly the document's URL {client_id!r}"
        )
    redirect_uris = document.get("redirect_uris")
    if not isinstance(redirect_uris, list) or not redirect_uris:
        raise invalid("has no redirect_uris; it must list at least one redirect URI")
    for uri in redirect_uris:
        problem = redirect_uri_problem(uri, private_use_schemes)
        if problem is not None:
            raise invalid(f"lists redirect URI {uri!r}, which {problem}")
    client_name = document.get("client_name")
    if not isinstance(client_name, str) or not client_name.strip():
        raise invalid("has no client_name; it must name the client so the user can recognise it on the consent page")
    for secret_field in ("client_secret", "client_secret_expires_at"):
        if secret_field in document:
            raise invalid(
                f"contains {secret_field}; metadata documents describe public clients and must not carry shared secrets"
            )
    # The shapes RFC 7591 §2 gives these fields; the client model and the consent page take them as such.
    for name in ("grant_types", "response_types"):
        value = document.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
            raise invalid(f"has {name} of type {type(value).__name__}; it must be a list of strings")
    for name in ("token_endpoint_auth_method", "scope", "client_uri", "logo_uri"):
        value = document.get(name)
        if value is not None and not isinstance(value, str):
            raise invalid(f"has {name} of type {type(value).__name__}; it must be a string")
    method = document.get("token_endpoint_auth_method", "none")
    if method == "private_key_jwt":
        raise invalid(
            "asks for token_endpoint_auth_method private_key_jwt, which this server does not support; use none"
        )
    if method in _FORBIDDEN_AUTH_METHODS:
        raise invalid(
            f"asks for token_endpoint_auth_method {method}, a shared-secret method that metadata documents"
            " must not use; use none"
        )
    if method != "none":
        raise invalid(f"asks for token_endpoint_auth_method {method!r}; this server supports only none")
    size_problem = metadata_size_problem(document)
    if size_problem is not None:
        raise invalid(f"is refused: {size_problem}")
    return document


class ClientMetadataFetcher:
    """Fetches, validates and caches Client ID Metadata Documents; safe to share between threads."""

    def __init__(
        self,
        *,
        allow_private_networks: bool = False,
        private_use_redirect_schemes: frozenset[str] | None = None,
        timeout: float = 5.0,
        max_bytes: int = 5 * 1024,
        max_entries: int = 1024,
        default_ttl: int = 300,
        max_ttl: int = 24 * 3600,
        min_ttl: int = 60,
        failure_ttl: int = 30,
        resolver: Resolver = socket.getaddrinfo,
        clock: Callable[[], float] = time.monotonic,
        ca_bundle: str | None = None,
    ) -> None:
        self.allow_private_networks = allow_private_networks
        self.private_use_redirect_schemes = private_use_redirect_schemes
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        # Even `max-age=0` is cached min_ttl seconds, so one client cannot make us refetch on every request; a failure
        # to fetch is remembered failure_ttl seconds, to stop hammering a broken or hostile host.
        self.min_ttl = min_ttl
        self.failure_ttl = failure_ttl
        self._resolver = resolver
        self._clock = clock
        self._ca_bundle = ca_bundle  # a CA file to trust instead of the default bundle (tests, private PKI)
        self._cache: OrderedDict[str, _CacheEntry] = OrderedDict()
        self._lock = threading.Lock()

    def fetch(self, client_id: str) -> dict[str, Any]:
        """The validated metadata document at `client_id` (a copy); raises `ClientMetadataError`."""
        problem = _client_id_problem(client_id, self.allow_private_networks)
        if problem is not None:
            raise ClientMetadataError(
                "invalid_client", f"The client_id {client_id!r} is not a client metadata document URL: {problem}."
            )
        entry = self._cache_get(client_id)
        if entry is not None:
            if entry.error is not None:
                raise ClientMetadataError(entry.error.error, entry.error.description)
            return copy.deepcopy(entry.document)  # type: ignore[arg-type]
        try:
            body, headers = self._download(client_id)
            document = self._parse(client_id, body)
        except ClientMetadataError as exc:
            # Only failures to get a JSON document are remembered (briefly); a document that is wrong is
            # refetched next time, so its author sees a fix at once.
            self._cache_put(client_id, _CacheEntry(self._clock() + self.failure_ttl, error=exc))
            raise
        valid = validate_metadata_document(client_id, document, self.private_use_redirect_schemes)
        ttl = self._ttl_from_headers(headers)
        if ttl is not None:
            self._cache_put(client_id, _CacheEntry(self._clock() + ttl, document=copy.deepcopy(valid)))
        return valid

    def cached(self, client_id: str) -> dict[str, Any] | None:
        """The document as last fetched and still cached (a copy), without any request: for pages that list many
        clients (the admin page) and must not fetch each one's document to show it."""
        entry = self._cache_get(client_id)
        return copy.deepcopy(entry.document) if entry is not None and entry.document is not None else None

    # Cache

    def _cache_get(self, client_id: str) -> _CacheEntry | None:
        with self._lock:
            entry = self._cache.get(client_id)
            if entry is None:
                return None
            if entry.expires_at <= self._clock():
                del self._cache[client_id]
                return None
            self._cache.move_to_end(client_id)
            return entry

    def _cache_put(self, client_id: str, entry: _CacheEntry) -> None:
        with self._lock:
            self._cache[client_id] = entry
            self._cache.move_to_end(client_id)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)

    def _ttl_from_headers(self, headers: Mapping[str, str]) -> int | None:
        """Seconds to cache for: None for no-store/no-cache, else max-age (or Expires) clamped to [min_ttl, max_ttl].

        `no-cache` means "revalidate before every use"; without conditional requests that is the same as not
        caching. Anything shorter than min_ttl is raised to it so a client cannot make us refetch on every request.
        """
        directives: dict[str, str] = {}
        for part in headers.get("Cache-Control", "").split(","):
            name, _, value = part.strip().partition("=")
            if name:
                directives[name.strip().lower()] = value.strip().strip('"')
        if "no-store" in directives or "no-cache" in directives:
            return None
        ttl: int | None = None
        if "max-age" in directives:
            try:
                ttl = int(directives["max-age"])
            except ValueError:
                ttl = 0  # an unreadable max-age means stale (RFC 9111 section 4.2.1)
            try:
                ttl -= max(0, int(headers.get("Age", "0")))
            except ValueError:
                pass
        elif "Expires" in headers:
            expires = _parse_http_date(headers["Expires"])
            date = _parse_http_date(headers.get("Date", "")) or datetime.now(UTC)
            ttl = int((expires - date).total_seconds()) if expires is not None else 0
        if ttl is None:
            ttl = self.default_ttl
        return max(self.min_ttl, min(ttl, self.max_ttl))

    # Fetching

    def _vetted_addresses(self, client_id: str) -> list[str]:
        """Resolve the URL's host once and return its addresses, refusing any that is not public."""
        parts = urlsplit(client_id)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)

        # The reason a host is refused is logged, never told to the requester: "host x resolves to 10.0.0.7"
        # would let anyone map this server's internal DNS. Unresolvable and non-public read alike for the same reason.
        def refuse(
            detail: str, rule: str = "client metadata documents are fetched only from public addresses"
        ) -> ClientMetadataError:
            log.info("client metadata document host %s refused: %s", host, detail)
            return ClientMetadataError(
                "invalid_client",
                f"Refusing to fetch the client metadata document at {client_id}: host {host} does not resolve to an"
                f" address this server may fetch from ({rule}).",
            )

        try:
            infos = self._resolver(host, port, 0, socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise refuse(f"it does not resolve ({exc})") from exc
        addresses: list[str] = []
        for info in infos:
            address = str(info[4][0])
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise refuse("it has no addresses")
        for address in addresses:
            try:
                ip = ipaddress.ip_address(address)
            except ValueError:
                raise refuse(f"it resolved to {address!r}, which is not an IP address") from None
            if parts.scheme == "http":
                # Development mode only (see _client_id_problem): plain http must stay on this machine.
                if not is_loopback_host(address):
                    raise refuse(
                        f"it resolves to {address}, which is not loopback",
                        "http is allowed only for loopback addresses",
                    )
                continue
            if self.allow_private_networks:
                continue
            problem = _address_problem(ip)
            if problem is not None:
                raise refuse(f"it resolves to {address}, {problem}")
        return addresses

    def _download(self, client_id: str) -> tuple[bytes, Mapping[str, str]]:
        addresses = self._vetted_addresses(client_id)
        where = f"the client metadata document at {client_id}"
        deadline = time.monotonic() + 2 * self.timeout  # bounds a server that drips bytes under the read timeout
        pool: HTTPConnectionPool | None = None
        response: BaseHTTPResponse | None = None
        try:
            pool, response = self._get(client_id, addresses)
            if 300 <= response.status < 400:
                location = response.headers.get("Location", "")[:200]
                raise ClientMetadataError(
                    "invalid_client",
                    f"Cannot use {where}: the server answered with a redirect (HTTP {response.status}"
                    f" to {location!r}); the document must be served at the client_id URL itself, redirects"
                    " are not followed.",
                )
            if response.status != 200:
                raise ClientMetadataError(
                    "invalid_client",
                    f"Cannot fetch {where}: the server answered HTTP {response.status}, expected 200 with"
                    " the JSON document.",
                )
            return self._read_body(response, where, deadline), response.headers
        except ClientMetadataError:
            raise
        # Before the timeouts: urllib3's NewConnectionError (connection refused) is also a ConnectTimeoutError.
        except (NewConnectionError, ProtocolError) as exc:
            raise ClientMetadataError(
                "invalid_client",
                f"Cannot fetch {where}: could not connect to {urlsplit(client_id).hostname} ({_root_cause(exc)}).",
            ) from exc
        except (Urllib3Timeout, TimeoutError) as exc:
            raise ClientMetadataError(
                "invalid_client", f"Cannot fetch {where}: the server did not answer within {self.timeout:g} s."
            ) from exc
        except Urllib3SSLError as exc:
            raise ClientMetadataError(
                "invalid_client",
                f"Cannot fetch {where}: the TLS connection failed or the certificate is not valid for host"
                f" {urlsplit(client_id).hostname} ({_root_cause(exc)}).",
            ) from exc
        except (Urllib3Error, OSError) as exc:
            raise ClientMetadataError("invalid_client", f"Cannot fetch {where}: {_root_cause(exc)}.") from exc
        finally:
            if response is not None:
                response.close()
            if pool is not None:
                pool.close()

    def _get(self, client_id: str, addresses: list[str]) -> tuple[HTTPConnectionPool, BaseHTTPResponse]:
        """GET `client_id` from the first of `addresses` that accepts a connection; no proxy variables, no .netrc, no
        redirects, no retries: the request goes only where we vetted."""
        parts = urlsplit(client_id)
        host = parts.hostname or ""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        headers = {
            "Host": _host_header(parts.scheme, host, port),
            "Accept": "application/json",
            "Accept-Encoding": "identity",
            "User-Agent": USER_AGENT,
        }
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        error: Exception = ClientMetadataError("invalid_client", f"Cannot fetch {client_id}: no address to connect to.")
        for address in addresses:
            pool = _pinned_pool(parts.scheme, address, port, host, self.timeout, self._ca_bundle)
            try:
                return pool, pool.urlopen(
                    "GET", target, headers=headers, retries=False, redirect=False, preload_content=False
                )
            except (NewConnectionError, ConnectTimeoutError) as exc:  # nothing was sent: the next address may answer
                pool.close()
                error = exc
            except BaseException:
                pool.close()
                raise
        raise error

    def _read_body(self, response: BaseHTTPResponse, where: str, deadline: float) -> bytes:
        """The body, read in small pieces so that the size cap and the deadline apply while it streams in."""

        def too_large() -> ClientMetadataError:
            return ClientMetadataError(
                "invalid_client", f"Refusing {where}: it is larger than the {self.max_bytes}-byte limit."
            )

        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise too_large()
        body = bytearray()
        while True:
            # read1 returns after one socket read, so a server dripping bytes cannot hold us past the deadline.
            chunk = response.read1(4096, decode_content=True)
            if not chunk:
                return bytes(body)
            body += chunk
            if len(body) > self.max_bytes:
                raise too_large()
            if time.monotonic() > deadline:
                raise ClientMetadataError(
                    "invalid_client",
                    f"Cannot fetch {where}: the server took longer than {2 * self.timeout:g} s to send it.",
                )

    def _parse(self, client_id: str, body: bytes) -> object:
        try:
            return json.loads(body)
        except (ValueError, RecursionError):
            raise ClientMetadataError(
                "invalid_client", f"The client metadata document at {client_id} is not valid JSON."
            ) from None
