"""Downstream authorization end to end (issue 13): the MCP Python SDK client, through the proxy under gunicorn, to MCP
servers that want each user's own credential: one doing its own OAuth at its own provider (configured at the proxy,
or discovered from its RFC 9728 metadata), one taking per-user API keys.

One browser-like walk does it all: the proxy's consent, the login at the proxy's provider (as alice), the connect
page, and the sign-in at the downstream's provider (as bob, so that the subject the downstream reports can only have
come from its own provider) or the key form. The downstream's `whoami` then names the subject its own authorization
server gave, and the client the proxy is there.
"""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import anyio
import httpx2
import pytest
import requests
from mcp import Client
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientMetadata

from tests.downstream_auth_fixtures import (
    ApiKeyDownstream,
    ProtectedDownstream,
    RouteSpec,
    api_key_route,
    oauth_route,
    register_proxy_client,
    write_routes_toml,
)
from tests.flows import MemoryStorage, hidden_inputs, query_of
from tests.provider_fixture import OidcProvider
from tests.proxy_fixtures import GunicornProxy
from tests.support.ports import free_port

SDK_REDIRECT = "http://127.0.0.1:9/sdk-callback"  # never contacted: the walk stops at this prefix
PROXY_USER = "alice"  # at the proxy's own provider
DOWNSTREAM_USER = "bob"  # at the downstream's provider
FORM_ACTION = re.compile(r'<form method="post" action="([^"]+)"')


def with_login_hint(url: str, hint: str) -> str:
    """`url` with `login_hint` set to `hint` (replacing any the proxy put there): which test user signs in."""
    parts = urlsplit(url)
    query = [(key, value) for key, value in parse_qsl(parts.query) if key != "login_hint"] + [("login_hint", hint)]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(query), parts.fragment))


@dataclass
class ConnectingBrowser:
    """A person's browser through authorize → consent → login → connect → the downstream's sign-in (or key) → client.

    Follows one redirect at a time, keeping cookies; approves the proxy's consent page, continues on the connect
    page or types `api_key` into the key page."""

    proxy_url: str
    downstream_issuer: str | None = None
    api_key: str | None = None
    session: requests.Session = field(default_factory=requests.Session)
    consent_pages: int = 0
    connect_pages: list[str] = field(default_factory=list)
    downstream_authorizations: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.session.trust_env = False

    def authorize(self, url: str, stop_prefix: str, max_hops: int = 40) -> str:
        for _ in range(max_hops):
            if url.startswith(stop_prefix):
                return url
            url = self._who_signs_in(url)
            response = self.session.get(url, allow_redirects=False, timeout=20)
            if response.is_redirect:
                url = urljoin(url, response.headers["Location"])
                continue
            if response.status_code == 200 and 'action="/authorize/consent"' in response.text:
                self.consent_pages += 1
                url = self._submit(url, "/authorize/consent", {**hidden_inputs(response.text), "decision": "approve"})
                continue
            if response.status_code == 200 and urlsplit(url).path.startswith("/connect/"):
                self.connect_pages.append(response.text)
                url = self._submit(url, self._form_action(response.text), self._connect_form(response.text))
                continue
            raise AssertionError(f"stopped at {url}: {response.status_code} {response.text[:1500]}")
        raise AssertionError("too many redirects")

    def _who_signs_in(self, url: str) -> str:
        # Both test providers' authorization endpoint is /auth (/auth/<uid> resumes a request already counted).
        if url.startswith(self.proxy_url) or urlsplit(url).path != "/auth":
            return url
        if self.downstream_issuer is not None and url.startswith(self.downstream_issuer + "/"):
            self.downstream_authorizations.append(url)
            return with_login_hint(url, DOWNSTREAM_USER)
        return url if "login_hint=" in url else with_login_hint(url, PROXY_USER)

    @staticmethod
    def _form_action(page: str) -> str:
        match = FORM_ACTION.search(page)
        assert match is not None, page[:1500]
        return match.group(1).replace("&amp;", "&")

    def _connect_form(self, page: str) -> dict[str, str]:
        form = {"csrf_token": hidden_inputs(page)["csrf_token"]}
        if 'name="api_key"' in page:
            assert self.api_key is not None, "the proxy asked for an API key on an OAuth route"
            form["api_key"] = self.api_key
        else:
            form["decision"] = "continue"
        return form

    def _submit(self, page_url: str, action: str, form: dict[str, str]) -> str:
        response = self.session.post(urljoin(page_url, action), data=form, allow_redirects=False, timeout=20)
        if not response.is_redirect:
            raise AssertionError(f"POST {action} answered {response.status_code}: {response.text[:1500]}")
        return urljoin(page_url, response.headers["Location"])


class SdkAuthorization:
    """The SDK's redirect_handler and callback_handler, driven by a ConnectingBrowser in a thread."""

    def __init__(self, browser: ConnectingBrowser):
        self.browser = browser
        self.authorize_urls: list[str] = []
        self.result: dict[str, str] = {}

    async def redirect_handler(self, authorization_url: str) -> None:
        self.authorize_urls.append(authorization_url)
        final = await asyncio.to_thread(self.browser.authorize, authorization_url, SDK_REDIRECT)
        self.result = query_of(final)

    async def callback_handler(self) -> AuthorizationCodeResult:
        assert "code" in self.result, self.result
        return AuthorizationCodeResult(
            code=self.result["code"], state=self.result.get("state"), iss=self.result.get("iss")
        )


def sdk_client(resource_url: str, authorization: SdkAuthorization) -> OAuthClientProvider:
    return OAuthClientProvider(
        resource_url,
        OAuthClientMetadata(
            client_name="SDK downstream-authorization test",
            redirect_uris=[SDK_REDIRECT],
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
        ),
        MemoryStorage(),
        redirect_handler=authorization.redirect_handler,
        callback_handler=authorization.callback_handler,
    )


def call_whoami_through(resource_url: str, browser: ConnectingBrowser) -> tuple[dict[str, Any], SdkAuthorization]:
    """From nothing: the SDK client discovers the proxy, registers, authorizes through `browser`, calls whoami."""
    authorization = SdkAuthorization(browser)
    auth = sdk_client(resource_url, authorization)

    async def scenario() -> dict[str, Any]:
        async with (
            httpx2.AsyncClient(auth=auth, timeout=60) as http,
            Client(streamable_http_client(resource_url, http_client=http)) as client,
        ):
            result = await client.call_tool("whoami", {})
            assert result.is_error is False, result
            assert isinstance(result.structured_content, dict)
            return result.structured_content

    return anyio.run(scenario), authorization


def route_name(kind: str) -> str:
    """Unique per test: the proxies of a session share a database, where connections are per user and route name."""
    return f"{kind}-{secrets.token_hex(3)}"


def start_proxy_with(
    start_gunicorn: Callable[..., GunicornProxy], tmp_path: Path, *specs: Callable[[str], RouteSpec]
) -> GunicornProxy:
    """gunicorn with a routes file; each spec is built from the proxy's PUBLIC_URL (a configured route's client at
    the downstream's provider must know its redirect URI before the proxy starts)."""
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    built = [spec(public_url) for spec in specs]
    routes = write_routes_toml(tmp_path / "routes.toml", [spec.route for spec in built])
    env = {key: value for spec in built for key, value in spec.env.items()}
    return start_gunicorn(
        PORT=str(port), PUBLIC_URL=public_url, MCP_SERVER_URL="", MCP_ROUTES_FILE=routes, WEB_CONCURRENCY="2", **env
    )


@pytest.mark.parametrize("mode", ["configured", "discovered"])
def test_sdk_client_connects_the_downstream_and_whoami_names_the_subject_its_provider_gave(
    start_gunicorn: Callable[..., GunicornProxy],
    protected_downstream: ProtectedDownstream,
    downstream_provider: OidcProvider,
    tmp_path: Path,
    mode: str,
) -> None:
    proxy_clients: list[str] = []
    name = route_name(mode)

    def route(public_url: str) -> RouteSpec:
        if mode == "discovered":
            return oauth_route(name, protected_downstream)
        # The operator registered the proxy at the downstream's provider, which issues its tokens for that server.
        client = register_proxy_client(downstream_provider, public_url, default_resource=protected_downstream.resource)
        proxy_clients.append(client.client_id)
        return oauth_route(name, protected_downstream, provider=downstream_provider, client=client)

    registrations_before = downstream_provider.endpoint_stats()["registration_requests"]
    proxy = start_proxy_with(start_gunicorn, tmp_path, route)
    browser = ConnectingBrowser(proxy.url, downstream_issuer=downstream_provider.issuer)

    caller, authorization = call_whoami_through(f"{proxy.url}/mcp/{name}", browser)

    # One walk: the proxy's consent, the connect page, one sign-in at the downstream's provider.
    assert len(authorization.authorize_urls) == 1
    assert browser.consent_pages == 1 and len(browser.connect_pages) == 1
    assert len(browser.downstream_authorizations) == 1
    # The downstream saw a token its own provider issued to the proxy, for itself, naming bob (not alice, who signed
    # in at the proxy's provider).
    assert caller["subject"] == DOWNSTREAM_USER
    assert caller["audience"] == protected_downstream.resource
    assert caller["issuer"] == downstream_provider.issuer
    if mode == "configured":
        assert caller["client_id"] == proxy_clients[0]
        assert downstream_provider.endpoint_stats()["registration_requests"] == registrations_before
    else:
        # RFC 8707: the discovered connect hop names the resource it wants a token for.
        assert query_of(browser.downstream_authorizations[0])["resource"] == protected_downstream.resource
        assert downstream_provider.endpoint_stats()["registration_requests"] == registrations_before + 1
        assert caller["client_id"] not in ("", None)


def test_a_second_client_of_the_same_user_reuses_the_connection(
    start_gunicorn: Callable[..., GunicornProxy],
    protected_downstream: ProtectedDownstream,
    downstream_provider: OidcProvider,
    tmp_path: Path,
) -> None:
    name = route_name("reused")

    def route(public_url: str) -> RouteSpec:
        client = register_proxy_client(downstream_provider, public_url, default_resource=protected_downstream.resource)
        return oauth_route(name, protected_downstream, provider=downstream_provider, client=client)

    proxy = start_proxy_with(start_gunicorn, tmp_path, route)
    browser = ConnectingBrowser(proxy.url, downstream_issuer=downstream_provider.issuer)
    first, _ = call_whoami_through(f"{proxy.url}/mcp/{name}", browser)

    # Another MCP client, same person, same browser: consent again (a new client), no connect page this time.
    second, _ = call_whoami_through(f"{proxy.url}/mcp/{name}", browser)

    assert first["subject"] == second["subject"] == DOWNSTREAM_USER
    assert len(browser.connect_pages) == 1
    assert len(browser.downstream_authorizations) == 1


def test_sdk_client_gives_alices_api_key_once_and_the_downstream_knows_her_by_it(
    start_gunicorn: Callable[..., GunicornProxy], api_key_downstream: ApiKeyDownstream, tmp_path: Path
) -> None:
    name = route_name("keyed")
    proxy = start_proxy_with(start_gunicorn, tmp_path, lambda _url: api_key_route(name, api_key_downstream))
    browser = ConnectingBrowser(proxy.url, api_key=api_key_downstream.keys["alice"])

    caller, _ = call_whoami_through(f"{proxy.url}/mcp/{name}", browser)

    assert caller == {"user": "alice"}
    assert len(browser.connect_pages) == 1 and 'name="api_key"' in browser.connect_pages[0]
    # The key was asked for on a page of the proxy, never put in a URL.
    assert api_key_downstream.keys["alice"] not in proxy.logs()


def whoami_before_and_after(resource_url: str, browser: ConnectingBrowser, between: Callable[[], None]) -> list[Any]:
    """One SDK client, one MCP session: whoami, then `between` (outside the client), then whoami again."""
    authorization = SdkAuthorization(browser)
    auth = sdk_client(resource_url, authorization)

    async def scenario() -> list[Any]:
        answers = []
        async with (
            httpx2.AsyncClient(auth=auth, timeout=60) as http,
            Client(streamable_http_client(resource_url, http_client=http)) as client,
        ):
            for step in range(2):
                if step == 1:
                    await asyncio.to_thread(between)
                result = await client.call_tool("whoami", {})
                assert result.is_error is False, result
                answers.append(result.structured_content)
        return answers

    return anyio.run(scenario)


def test_access_revoked_at_the_downstreams_provider_sends_the_client_back_through_connect(
    start_gunicorn: Callable[..., GunicornProxy],
    protected_downstream: ProtectedDownstream,
    downstream_provider: OidcProvider,
    tmp_path: Path,
) -> None:
    """bob removes the proxy's access at the downstream's provider: the downstream refuses the stored token, the
    proxy answers the client 401 invalid_token, and the client's re-authorization runs the connect step again; the
    same MCP client then works as before, without anyone restarting anything."""
    name = route_name("revoked")
    clients: list[str] = []

    def route(public_url: str) -> RouteSpec:
        client = register_proxy_client(downstream_provider, public_url, default_resource=protected_downstream.resource)
        clients.append(client.client_id)
        return oauth_route(name, protected_downstream, provider=downstream_provider, client=client)

    proxy = start_proxy_with(start_gunicorn, tmp_path, route)
    browser = ConnectingBrowser(proxy.url, downstream_issuer=downstream_provider.issuer)

    def revoke_at_the_downstreams_provider() -> None:
        assert downstream_provider.revoke_grants(DOWNSTREAM_USER, clients[0]) >= 1

    before, after = whoami_before_and_after(f"{proxy.url}/mcp/{name}", browser, revoke_at_the_downstreams_provider)

    assert before["subject"] == after["subject"] == DOWNSTREAM_USER
    # Connected twice: at first, and again after the revocation (the proxy's consent was remembered the second time).
    assert len(browser.connect_pages) == 2
    assert len(browser.downstream_authorizations) == 2
