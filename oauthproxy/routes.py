"""MCP routes: which public paths front which downstream MCP servers, and how each downstream is authenticated."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from oauthproxy.allowlists import user_is_listed
from oauthproxy.config_values import DAY, boolean_value, read_int, read_list, read_seconds, read_text, string_list
from oauthproxy.groups import read_group_list
from oauthproxy.tool_policy import ToolPolicy, parse_tool_rules
from oauthproxy.urls import normalise_origin

CredentialKind = Literal["none", "upstream_token", "static", "oauth", "user_api_key"]
CREDENTIAL_KINDS: tuple[CredentialKind, ...] = ("none", "upstream_token", "static", "oauth", "user_api_key")
#: Credentials each user brings for themselves: a connection to the downstream's own authorization server, or a key.
PER_USER_CREDENTIALS: frozenset[CredentialKind] = frozenset({"oauth", "user_api_key"})

#: Paths the authorization server owns; a route there would shadow it.
RESERVED_PATHS = (
    "/authorize",
    "/token",
    "/register",
    "/revoke",
    "/callback",
    "/connect",
    "/account",
    "/admin",
    "/.well-known",
    "/static",
    "/healthz",
    "/readyz",
    "/metrics",
)

#: An RFC 9110 field name (token characters).
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
ROUTE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Headers a static credential must not replace: the proxy sets or strips them itself.
PROTECTED_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-forwarded-proto",
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-name",
        "x-forwarded-access-token",
        "x-forwarded-groups",
        "mcp-session-id",
        "mcp-protocol-version",
        "content-type",
        "accept",
    }
)

ROUTE_KEYS = frozenset(
    {
        "name",
        "path",
        "url",
        "scopes",
        "allowed_emails",
        "allowed_email_domains",
        "allowed_groups",
        "identity_headers",
        "groups_header",
        "forward_access_token",
        "credential",
        "credential_header",
        "credential_scheme",
        "credential_env",
        "credential_file",
        "oauth",
        "api_key_help_url",
        "api_key_verify",
        "tool_rules",
        "identity_assertion",
        "identity_assertion_header",
    }
)
#: Keys of a route's `[routes.oauth]` table: the downstream's own authorization server, configured like the login
#: provider (OAUTH_AUTHORIZE_URL and friends).
OAUTH_KEYS = frozenset(
    {
        "authorize_url",
        "token_url",
        "userinfo_url",
        "revocation_url",
        "client_id",
        "client_secret_env",
        "client_secret_file",
        "scopes",
        "authorize_params",
        "display_name",
        "github_api_url",
    }
)

#: `MCP_SERVER_URL` alone is one route; these variables configure it the way a routes-file entry would.
SINGLE_ROUTE_ENV = {
    "scopes": "MCP_REQUIRED_SCOPES",
    "identity_headers": "DOWNSTREAM_IDENTITY_HEADERS",
    "groups_header": "DOWNSTREAM_GROUPS_HEADER",
    "forward_access_token": "DOWNSTREAM_FORWARD_ACCESS_TOKEN",
    "credential": "DOWNSTREAM_CREDENTIAL",
    "credential_header": "DOWNSTREAM_CREDENTIAL_HEADER",
    "credential_scheme": "DOWNSTREAM_CREDENTIAL_SCHEME",
    "credential_env": "DOWNSTREAM_CREDENTIAL_ENV",
    "credential_file": "DOWNSTREAM_CREDENTIAL_FILE",
    "oauth": "DOWNSTREAM_OAUTH",  # only "discover": a configured provider needs the routes file's table
    "api_key_help_url": "DOWNSTREAM_API_KEY_HELP_URL",
    "api_key_verify": "DOWNSTREAM_API_KEY_VERIFY",
    "identity_assertion": "DOWNSTREAM_IDENTITY_ASSERTION",
    "identity_assertion_header": "DOWNSTREAM_IDENTITY_ASSERTION_HEADER",
}

#: Where a route's signed identity assertion (identity_assertions.py) goes unless `identity_assertion_header` says.
DEFAULT_IDENTITY_ASSERTION_HEADER = "X-Forwarded-Identity"
#: Letters, digits and single hyphens: a name with `_` would reach a WSGI server as the same variable as its `-`
#: spelling, so the client's copy could slip past the stripping that matches names exactly.
IDENTITY_ASSERTION_HEADER_NAME = re.compile(r"^[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*$")
#: Besides PROTECTED_HEADERS: what the proxy removes from clients or passes untouched (credentials, cookies,
#: hop-by-hop fields, MCP's resumption header, the request id), which the assertion must not replace.
ASSERTION_HEADER_CONFLICTS = PROTECTED_HEADERS | frozenset(
    {
        "authorization",
        "cookie",
        "origin",
        "forwarded",
        "x-real-ip",
        "expect",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "upgrade",
        "last-event-id",
        "x-request-id",
    }
)
#: Algorithms of the proxy's signing keys, as `IDENTITY_ASSERTION_ALGORITHM` spells them (any case).
ASSERTION_ALGORITHMS = ("ES256", "EdDSA")


@dataclass(frozen=True)
class DownstreamCredential:
    """What the downstream receives besides identity headers: nothing, the user's upstream token, a fixed secret,
    or the user's own credential for it (a connection's access token, or their API key)."""

    kind: CredentialKind = "none"
    header: str = "Authorization"
    # The whole header value (scheme included). Never logged, never shown to clients: kept out of repr.
    value: str = field(default="", repr=False)
    #: For per-user credentials: the word before the user's token or key (`Bearer`), or empty for the bare value.
    scheme: str = ""

    @property
    def per_user(self) -> bool:
        return self.kind in PER_USER_CREDENTIALS

    def header_value(self, secret: str) -> str:
        """A per-user secret as the route sends it."""
        return f"{self.scheme} {secret}" if self.scheme else secret


@dataclass(frozen=True)
class RouteOAuth:
    """The downstream's own authorization server (route credential `oauth`).

    Either configured like the login provider (an authorize URL that names a known provider or an issuer to
    discover, or explicit endpoints with `token_url`), or `discover`: the downstream does MCP authorization itself
    and the proxy finds its authorization server as any MCP client would (401 -> RFC 9728 -> RFC 8414)."""

    discover: bool = False
    authorize_url: str = ""
    token_url: str | None = None
    userinfo_url: str | None = None
    revocation_url: str | None = None
    client_id: str = ""
    client_secret: str = field(default="", repr=False)
    scopes: tuple[str, ...] = ()
    #: Extra parameters for the authorization request (`audience`, `prompt`, ...), in the order configured.
    authorize_params: tuple[tuple[str, str], ...] = ()
    #: What the connect page calls the server's sign-in ("This MCP server needs you to sign in to X").
    display_name: str | None = None
    github_api_url: str | None = None


@dataclass(frozen=True)
class RouteApiKey:
    """How a route asks each user for their own API key (route credential `user_api_key`)."""

    #: Where the user finds or creates their key; shown as a link on the key page.
    help_url: str | None = None
    #: Try the key with an MCP `initialize` before accepting it.
    verify: bool = False


@dataclass(frozen=True)
class Route:
    """One protected resource: `PUBLIC_URL + path` (and everything under it) forwarded to `downstream_url`."""

    name: str
    path: str
    downstream_url: str
    resource: str
    required_scopes: tuple[str, ...] = ()
    allowed_emails: frozenset[str] = frozenset()
    allowed_email_domains: frozenset[str] = frozenset()
    #: A user in any of these groups passes the route's list (groups.py); with allowed_emails or
    #: allowed_email_domains, any one match is enough (allowlists.user_is_listed).
    allowed_groups: frozenset[str] = frozenset()
    identity_headers: bool = True
    #: Send the caller's groups as X-Forwarded-Groups (groups.groups_header_value).
    groups_header: bool = False
    #: The user's provider token as `X-Forwarded-Access-Token`: only to a downstream that calls the provider's APIs
    #: for the user. Default: on where `credential = "upstream_token"` with identity headers, off everywhere else.
    forward_access_token: bool = False
    credential: DownstreamCredential = field(default_factory=DownstreamCredential)
    oauth: RouteOAuth | None = None
    api_key: RouteApiKey | None = None
    #: Which tools each caller may list and call (`[[routes.tool_rules]]`); None: every tool, and the proxy never
    #: reads the requests' bodies.
    tool_policy: ToolPolicy | None = None
    #: The header that carries a short-lived JWT signed by the proxy asserting who calls (identity_assertions.py);
    #: None: the route sends none.
    identity_assertion_header: str | None = None

    @property
    def metadata_path(self) -> str:
        """RFC 9728 §3.1: the well-known suffix is inserted before the resource's path."""
        return "/.well-known/oauth-protected-resource" + (self.path if self.path != "/" else "")

    @property
    def forwards_upstream_token(self) -> bool:
        return self.forward_access_token or self.credential.kind == "upstream_token"

    def user_is_allowed(self, email: str | None, groups: frozenset[str]) -> bool:
        return user_is_listed(email, groups, self.allowed_emails, self.allowed_email_domains, self.allowed_groups)


@dataclass(frozen=True)
class ProxySettings:
    """Settings of the MCP endpoint side (resource server and streaming proxy)."""

    #: Origins allowed to call the MCP endpoints (RS-6); `*` allows any. Always includes PUBLIC_URL's origin.
    allowed_origins: frozenset[str] = frozenset()
    #: How long a validated access token is answered from memory: the bound on how late a revocation bites.
    token_cache_ttl: int = 30
    token_cache_size: int = 10_000
    #: Refresh the user's upstream token when it expires within this many seconds.
    upstream_refresh_skew: int = 60
    downstream_connect_timeout: float = 5.0
    #: Waiting for the downstream's response headers (and between bytes of a non-streamed body).
    downstream_read_timeout: float = 300.0
    #: Between events of an open event stream; 0 means no limit (idle GET streams may stay open for hours).
    downstream_stream_idle_timeout: float = 0.0
    downstream_pool_size: int = 256
    #: The largest request body forwarded (Content-Length, or a chunked body as it grows); larger ones get 413.
    max_body_bytes: int = 8 * 1024 * 1024
    #: An MCP session unused this long is forgotten (its id then gets 404 and the client opens a new one).
    session_idle_timeout: float = 86_400.0
    #: A pooled downstream connection idle longer than this is not reused: below the keep-alive timeouts of common
    #: servers (uvicorn, Node, Apache: 5 s), so the proxy never sends on a connection the downstream is closing.
    downstream_pool_idle_timeout: float = 4.0
    #: Signed identity assertions (routes with `identity_assertion = true`): their lifetime in seconds, the
    #: algorithm of new signing keys, how often each worker re-reads the key set (also the JWKS's max-age, and how
    #: long a new key is published before it signs), and how many assertions each worker keeps for reuse.
    identity_assertion_ttl: int = 300
    identity_assertion_algorithm: str = "ES256"
    identity_keys_reload_interval: int = 30
    identity_assertion_cache_size: int = 10_000

    def origin_is_allowed(self, origin: str) -> bool:
        return "*" in self.allowed_origins or normalise_origin(origin) in self.allowed_origins


def _has_control_characters(value: str) -> bool:
    return any(ord(char) < 0x20 or ord(char) == 0x7F for char in value)


def _read_secret(
    entry: Mapping[str, Any],
    where: str,
    env: Mapping[str, str],
    problems: list[str],
    prefix: str = "credential",
    what: str = "a static credential",
    required: bool = True,
) -> str:
    """A secret from an environment variable (`{prefix}_env`) or a file (`{prefix}_file`). Error messages name the
    source, never the value."""
    env_key, file_key = f"{prefix}_env", f"{prefix}_file"
    env_name, file_name = entry.get(env_key), entry.get(file_key)
    if not env_name and not file_name and not required:
        return ""
    if bool(env_name) == bool(file_name):
        problems.append(
            f"{where}: {what} needs exactly one of {env_key} (the name of an "
            f"environment variable holding the secret) or {file_key} (a file holding it)"
        )
        return ""
    if env_name:
        if not isinstance(env_name, str):
            problems.append(f"{where}: {env_key} must be the name of an environment variable")
            return ""
        secret = read_text(env, env_name)
        if not secret:
            problems.append(f"{where}: the environment variable {env_name} ({env_key}) is unset or empty")
            return ""
    else:
        try:
            with open(str(file_name), encoding="utf-8") as handle:
                secret = handle.read().strip()
        except OSError as error:
            problems.append(f"{where}: cannot read {file_key} {file_name}: {error.strerror}")
            return ""
        if not secret:
            problems.append(f"{where}: {file_key} {file_name} is empty")
            return ""
    if _has_control_characters(secret):
        problems.append(f"{where}: {what} contains a line break or control character")
        return ""
    return secret


def _optional_url(value: Any, where: str, problems: list[str]) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{where} must be an absolute http(s) URL; got {value!r}")
        return None
    return value.strip()


def _route_oauth(value: Any, where: str, env: Mapping[str, str], problems: list[str]) -> RouteOAuth | None:
    """The `oauth` key of a route: `"discover"`, or a table configuring the downstream's authorization server."""
    if isinstance(value, str) and value.strip().lower() == "discover":
        return RouteOAuth(discover=True)
    if not isinstance(value, dict):
        problems.append(
            f'{where}: oauth must be "discover" (the downstream does MCP authorization itself) or a table '
            "[routes.oauth] with authorize_url, client_id and client_secret_env or client_secret_file"
        )
        return None
    where = f"{where} oauth"
    unknown = sorted(set(value) - OAUTH_KEYS)
    if unknown:
        problems.append(
            f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(OAUTH_KEYS))}"
        )
    authorize_url = _optional_url(value.get("authorize_url"), f"{where}: authorize_url", problems)
    if authorize_url is None and "authorize_url" not in value:
        problems.append(
            f"{where}: authorize_url is required: the provider's authorize URL, or its issuer URL for discovery"
        )
    client_id = value.get("client_id")
    if not isinstance(client_id, str) or not client_id.strip() or _has_control_characters(client_id):
        problems.append(f"{where}: client_id is required: the client id registered at that provider for this proxy")
        client_id = ""
    params = value.get("authorize_params", {})
    if not isinstance(params, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and not _has_control_characters(k + v) for k, v in params.items()
    ):
        problems.append(f'{where}: authorize_params must be a table of text values, e.g. {{ audience = "api" }}')
        params = {}
    reserved = sorted(
        set(params) & {"client_id", "redirect_uri", "response_type", "state", "code_challenge", "code_challenge_method"}
    )
    if reserved:
        problems.append(f"{where}: authorize_params must not set {', '.join(reserved)}: the proxy sets them")
    display_name = value.get("display_name")
    if display_name is not None and (not isinstance(display_name, str) or not display_name.strip()):
        problems.append(f"{where}: display_name must be text")
        display_name = None
    return RouteOAuth(
        authorize_url=authorize_url or "",
        token_url=_optional_url(value.get("token_url"), f"{where}: token_url", problems),
        userinfo_url=_optional_url(value.get("userinfo_url"), f"{where}: userinfo_url", problems),
        revocation_url=_optional_url(value.get("revocation_url"), f"{where}: revocation_url", problems),
        client_id=client_id.strip(),
        client_secret=_read_secret(
            value, where, env, problems, prefix="client_secret", what="the client secret", required=False
        ),
        scopes=string_list(value.get("scopes", []), f"{where}: scopes", problems),
        authorize_params=tuple((k, v) for k, v in params.items() if k not in reserved),
        display_name=display_name.strip() if display_name else None,
        github_api_url=_optional_url(value.get("github_api_url"), f"{where}: github_api_url", problems),
    )


def _credential(
    entry: Mapping[str, Any], where: str, env: Mapping[str, str], problems: list[str]
) -> DownstreamCredential:
    kind = entry.get("credential", "none")
    if kind not in CREDENTIAL_KINDS:
        problems.append(f"{where}: credential must be one of {', '.join(CREDENTIAL_KINDS)}; got {kind!r}")
        return DownstreamCredential()
    header = entry.get("credential_header", "Authorization")
    if not isinstance(header, str) or not HEADER_NAME.match(header):
        problems.append(f"{where}: credential_header must be an HTTP header name; got {header!r}")
        return DownstreamCredential()
    if kind == "none":
        return DownstreamCredential()
    if kind == "oauth":
        # RFC 6750 §2.1: the token the downstream's own authorization server issued, as any client would send it.
        return DownstreamCredential("oauth", "Authorization", scheme="Bearer")
    if kind == "upstream_token":
        # RFC 6750 §2.1: the user's upstream access token, as the downstream would send it to the provider's APIs.
        return DownstreamCredential("upstream_token", "Authorization")
    if header.lower() in PROTECTED_HEADERS:
        problems.append(f"{where}: credential_header {header} is set by the proxy itself; choose another header")
        return DownstreamCredential()
    default_scheme = "Bearer" if header.lower() == "authorization" else ""
    scheme = entry.get("credential_scheme", default_scheme)
    if not isinstance(scheme, str) or (scheme and not HEADER_NAME.match(scheme)):
        problems.append(f"{where}: credential_scheme must be a word such as Bearer, or empty; got {scheme!r}")
        return DownstreamCredential()
    if kind == "user_api_key":
        if entry.get("credential_env") or entry.get("credential_file"):
            problems.append(
                f"{where}: a user_api_key route takes each user's own key; credential_env and credential_file are "
                'for credential = "static"'
            )
        return DownstreamCredential("user_api_key", header, scheme=scheme)
    secret = _read_secret(entry, where, env, problems)
    return DownstreamCredential("static", header, f"{scheme} {secret}" if scheme else secret)


def _path(value: Any, where: str, problems: list[str]) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        problems.append(f"{where}: path must start with /, e.g. /mcp/gmail; got {value!r}")
        return "/"
    parts = urlsplit(value)
    if parts.query or parts.fragment or "//" in value or any(seg in (".", "..") for seg in value.split("/")):
        problems.append(
            f"{where}: path must be a plain path without query, fragment, // or dot segments; got {value!r}"
        )
    path = value.rstrip("/") or "/"
    if any(path == reserved or path.startswith(reserved + "/") for reserved in RESERVED_PATHS):
        problems.append(f"{where}: path {path} would shadow an authorization server endpoint; choose another path")
    return path


def _downstream_url(value: Any, where: str, problems: list[str]) -> str:
    if not isinstance(value, str):
        problems.append(f"{where}: url must be the downstream MCP server's URL, e.g. http://127.0.0.1:9000/mcp")
        return ""
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{where}: url must be an absolute http(s) URL; got {value!r}")
    if parts.fragment or parts.username or parts.password:
        problems.append(f'{where}: url must not carry a fragment or credentials (use credential = "static")')
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), parts.query, ""))


def build_route(
    entry: Mapping[str, Any],
    where: str,
    public_url: str,
    env: Mapping[str, str],
    scopes_supported: tuple[str, ...],
    problems: list[str],
) -> Route:
    """Validate one route entry (a TOML table, or the single-route environment variables)."""
    unknown = sorted(set(entry) - ROUTE_KEYS)
    if unknown:
        problems.append(
            f"{where}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(sorted(ROUTE_KEYS))}"
        )
    path = _path(entry.get("path"), where, problems)
    url = _downstream_url(entry.get("url"), where, problems)
    name = entry.get("name") or (path.rstrip("/").rsplit("/", 1)[-1] or "mcp")
    if not isinstance(name, str) or not ROUTE_NAME.match(name):
        problems.append(f"{where}: name must be letters, digits, '.', '_' or '-'; got {name!r}")
        name = "mcp"
    scopes = string_list(entry.get("scopes", []), f"{where}: scopes", problems)
    if scopes_supported:
        missing = [scope for scope in scopes if scope not in scopes_supported]
        if missing:
            problems.append(
                f"{where}: scopes {', '.join(missing)} are not in SCOPES_SUPPORTED, so no token could ever carry them"
            )
    identity_headers = boolean_value(entry.get("identity_headers", True), f"{where}: identity_headers", True, problems)
    credential = _credential(entry, where, env, problems)
    oauth = _route_oauth(entry["oauth"], where, env, problems) if "oauth" in entry else None
    if credential.kind == "oauth" and oauth is None and "oauth" not in entry:
        problems.append(
            f'{where}: credential = "oauth" needs oauth = "discover" or an [routes.oauth] table naming the '
            "downstream's authorization server"
        )
    if credential.kind != "oauth" and "oauth" in entry:
        problems.append(f'{where}: oauth is set but credential is {credential.kind!r}; set credential = "oauth"')
        oauth = None
    api_key = None
    if credential.kind == "user_api_key":
        api_key = RouteApiKey(
            help_url=_optional_url(entry.get("api_key_help_url"), f"{where}: api_key_help_url", problems),
            verify=boolean_value(entry.get("api_key_verify", False), f"{where}: api_key_verify", False, problems),
        )
    elif "api_key_help_url" in entry or "api_key_verify" in entry:
        problems.append(f'{where}: api_key_help_url and api_key_verify are for credential = "user_api_key"')
    assertion_header = _identity_assertion_header(entry, where, credential, problems)
    emails = string_list(entry.get("allowed_emails", []), f"{where}: allowed_emails", problems)
    domains = string_list(entry.get("allowed_email_domains", []), f"{where}: allowed_email_domains", problems)
    return Route(
        name=name,
        path=path,
        downstream_url=url,
        resource=public_url + (path if path != "/" else ""),
        required_scopes=scopes,
        allowed_emails=frozenset(email.lower() for email in emails),
        allowed_email_domains=frozenset(domain.lower().lstrip("@") for domain in domains),
        allowed_groups=read_group_list(entry.get("allowed_groups", []), f"{where}: allowed_groups", problems),
        identity_headers=identity_headers,
        groups_header=boolean_value(entry.get("groups_header", False), f"{where}: groups_header", False, problems),
        forward_access_token=boolean_value(
            entry.get("forward_access_token", identity_headers and credential.kind == "upstream_token"),
            f"{where}: forward_access_token",
            False,
            problems,
        ),
        credential=credential,
        oauth=oauth,
        api_key=api_key,
        tool_policy=parse_tool_rules(entry["tool_rules"], f"{where}: tool_rules", problems)
        if "tool_rules" in entry
        else None,
        identity_assertion_header=assertion_header,
    )


def _identity_assertion_header(
    entry: Mapping[str, Any], where: str, credential: DownstreamCredential, problems: list[str]
) -> str | None:
    """`identity_assertion` (yes/no, default no) and `identity_assertion_header` (default X-Forwarded-Identity)."""
    enabled = boolean_value(entry.get("identity_assertion", False), f"{where}: identity_assertion", False, problems)
    header = entry.get("identity_assertion_header")
    if not enabled:
        if header is not None:
            problems.append(
                f"{where}: identity_assertion_header is set but identity_assertion is not true; set "
                "identity_assertion = true to send the signed identity assertion"
            )
        return None
    if header is None:
        return DEFAULT_IDENTITY_ASSERTION_HEADER
    if not isinstance(header, str) or not IDENTITY_ASSERTION_HEADER_NAME.match(header) or len(header) > 64:
        problems.append(
            f"{where}: identity_assertion_header must be a header name of at most 64 letters, digits and hyphens, "
            f"such as {DEFAULT_IDENTITY_ASSERTION_HEADER}; got {header!r}"
        )
        return None
    lower = header.lower()
    if lower in ASSERTION_HEADER_CONFLICTS or lower.startswith("mcp-"):
        problems.append(
            f"{where}: identity_assertion_header {header} is set, removed or passed through by the proxy itself; "
            f"choose another header, such as {DEFAULT_IDENTITY_ASSERTION_HEADER}"
        )
        return None
    if credential.kind != "none" and lower == credential.header.lower():
        problems.append(
            f"{where}: identity_assertion_header {header} already carries the route's credential; choose another header"
        )
        return None
    return header


def load_routes(
    env: Mapping[str, str], public_url: str, scopes_supported: tuple[str, ...], problems: list[str]
) -> tuple[Route, ...]:
    """Routes from the TOML file named by `MCP_ROUTES_FILE`, or one route from `MCP_SERVER_URL`."""
    routes_file = read_text(env, "MCP_ROUTES_FILE")
    server_url = read_text(env, "MCP_SERVER_URL")
    if routes_file and server_url:
        problems.append("set MCP_SERVER_URL (one downstream) or MCP_ROUTES_FILE (several), not both")
        return ()
    if not routes_file:
        if not server_url:
            return ()  # config.py reports the missing MCP_SERVER_URL
        entry: dict[str, Any] = {"path": urlsplit(server_url).path or "/", "url": server_url}
        for key, variable in SINGLE_ROUTE_ENV.items():
            if read_text(env, variable):
                entry[key] = read_text(env, variable)
        return (build_route(entry, "MCP_SERVER_URL", public_url, env, scopes_supported, problems),)

    try:
        with open(routes_file, "rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        problems.append(f"MCP_ROUTES_FILE: cannot read {routes_file}: {error.strerror}")
        return ()
    except tomllib.TOMLDecodeError as error:
        problems.append(f"MCP_ROUTES_FILE: {routes_file} is not valid TOML: {error}")
        return ()
    entries = document.get("routes")
    extra = sorted(set(document) - {"routes"})
    if extra:
        problems.append(f"MCP_ROUTES_FILE: unknown top-level key(s) {', '.join(extra)}; declare [[routes]] tables")
    if not isinstance(entries, list) or not entries or not all(isinstance(item, dict) for item in entries):
        problems.append(f"MCP_ROUTES_FILE: {routes_file} must declare at least one [[routes]] table")
        return ()
    routes = tuple(
        build_route(item, f"MCP_ROUTES_FILE [[routes]] #{index + 1}", public_url, env, scopes_supported, problems)
        for index, item in enumerate(entries)
    )
    seen_paths: dict[str, str] = {}
    seen_names: set[str] = set()
    for route in routes:
        if route.name in seen_names:
            problems.append(f"MCP_ROUTES_FILE: two routes are named {route.name!r}; names must be unique")
        seen_names.add(route.name)
        for other, other_name in seen_paths.items():
            if (
                route.path == other
                or route.path.startswith(other.rstrip("/") + "/")
                or other.startswith(route.path.rstrip("/") + "/")
            ):
                # Each route is its own audience; a nested path would make one resource a prefix of another.
                problems.append(
                    f"MCP_ROUTES_FILE: routes {other_name!r} ({other}) and {route.name!r} ({route.path}) "
                    "overlap; route paths must not be equal or nested"
                )
        seen_paths[route.path] = route.name
    return routes


def load_proxy_settings(env: Mapping[str, str], public_url: str, problems: list[str]) -> ProxySettings:
    origins = {normalise_origin(public_url)} if public_url else set()
    for origin in read_list(env, "ALLOWED_ORIGINS", problems):
        if origin != "*" and not re.match(r"^https?://[^/?#]+$", origin.rstrip("/")):
            problems.append(
                f"ALLOWED_ORIGINS entries must be origins such as https://app.example.com, or *; got {origin!r}"
            )
            continue
        origins.add(origin if origin == "*" else normalise_origin(origin))
    return ProxySettings(
        allowed_origins=frozenset(origins),
        token_cache_ttl=read_int(env, "TOKEN_CACHE_TTL", 30, problems, minimum=0, maximum=300, unit="seconds"),
        token_cache_size=read_int(env, "TOKEN_CACHE_SIZE", 10_000, problems, minimum=1, maximum=10_000_000),
        upstream_refresh_skew=read_int(
            env, "UPSTREAM_REFRESH_SKEW", 60, problems, minimum=0, maximum=3600, unit="seconds"
        ),
        downstream_connect_timeout=read_seconds(
            env, "DOWNSTREAM_CONNECT_TIMEOUT", 5, problems, minimum=0.1, maximum=120
        ),
        downstream_read_timeout=read_seconds(env, "DOWNSTREAM_READ_TIMEOUT", 300, problems, minimum=0.1, maximum=DAY),
        downstream_stream_idle_timeout=read_seconds(
            env, "DOWNSTREAM_STREAM_IDLE_TIMEOUT", 0, problems, minimum=0, maximum=7 * DAY
        ),
        downstream_pool_idle_timeout=read_seconds(
            env, "DOWNSTREAM_POOL_IDLE_TIMEOUT", 4, problems, minimum=0.1, maximum=3600
        ),
        downstream_pool_size=read_int(env, "DOWNSTREAM_POOL_SIZE", 256, problems, minimum=1, maximum=100_000),
        max_body_bytes=read_int(
            env, "MCP_MAX_BODY_BYTES", 8 * 1024 * 1024, problems, minimum=1024, maximum=2**40, unit="bytes"
        ),
        session_idle_timeout=read_seconds(env, "MCP_SESSION_IDLE_TIMEOUT", DAY, problems, minimum=60, maximum=30 * DAY),
        identity_assertion_ttl=read_int(
            env, "IDENTITY_ASSERTION_TTL", 300, problems, minimum=10, maximum=3600, unit="seconds"
        ),
        identity_assertion_algorithm=_assertion_algorithm(env, problems),
        identity_keys_reload_interval=read_int(
            env, "IDENTITY_KEYS_RELOAD_INTERVAL", 30, problems, minimum=1, maximum=300, unit="seconds"
        ),
        identity_assertion_cache_size=read_int(
            env, "IDENTITY_ASSERTION_CACHE_SIZE", 10_000, problems, minimum=1, maximum=10_000_000
        ),
    )


def _assertion_algorithm(env: Mapping[str, str], problems: list[str]) -> str:
    raw = read_text(env, "IDENTITY_ASSERTION_ALGORITHM", ASSERTION_ALGORITHMS[0])
    for algorithm in ASSERTION_ALGORITHMS:
        if raw.lower() == algorithm.lower():
            return algorithm
    problems.append(
        f"IDENTITY_ASSERTION_ALGORITHM must be ES256 (ECDSA P-256, the default) or EdDSA (Ed25519); got {raw!r}"
    )
    return ASSERTION_ALGORITHMS[0]
