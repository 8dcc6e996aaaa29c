"""`oauthproxy check`: configuration, database, provider, callback, downstream and the client's discovery chain, in plain words."""

from __future__ import annotations

import json
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs, urljoin, urlsplit

import requests
from flask import Flask
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from oauthproxy.components import components
from oauthproxy.config import Settings
from oauthproxy.groups import route_uses_groups
from oauthproxy.mcp_initialize import DEFAULT_PROTOCOL_VERSION, initialize_request
from oauthproxy.providers import OAuthProvider
from oauthproxy.routes import Route
from oauthproxy.urls import canonical_resource

Level = Literal["ok", "info", "warn", "fail"]

INITIALIZE = initialize_request("oauthproxy-check")
MCP_HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": DEFAULT_PROTOCOL_VERSION,
}
#: Words providers use when they refuse a redirect URI (Google, Microsoft Entra, Keycloak, Auth0, Okta,
#: oidc-provider, GitHub). Checked in the provider's answer to an authorization request.
REDIRECT_REFUSALS = (
    "redirect_uri_mismatch",
    "invalid_redirect_uri",
    "aadsts50011",
    "aadsts500113",
    "redirect_uri is not associated",
    "callback url mismatch",
    "invalid parameter: redirect_uri",
    "redirect_uri did not match",
    "'redirect_uri' parameter does not match",
    "invalid redirect_uri",
    "redirect uri mismatch",
    "the redirect uri",
)
CLIENT_REFUSALS = (
    "invalid_client",
    "unauthorized_client",
    "aadsts700016",
    "oauth client was not found",
    "client not found",
    "unknown client",
    "client authentication failed",
)
MAX_PROVIDER_HOPS = 6
#: Bytes of a page read when looking for the provider's error words.
PAGE_LIMIT = 256 * 1024


@dataclass(frozen=True)
class Finding:
    level: Level
    subject: str
    message: str

    def render(self) -> str:
        return f"  {self.level.upper() if self.level == 'fail' else self.level:<5} {self.subject}: {self.message}"


def database_problem(dsn: str, error: Exception) -> str:
    """A database that cannot be used, in one line (here and at gunicorn's start-up): where, why, what to check."""
    where = make_url(dsn).render_as_string(hide_password=True)
    cause = getattr(error, "orig", None) or error  # the driver's own error, without SQLAlchemy's background link
    reason = " ".join(str(cause).split())[:300]
    return (
        f"cannot use {where}: {type(cause).__name__}: {reason}{'' if reason.endswith(('.', '?')) else '.'} "
        "Check DATABASE_DSN (or DATABASE_URL) and that the database server is running."
    )


def _reason(error: Exception) -> str:
    """A short reason for a failed connection, without requests' nested exception reprs."""
    text = str(error)
    for marker in (
        "Connection refused",
        "Name or service not known",
        "nodename nor servname",
        "timed out",
        "No route to host",
        "certificate verify failed",
        "Temporary failure in name resolution",
        "Network is unreachable",
        "Connection reset",
    ):
        if marker.lower() in text.lower():
            return marker.lower()
    return type(error).__name__


def _page_text(response: requests.Response) -> str:
    try:
        return response.content[:PAGE_LIMIT].decode("utf-8", "replace").lower()
    except requests.RequestException:
        return ""


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def _bearer_parameter(challenge: str, name: str) -> str | None:
    for part in challenge.split(","):
        key, _, value = part.strip().partition("=")
        if key.strip().lower().removeprefix("bearer ").strip() == name:
            return value.strip().strip('"')
    return None


@dataclass(frozen=True)
class SignInTarget:
    """An authorization server the proxy sends browsers to, and the words a finding uses to point at its settings:
    the login provider, or a route's downstream authorization server."""

    provider: OAuthProvider
    callback: str
    client_id: str
    #: The scopes to ask for; a call, as working them out may need the provider's metadata (a ProviderError).
    scopes: Callable[[], list[str]]
    #: Finding subjects: "identity provider" / "callback URL" for the login, prefixed by the route for a connection.
    provider_subject: str = "identity provider"
    callback_subject: str = "callback URL"
    url_setting: str = "OAUTH_AUTHORIZE_URL"
    client_setting: str = "OAUTH_CLIENT_ID"
    scope_setting: str = "SCOPES_SUPPORTED / UPSTREAM_SCOPES"
    #: Before the "scopes" and "client id" subjects: empty for the login, "route NAME " for a connection.
    subject_prefix: str = ""


class SelfCheck:
    """Runs every check with the application's own settings; each produces findings, none stops the others."""

    def __init__(self, app: Flask, timeout: float = 10.0, walk_public_url: bool = True):
        self.app, self.timeout, self.walk_public_url = app, timeout, walk_public_url
        self.settings: Settings = app.config["SETTINGS"]
        self.http = requests.Session()
        self.verify: str | bool = self.settings.ca_bundle or True  # CA_BUNDLE, as the proxy itself connects
        self.http.verify = self.verify
        self.http.trust_env = not self.settings.ca_bundle  # else REQUESTS_CA_BUNDLE would override CA_BUNDLE

    def run(self) -> Iterator[Finding]:
        with self.app.app_context():
            yield from self.configuration()
            yield from self.database()
            yield from self.revocation_feed()
            login = components(self.app).login_provider
            yield from self.sign_in(
                SignInTarget(
                    login,
                    self.settings.callback_url,
                    self.settings.oauth_client_id,
                    lambda: login.scopes_for(list(self.app.config["OAUTH_SCOPES_SUPPORTED"])),
                )
            )
            yield from self.groups(login)
            yield from self.tool_rules()
            for route in self.settings.routes:
                target = self.connection_target(route)
                if target is not None:
                    yield from self.sign_in(target)
            for route in self.settings.routes:
                yield from self.downstream(route)
                if route.oauth is not None and route.oauth.discover:
                    yield from self.downstream_authorization(route)
            if self.walk_public_url:
                for route in self.settings.routes:
                    yield from self.discovery_chain(route)

    # -- local ------------------------------------------------------------------------------------

    def configuration(self) -> Iterator[Finding]:
        settings = self.settings
        routes = ", ".join(f"{route.resource} -> {route.downstream_url}" for route in settings.routes)
        yield Finding("ok", "configuration", f"PUBLIC_URL {settings.public_url}; MCP {routes}")
        if not settings.is_loopback and settings.trusted_proxy_hops == 0:
            yield Finding(
                "info",
                "forwarded headers",
                "TRUSTED_PROXY_HOPS is 0: client addresses (logs, rate "
                "limits) are those of the peer; behind nginx or a load balancer set it to the number of "
                "proxies in front",
            )

    def database(self) -> Iterator[Finding]:
        from oauthproxy.database import schema_is_current

        where = make_url(self.settings.database_dsn).render_as_string(hide_password=True)
        try:
            current = schema_is_current(self.app)
        except Exception as error:
            yield Finding("fail", "database", database_problem(self.settings.database_dsn, error))
            return
        if current:
            yield Finding("ok", "database", f"{where} answers and its schema is current")
        else:
            yield Finding(
                "fail", "database", f"{where} answers but its schema is not current: run `oauthproxy db upgrade`"
            )

    def revocation_feed(self) -> Iterator[Finding]:
        feed = components(self.app).revocation_feed
        ttl = self.settings.proxy.token_cache_ttl
        if feed.mode == "off" or ttl == 0:
            yield Finding(
                "info",
                "revocation feed",
                f"off: a revoked token keeps working for up to {ttl} s (TOKEN_CACHE_TTL) in workers that cached it",
            )
            return
        problem = feed.probe()
        if problem is None:
            yield Finding("ok", "revocation feed", f"{feed.mode}: revocations reach every worker within a second")
        else:
            yield Finding(
                "fail",
                "revocation feed",
                f"{feed.mode}: cannot listen ({problem}); a revoked token would keep working for up to {ttl} s "
                "(TOKEN_CACHE_TTL) in workers that cached it",
            )

    # -- the identity provider ----------------------------------------------------------------------

    def sign_in(self, target: SignInTarget) -> Iterator[Finding]:
        """The provider's metadata, the redirect URI to register there, and whether the provider accepts it."""
        provider_ok = False
        for finding in self.provider(target):
            provider_ok = provider_ok or (finding.subject == target.provider_subject and finding.level == "ok")
            yield finding
        yield Finding(
            "info",
            target.callback_subject,
            f"register exactly {target.callback} as a redirect URI "
            f"of the client {target.client_id} at the {target.provider_subject}",
        )
        if provider_ok:
            yield from self.callback_accepted(target)

    def groups(self, login: OAuthProvider) -> Iterator[Finding]:
        """Where the users' groups come from, when anything in the configuration decides by them: a provider that
        never states them refuses every sign-in that needs them (groups.py fails closed)."""
        from oauthproxy.providers import ProviderError
        from oauthproxy.providers.github import GitHubProvider
        from oauthproxy.providers.google import GoogleProvider
        from oauthproxy.providers.oidc import OpenIDConnectProvider

        settings = self.settings
        if not settings.reads_groups:
            return
        uses = ["ALLOWED_GROUPS"] if settings.allowed_groups else []
        uses += [f"route {route.name}" for route in settings.routes if route_uses_groups(route)]
        where = f"used by {', '.join(uses)}"
        claim = settings.groups_claim
        if isinstance(login, GitHubProvider):
            yield Finding(
                "info",
                "groups",
                f"{where}: GitHub organisations and teams (org:<login>, <org>/<team>), read with the read:org scope",
            )
            return
        if isinstance(login, GoogleProvider):
            yield Finding(
                "info",
                "groups",
                f"{where}: Google states only the Workspace domain (domain:<hd>, for verified emails), and the "
                f"{claim} claim only if something in front of Google adds it",
            )
            return
        if not isinstance(login, OpenIDConnectProvider):
            yield Finding(
                "warn",
                "groups",
                f"{where}, but a plain OAuth 2.0 provider states no groups: every sign-in that needs them is refused",
            )
            return
        try:
            listed = login.load_metadata().get("claims_supported")
        except ProviderError:
            return  # the identity provider finding says why
        top = claim.split(".", 1)[0]
        if isinstance(listed, list) and top not in listed:
            yield Finding(
                "warn",
                "groups",
                f"{where}: the provider does not list the {top} claim (GROUPS_CLAIM={claim}) in claims_supported; "
                "unless its ID token or userinfo carries it anyway (a Keycloak mapper, an Auth0 action or Entra ID's "
                "groupMembershipClaims add it unlisted), every sign-in that needs groups is refused",
            )
            return
        yield Finding("ok", "groups", f"{where}: read from the {claim} claim (GROUPS_CLAIM)")

    def tool_rules(self) -> Iterator[Finding]:
        for route in self.settings.routes:
            policy = route.tool_policy
            if policy is None:
                continue
            allowing = sum(1 for rule in policy.rules if rule.allow)
            yield Finding(
                "info",
                f"tool rules {route.name}",
                f"{len(policy.rules)} rule(s), {allowing} allowing; the first rule that names a tool and applies to "
                "the caller decides, and a tool no rule names is denied (also in tools/list)",
            )

    def connection_target(self, route: Route) -> SignInTarget | None:
        """A route's configured downstream authorization server (credential `oauth` with a table)."""
        from oauthproxy.connection_providers import CONNECT_CALLBACK_PATH, connection_provider

        if route.oauth is None or route.oauth.discover:
            return None
        return SignInTarget(
            components(self.app).connection_providers[route.name],
            self.settings.public_url + CONNECT_CALLBACK_PATH,
            route.oauth.client_id,
            lambda: list(connection_provider(route).scopes),
            provider_subject=f"route {route.name} authorization server",
            callback_subject=f"route {route.name} callback URL",
            url_setting=f"the route's oauth authorize_url ({route.name})",
            client_setting=f"the route's oauth client_id ({route.name})",
            scope_setting=f"the route's oauth scopes ({route.name})",
            subject_prefix=f"route {route.name} ",
        )

    def provider(self, target: SignInTarget) -> Iterator[Finding]:
        from oauthproxy.providers import ProviderError

        provider = target.provider
        try:
            metadata = provider.load_metadata()
        except ProviderError as error:
            advice = (
                f"the provider could not be reached from here; check the network, proxies and {target.url_setting}"
                if error.kind == "transient"
                else f"fix {target.url_setting}"
            )
            yield Finding("fail", target.provider_subject, f"{error.description} ({advice})")
            return
        source = provider.metadata_url or "the configured endpoints (OAUTH_TOKEN_URL)"
        yield Finding(
            "ok",
            target.provider_subject,
            f"{provider.name} metadata from {source}; authorize at {metadata.get('authorization_endpoint')}",
        )

    def callback_accepted(self, target: SignInTarget) -> Iterator[Finding]:
        """Start an authorization request as a browser would and read the provider's answer: most providers
        check `redirect_uri` (and the client id and scopes) before they show their sign-in page."""
        from oauthproxy.providers import ProviderError

        provider, callback, subject = target.provider, target.callback, target.callback_subject
        try:
            url, _secrets = provider.create_authorization_url(callback, target.scopes())
        except ProviderError as error:
            yield Finding("fail", subject, f"cannot build an authorization request: {error.description}")
            return
        provider_origin = _origin(url)
        browser = requests.Session()
        browser.verify, browser.trust_env = self.verify, self.http.trust_env
        for _hop in range(MAX_PROVIDER_HOPS):
            try:
                response = browser.get(url, allow_redirects=False, timeout=self.timeout)
            except requests.RequestException as error:
                yield Finding(
                    "fail",
                    subject,
                    f"the provider's authorization endpoint {url.split('?')[0]} did not answer ({_reason(error)})",
                )
                return
            if response.is_redirect:
                location = urljoin(url, response.headers.get("Location", ""))
                if location.startswith(callback):
                    yield from self._back_at_callback(target, location)
                    return
                if _origin(location) != provider_origin:
                    yield Finding(
                        "ok",
                        subject,
                        "the provider accepted the authorization request and sent "
                        f"the browser on to sign in at {_origin(location)}",
                    )
                    return
                url = location
                continue
            yield from self._provider_page(target, response)
            return
        yield Finding(
            "ok",
            subject,
            "the provider accepted the authorization request (it redirected the "
            "browser several times within its own site, naming no error)",
        )

    def _back_at_callback(self, target: SignInTarget, location: str) -> Iterator[Finding]:
        subject = target.callback_subject
        query = {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}
        if "error" not in query:
            yield Finding("ok", subject, "the provider accepted the callback URL (it sent the browser back to it)")
            return
        detail = f"{query['error']}: {query.get('error_description', '')}".strip(": ")
        if query["error"] == "invalid_scope":
            yield Finding(
                "fail",
                f"{target.subject_prefix}scopes",
                f"the provider refused the scopes we ask for ({detail}); fix {target.scope_setting}",
            )
        else:
            yield Finding(
                "warn",
                subject,
                f"the provider accepted the callback URL but answered the "
                f"authorization request with an error ({detail})",
            )

    def _provider_page(self, target: SignInTarget, response: requests.Response) -> Iterator[Finding]:
        page = _page_text(response)
        callback, client_id, subject = target.callback, target.client_id, target.callback_subject
        refused_redirect = any(word in page for word in REDIRECT_REFUSALS)
        if response.status_code >= 400 and not refused_redirect and "redirect_uri" in page:
            refused_redirect = True
        if refused_redirect:
            yield Finding(
                "fail",
                subject,
                f"the provider refused our redirect URI {callback}: register "
                f"exactly this URL for the client {client_id} at the provider, or, if it is registered "
                "already, PUBLIC_URL is wrong (the callback derives from it)",
            )
            return
        if any(word in page for word in CLIENT_REFUSALS):
            yield Finding(
                "fail",
                f"{target.subject_prefix}client id",
                f"the provider does not accept the client {client_id} (HTTP "
                f"{response.status_code}): check {target.client_setting}, and that the client is enabled",
            )
            return
        if response.status_code >= 400:
            yield Finding(
                "fail",
                subject,
                f"the provider answered the authorization request with HTTP {response.status_code}: {page[:200]!r}",
            )
            return
        if getattr(target.provider, "name", "") == "github":
            yield Finding(
                "info",
                subject,
                "GitHub shows its sign-in page first and checks the redirect URI "
                f"only after sign-in: make sure {callback} is the app's Authorization callback URL",
            )
            return
        yield Finding(
            "ok",
            subject,
            "the provider answered the authorization request with a page that "
            "names no error (its sign-in page); most providers check the redirect URI before showing it",
        )

    # -- the downstream MCP server -------------------------------------------------------------------

    def downstream(self, route: Route) -> Iterator[Finding]:
        subject = f"downstream {route.name}"
        headers = dict(MCP_HEADERS)
        if route.credential.kind == "static":
            headers[route.credential.header] = route.credential.value
        session = requests.Session()
        session.trust_env = False  # as the proxy itself connects
        session.verify = self.verify
        try:
            response = session.post(
                route.downstream_url,
                json=INITIALIZE,
                headers=headers,
                timeout=self.timeout,
                allow_redirects=False,
                stream=True,
            )
        except requests.Timeout:
            yield Finding(
                "fail",
                subject,
                f"{route.downstream_url} did not answer within {self.timeout:g} s; is "
                "the MCP server overloaded, or is a firewall dropping the connection?",
            )
            return
        except requests.RequestException as error:
            yield Finding(
                "fail",
                subject,
                f"cannot connect to {route.downstream_url} ({_reason(error)}): start "
                "the MCP server, or fix MCP_SERVER_URL (it is reached from where the proxy runs: in a "
                "container, localhost is the container itself)",
            )
            return
        with response:
            status = response.status_code
            if status == 404:
                yield Finding(
                    "fail",
                    subject,
                    f"{route.downstream_url} answered 404: the server runs, but its MCP "
                    "endpoint has another path; fix the path in MCP_SERVER_URL (often /mcp)",
                )
            elif status == 421:
                yield Finding(
                    "fail",
                    subject,
                    f"{route.downstream_url} refused the Host header (421): the MCP "
                    "server's DNS-rebinding protection must allow the host named in MCP_SERVER_URL",
                )
            elif status in (401, 403) and route.credential.per_user:
                yield Finding(
                    "ok",
                    subject,
                    f"{route.downstream_url} answers {status} without a credential, as expected: each user brings "
                    f"their own (credential {route.credential.kind})",
                )
            elif status in (401, 403):
                yield Finding(
                    "warn",
                    subject,
                    f"{route.downstream_url} answered {status} to a request without a "
                    "user's identity; if it wants a credential of its own, configure DOWNSTREAM_CREDENTIAL",
                )
            elif 200 <= status < 300:
                yield Finding("ok", subject, f"{route.downstream_url} answers MCP{self._server_name(response)}")
                session_id = response.headers.get("Mcp-Session-Id")
                if session_id:  # end the session the probe opened
                    try:
                        session.delete(
                            route.downstream_url,
                            headers={**headers, "Mcp-Session-Id": session_id},
                            timeout=self.timeout,
                        )
                    except requests.RequestException:
                        pass
            else:
                yield Finding(
                    "warn",
                    subject,
                    f"{route.downstream_url} is reachable but answered an MCP initialize request with HTTP {status}",
                )

    @staticmethod
    def _server_name(response: requests.Response) -> str:
        """The server's name from its initialize result, read line by line: an event stream may stay open."""
        try:
            for count, line in enumerate(response.iter_lines(chunk_size=1024, decode_unicode=True)):
                if count > 200:
                    break
                text = line[5:] if line.startswith("data:") else line
                if '"serverInfo"' not in text:
                    continue
                info = json.loads(text)["result"]["serverInfo"]
                return f" (server {info.get('name')} {info.get('version', '')})".replace(" )", ")")
        except (requests.RequestException, ValueError, KeyError, TypeError):
            pass
        return ""

    def downstream_authorization(self, route: Route) -> Iterator[Finding]:
        """A route with oauth = "discover": walk the downstream's discovery chain as the connect step will, say how
        the proxy will identify itself there (without registering: that happens on first use), and once it has an
        identity, whether the server accepts the connect callback."""
        from oauthproxy.connection_providers import CONNECT_CALLBACK_PATH
        from oauthproxy.downstream_discovery import build_discovered_provider, discover_authorization, identity_plan
        from oauthproxy.providers import ProviderError

        subject = f"downstream authorization {route.name}"
        try:
            found = discover_authorization(
                route.downstream_url, timeout=self.timeout, ca_bundle=self.settings.ca_bundle
            )
        except ProviderError as error:
            advice = (
                "; it could not be reached from here: check that the MCP server and its authorization server run"
                if error.kind == "transient"
                else ""
            )
            yield Finding("fail", subject, f"{error.description}{advice}")
            return
        scopes = " ".join(found.scopes) or "none named"
        yield Finding(
            "ok",
            subject,
            f"{found.resource_metadata_url} names the authorization server {found.issuer} (metadata "
            f"{found.metadata_url}, PKCE S256); users connect for the resource {found.resource}, scopes: {scopes}",
        )
        try:
            identity, plan = identity_plan(route, found, self.settings)
        except ProviderError as error:
            yield Finding("fail", subject, error.description)
            return
        except SQLAlchemyError as error:  # the database: reported by its own check
            yield Finding("warn", subject, f"cannot read the stored registration ({type(error).__name__})")
            return
        yield Finding("ok", subject, f"the proxy identifies itself there {plan}")
        if identity is None:
            return
        connection = build_discovered_provider(route, found, identity, self.settings)
        connection.provider.init_app(self.app)
        yield from self.callback_accepted(
            SignInTarget(
                connection.provider,
                self.settings.public_url + CONNECT_CALLBACK_PATH,
                identity.client_id,
                lambda: list(connection.scopes),
                provider_subject=f"route {route.name} authorization server",
                callback_subject=f"route {route.name} callback URL",
                url_setting=f"the route's downstream ({route.name})",
                client_setting=f"the stored registration of route {route.name}",
                scope_setting=f"the downstream's scopes_supported ({route.name})",
                subject_prefix=f"route {route.name} ",
            )
        )

    # -- what a client sees through PUBLIC_URL -------------------------------------------------------------

    def discovery_chain(self, route: Route) -> Iterator[Finding]:
        """401 challenge → protected resource metadata → authorization server metadata, as an MCP client walks it."""
        subject = f"discovery {route.path}"
        settings = self.settings
        resource = route.resource
        try:
            response = self.http.post(
                resource, json=INITIALIZE, headers=MCP_HEADERS, timeout=self.timeout, allow_redirects=False
            )
        except requests.exceptions.SSLError as error:
            yield Finding(
                "fail",
                subject,
                f"TLS failed at {resource} ({_reason(error)}): clients need a valid certificate for PUBLIC_URL's host",
            )
            return
        except requests.RequestException as error:
            yield Finding(
                "fail",
                subject,
                f"nothing answers at {resource} ({_reason(error)}). PUBLIC_URL must be the "
                "address clients use to reach this proxy: is the proxy running, and do DNS and the reverse "
                "proxy send that address here?",
            )
            return
        status = response.status_code
        if response.is_redirect:
            location = urljoin(resource, response.headers.get("Location", ""))
            yield Finding(
                "fail",
                subject,
                f"{resource} redirects to {location}: clients do not follow that (a POST "
                f"is lost), so PUBLIC_URL is wrong; set it to the address that answers directly, probably "
                f"{_origin(location)}",
            )
            return
        if status == 404:
            yield Finding(
                "fail",
                subject,
                f"{resource} answered 404: whatever answers at PUBLIC_URL does not serve "
                f"the MCP path {route.path}; PUBLIC_URL may point at another server, or lack a path prefix "
                "that the reverse proxy adds",
            )
            return
        if status in (502, 503, 504):
            yield Finding(
                "fail",
                subject,
                f"{resource} answered {status}: the reverse proxy at PUBLIC_URL cannot reach "
                "this proxy; check its upstream address and that the proxy is running",
            )
            return
        challenge = response.headers.get("WWW-Authenticate", "")
        metadata_url = (
            _bearer_parameter(challenge, "resource_metadata") if challenge.lower().startswith("bearer") else None
        )
        if status != 401 or not metadata_url:
            yield Finding(
                "fail",
                subject,
                f"{resource} answered {status} "
                f"{'with' if challenge else 'without'} a challenge {challenge[:120]!r}; the proxy answers 401 "
                "with a Bearer challenge naming resource_metadata, so something else answers at PUBLIC_URL",
            )
            return
        if not metadata_url.startswith(settings.public_url + "/"):
            yield Finding(
                "fail",
                subject,
                f"the server at {resource} points clients to {metadata_url}, outside "
                f"PUBLIC_URL={settings.public_url}: it runs with another PUBLIC_URL "
                f"({_origin(metadata_url)}); give every instance the same PUBLIC_URL, the address clients use",
            )
            return
        document = yield from self._json(subject, metadata_url, "protected resource metadata")
        if document is None:
            return
        advertised = str(document.get("resource", ""))
        if canonical_resource(advertised) != canonical_resource(resource):
            yield Finding(
                "fail",
                subject,
                f"{metadata_url} describes the resource {advertised!r}, but clients reach "
                f"it at {resource}; clients refuse the mismatch (RFC 9728 §3.3): the proxy answering there "
                "runs with another PUBLIC_URL or MCP path",
            )
            return
        servers = document.get("authorization_servers") or []
        if settings.issuer not in servers:
            yield Finding(
                "fail",
                subject,
                f"{metadata_url} names the authorization server(s) {servers}, not "
                f"{settings.issuer}: PUBLIC_URL differs between this configuration and the running proxy",
            )
            return
        issuer = settings.issuer
        parts = urlsplit(issuer)
        as_url = f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{parts.path.rstrip('/')}"
        metadata = yield from self._json(subject, as_url, "authorization server metadata")
        if metadata is None:
            return
        if metadata.get("issuer") != issuer:
            yield Finding(
                "fail",
                subject,
                f"{as_url} names the issuer {metadata.get('issuer')!r}, not {issuer}; "
                "clients refuse the mismatch (RFC 8414 §3.3)",
            )
            return
        outside = [
            f"{key} {metadata.get(key)}"
            for key in ("authorization_endpoint", "token_endpoint", "registration_endpoint")
            if not str(metadata.get(key, "")).startswith(issuer + "/")
        ]
        if outside:
            yield Finding("fail", subject, f"{as_url} advertises endpoints outside PUBLIC_URL: {', '.join(outside)}")
            return
        if "S256" not in (metadata.get("code_challenge_methods_supported") or []):
            yield Finding("fail", subject, f"{as_url} does not advertise PKCE S256; MCP clients refuse to proceed")
            return
        yield Finding(
            "ok",
            subject,
            f"a client reaching {resource} gets 401, then {metadata_url}, then {as_url}: "
            "all consistent with PUBLIC_URL",
        )

    def _json(self, subject: str, url: str, what: str) -> Generator[Finding, None, dict[str, Any] | None]:
        """Generator helper: yields a failure, or returns the JSON object at `url` (via `yield from`)."""
        try:
            response = self.http.get(
                url, headers={"Accept": "application/json"}, timeout=self.timeout, allow_redirects=False
            )
        except requests.RequestException as error:
            yield Finding("fail", subject, f"cannot fetch the {what} at {url} ({_reason(error)})")
            return None
        if response.status_code != 200:
            yield Finding(
                "fail",
                subject,
                f"the {what} at {url} answered HTTP {response.status_code}; a reverse "
                "proxy in front may not pass /.well-known/ paths through",
            )
            return None
        try:
            document: Any = response.json()
        except ValueError:
            document = None
        if not isinstance(document, dict):
            yield Finding("fail", subject, f"the {what} at {url} is not a JSON object")
            return None
        return document


def run_check(app: Flask, timeout: float = 10.0, walk_public_url: bool = True) -> list[Finding]:
    return list(SelfCheck(app, timeout, walk_public_url).run())
