"""The upstream identity provider: the one OAuth 2.0 / OpenID Connect provider the operator registered.

The proxy delegates the user's login to it (authorization code + PKCE S256), keeps its tokens to
refresh them behind the scenes, and learns who the user is (a stable subject id, a *verified*
email, a display name).

Authlib's Flask client (`authlib.integrations.flask_client.OAuth`) does the protocol work.  We do
not use its `authorize_redirect` / `authorize_access_token`: those keep `state`, the PKCE
`code_verifier` and the `nonce` in the Flask session cookie.  Instead `create_authorization_url`
returns them to the caller, which stores them server-side and uses them once.

Providers, detected from `OAUTH_AUTHORIZE_URL` by `build_upstream_provider`:

* Google (accounts.google.com): OpenID Connect.
* Microsoft Entra ID (login.microsoftonline.com and the national clouds): OpenID Connect v2.0.
* GitHub (github.com): plain OAuth 2.0 plus its REST API for the user.
* Anything else: OpenID Connect / RFC 8414 discovery, or explicit endpoints when
  `OAUTH_TOKEN_URL` is set (no discovery).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import requests
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.flask_client import OAuth
from joserfc.errors import InvalidClaimError, JoseError, MissingClaimError

from oauthproxy.allowlists import email_address
from oauthproxy.urls import canonical_resource, is_loopback_host

log = logging.getLogger(__name__)

#: Seconds for every request to the provider (connect and read each). A provider that hangs must
#: not hold a worker: the caller gets `UpstreamError("transient")` and can answer 503.
HTTP_TIMEOUT = 10.0

#: Name of the Authlib registration on the Flask app (one upstream per app).
REGISTRATION_NAME = "upstream"

OIDC_SCOPES = ("openid", "email", "profile")
GITHUB_SCOPES = ("read:user", "user:email")
OFFLINE_ACCESS = "offline_access"
CLIENT_SECRET_POST = "client_secret_post"  # a token endpoint auth method name (RFC 7591 §2)

GOOGLE_HOSTS = frozenset({"accounts.google.com"})
GOOGLE_ISSUER = "https://accounts.google.com"
GITHUB_HOSTS = frozenset({"github.com", "www.github.com"})
GITHUB_AUTHORIZE_URL = "https://github.com/login/oauth/authorize"
GITHUB_TOKEN_URL = "https://github.com/login/oauth/access_token"
GITHUB_API_URL = "https://api.github.com"
#: Entra ID's public cloud and the national clouds all serve the same v2.0 endpoints.
MICROSOFT_HOSTS = frozenset(
    {
        "login.microsoftonline.com",
        "login.microsoftonline.us",
        "login.chinacloudapi.cn",
        "login.partner.microsoftonline.cn",
    }
)
#: Path segments of an Entra ID URL that are not a tenant (…/oauth2/v2.0/authorize, …/v2.0).
_MICROSOFT_NON_TENANT_SEGMENTS = frozenset({"oauth2", "v2.0", ".well-known", "authorize", "token"})

#: Discovery keys handed to Authlib.  Authlib merges server metadata into the keyword arguments of
#: its requests session (`client_kwargs.update(metadata)`), so a document carrying e.g. `verify`,
#: `proxies` or `code_challenge_method` would reconfigure TLS checking or switch PKCE off.  Only
#: these RFC 8414 / OIDC Discovery names, none of which is a session argument, are passed on.
AUTHLIB_METADATA_KEYS = (
    "issuer",
    "authorization_endpoint",
    "token_endpoint",
    "userinfo_endpoint",
    "jwks_uri",
    "id_token_signing_alg_values_supported",
    "token_endpoint_auth_methods_supported",
    "scopes_supported",
    "code_challenge_methods_supported",
    "revocation_endpoint",
    "end_session_endpoint",
)

ErrorKind = Literal["access_denied", "invalid_grant", "transient", "misconfigured"]

# OAuth error codes (RFC 6749 §4.1.2.1, §5.2, OIDC Core §3.1.2.6, and provider dialects) by meaning.
#: The grant (code or refresh token) is dead: the user must log in again.  GitHub answers
#: `bad_verification_code` / `bad_refresh_token` (with HTTP 200) instead of `invalid_grant`.
_INVALID_GRANT_ERRORS = frozenset({"invalid_grant", "bad_verification_code", "bad_refresh_token", "expired_token"})
#: Retrying later may work.
_TRANSIENT_ERRORS = frozenset({"temporarily_unavailable", "server_error", "slow_down"})
#: The user (or the provider's policy about the user) said no.
_DENIED_ERRORS = frozenset(
    {"access_denied", "consent_required", "interaction_required", "login_required", "account_selection_required"}
)
#: Our registration or configuration is wrong; only the operator can fix it.
_MISCONFIGURED_ERRORS = frozenset(
    {
        "invalid_client",
        "unauthorized_client",
        "invalid_request",
        "invalid_scope",
        "unsupported_grant_type",
        "unsupported_response_type",
        "redirect_uri_mismatch",
        "incorrect_client_credentials",
        "application_suspended",
        "invalid_request_uri",
        "invalid_request_object",
        "registration_not_supported",
    }
)


class UpstreamSettings(Protocol):
    """The part of `oauthproxy.config.Settings` this module reads."""

    @property
    def oauth_client_id(self) -> str: ...
    @property
    def oauth_client_secret(self) -> str: ...
    @property
    def oauth_authorize_url(self) -> str: ...
    @property
    def oauth_token_url(self) -> str | None: ...
    @property
    def oauth_userinfo_url(self) -> str | None: ...
    @property
    def scopes_supported(self) -> tuple[str, ...]: ...
    @property
    def upstream_scopes(self) -> tuple[str, ...]: ...


@dataclass(frozen=True)
class UpstreamIdentity:
    """Who logged in.  `id` is the provider's stable subject (OIDC `sub`, GitHub's numeric id as str);
    `email` is set only when the provider affirms it is verified (see `verified_email`)."""

    id: str
    email: str | None
    name: str | None


@dataclass(frozen=True)
class UpstreamTokens:
    access_token: str
    refresh_token: str | None
    expires_at: datetime | None  # naive UTC; None when the provider gave no lifetime (GitHub OAuth apps)


class UpstreamError(Exception):
    """A failure talking to the provider, classified for the caller:

    * `access_denied`: the user (or the provider's policy) refused: tell the MCP client `access_denied`.
    * `invalid_grant`: the code / refresh token is dead or the result unacceptable: log in again.
    * `transient`: network error, timeout, 5xx, 429: retry later (503), keep the stored grant.
    * `misconfigured`: our client registration or settings are wrong: the operator must act.
    """

    def __init__(self, kind: ErrorKind, description: str, *, error: str | None = None):
        super().__init__(description)
        self.kind: ErrorKind = kind
        self.description = description
        self.error = error  # the provider's own error code, when it gave one

    def __repr__(self) -> str:
        return f"UpstreamError({self.kind!r}, {self.description!r})"


# --------------------------------------------------------------------------------------------
# Small pure helpers (unit-tested directly)
# --------------------------------------------------------------------------------------------


def _dedupe(items: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for item in items:
        if item and item not in seen:
            seen.add(item)
            out.append(item)
    return out


def is_affirmed(value: Any) -> bool:
    """Only an explicit yes counts: JSON `true` (OIDC Core §5.1), or the string "true" that some providers
    (AWS Cognito) send.  Absent, null, 0, 1, "yes", "false": not affirmed."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def verified_email(claims: Mapping[str, Any], *verified_keys: str) -> str | None:
    """The `email` claim when one of `verified_keys` (default `email_verified`) affirms it, else None.

    An address the provider does not vouch for must not pass an email allowlist nor reach a downstream:
    anyone can type someone else's address into a sign-up form."""
    email = email_address(claims.get("email"))
    if email is None:
        return None
    return email if any(is_affirmed(claims.get(key)) for key in verified_keys or ("email_verified",)) else None


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def _subject(value: Any) -> str | None:
    # GitHub and many OAuth 2.0 APIs give numeric ids; bool is an int subclass, refuse it.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return _text(value)


def _is_secure_url(url: Any) -> bool:
    """https, or http on a loopback host (OAuth 2.1 §1.5: TLS everywhere except loopback)."""
    if not isinstance(url, str):
        return False
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    return parts.scheme == "https" or (parts.scheme == "http" and is_loopback_host(parts.hostname))


def detect_provider(authorize_url: str) -> Literal["google", "microsoft", "github", "generic"]:
    """Which provider `OAUTH_AUTHORIZE_URL` names, by its host."""
    host = (urlsplit(authorize_url.strip()).hostname or "").lower()
    if host in GOOGLE_HOSTS:
        return "google"
    if host in MICROSOFT_HOSTS:
        return "microsoft"
    if host in GITHUB_HOSTS:
        return "github"
    return "generic"


def microsoft_tenant(url: str) -> str:
    """The Entra ID tenant in a login.microsoftonline.com URL (its first path segment: `common`,
    `organizations`, `consumers`, a tenant GUID or a verified domain); `common` when absent."""
    segments = [segment for segment in urlsplit(url.strip()).path.split("/") if segment]
    if not segments or segments[0].lower() in _MICROSOFT_NON_TENANT_SEGMENTS:
        return "common"
    tenant = segments[0]
    if not all(ch.isalnum() or ch in "-." for ch in tenant):
        raise UpstreamError(
            "misconfigured", f"OAUTH_AUTHORIZE_URL names an invalid Microsoft tenant {tenant!r}: {url!r}"
        )
    return tenant


def discovery_candidates(url: str, max_depth: int = 6) -> list[tuple[str, bool]]:
    """Metadata URLs to try for a provider URL, best first, each with `exact`: True when the URL as
    given is taken as the issuer, False for a shorter path prefix (the URL was then probably a
    full authorization endpoint, so the document must name it as its `authorization_endpoint`).

    For an issuer `<origin><path>`:
      * `<origin><path>/.well-known/openid-configuration`      (OIDC Discovery 1.0 §4)
      * `<origin><path>/.well-known/oauth-authorization-server` (what some servers do for RFC 8414)
      * `<origin>/.well-known/oauth-authorization-server<path>` (RFC 8414 §3.1, path inserted)
      * `<origin>/.well-known/openid-configuration<path>`       (RFC 8414 §5, path inserted)
    """
    parts = urlsplit(url.strip())
    origin = urlunsplit((parts.scheme.lower(), parts.netloc.lower(), "", "", ""))
    segments = [segment for segment in parts.path.split("/") if segment]
    if ".well-known" in segments:
        # The operator pasted a metadata URL: its issuer is the part before /.well-known.
        segments = segments[: segments.index(".well-known")]
    segments = segments[:max_depth]
    out: list[tuple[str, bool]] = []
    for depth in range(len(segments), -1, -1):
        path = "".join("/" + segment for segment in segments[:depth])
        exact = depth == len(segments)
        urls = [
            f"{origin}{path}/.well-known/openid-configuration",
            f"{origin}{path}/.well-known/oauth-authorization-server",
        ]
        if path:
            urls += [
                f"{origin}/.well-known/oauth-authorization-server{path}",
                f"{origin}/.well-known/openid-configuration{path}",
            ]
        for candidate in urls:
            if all(candidate != seen for seen, _ in out):
                out.append((candidate, exact))
    return out


def choose_token_auth_method(metadata: Mapping[str, Any]) -> str:
    """`client_secret_post` when the provider lists it, else `client_secret_basic`.

    Post first because Authlib 1.9 puts the secret into the Basic header without the form-encoding RFC 6749
    §2.3.1 requires: a secret with `+` or `%` then fails at strict providers (seen with oidc-provider).
    RFC 8414 §2: an absent `token_endpoint_auth_methods_supported` means client_secret_basic."""
    supported = metadata.get("token_endpoint_auth_methods_supported")
    if isinstance(supported, list) and "client_secret_post" in supported:
        return "client_secret_post"
    return "client_secret_basic"


def classify_oauth_error(error: str | None, description: str | None, action: str) -> UpstreamError:
    """Turn an OAuth error code from the provider into an `UpstreamError`.  Unknown codes at the
    token endpoint count as `misconfigured`: retrying the same request will not help."""
    code = (error or "").strip() or "unknown_error"
    text = f"{action}: the identity provider answered {code}"
    if description:
        text += f" ({_clip(description)})"
    if code in _INVALID_GRANT_ERRORS:
        return UpstreamError("invalid_grant", text, error=code)
    if code in _TRANSIENT_ERRORS:
        return UpstreamError("transient", text, error=code)
    if code in _DENIED_ERRORS:
        return UpstreamError("access_denied", text, error=code)
    return UpstreamError("misconfigured", text, error=code)


def error_from_callback(args: Mapping[str, str]) -> UpstreamError | None:
    """Read the provider's redirect to our callback (RFC 6749 §4.1.2): None when it carries a code
    and no error, else the classified error.  `error=access_denied` (the user clicked "Cancel")
    becomes kind `access_denied`; `server_error` / `temporarily_unavailable` become `transient`;
    errors that mean our request was wrong (`invalid_scope`, `unauthorized_client`, ...) become
    `misconfigured`; anything else the provider invents is treated as a refusal."""
    error = (args.get("error") or "").strip()
    if not error:
        if (args.get("code") or "").strip():
            return None
        return UpstreamError("access_denied", "the identity provider redirected back with neither a code nor an error")
    description = args.get("error_description") or None
    if error in _MISCONFIGURED_ERRORS:
        return classify_oauth_error(error, description, "login at the identity provider failed")
    if error in _TRANSIENT_ERRORS:
        return classify_oauth_error(error, description, "login at the identity provider failed")
    text = f"the identity provider refused the login: {_clip(error, 100)}"
    if description:
        text += f" ({_clip(description)})"
    return UpstreamError("access_denied", text, error=error)


def _clip(text: str, limit: int = 300) -> str:
    """Provider-supplied text goes into logs and error pages: one line, bounded length."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _expires_at(token: Mapping[str, Any]) -> datetime | None:
    # Authlib's OAuth2Token turns `expires_in` into an absolute `expires_at` (epoch seconds).
    value = token.get("expires_at")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)


def _tokens_from(token: Mapping[str, Any], fallback_refresh_token: str | None = None) -> UpstreamTokens:
    access_token = token.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise UpstreamError("misconfigured", "the identity provider's token response carried no access_token")
    refresh_token = token.get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token:
        # RFC 6749 §6: the server MAY issue a new refresh token; when it does not (Google), the
        # old one stays valid.
        refresh_token = fallback_refresh_token
    return UpstreamTokens(access_token=access_token, refresh_token=refresh_token, expires_at=_expires_at(token))


T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------------


class UpstreamProvider:
    """Base class: holds the Authlib client, the cached metadata, and the flow.

    Subclasses say where the metadata comes from (`_discover`), which extra authorization
    parameters to send, and how to turn a token response into an `UpstreamIdentity`.
    """

    name: str = "oauth2"
    default_scopes: tuple[str, ...] = ()
    #: Whether to add `offline_access` to the scopes (Microsoft always; generic OIDC when listed).
    wants_offline_access: bool = False

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        timeout: float = HTTP_TIMEOUT,
        token_endpoint_auth_method: str | None = None,
    ):
        self.settings = settings
        self.client_id = settings.oauth_client_id
        self.client_secret = settings.oauth_client_secret
        self.timeout = timeout
        self._token_endpoint_auth_method = token_endpoint_auth_method
        self._metadata: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._client: Any = None  # authlib FlaskOAuth2App, set by init_app
        self._client_ready = False
        #: The URL the metadata came from (for logs and a `check` command); None for explicit endpoints.
        self.metadata_url: str | None = None
        self.ca_bundle: str | None = getattr(settings, "ca_bundle", None)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.settings.oauth_authorize_url}>"

    @property
    def display_name(self) -> str:
        """What the consent page calls the provider: a brand, or the host people will see in the address bar."""
        brands = {"google": "Google", "microsoft": "Microsoft", "github": "GitHub"}
        return brands.get(self.name) or urlsplit(self.settings.oauth_authorize_url).netloc

    # -- Flask / Authlib --------------------------------------------------------------------

    def init_app(self, app: Any) -> None:
        """Register the provider with Authlib's Flask client on `app`.  No network here: the
        metadata is fetched on first use, so a provider outage does not stop the proxy booting."""
        oauth = app.extensions.get("authlib.integrations.flask_client")
        if not isinstance(oauth, OAuth):
            oauth = OAuth(app)
        # Authlib caches created clients by name; drop ours so a re-registration takes effect.
        oauth._clients.pop(REGISTRATION_NAME, None)
        # Every Authlib parameter is passed explicitly (None when unused) so stray Flask config
        # keys such as UPSTREAM_ACCESS_TOKEN_URL cannot silently override them.
        self._client = oauth.register(
            REGISTRATION_NAME,
            client_id=self.client_id,
            client_secret=self.client_secret,
            request_token_url=None,
            request_token_params=None,
            access_token_url=None,
            access_token_params=None,
            refresh_token_url=None,
            refresh_token_params=None,
            authorize_url=None,
            authorize_params=None,
            api_base_url=self._api_base_url(),
            server_metadata_url=None,  # we discover ourselves (fallback chain, clear errors)
            client_kwargs={
                # PKCE S256 on every upstream authorization (OAuth 2.1 §4.1.1, RFC 7636 §4.2),
                # whether or not the provider advertises it: unknown parameters are ignored.
                "code_challenge_method": "S256",
                # OAuth2Session applies this to every request it sends (token, userinfo, JWKS).
                "default_timeout": self.timeout,
                # CA_BUNDLE (a private PKI), else requests' default (certifi, or REQUESTS_CA_BUNDLE). With it, the
                # environment is not read: requests lets REQUESTS_CA_BUNDLE override a session's `verify`.
                **({"verify": self.ca_bundle, "trust_env": False} if self.ca_bundle else {}),
            },
        )
        self._client_ready = False

    def _api_base_url(self) -> str | None:
        return None

    def _app(self) -> Any:
        """The Authlib app, with the discovered metadata loaded into it."""
        if self._client is None:
            raise RuntimeError(f"{type(self).__name__}.init_app(app) must be called before using the provider")
        metadata = self.load_metadata()
        if not self._client_ready:
            self._client.server_metadata.update({k: metadata[k] for k in AUTHLIB_METADATA_KEYS if k in metadata})
            self._client.client_kwargs["token_endpoint_auth_method"] = (
                self._token_endpoint_auth_method or choose_token_auth_method(metadata)
            )
            self._client_ready = True
        return self._client

    # -- metadata -------------------------------------------------------------------------------

    def load_metadata(self) -> dict[str, Any]:
        """The provider's metadata (discovery document, or the explicit endpoints), fetched once and
        cached after the first success; failures are not cached so the next call retries.
        Raises `UpstreamError` (`misconfigured` or `transient`) naming the URLs tried."""
        if self._metadata is None:
            with self._lock:
                if self._metadata is None:
                    metadata = self._discover()
                    self._check_metadata(metadata)
                    self._metadata = metadata
        return dict(self._metadata)

    def _discover(self) -> dict[str, Any]:
        raise NotImplementedError

    def _check_metadata(self, metadata: Mapping[str, Any]) -> None:
        source = self.metadata_url or "the configuration"
        for key in ("authorization_endpoint", "token_endpoint"):
            if not metadata.get(key):
                raise UpstreamError("misconfigured", f"{source} names no {key}")
        for key in ("authorization_endpoint", "token_endpoint", "userinfo_endpoint", "jwks_uri"):
            value = metadata.get(key)
            if value is not None and not _is_secure_url(value):
                raise UpstreamError(
                    "misconfigured",
                    f"{source}: {key} {value!r} must be an https URL (plain http only on loopback)",
                )
        methods = metadata.get("code_challenge_methods_supported")
        if isinstance(methods, list) and "S256" not in methods:
            log.warning("%s does not list PKCE S256 in code_challenge_methods_supported; sending it anyway", source)

    def _fetch_metadata(self, url: str) -> tuple[dict[str, Any] | None, str]:
        """GET one metadata URL: (document, "") or (None, reason).  Network errors raise transient."""
        try:
            with requests.Session() as session:
                if self.ca_bundle:
                    session.verify, session.trust_env = self.ca_bundle, False
                response = session.get(url, headers={"Accept": "application/json"}, timeout=self.timeout)
        except requests.RequestException as exc:
            raise UpstreamError(
                "transient",
                f"could not reach the identity provider at {url}: {_clip(type(exc).__name__ + ': ' + str(exc))}",
            ) from exc
        if response.status_code != 200:
            return None, f"HTTP {response.status_code}"
        try:
            document = response.json()
        except ValueError:
            return None, "not JSON"
        if not isinstance(document, dict):
            return None, "not a JSON object"
        if not document.get("authorization_endpoint") or not document.get("token_endpoint"):
            return None, "no authorization_endpoint/token_endpoint"
        return document, ""

    def _discover_at(self, url: str) -> dict[str, Any]:
        """Fetch the one well-known metadata URL of a known provider."""
        document, reason = self._fetch_metadata(url)
        if document is None:
            kind: ErrorKind = "transient" if reason.startswith("HTTP 5") or reason == "HTTP 429" else "misconfigured"
            raise UpstreamError(kind, f"could not load the identity provider's metadata from {url}: {reason}")
        self.metadata_url = url
        return document

    # -- scopes ---------------------------------------------------------------------------------

    def identity_scopes(self) -> list[str]:
        return list(self.default_scopes)

    def upstream_scopes(self, granted: list[str]) -> list[str]:
        """Scopes to request upstream: the identity scopes, `offline_access` where the provider
        needs it for a refresh token, `UPSTREAM_SCOPES`, then the scopes the user granted the MCP
        client; de-duplicated, order kept.

        Granted scopes are filtered: only those in `SCOPES_SUPPORTED` (when it is set) pass, so a
        client cannot smuggle arbitrary upstream scopes through; `offline_access` from a client is
        dropped for providers that do not use it (Google rejects it as an invalid scope)."""
        offline = [OFFLINE_ACCESS] if self._use_offline_access() else []
        supported = set(self.settings.scopes_supported)
        passed = [
            scope for scope in granted if (not supported or scope in supported) and (scope != OFFLINE_ACCESS or offline)
        ]
        return _dedupe([*self.identity_scopes(), *offline, *self.settings.upstream_scopes, *passed])

    def _use_offline_access(self) -> bool:
        return self.wants_offline_access

    # -- the flow -------------------------------------------------------------------------------

    @staticmethod
    def error_from_callback(args: Mapping[str, str]) -> UpstreamError | None:
        """The module-level `error_from_callback`, reachable from the provider object too."""
        return error_from_callback(args)

    def _authorize_params(self, scopes: list[str]) -> dict[str, str]:
        return {}

    def create_authorization_url(self, redirect_uri: str, scopes: list[str]) -> tuple[str, dict[str, Any]]:
        """The URL to send the user's browser to, and the secrets the caller must store
        server-side (bound to this login attempt) and hand back to `exchange_code` once:
        `{"state", "code_verifier", "nonce"}` (nonce None without `openid`)."""
        client = self._app()
        rv = client.create_authorization_url(redirect_uri, scope=" ".join(scopes), **self._authorize_params(scopes))
        secrets = {"state": rv["state"], "code_verifier": rv["code_verifier"], "nonce": rv.get("nonce")}
        return rv["url"], secrets

    def exchange_code(
        self, code: str, redirect_uri: str, secrets: Mapping[str, Any]
    ) -> tuple[UpstreamTokens, UpstreamIdentity]:
        """Redeem the authorization code (with the stored PKCE verifier) and identify the user."""
        verifier = secrets.get("code_verifier")
        if not isinstance(verifier, str) or not verifier:
            # PKCE must be impossible to skip, even through a caller bug.
            raise UpstreamError("invalid_grant", "no PKCE code_verifier was stored for this login; start again")
        client = self._app()
        token = self._call(
            "exchanging the authorization code",
            self._metadata_value("token_endpoint"),
            lambda: client.fetch_access_token(redirect_uri=redirect_uri, code=code, code_verifier=verifier),
        )
        tokens = _tokens_from(token)
        identity = self._identity(token, secrets)
        return tokens, identity

    def _refresh_params(self, scopes: list[str] | None) -> dict[str, str]:
        # RFC 6749 §6: scope is optional and defaults to the original grant; oidc-provider and
        # Google want it absent (or equal to the grant).
        return {}

    def refresh_upstream_token(self, refresh_token: str, scopes: list[str] | None = None) -> UpstreamTokens:
        """Use a refresh token.  Keeps the old refresh token when the provider returns none.
        400 `invalid_grant` (revoked/expired) → `UpstreamError("invalid_grant")`; network error,
        timeout, 5xx, 429 → `"transient"` (keep the grant and retry later).

        `scopes`: the scopes of the original login; only Microsoft uses them (its v2.0 token
        endpoint wants `scope` on a refresh); without them Microsoft gets the configured ones."""
        client = self._app()
        # `fetch_access_token(grant_type="refresh_token")` rather than the session's
        # `refresh_token()`: the latter fires Authlib's token_update signal, which needs a Flask
        # app context, and we store the tokens ourselves anyway.
        token = self._call(
            "refreshing the upstream token",
            self._metadata_value("token_endpoint"),
            lambda: client.fetch_access_token(
                grant_type="refresh_token", refresh_token=refresh_token, **self._refresh_params(scopes)
            ),
        )
        return _tokens_from(token, fallback_refresh_token=refresh_token)

    # -- identity -------------------------------------------------------------------------------

    def _identity(self, token: Mapping[str, Any], secrets: Mapping[str, Any]) -> UpstreamIdentity:
        info = self._userinfo(token)
        return self._identity_from_userinfo(info)

    def _userinfo_url(self) -> str | None:
        url = self.load_metadata().get("userinfo_endpoint") or self.settings.oauth_userinfo_url
        if url and not _is_secure_url(url):
            raise UpstreamError(
                "misconfigured", f"the userinfo URL {url!r} must be https (plain http only on loopback)"
            )
        return url

    def _userinfo(self, token: Mapping[str, Any]) -> dict[str, Any]:
        url = self._userinfo_url()
        if not url:
            raise UpstreamError(
                "misconfigured",
                "the identity provider has no userinfo endpoint: "
                "set OAUTH_USERINFO_URL to the URL that returns the user's profile",
            )
        return self._get_json(url, token, "fetching the user's profile")

    def _get_json(self, url: str, token: Mapping[str, Any], action: str) -> Any:
        """GET a protected resource with the user's access token (RFC 6750 bearer)."""
        client = self._app()
        response = self._call(
            action, url, lambda: client.get(url, token=dict(token), headers={"Accept": "application/json"})
        )
        if response.status_code != 200:
            raise _response_error(response, action, url)
        try:
            return response.json()
        except ValueError:
            raise UpstreamError("misconfigured", f"{action}: {url} did not answer JSON") from None

    def _identity_from_userinfo(self, info: Any) -> UpstreamIdentity:
        """Normalise a profile document of an unknown OAuth 2.0 provider."""
        if not isinstance(info, Mapping):
            raise UpstreamError("misconfigured", "the user's profile is not a JSON object")
        subject = _subject(info.get("sub")) or _subject(info.get("id")) or _subject(info.get("user_id"))
        if subject is None:
            raise UpstreamError("misconfigured", "the user's profile has no sub or id: cannot tell users apart")
        # `verified` is how several OAuth 2.0 APIs (Discord, ...) vouch for an address.
        email = verified_email(info, "email_verified", "verified")
        name = (
            _text(info.get("name"))
            or _text(info.get("preferred_username"))
            or _text(info.get("global_name"))
            or _text(info.get("username"))
            or _text(info.get("login"))
        )
        return UpstreamIdentity(id=subject, email=email, name=name)

    # -- error handling ---------------------------------------------------------------------------

    def _metadata_value(self, key: str) -> str:
        return str(self.load_metadata().get(key) or "")

    def _call(self, action: str, url: str, func: Callable[[], T]) -> T:
        """Run one provider request and classify whatever goes wrong."""
        try:
            return func()
        except UpstreamError:
            raise
        except (AuthlibBaseError, requests.RequestException, ValueError) as exc:
            raise _classify_exception(exc, action, url) from exc


def _classify_exception(exc: Exception, action: str, url: str) -> UpstreamError:
    """Classify an exception raised by Authlib / requests while talking to the provider."""
    if isinstance(exc, AuthlibBaseError):
        # An OAuth error response (RFC 6749 §5.2) read from the JSON body; GitHub sends these with 200.
        return classify_oauth_error(exc.error, exc.description, action)
    if isinstance(exc, requests.HTTPError):
        # Authlib raises these for 5xx and for non-JSON error bodies.
        if exc.response is None:
            return UpstreamError("transient", f"{action}: {url} failed: {_clip(str(exc))}")
        return _response_error(exc.response, action, url)
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return UpstreamError(
            "transient", f"{action}: could not reach {url}: {_clip(type(exc).__name__ + ': ' + str(exc))}"
        )
    if isinstance(exc, requests.RequestException):
        return UpstreamError("transient", f"{action}: request to {url} failed: {_clip(str(exc))}")
    # Authlib: "Token endpoint response is not a JSON object" (an HTML error page, a proxy, ...).
    return UpstreamError("misconfigured", f"{action}: {url} answered something that is not JSON: {_clip(str(exc))}")


def _response_error(response: requests.Response, action: str, url: str) -> UpstreamError:
    """An unexpected HTTP status: 5xx, 429 and GitHub's rate-limit 403 are worth retrying."""
    status = response.status_code
    if status >= 500 or status == 429 or (status == 403 and response.headers.get("X-RateLimit-Remaining") == "0"):
        return UpstreamError("transient", f"{action}: {url} answered HTTP {status}")
    return UpstreamError("misconfigured", f"{action}: {url} answered HTTP {status}: {_clip(response.text, 200)}")


class OAuth2Provider(UpstreamProvider):
    """A plain OAuth 2.0 provider configured with explicit endpoints (`OAUTH_TOKEN_URL` set): no
    discovery, no ID token; the user comes from `OAUTH_USERINFO_URL`.  It requests only
    `UPSTREAM_SCOPES` (no default identity scopes: many such providers refuse `openid`)."""

    name = "oauth2"
    default_scopes = ()

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        authorize_url: str | None = None,
        token_url: str | None = None,
        userinfo_url: str | None = None,
        timeout: float = HTTP_TIMEOUT,
        token_endpoint_auth_method: str | None = None,
    ):
        super().__init__(settings, timeout=timeout, token_endpoint_auth_method=token_endpoint_auth_method)
        self.authorize_url = authorize_url or settings.oauth_authorize_url
        self.token_url = token_url or settings.oauth_token_url
        self.userinfo_url = userinfo_url or settings.oauth_userinfo_url

    def _discover(self) -> dict[str, Any]:
        if not self.token_url:
            raise UpstreamError("misconfigured", "OAUTH_TOKEN_URL is required for this provider")
        metadata: dict[str, Any] = {"authorization_endpoint": self.authorize_url, "token_endpoint": self.token_url}
        if self.userinfo_url:
            metadata["userinfo_endpoint"] = self.userinfo_url
        return metadata


class GitHubProvider(OAuth2Provider):
    """GitHub OAuth apps and GitHub Apps: plain OAuth 2.0 (no OIDC for users), the user from the
    REST API.  The URLs are constructor arguments so tests can point it at a fake GitHub."""

    name = "github"
    default_scopes = GITHUB_SCOPES

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        api_base_url: str | None = None,
        authorize_url: str | None = None,
        token_url: str | None = None,
        timeout: float = HTTP_TIMEOUT,
        token_endpoint_auth_method: str = CLIENT_SECRET_POST,
    ):
        # GitHub documents client_id/client_secret as form parameters (client_secret_post).
        super().__init__(
            settings,
            authorize_url=authorize_url or GITHUB_AUTHORIZE_URL,
            token_url=token_url or GITHUB_TOKEN_URL,
            userinfo_url=None,
            timeout=timeout,
            token_endpoint_auth_method=token_endpoint_auth_method,
        )
        base = api_base_url or getattr(settings, "github_api_url", None) or GITHUB_API_URL
        # Trailing slash: Authlib joins relative paths with urljoin, which drops a last segment
        # without one (GitHub Enterprise's https://ghe.example.com/api/v3).
        self.api_base_url = base.rstrip("/") + "/"

    def _api_base_url(self) -> str | None:
        return self.api_base_url

    def _discover(self) -> dict[str, Any]:
        # GitHub's token endpoint answers form-encoded unless asked for JSON; Authlib sends
        # `Accept: application/json` on token requests, which is what GitHub needs.
        return {
            "authorization_endpoint": self.authorize_url,
            "token_endpoint": self.token_url,
            "userinfo_endpoint": self.api_base_url + "user",
        }

    def _identity(self, token: Mapping[str, Any], secrets: Mapping[str, Any]) -> UpstreamIdentity:
        user = self._github("user", token)
        if not isinstance(user, Mapping):
            raise UpstreamError("misconfigured", "GitHub's /user did not answer a JSON object")
        subject = _subject(user.get("id"))
        if subject is None:
            raise UpstreamError("misconfigured", "GitHub's /user has no numeric id")
        email = github_email(user, self._github_emails(token))
        name = _text(user.get("name")) or _text(user.get("login"))
        return UpstreamIdentity(id=subject, email=email, name=name)

    def _github(self, path: str, token: Mapping[str, Any]) -> Any:
        url = self.api_base_url + path
        client = self._app()
        response = self._call(
            f"fetching GitHub {path}",
            url,
            lambda: client.get(
                url,
                token=dict(token),
                # GitHub's documented media type and API version for the REST API.
                headers={"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"},
            ),
        )
        if response.status_code != 200:
            raise _response_error(response, f"fetching GitHub /{path}", url)
        try:
            return response.json()
        except ValueError:
            raise UpstreamError("misconfigured", f"GitHub {url} did not answer JSON") from None

    def _github_emails(self, token: Mapping[str, Any]) -> list[Any] | None:
        """`GET /user/emails` (needs the user:email scope), or None when the token may not read it."""
        try:
            emails = self._github("user/emails", token)
        except UpstreamError as exc:
            if exc.kind == "transient":
                raise
            # 403/404: the token lacks user:email (e.g. a GitHub App without the email permission).
            log.warning("GitHub /user/emails unavailable: %s", exc.description)
            return None
        return emails if isinstance(emails, list) else None


def github_email(user: Mapping[str, Any], emails: list[Any] | None) -> str | None:
    """The email of a GitHub user, only as `/user/emails` (user:email scope) lists it with `verified: true`:
    the public profile email (`/user`'s `email`) when it is one of those, else the primary verified one.

    Without `/user/emails` there is no email: `/user` says nothing about verification."""
    if emails is None:
        return None
    verified = [
        address
        for entry in emails
        if isinstance(entry, Mapping)
        and entry.get("verified") is True
        and (address := email_address(entry.get("email"))) is not None
    ]
    public = email_address(user.get("email"))
    if public and public in verified:
        return public
    for entry in emails:
        if isinstance(entry, Mapping) and entry.get("primary") is True and entry.get("verified") is True:
            return email_address(entry.get("email"))
    return None


class OpenIDConnectProvider(UpstreamProvider):
    """A generic OpenID Connect provider found by discovery from `OAUTH_AUTHORIZE_URL`.

    The user is taken from the validated ID token (signature against the provider's JWKS, `iss`,
    `aud`, `exp`, `nonce`), completed from userinfo for a missing email or name.  If discovery
    finds only RFC 8414 metadata without a `jwks_uri`, it works as plain OAuth 2.0 with userinfo."""

    name = "oidc"
    default_scopes = OIDC_SCOPES
    #: Ask for a refresh token with `prompt=consent` when requesting offline_access (OIDC Core §11:
    #: otherwise the OP MUST ignore offline_access; oidc-provider does).
    prompt_consent_for_offline_access = True

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        url: str | None = None,
        timeout: float = HTTP_TIMEOUT,
        token_endpoint_auth_method: str | None = None,
    ):
        super().__init__(settings, timeout=timeout, token_endpoint_auth_method=token_endpoint_auth_method)
        self.url = url or settings.oauth_authorize_url

    # -- discovery --------------------------------------------------------------------------------

    def _discover(self) -> dict[str, Any]:
        """OIDC Discovery, then RFC 8414, at the URL as given and then at its shorter path prefixes
        down to the origin (for when the operator pasted the full authorize URL)."""
        tried: list[str] = []
        mismatched: list[str] = []
        transient: list[str] = []
        wanted = canonical_resource(self.url)
        for url, exact in discovery_candidates(self.url):
            document, reason = self._fetch_metadata(url)  # a network error raises transient at once
            if document is None:
                tried.append(f"{url} ({reason})")
                if reason.startswith("HTTP 5") or reason == "HTTP 429":
                    transient.append(url)
                continue
            if not exact and canonical_resource(str(document["authorization_endpoint"])) != wanted:
                # Another server's metadata (e.g. Okta's org server above a custom one): not ours.
                mismatched.append(f"{url} (authorization_endpoint {document['authorization_endpoint']})")
                continue
            self.metadata_url = url
            issuer = document.get("issuer")
            base = url.split("/.well-known/")[0]
            if exact and isinstance(issuer, str) and issuer.rstrip("/") != base.rstrip("/") and "/.well-known/" in url:
                # OIDC Discovery §4.3 / RFC 8414 §3.3 want them equal; tolerate, tokens are checked
                # against the document's issuer anyway.
                log.warning("metadata at %s names issuer %s, not %s", url, issuer, base)
            return document
        message = (
            f"could not discover the identity provider from OAUTH_AUTHORIZE_URL={self.url!r}; tried "
            + ", ".join(tried + mismatched)
            + ". Set OAUTH_AUTHORIZE_URL to the provider's issuer URL "
            "(the one with /.well-known/openid-configuration), "
            "or set OAUTH_TOKEN_URL and OAUTH_USERINFO_URL to configure the endpoints explicitly."
        )
        if transient and not mismatched:
            raise UpstreamError("transient", message)
        raise UpstreamError("misconfigured", message)

    def _check_metadata(self, metadata: Mapping[str, Any]) -> None:
        super()._check_metadata(metadata)
        if metadata.get("jwks_uri") and not metadata.get("issuer"):
            raise UpstreamError("misconfigured", f"{self.metadata_url} has a jwks_uri but no issuer")

    @property
    def is_oidc(self) -> bool:
        return bool(self.load_metadata().get("jwks_uri"))

    # -- scopes -----------------------------------------------------------------------------------

    def identity_scopes(self) -> list[str]:
        metadata = self.load_metadata()
        supported = metadata.get("scopes_supported")
        if not metadata.get("jwks_uri") and isinstance(supported, list):
            # A plain RFC 8414 server: ask only for the identity scopes it lists (openid would be
            # refused as invalid_scope by some).
            return [scope for scope in self.default_scopes if scope in supported]
        return list(self.default_scopes)

    def _use_offline_access(self) -> bool:
        supported = self.load_metadata().get("scopes_supported")
        return isinstance(supported, list) and OFFLINE_ACCESS in supported

    def _authorize_params(self, scopes: list[str]) -> dict[str, str]:
        if OFFLINE_ACCESS in scopes and self.prompt_consent_for_offline_access:
            return {"prompt": "consent"}
        return {}

    # -- identity ---------------------------------------------------------------------------------

    def _issuer_option(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        return {"essential": True, "values": [metadata["issuer"]]}

    def _id_token_claims(self, token: Mapping[str, Any], nonce: str | None) -> dict[str, Any]:
        """Validate the ID token (OIDC Core §3.1.3.7) and return its claims."""
        client = self._app()
        metadata = self.load_metadata()
        claims_options = {
            "iss": self._issuer_option(metadata),
            # Authlib checks `aud` only when told to: it must contain our client id (and `azp`,
            # when present, must be us).
            "aud": {"essential": True, "value": self.client_id},
            "sub": {"essential": True},
        }
        try:
            claims = client.parse_id_token(dict(token), nonce=nonce, claims_options=claims_options)
        except (InvalidClaimError, MissingClaimError) as exc:
            if exc.claim in ("iss", "aud", "azp"):
                raise UpstreamError(
                    "misconfigured",
                    f"the ID token's {exc.claim} claim does not match this proxy's configuration (issuer "
                    f"{metadata.get('issuer')}, client id {self.client_id}): {exc}",
                ) from exc
            raise UpstreamError("invalid_grant", f"the ID token is not acceptable: {exc}") from exc
        except JoseError as exc:  # expired, bad signature, unknown key, malformed
            raise UpstreamError("invalid_grant", f"the ID token is not acceptable: {exc}") from exc
        except RuntimeError as exc:  # Authlib: 'Missing "jwks_uri" in metadata'
            raise UpstreamError("misconfigured", f"cannot verify the ID token: {exc}") from exc
        except requests.RequestException as exc:  # fetching the JWKS
            raise _classify_exception(
                exc, "fetching the provider's signing keys", str(metadata.get("jwks_uri"))
            ) from exc
        except ValueError as exc:  # undecodable token parts
            raise UpstreamError("invalid_grant", f"the ID token is malformed: {_clip(str(exc))}") from exc
        return dict(claims or {})

    #: The claims that can vouch for `email`; a present one that is not `true` is a verdict: unverified.
    email_verified_keys: tuple[str, ...] = ("email_verified",)

    def _email_from(self, claims: Mapping[str, Any]) -> str | None:
        return verified_email(claims, *self.email_verified_keys)

    def _identity(self, token: Mapping[str, Any], secrets: Mapping[str, Any]) -> UpstreamIdentity:
        metadata = self.load_metadata()
        claims: dict[str, Any] = {}
        if token.get("id_token") and metadata.get("jwks_uri"):
            nonce = secrets.get("nonce")
            claims = self._id_token_claims(token, nonce if isinstance(nonce, str) else None)
        elif secrets.get("nonce") and metadata.get("jwks_uri"):
            # We asked for openid and got no ID token (OIDC Core §3.1.3.3 requires one): the access
            # token came straight from the token endpoint over TLS, so userinfo can still say who it is.
            log.warning("the identity provider returned no id_token for an openid request; using userinfo")

        if not claims:
            return self._identity_from_userinfo(self._userinfo(token))

        subject = _subject(claims.get("sub"))
        if subject is None:
            raise UpstreamError("invalid_grant", "the ID token has no sub claim")
        email = self._email_from(claims)
        # An address the ID token itself says is unverified stays refused: userinfo must not launder it.
        need_email = email is None and all(claims.get(key) is None for key in self.email_verified_keys)
        name = _text(claims.get("name"))
        if (need_email or name is None) and self._userinfo_url():
            info = self._optional_userinfo(token)
            # OIDC Core §5.3.2: userinfo's sub MUST match the ID token's, or its values are unusable.
            if info and _subject(info.get("sub")) == subject:
                if need_email:
                    email = self._email_from(info)
                name = name or _text(info.get("name"))
            elif info:
                log.warning("userinfo sub does not match the ID token sub; ignoring userinfo")
        if name is None:
            name = _text(claims.get("preferred_username")) or _text(claims.get("nickname"))
        return UpstreamIdentity(id=subject, email=email, name=name)

    def _optional_userinfo(self, token: Mapping[str, Any]) -> dict[str, Any] | None:
        """Userinfo only to complete the ID token: a 4xx (e.g. Microsoft's Graph userinfo with an
        access token for another resource) is not fatal; a transient failure is, so the user is not
        wrongly refused by an email allowlist because of a network blip."""
        try:
            info = self._userinfo(token)
        except UpstreamError as exc:
            if exc.kind == "transient":
                raise
            log.warning("userinfo unavailable, using the ID token alone: %s", exc.description)
            return None
        return dict(info) if isinstance(info, Mapping) else None


class GoogleProvider(OpenIDConnectProvider):
    """Google accounts (consumer and Workspace)."""

    name = "google"
    metadata_location = "https://accounts.google.com/.well-known/openid-configuration"

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        timeout: float = HTTP_TIMEOUT,
        token_endpoint_auth_method: str | None = None,
    ):
        super().__init__(
            settings, url=GOOGLE_ISSUER, timeout=timeout, token_endpoint_auth_method=token_endpoint_auth_method
        )

    def _discover(self) -> dict[str, Any]:
        return self._discover_at(self.metadata_location)

    def identity_scopes(self) -> list[str]:
        return list(self.default_scopes)  # fixed: no need to consult the discovery document

    def _use_offline_access(self) -> bool:
        return False  # Google uses access_type=offline; the offline_access scope is invalid there

    def _authorize_params(self, scopes: list[str]) -> dict[str, str]:
        # Google returns a refresh token only with access_type=offline, and only on the first
        # consent of a user to this client unless prompt=consent forces the consent screen again.
        # Every login starts a new proxy grant that needs its own refresh token, so ask each time.
        return {"access_type": "offline", "prompt": "consent"}

    def _issuer_option(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        # Google's ID tokens carry iss "https://accounts.google.com" or "accounts.google.com"
        # (documented: "Verify that the value of iss is equal to either").
        return {"essential": True, "values": [GOOGLE_ISSUER, "accounts.google.com"]}


class MicrosoftProvider(OpenIDConnectProvider):
    """Microsoft Entra ID (work/school accounts) and personal Microsoft accounts, v2.0 endpoints.

    * `offline_access` is how Entra ID issues refresh tokens; `prompt=consent` is never sent:
      users without the right to consent would hit an "admin approval required" wall.
    * For the multi-tenant `common` / `organizations` authorities the discovery document's issuer
      is the template `https://login.microsoftonline.com/{tenantid}/v2.0`; each ID token's `iss`
      names the user's real tenant, so it is checked against the template filled with the token's
      `tid` claim.
    """

    name = "microsoft"
    wants_offline_access = True

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        tenant: str | None = None,
        authority_host: str | None = None,
        timeout: float = HTTP_TIMEOUT,
        token_endpoint_auth_method: str | None = None,
    ):
        url = settings.oauth_authorize_url
        self.tenant = tenant or microsoft_tenant(url)
        self.authority_host = authority_host or (urlsplit(url).hostname or "login.microsoftonline.com").lower()
        super().__init__(
            settings,
            url=f"https://{self.authority_host}/{self.tenant}/v2.0",
            timeout=timeout,
            token_endpoint_auth_method=token_endpoint_auth_method,
        )

    def _discover(self) -> dict[str, Any]:
        # v2.0 endpoints whatever the configured URL said (a v1 /oauth2/authorize URL included):
        # v1 tokens have a different issuer and no offline_access scope.
        return self._discover_at(f"{self.url}/.well-known/openid-configuration")

    def identity_scopes(self) -> list[str]:
        return list(self.default_scopes)  # fixed: no need to consult the discovery document

    def _use_offline_access(self) -> bool:
        return True

    def _authorize_params(self, scopes: list[str]) -> dict[str, str]:
        return {}  # no prompt=consent, see the class docstring

    def _refresh_params(self, scopes: list[str] | None) -> dict[str, str]:
        # The v2.0 token endpoint documents `scope` as required on a refresh (golang/oauth2#540:
        # omitting it fails in practice); a subset of the original scopes is allowed.
        return {"scope": " ".join(scopes or self.upstream_scopes([]))}

    def _issuer_option(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        template = str(metadata["issuer"])

        def issuer_matches(claims: Mapping[str, Any], value: Any) -> bool:
            if "{tenantid}" not in template:
                return value == template
            tid = claims.get("tid")
            return isinstance(tid, str) and bool(tid) and value == template.replace("{tenantid}", tid)

        return {"essential": True, "validate": issuer_matches}

    # Entra ID's `email` comes from the user's mail attribute, which a tenant admin can set to any
    # address ("nOAuth"), and it never sends `email_verified`.  Only the optional claim `xms_edov`
    # (email domain owner verified: the tenant owns the address's domain) vouches for it; it must be
    # added to the app registration's ID token claims.  Graph's userinfo never carries it.
    email_verified_keys = ("xms_edov",)


def build_upstream_provider(settings: UpstreamSettings) -> UpstreamProvider:
    """The provider `OAUTH_AUTHORIZE_URL` (and `OAUTH_TOKEN_URL`) designate.  No network."""
    url = settings.oauth_authorize_url
    kind = detect_provider(url)
    if kind == "google":
        return GoogleProvider(settings)
    if kind == "microsoft":
        return MicrosoftProvider(settings)
    if kind == "github":
        # A full github.com authorize URL or just https://github.com: the endpoints are fixed.
        return GitHubProvider(settings, token_url=settings.oauth_token_url or None)
    if getattr(settings, "github_api_url", None):
        # GitHub Enterprise Server: GITHUB_API_URL (https://HOST/api/v3) says so. OAUTH_AUTHORIZE_URL is HOST or its
        # authorize URL; the token URL is GitHub's path on the same host unless OAUTH_TOKEN_URL names it.
        parts = urlsplit(url.strip())
        origin = f"{parts.scheme}://{parts.netloc}"
        authorize_url = url.strip() if parts.path.strip("/") else origin + "/login/oauth/authorize"
        return GitHubProvider(
            settings,
            authorize_url=authorize_url,
            token_url=settings.oauth_token_url or origin + "/login/oauth/access_token",
        )
    if settings.oauth_token_url:
        if not settings.oauth_userinfo_url:
            raise UpstreamError(
                "misconfigured",
                "OAUTH_USERINFO_URL is required with OAUTH_TOKEN_URL: without discovery the proxy needs the URL "
                "that returns the user's profile (id, email, name)",
            )
        return OAuth2Provider(settings)
    return OpenIDConnectProvider(settings)


__all__ = [
    "GitHubProvider",
    "GoogleProvider",
    "MicrosoftProvider",
    "OAuth2Provider",
    "OpenIDConnectProvider",
    "UpstreamError",
    "UpstreamIdentity",
    "UpstreamProvider",
    "UpstreamSettings",
    "UpstreamTokens",
    "build_upstream_provider",
    "choose_token_auth_method",
    "classify_oauth_error",
    "detect_provider",
    "discovery_candidates",
    "error_from_callback",
    "github_email",
    "is_affirmed",
    "microsoft_tenant",
    "verified_email",
]
