"""The base of every provider: the authorization code flow with PKCE, token exchange and refresh, the user's identity.

Authlib's Flask client (`authlib.integrations.flask_client.OAuth`) does the protocol work.  We do
not use its `authorize_redirect` / `authorize_access_token`: those keep `state`, the PKCE
`code_verifier` and the `nonce` in the Flask session cookie.  Instead `create_authorization_url`
returns them to the caller, which stores them server-side and uses them once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

import requests
from authlib.common.errors import AuthlibBaseError
from authlib.integrations.flask_client import OAuth

from oauthproxy.providers import discovery
from oauthproxy.providers.errors import ProviderError, classify_exception, error_from_callback, response_error
from oauthproxy.providers.identity import ProviderIdentity, subject_claim, text_claim, verified_email

OFFLINE_ACCESS = "offline_access"

# The logger name operators know from before the providers package: log lines keep naming it.
log = logging.getLogger("oauthproxy.upstream")

T = TypeVar("T")


class ProviderSettings(Protocol):
    """The part of `oauthproxy.config.Settings` a provider reads."""

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
    @property
    def ca_bundle(self) -> str | None: ...


@dataclass(frozen=True)
class ProviderTokens:
    access_token: str
    refresh_token: str | None
    expires_at: datetime | None  # naive UTC; None when the provider gave no lifetime (GitHub OAuth apps)


def _expires_at(token: Mapping[str, Any]) -> datetime | None:
    # Authlib's OAuth2Token turns `expires_in` into an absolute `expires_at` (epoch seconds).
    value = token.get("expires_at")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return datetime.fromtimestamp(value, UTC).replace(tzinfo=None)


def tokens_from(token: Mapping[str, Any], fallback_refresh_token: str | None = None) -> ProviderTokens:
    """The tokens of a token endpoint response; without a new refresh token, `fallback_refresh_token`."""
    access_token = token.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise ProviderError("misconfigured", "the identity provider's token response carried no access_token")
    refresh_token = token.get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token:
        # RFC 6749 §6: the server MAY issue a new refresh token; when it does not (Google), the
        # old one stays valid.
        refresh_token = fallback_refresh_token
    return ProviderTokens(access_token=access_token, refresh_token=refresh_token, expires_at=_expires_at(token))


def _dedupe(items: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for item in items:
        if item and item not in seen:
            seen.add(item)
            out.append(item)
    return out


class OAuthProvider:
    """Base class: holds the Authlib client, the cached metadata, and the flow.

    Subclasses say where the metadata comes from (`_discover`), which extra authorization
    parameters to send, and how to turn a token response into a `ProviderIdentity`.
    """

    name: str = "oauth2"
    #: What the consent page calls the provider; None: the host people will see in the address bar.
    brand: str | None = None
    default_scopes: tuple[str, ...] = ()
    #: Whether to add `offline_access` to the scopes (Microsoft always; generic OIDC when listed).
    wants_offline_access: bool = False
    #: Name of the Authlib registration on the Flask app; a second provider on the same app needs another.
    registration_name: str = "upstream"

    def __init__(
        self,
        settings: ProviderSettings,
        *,
        timeout: float,
        token_endpoint_auth_method: str | None = None,
    ):
        self.settings = settings
        self.client_id = settings.oauth_client_id
        self.client_secret = settings.oauth_client_secret
        #: Seconds for every request to the provider (connect and read each). A provider that hangs must
        #: not hold a worker: the caller gets `ProviderError("transient")` and can answer 503.
        self.timeout = timeout
        self._token_endpoint_auth_method = token_endpoint_auth_method
        self._metadata: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._client: Any = None  # authlib FlaskOAuth2App, set by init_app
        self._client_ready = False
        #: The URL the metadata came from (for logs and a `check` command); None for explicit endpoints.
        self.metadata_url: str | None = None
        self.ca_bundle: str | None = settings.ca_bundle

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.settings.oauth_authorize_url}>"

    @property
    def display_name(self) -> str:
        """What the consent page calls the provider: a brand, or the host people will see in the address bar."""
        return self.brand or urlsplit(self.settings.oauth_authorize_url).netloc

    # -- Flask / Authlib --------------------------------------------------------------------

    def init_app(self, app: Any) -> None:
        """Register the provider with Authlib's Flask client on `app`.  No network here: the
        metadata is fetched on first use, so a provider outage does not stop the proxy booting."""
        oauth = app.extensions.get("authlib.integrations.flask_client")
        if not isinstance(oauth, OAuth):
            oauth = OAuth(app)
        # Authlib caches created clients by name; drop ours so a re-registration takes effect.
        oauth._clients.pop(self.registration_name, None)
        # Every Authlib parameter is passed explicitly (None when unused) so stray Flask config
        # keys such as UPSTREAM_ACCESS_TOKEN_URL cannot silently override them.
        self._client = oauth.register(
            self.registration_name,
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
                # PKCE S256 on every authorization at the provider (OAuth 2.1 §4.1.1, RFC 7636 §4.2),
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
            self._client.server_metadata.update(
                {k: metadata[k] for k in discovery.AUTHLIB_METADATA_KEYS if k in metadata}
            )
            self._client.client_kwargs["token_endpoint_auth_method"] = (
                self._token_endpoint_auth_method or discovery.choose_token_auth_method(metadata)
            )
            self._client_ready = True
        return self._client

    # -- metadata -------------------------------------------------------------------------------

    def load_metadata(self) -> dict[str, Any]:
        """The provider's metadata (discovery document, or the explicit endpoints), fetched once and
        cached after the first success; failures are not cached so the next call retries.
        Raises `ProviderError` (`misconfigured` or `transient`) naming the URLs tried."""
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
        discovery.check_metadata(metadata, self.metadata_url or "the configuration")

    def _fetch_metadata(self, url: str) -> tuple[dict[str, Any] | None, str]:
        """GET one metadata URL: every discovery request goes through here (metrics.instrument_provider times it)."""
        return discovery.fetch_metadata(url, timeout=self.timeout, ca_bundle=self.ca_bundle)

    def _discover_at(self, url: str) -> dict[str, Any]:
        """Fetch the one well-known metadata URL of a known provider."""
        document = discovery.metadata_at(url, self._fetch_metadata)
        self.metadata_url = url
        return document

    # -- scopes ---------------------------------------------------------------------------------

    def identity_scopes(self) -> list[str]:
        return list(self.default_scopes)

    def scopes_for(self, granted: list[str]) -> list[str]:
        """Scopes to request from the provider: the identity scopes, `offline_access` where the provider
        needs it for a refresh token, `UPSTREAM_SCOPES`, then the scopes the user granted the MCP
        client; de-duplicated, order kept.

        Granted scopes are filtered: only those in `SCOPES_SUPPORTED` (when it is set) pass, so a
        client cannot smuggle arbitrary provider scopes through; `offline_access` from a client is
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
    def error_from_callback(args: Mapping[str, str]) -> ProviderError | None:
        """`errors.error_from_callback`, reachable from the provider object too."""
        return error_from_callback(args)

    def _authorize_params(self, scopes: list[str]) -> dict[str, str]:
        return {}

    def create_authorization_url(
        self, redirect_uri: str, scopes: list[str], extra_params: Mapping[str, str] | None = None
    ) -> tuple[str, dict[str, Any]]:
        """The URL to send the user's browser to, and the secrets the caller must store
        server-side (bound to this login attempt) and hand back to `exchange_code` once:
        `{"state", "code_verifier", "nonce"}` (nonce None without `openid`).

        `extra_params`: more authorization parameters (a downstream connection's `resource`, RFC 8707 §2.1, or
        its operator's `authorize_params`); the provider's own quirks win over them."""
        client = self._app()
        params = {**(extra_params or {}), **self._authorize_params(scopes)}
        rv = client.create_authorization_url(redirect_uri, scope=" ".join(scopes), **params)
        secrets = {"state": rv["state"], "code_verifier": rv["code_verifier"], "nonce": rv.get("nonce")}
        return rv["url"], secrets

    def redeem_code(
        self, code: str, redirect_uri: str, secrets: Mapping[str, Any], extra_params: Mapping[str, str] | None = None
    ) -> tuple[ProviderTokens, Any]:
        """Redeem the authorization code with the stored PKCE verifier: the tokens, and the token response itself.

        `extra_params` go in the token request too (RFC 8707 §2.2: `resource` again)."""
        verifier = secrets.get("code_verifier")
        if not isinstance(verifier, str) or not verifier:
            # PKCE must be impossible to skip, even through a caller bug.
            raise ProviderError("invalid_grant", "no PKCE code_verifier was stored for this login; start again")
        client = self._app()
        token = self._call(
            "exchanging the authorization code",
            self._metadata_value("token_endpoint"),
            lambda: client.fetch_access_token(
                redirect_uri=redirect_uri, code=code, code_verifier=verifier, **(extra_params or {})
            ),
        )
        return tokens_from(token), token

    def exchange_code(
        self, code: str, redirect_uri: str, secrets: Mapping[str, Any]
    ) -> tuple[ProviderTokens, ProviderIdentity]:
        """Redeem the authorization code (with the stored PKCE verifier) and identify the user."""
        tokens, token = self.redeem_code(code, redirect_uri, secrets)
        identity = self._identity(token, secrets)
        return tokens, identity

    def _refresh_params(self, scopes: list[str] | None) -> dict[str, str]:
        # RFC 6749 §6: scope is optional and defaults to the original grant; oidc-provider and
        # Google want it absent (or equal to the grant).
        return {}

    def refresh(
        self, refresh_token: str, scopes: list[str] | None = None, extra_params: Mapping[str, str] | None = None
    ) -> ProviderTokens:
        """Use a refresh token.  Keeps the old refresh token when the provider returns none.
        400 `invalid_grant` (revoked/expired) → `ProviderError("invalid_grant")`; network error,
        timeout, 5xx, 429 → `"transient"` (keep the grant and retry later).

        `scopes`: the scopes of the original login; only Microsoft uses them (its v2.0 token
        endpoint wants `scope` on a refresh); without them Microsoft gets the configured ones.
        `extra_params`: more token request parameters (a downstream connection's `resource`, RFC 8707 §2.2)."""
        client = self._app()
        params = {**(extra_params or {}), **self._refresh_params(scopes)}
        # `fetch_access_token(grant_type="refresh_token")` rather than the session's
        # `refresh_token()`: the latter fires Authlib's token_update signal, which needs a Flask
        # app context, and we store the tokens ourselves anyway.
        token = self._call(
            "refreshing the upstream token",
            self._metadata_value("token_endpoint"),
            lambda: client.fetch_access_token(grant_type="refresh_token", refresh_token=refresh_token, **params),
        )
        return tokens_from(token, fallback_refresh_token=refresh_token)

    def revoke_token(self, token: str, token_type_hint: str, endpoint: str | None = None) -> bool:
        """RFC 7009: ask the provider to revoke `token` ("access_token" or "refresh_token"); True when it said 200.

        Best effort, for a user who disconnects: at `endpoint`, else the metadata's `revocation_endpoint` (none:
        nothing is sent, False). Bounded by `timeout` (and the metadata's first load); the client authenticates as
        at the token endpoint. Failures are logged (never the token) and never raised."""
        try:
            url = endpoint or self._metadata_value("revocation_endpoint")
            if not url:
                return False
            if not discovery.is_secure_url(url):
                log.warning("not revoking a token at %s: a revocation URL must be https (http only on loopback)", url)
                return False
            client = self._app()
            auth_method = client.client_kwargs.get("token_endpoint_auth_method")
            with client._get_oauth_client(revocation_endpoint_auth_method=auth_method) as session:
                response = self._call(
                    "revoking a token",
                    url,
                    lambda: session.revoke_token(url, token=token, token_type_hint=token_type_hint),
                )
        except ProviderError as error:
            log.warning("could not revoke a token at %s (%s): %s", self, error.kind, error.description)
            return False
        except Exception as error:  # best effort: whatever went wrong, the caller carries on
            log.warning("could not revoke a token at %s: %s", self, type(error).__name__)
            return False
        if response.status_code != 200:
            # RFC 7009 §2.2: 200 whether or not the token was valid; anything else is the provider's trouble.
            log.warning("%s answered %s to a token revocation", url, response.status_code)
            return False
        return True

    # -- identity -------------------------------------------------------------------------------

    def _identity(self, token: Mapping[str, Any], secrets: Mapping[str, Any]) -> ProviderIdentity:
        info = self._userinfo(token)
        return self._identity_from_userinfo(info)

    def _userinfo_url(self) -> str | None:
        url = self.load_metadata().get("userinfo_endpoint") or self.settings.oauth_userinfo_url
        if url and not discovery.is_secure_url(url):
            raise ProviderError(
                "misconfigured", f"the userinfo URL {url!r} must be https (plain http only on loopback)"
            )
        return url

    def _userinfo(self, token: Mapping[str, Any]) -> dict[str, Any]:
        url = self._userinfo_url()
        if not url:
            raise ProviderError(
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
            raise response_error(response, action, url)
        try:
            return response.json()
        except ValueError:
            raise ProviderError("misconfigured", f"{action}: {url} did not answer JSON") from None

    def _identity_from_userinfo(self, info: Any) -> ProviderIdentity:
        """Normalise a profile document of an unknown OAuth 2.0 provider."""
        if not isinstance(info, Mapping):
            raise ProviderError("misconfigured", "the user's profile is not a JSON object")
        subject = subject_claim(info.get("sub")) or subject_claim(info.get("id")) or subject_claim(info.get("user_id"))
        if subject is None:
            raise ProviderError("misconfigured", "the user's profile has no sub or id: cannot tell users apart")
        # `verified` is how several OAuth 2.0 APIs (Discord, ...) vouch for an address.
        email = verified_email(info, "email_verified", "verified")
        name = (
            text_claim(info.get("name"))
            or text_claim(info.get("preferred_username"))
            or text_claim(info.get("global_name"))
            or text_claim(info.get("username"))
            or text_claim(info.get("login"))
        )
        return ProviderIdentity(id=subject, email=email, name=name)

    # -- error handling ---------------------------------------------------------------------------

    def _metadata_value(self, key: str) -> str:
        return str(self.load_metadata().get(key) or "")

    def _call(self, action: str, url: str, func: Callable[[], T]) -> T:
        """Run one provider request and classify whatever goes wrong (metrics.instrument_provider times it)."""
        try:
            return func()
        except ProviderError:
            raise
        except (AuthlibBaseError, requests.RequestException, ValueError) as exc:
            raise classify_exception(exc, action, url) from exc
