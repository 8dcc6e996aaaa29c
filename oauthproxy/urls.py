"""URL rules: safe parsing, what counts as loopback, the redirect-URI policy, resource and origin comparison forms."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import SplitResult, urlsplit, urlunsplit

#: RFC 3986 §3.1: scheme = ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*$")
#: A DNS name (IDNs in their xn-- form) or an IPv4 literal; IPv6 literals are bracketed and checked by urlsplit.
_HOST_RE = re.compile(r"^[a-z0-9]([a-z0-9_.-]*[a-z0-9])?$")

#: Schemes that run code, read local data or open the browser's own pages: never a redirect target.
NEVER_REDIRECT_SCHEMES = frozenset(
    {
        "javascript",
        "vbscript",
        "data",
        "file",
        "filesystem",
        "blob",
        "about",
        "view-source",
        "jar",
        "intent",
        "chrome",
        "chrome-extension",
        "moz-extension",
        "resource",
        "ms-appinstaller",
        "search-ms",
        "ms-msdt",
        # Handlers with a record of being abused from a link: `search:` is search-ms's other name (Explorer opening
        # a remote share), ms-officecmd had an argument-injection RCE, the Office schemes open remote documents,
        # shell:/hcp:/ms-help:/ms-its:/its:/mk: reach the Windows shell and help (CHM) handlers, itms-services
        # installs an iOS app as ms-appinstaller does a Windows one.
        "search",
        "ms-officecmd",
        "ms-word",
        "ms-excel",
        "ms-powerpoint",
        "shell",
        "hcp",
        "ms-help",
        "ms-its",
        "its",
        "mk",
        "itms-services",
    }
)
#: Registered network schemes: they name a place on the network, not an app on the user's device, so they are
#: not private-use schemes (RFC 8252 §7.1); http and https follow their own rule.
NETWORK_SCHEMES = frozenset(
    {
        "http",
        "https",
        "ftp",
        "ftps",
        "sftp",
        "ws",
        "wss",
        "gopher",
        "mailto",
        "news",
        "nntp",
        "telnet",
        "ldap",
        "ldaps",
        "tel",
        "sms",
        "smb",
        "ssh",
        "irc",
        "xmpp",
        "sip",
        "sips",
    }
)


class MalformedURL(ValueError):
    """A URL that cannot be parsed (e.g. `http://[::1` or a port that is not a number)."""


def split_url(url: str) -> SplitResult:
    """`urlsplit`, plus the port check urlsplit defers; raises `MalformedURL` instead of a bare ValueError."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError as error:
        raise MalformedURL(f"{url!r} is not a well-formed URL ({error})") from None
    return parts


def is_loopback_host(host: str) -> bool:
    """The one definition of loopback: `localhost`, and any IPv4 127.0.0.0/8 or IPv6 ::1 literal.

    Packets to these never leave the machine, which is what the http exception for loopback relies on
    (OAuth 2.1 §1.5, RFC 8252 §7.3). Not loopback: 0.0.0.0 (unspecified; browsers block it), IPv4-mapped
    forms such as ::ffff:127.0.0.1 (an unusual spelling of a redirect target is refused, not interpreted),
    short forms such as 127.1 (ipaddress refuses them), addresses with an IPv6 zone id (`[::1%25eth0]`), and names
    under localhost (their resolution is not guaranteed).
    """
    host = host.lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if "%" in host:
        # An IPv6 zone id (`::1%25eth0`, `::1%eth0`, any encoding): ipaddress accepts it and calls the address
        # loopback, but it names an interface of one machine, and a spelling this odd is refused, not interpreted.
        return False
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return False
    return address.is_loopback


def is_loopback_url(url: str) -> bool:
    try:
        return is_loopback_host(split_url(url).hostname or "")
    except MalformedURL:
        return False


def redirect_uri_problem(uri: object, private_use_schemes: frozenset[str] | None = None) -> str | None:
    """Why `uri` may not be a redirect URI, or None: the one policy for registration and metadata documents.

    https; http only on a loopback host (OAuth 2.1 §1.5); private-use schemes for native apps (RFC 8252 §7.1)
    when `private_use_schemes` is None (any) or names the scheme; never a scheme that runs code or reads local
    data. No fragment (RFC 6749 §3.1.2), no userinfo (it makes `https://trusted.example@evil.example` look like
    a trusted host). The answer is a phrase that follows the URI: "redirect URI X <problem>".
    """
    if not isinstance(uri, str) or not uri:
        return "is not a non-empty string"
    if not uri.isascii() or any(c <= " " or c in '\x7f"\\<>' for c in uri):
        return "contains non-ASCII characters, spaces, control characters, quotes, backslashes or angle brackets"
    scheme, colon, _ = uri.partition(":")
    if not colon or not _SCHEME_RE.match(scheme):
        return "is not an absolute URI (it has no scheme)"
    scheme = scheme.lower()
    if scheme in NEVER_REDIRECT_SCHEMES:
        return f"uses the {scheme}: scheme, which is never allowed for a redirect URI"
    if "#" in uri:
        return "contains a fragment (#), which RFC 6749 section 3.1.2 forbids"
    try:
        parts = split_url(uri)
    except MalformedURL:
        return "is not a well-formed URL"
    if "@" in parts.netloc:
        return "contains a user name or password (user@host), which is not allowed in a redirect URI"
    if scheme in ("http", "https"):
        if not parts.hostname:
            return "has no host"
        if not _HOST_RE.match(parts.hostname) and not parts.netloc.startswith("["):
            # e.g. `evil.example%40trusted.example`: the consent page shows the host, so it must read as one
            return "has a host that is not a plain DNS name or IP address"
        if "%" in parts.hostname:
            # An IPv6 zone id (RFC 6874's `[fe80::1%25eth0]`, or a bare `%`): refused outright, on https too. It
            # names a network interface of the machine that parses it, not a host (so it means something else
            # on the user's machine than here), browsers do not accept it in a URL, and exact redirect-URI
            # matching would have to decide whether `%25eth0` and `%25ETH0` are the same interface.
            return "has an IPv6 zone id (%...), which is not allowed in a redirect URI"
        if scheme == "https" or is_loopback_host(parts.hostname):
            return None
        return (
            "uses http on a host that is not loopback; use https, or http on a loopback address "
            "(127.0.0.1, [::1] or localhost)"
        )
    if scheme in NETWORK_SCHEMES:
        return f"uses the {scheme}: scheme; use https, http on a loopback address, or an app's private-use scheme"
    if private_use_schemes is not None and scheme not in private_use_schemes:
        allowed = ", ".join(f"{s}:" for s in sorted(private_use_schemes)) or "none"
        return (
            f"uses the private-use scheme {scheme}:, which this server does not allow "
            f"(ALLOW_CUSTOM_REDIRECT_SCHEMES; allowed: {allowed})"
        )
    return None


def private_use_scheme_problem(scheme: str) -> str | None:
    """Why `scheme` cannot be listed as an allowed private-use redirect scheme (setting validation), or None."""
    if not _SCHEME_RE.match(scheme):
        return f"{scheme!r} is not a URI scheme"
    if scheme.lower() in NEVER_REDIRECT_SCHEMES | NETWORK_SCHEMES:
        return f"{scheme!r} is not a private-use scheme"
    return None


def private_use_scheme(uri: str) -> str | None:
    """The scheme of a private-use (native app) redirect URI as people write it (`cursor://`), else None."""
    scheme, colon, rest = uri.partition(":")
    if not colon or not _SCHEME_RE.match(scheme) or scheme.lower() in NETWORK_SCHEMES | NEVER_REDIRECT_SCHEMES:
        return None
    return f"{scheme.lower()}://" if rest.startswith("//") else f"{scheme.lower()}:"


#: The most characters of a host or a private-use scheme the consent page shows (the full URI is in its title).
SHOWN_TARGET_LENGTH = 64


def redirect_target(uri: str) -> str:
    """Where a redirect URI sends the user, for the consent page: the host (with port), or the app's scheme.

    Cut to SHOWN_TARGET_LENGTH characters, so that a registration cannot fill the page (a URI may have 2048). A
    host keeps its end, the registrable domain and port that decide where the user goes: a spoof puts a trusted
    name first (`accounts.google.com.…evil.example`). A scheme keeps its start, which in the reverse-DNS form
    RFC 8252 §7.1 asks for (`com.example.app`) names the owner, and its end, which tells similar schemes apart.
    """
    scheme = private_use_scheme(uri)
    if scheme is not None:
        if len(scheme) > SHOWN_TARGET_LENGTH:
            head = SHOWN_TARGET_LENGTH * 2 // 3
            scheme = f"{scheme[:head]}…{scheme[head + 1 - SHOWN_TARGET_LENGTH :]}"
        return f"the app that handles {scheme} links"
    try:
        parts = split_url(uri)
    except MalformedURL:
        target = uri
    else:
        target = parts.netloc.rpartition("@")[2] or uri
    if len(target) > SHOWN_TARGET_LENGTH:
        target = "…" + target[1 - SHOWN_TARGET_LENGTH :]
    return target


def canonical_resource(uri: str) -> str:
    """RFC 8707 comparison form: scheme and host lower-cased, no trailing slash, no query or fragment.

    Some clients (reported for ChatGPT) append query parameters to `resource`; they don't name another resource.
    A malformed URL is returned as it is (stripped), so it simply matches no resource served here.
    """
    try:
        parts = split_url(uri.strip())
    except MalformedURL:
        return uri.strip()
    return urlunsplit((parts.scheme.lower(), parts.netloc.lower(), parts.path.rstrip("/"), "", ""))


def normalise_origin(origin: str) -> str:
    """An Origin (or a configured allowed origin) as `scheme://host[:port]`, lower-cased, for comparison.

    Anything unparseable is compared as its stripped, lower-cased text, so it matches no allowed origin.
    """
    try:
        parts = split_url(origin.strip())
    except MalformedURL:
        return origin.strip().lower()
    if not parts.scheme or not parts.netloc:
        return origin.strip().lower()
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"
