"""Forwarding rules: the headers passed or set either way, path confinement, query tokens, the downstream URL."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, unquote, unquote_plus, urlsplit, urlunsplit

from urllib3.response import HTTPResponse

from oauthproxy.downstream_credentials import Caller, credential_header_names, downstream_auth_headers
from oauthproxy.routes import Route

#: RFC 9110 §7.6.1: connection-specific fields, never forwarded (WSGI servers also refuse them from apps).
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
#: Client headers never forwarded: the client's token (no token passthrough, MCP P-6), headers the proxy sets
#: itself (Host: SDK servers answer 421 to a foreign one; X-Forwarded-*: a client must not choose them),
#: Origin (checked here; SDK servers answer 403 to a foreign one), and the body framing requests recomputes.
DROPPED_REQUEST_HEADERS = frozenset(
    {"host", "authorization", "origin", "content-length", "expect", "forwarded", "x-real-ip"}
)
#: Client headers other stacks trust for identity, the client address or the original URL, removed as the
#: X-Forwarded-* ones are: a downstream behind another proxy, or a framework that reads them, must not take a
#: client's word for who it is (Apache's and IIS's Remote-User, X-Original-URL and X-Rewrite-URL; CDN client
#: addresses).
IDENTITY_SPOOFING_HEADERS = frozenset(
    {
        "remote-user",
        "x-original-url",
        "x-rewrite-url",
        "x-original-uri",
        "true-client-ip",
        "cf-connecting-ip",
        "x-client-ip",
        "x-cluster-client-ip",
        "fastly-client-ip",
    }
)
#: The same, by prefix: X-Forwarded-* (ours to set), oauth2-proxy's X-Auth-Request-*, Kubernetes' and Apache's
#: X-Remote-*, Azure's X-MS-Client-Principal*, Google IAP's, AWS ALB's and Cloudflare Access's identity headers.
IDENTITY_SPOOFING_PREFIXES = (
    "x-forwarded-",
    "x-auth-request-",
    "x-remote-",
    "x-ms-client-principal",
    "x-goog-authenticated-user-",
    "x-amzn-oidc-",
    "cf-access-",
)
#: The WSGI server writes its own (date, server), and so does the proxy (x-accel-buffering, once, not twice).
DROPPED_RESPONSE_HEADERS = frozenset({"date", "server", "x-accel-buffering"})
_NEVER_FORWARDED = HOP_BY_HOP | DROPPED_REQUEST_HEADERS | IDENTITY_SPOOFING_HEADERS


def _without_cookies(value: str, names: frozenset[str]) -> str:
    return "; ".join(
        part.strip() for part in value.split(";") if part.strip() and part.split("=", 1)[0].strip() not in names
    )


#: Rounds of percent-decoding a path segment gets; a segment still encoded after this many is refused.
DECODING_ROUNDS = 4


class PathRefused(ValueError):
    """A request path that could reach the downstream outside its route's prefix, in some server's reading."""


def _fully_decoded(value: str, decode: Callable[[str], str] = unquote) -> str | None:
    """`value` percent-decoded until nothing changes, as a server that decodes again might read it; None when it
    still changes after DECODING_ROUNDS."""
    for _round in range(DECODING_ROUNDS):
        decoded = decode(value)
        if decoded == value:
            return value
        value = decoded
    return None


def _decoded_segment(segment: str) -> str:
    decoded = _fully_decoded(segment)
    if decoded is None:
        raise PathRefused("a path segment is percent-encoded too many times over")
    return decoded


def _check_segment(decoded: str) -> None:
    # Everything before a `;` (path parameters: Tomcat and Spring read `/..;x/` as `/../`); Windows servers drop
    # trailing dots and spaces, so `...` and `.. ` are dot segments too.
    if "." in decoded and not decoded.split(";", 1)[0].strip(" ."):
        raise PathRefused("the path may not contain . or .. segments, in any spelling")
    if "/" in decoded or "\\" in decoded:
        raise PathRefused("the path may not contain an encoded / or a \\ (%2F, %5C)")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in decoded):
        raise PathRefused("the path may not contain control characters (%00 to %1F, %7F)")


def confined_suffix(route_path: str, raw_path: str) -> str:
    """The part of `raw_path` (the path as sent) below the route's path, kept as sent, or PathRefused.

    The rule (README, "Path confinement"): the route matches on a segment boundary only; no segment of the whole
    path, percent-decoded repeatedly, is `.` or `..` (also as `..;param`, `...`), contains `/` or `\\` or a control
    character; and no segment below the route is empty (`//`). A downstream that decodes `%2F`, resolves dot
    segments or splits on backslashes (nginx, IIS, Tomcat) then still serves a path under the route's prefix.
    """
    segments = raw_path.split("/")
    decoded = [_decoded_segment(segment) for segment in segments]
    for segment in decoded:
        _check_segment(segment)
    prefix = route_path.rstrip("/").split("/")  # "/mcp": ["", "mcp"]; "/": [""]
    if decoded[: len(prefix)] != [unquote(segment) for segment in prefix]:
        raise PathRefused("the path is not under this route's path")
    below = segments[len(prefix) :]
    if not below or (below == [""] and route_path == "/"):
        return ""
    if "" in below[:-1]:
        raise PathRefused("the path may not contain empty segments (//)")
    return "/" + "/".join(below)


#: Around a parameter name, what some server's reading ignores: whitespace and control characters.
_IGNORED_AROUND_NAME = re.compile(r"^[\s\x00-\x1f\x7f]+|[\s\x00-\x1f\x7f]+$")


def _is_token_parameter(name: str) -> bool:
    decoded = _fully_decoded(name, unquote_plus)
    if decoded is None:
        return True
    # A server that reads names as C strings stops at the first NUL: `access_token%00x` is access_token there.
    return _IGNORED_AROUND_NAME.sub("", decoded.split("\x00", 1)[0]).lower() == "access_token"


def query_without_tokens(query: str) -> str:
    """The query as sent, less every `access_token` parameter in any spelling (`access%5Ftoken`, `%61ccess_token`,
    `ACCESS_TOKEN`, encoded twice, after a `;` that some servers take as a separator): tokens are accepted only in
    the Authorization header (RS-3), and one in the query is never passed on."""
    if "%" not in query and "access_token" not in query.lower():
        return query
    return "&".join(
        pair
        for pair in query.split("&")
        if not any(_is_token_parameter(part.split("=", 1)[0]) for part in pair.split(";"))
    )


def downstream_url(route: Route, environ: dict[str, Any]) -> str:
    """The route's downstream URL plus whatever followed the route's public path, and the query string; PathRefused
    for a path that could leave the route's prefix."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        raw_path = raw.split("?", 1)[0].split("#", 1)[0]
        if not raw_path.startswith("/"):
            raw_path = urlsplit(raw_path).path  # the absolute form, `GET http://host/mcp HTTP/1.1`
    else:
        raw_path = quote(environ.get("PATH_INFO", ""), safe="/:@!$&'()*+,;=-._~%")
    suffix = confined_suffix(route.path, raw_path)
    query = query_without_tokens(environ.get("QUERY_STRING", ""))
    base = urlsplit(route.downstream_url)
    path = base.path + suffix
    return urlunsplit((base.scheme, base.netloc, path or "/", "&".join(q for q in (base.query, query) if q), ""))


class HeaderRules:
    """The headers of a forwarded exchange: the client's, less what is never forwarded, plus the proxy's own
    (X-Forwarded-*, the route's downstream credentials); the downstream's, less hop-by-hop ones, with Location made
    public."""

    def __init__(self, public_url: str, proxy_cookie_names: frozenset[str]):
        parts = urlsplit(public_url)
        self.public_host, self.public_scheme = parts.netloc, parts.scheme
        self.proxy_cookie_names = proxy_cookie_names
        self._own_headers: dict[str, frozenset[str]] = {}  # per route name: what credential_header_names says

    def request_headers(self, route: Route, environ: dict[str, Any], caller: Caller) -> dict[str, str | bytes]:
        own = self._own_headers.get(route.name)
        if own is None:
            own = self._own_headers[route.name] = credential_header_names(route)
        connection_tokens = {token.strip().lower() for token in environ.get("HTTP_CONNECTION", "").split(",")}
        headers: dict[str, str | bytes] = {}
        for key, value in environ.items():
            if not key.startswith("HTTP_"):
                if key == "CONTENT_TYPE" and value:
                    headers["Content-Type"] = value
                continue
            lower = key[5:].replace("_", "-").lower()
            if (
                lower in _NEVER_FORWARDED
                or lower in connection_tokens
                or lower in own
                or lower.startswith(IDENTITY_SPOOFING_PREFIXES)
            ):
                continue
            if lower == "cookie":
                # The proxy's own session and consent cookies are its secrets, not the downstream's.
                value = _without_cookies(value, self.proxy_cookie_names)
                if not value:
                    continue
            headers[lower.title()] = value
        headers.update(
            {
                "X-Forwarded-For": environ.get("REMOTE_ADDR", ""),
                "X-Forwarded-Host": self.public_host,
                "X-Forwarded-Proto": self.public_scheme,
            }
        )
        headers.update(downstream_auth_headers(route, caller))
        return headers

    def response_headers(
        self, route: Route, downstream: HTTPResponse, body_reframed: bool
    ) -> tuple[list[tuple[str, str]], str | None]:
        """The downstream's headers as the client gets them, and its `Mcp-Session-Id` (None without one).
        `body_reframed`: the proxy adds bytes to the body, so the downstream's Content-Length no longer holds."""
        connection_tokens = {token.strip().lower() for token in downstream.headers.get("Connection", "").split(",")}
        headers = []
        session_id = None
        for name, value in downstream.headers.items():
            lower = name.lower()
            if lower in HOP_BY_HOP or lower in DROPPED_RESPONSE_HEADERS or lower in connection_tokens:
                continue
            if lower == "content-length" and body_reframed:
                continue
            if lower == "location":
                value = public_location(route, value)
            elif lower == "mcp-session-id":
                session_id = value
            headers.append((name, value))
        headers.append(("X-Accel-Buffering", "no"))  # nginx and similar front proxies: do not buffer this
        return headers, session_id


def public_location(route: Route, location: str) -> str:
    """A Location the downstream sent, pointing at the route's public URL when it points at the downstream's."""
    base = route.downstream_url.split("?", 1)[0]
    base_path = urlsplit(base).path
    if location.startswith(base):
        return route.resource + location[len(base) :]
    if base_path and (location.startswith(base_path + "/") or location == base_path):
        return route.path.rstrip("/") + location[len(base_path) :]
    return location
