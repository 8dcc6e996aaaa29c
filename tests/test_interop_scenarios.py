"""The scenarios of issue 4, each end to end with an independent client implementation.

Client: the MCP Python SDK (`OAuthClientProvider` over `streamable_http_client`), its `redirect_handler` driven by
a person's cookie-keeping browser that walks the proxy's consent page and the real OpenID provider
(`oidc-provider`) one hop at a time. Proxy: gunicorn with gevent workers (two, so requests land on different
workers). Downstream: a real MCP server (the SDK's `MCPServer`), reached through the proxy.

Time is moved, not waited for: an expiry is the token row's `access_expires_at` set in the past (the proxy's
clock) plus the SDK's own expiry time set in the past (the client's clock), which is what 60 s of waiting does.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
import requests

from tests.flows import query_of
from tests.interop_fixtures import (
    ON_INTEROP_DATABASE,
    AuthorizationFailed,
    ProxyDatabase,
    SdkClient,
    StartGunicorn,
    find_cause,
    reload_gunicorn,
)
from tests.provider_fixture import OidcProvider
from tests.proxy_fixtures import GunicornProxy, McpDownstream, write_routes

pytestmark = ON_INTEROP_DATABASE

#: Seconds a validated token is answered from a worker's memory: the documented bound on a revocation's delay.
TOKEN_CACHE_TTL = 2
#: How long a client may wait for an OAuth error before it counts as a hang.
NO_HANG = 15.0


@pytest.fixture(scope="module")
def interop_proxy(
    start_gunicorn: StartGunicorn, mcp_downstream: McpDownstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GunicornProxy]:
    """One proxy for the module: two routes to the real MCP server, an email-domain allowlist, short caches."""
    routes = write_routes(
        tmp_path_factory.mktemp("routes") / "routes.toml",
        [
            {"name": "mcp", "path": "/mcp", "url": mcp_downstream.url, "forward_access_token": True},
            {"name": "other", "path": "/other", "url": mcp_downstream.url},
        ],
    )
    proxy = start_gunicorn(
        workers=2,
        MCP_SERVER_URL="",
        MCP_ROUTES_FILE=routes,
        ACCESS_LOG="-",
        TOKEN_CACHE_TTL=str(TOKEN_CACHE_TTL),
        # No retry grace: a replayed refresh token is theft at once (the grace window has its own tests).
        REFRESH_GRACE_SECONDS="0",
        # alice@example.com and bob@example.org are in; carol@outsider.test is not.
        ALLOWED_EMAIL_DOMAINS="example.com,example.org",
    )
    yield proxy
    proxy.stop()


def mcp_post(url: str, token: str) -> requests.Response:
    """One raw MCP request with a Bearer token, as any client sends it."""
    return requests.post(
        url,
        json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
        timeout=10,
        headers={
            "Authorization": f"Bearer {token}",
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
            "MCP-Protocol-Version": "2025-11-25",
        },
    )


def seconds_until_refused(url: str, token: str, limit: float) -> float:
    """Send requests with `token` until the proxy answers 401; return when (after the start) that request was sent."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        sent = time.monotonic() - started
        response = mcp_post(url, token)
        if response.status_code == 401:
            challenge = response.headers["WWW-Authenticate"]
            assert 'error="invalid_token"' in challenge and 'resource_metadata="http' in challenge, challenge
            return sent
        assert response.status_code != 403, response.text
        time.sleep(0.1)
    raise AssertionError(f"{url} still accepted the token after {limit} s")


def refresh(proxy: GunicornProxy, sdk: SdkClient, refresh_token: str) -> requests.Response:
    assert sdk.storage.client_info is not None
    return requests.post(
        proxy.url + "/token",
        timeout=10,
        data={
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
            "client_id": sdk.storage.client_info.client_id,
        },
    )


def run_expecting_failure(sdk: SdkClient, mode: str = "auto") -> tuple[BaseException, float]:
    """Connect and call a tool; return the error the SDK raised and how long it took to raise it."""

    async def scenario() -> None:
        async with sdk.connect(mode) as client:
            await sdk.whoami(client)

    started = time.monotonic()
    try:
        anyio.run(scenario)
    except Exception as error:  # the SDK surfaces flow errors wrapped in anyio exception groups
        return error, time.monotonic() - started
    raise AssertionError("the client connected, but it should have been refused")


# -- first connection, second connection, a new client ---------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_first_connection_then_stored_tokens_then_a_new_client(interop_proxy: GunicornProxy, mode: str) -> None:
    resource = interop_proxy.url + "/mcp"
    log_start = len(interop_proxy.logs())
    first = SdkClient(interop_proxy.url, resource)
    seen: dict[str, tuple[int, int]] = {}  # step -> (authorizations so far, consent pages so far)
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(time.monotonic())

    async def scenario() -> tuple[float, float, dict[str, str]]:
        # 1. From nothing: 401 → discovery → registration → consent → provider → code → token → a streamed call.
        async with first.connect(mode) as client:
            started = time.monotonic()
            result = await client.call_tool("progress", {"steps": 3, "pause": 0.3}, progress_callback=on_progress)
            finished = time.monotonic()
            assert result.is_error is False and result.structured_content == {"result": "finished 3 steps"}
            identity = await first.whoami(client)
        seen["first"] = (len(first.authorize_urls), first.consent_pages_seen)
        # 2. The client restarts with its stored registration and tokens: no browser at all.
        async with first.connect(mode) as client:
            await first.whoami(client)
        seen["stored tokens"] = (len(first.authorize_urls), first.consent_pages_seen)
        # 3. It lost its tokens (signed out) but not its registration: the person approved it already.
        first.storage.tokens = None
        async with first.connect(mode) as client:
            await first.whoami(client)
        seen["same client again"] = (len(first.authorize_urls), first.consent_pages_seen)
        # 4. Another client, in the same person's browser, must be approved on its own.
        second = SdkClient(interop_proxy.url, resource, browser=first.browser, client_name="Another SDK client")
        async with second.connect(mode) as client:
            assert (await second.whoami(client))["x-forwarded-user"] == "alice"
        seen["new client"] = (len(first.authorize_urls) + len(second.authorize_urls), first.consent_pages_seen)
        assert second.storage.client_info is not None and first.storage.client_info is not None
        assert second.storage.client_info.client_id != first.storage.client_info.client_id
        return started, finished, identity

    started, finished, identity = anyio.run(scenario)

    assert seen == {"first": (1, 1), "stored tokens": (1, 1), "same client again": (2, 1), "new client": (3, 2)}
    assert identity["x-forwarded-user"] == "alice" and identity["x-forwarded-email"] == "alice@example.com"
    # Streamed through gunicorn: each progress notification arrived when sent, not with the result.
    assert len(progress) == 3, progress
    assert progress[0] - started < 1.0 and all(b - a > 0.15 for a, b in itertools.pairwise(progress)), progress
    assert finished - progress[0] > 0.4
    authorize = query_of(first.authorize_urls[0])
    assert authorize["resource"] == resource and authorize["code_challenge_method"] == "S256"
    log = interop_proxy.logs()[log_start:]
    if mode == "legacy":  # initialize, a session, the standalone GET stream, DELETE at close: all through
        assert identity["mcp-session-id"]
        assert '"GET /mcp HTTP/1.1" 200' in log and '"DELETE /mcp HTTP/1.1" 200' in log
    else:  # 2026-07-28: stateless, with the routing headers
        assert identity["mcp-method"] == "tools/call" and identity["mcp-name"] == "whoami"
        assert "mcp-session-id" not in identity


# -- expiry, refresh, rotation, replay -------------------------------------------------------------


def test_expiry_then_sdk_refresh_then_rotation_and_replay_revokes_the_family(
    interop_proxy: GunicornProxy, proxy_database: ProxyDatabase
) -> None:
    resource = interop_proxy.url + "/mcp"
    sdk = SdkClient(interop_proxy.url, resource)

    def let_the_access_token_expire() -> None:
        assert sdk.storage.tokens is not None and sdk.provider is not None
        proxy_database.expire_access_token(sdk.storage.tokens.access_token)
        sdk.provider.context.token_expiry_time = time.time() - 1

    async def scenario() -> list[str]:
        users = []
        async with sdk.connect("auto") as client:
            users.append((await sdk.whoami(client))["x-forwarded-user"])
            for _ in range(2):  # a refreshed token works, keeps working, and the next refresh works too
                let_the_access_token_expire()
                users.append((await sdk.whoami(client))["x-forwarded-user"])
                users.append((await sdk.whoami(client))["x-forwarded-user"])
        return users

    assert anyio.run(scenario) == ["alice"] * 5
    assert len(sdk.authorize_urls) == 1, "the SDK re-authorized instead of refreshing"
    original, refreshed, latest = sdk.storage.token_history
    assert len({original.access_token, refreshed.access_token, latest.access_token}) == 3
    assert len({original.refresh_token, refreshed.refresh_token, latest.refresh_token}) == 3
    assert latest.refresh_token is not None

    # The expired token is refused, within the cache bound.
    assert seconds_until_refused(resource, original.access_token, TOKEN_CACHE_TTL + 2) <= TOKEN_CACHE_TTL + 1
    # The latest pair still works.
    assert mcp_post(resource, latest.access_token).status_code != 401

    # Rotation: the first refresh token is refused now, and replaying it revokes the whole family.
    assert original.refresh_token is not None
    replay = refresh(interop_proxy, sdk, original.refresh_token)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant", replay.text
    after = refresh(interop_proxy, sdk, latest.refresh_token)
    assert after.status_code == 400 and after.json()["error"] == "invalid_grant", after.text
    assert seconds_until_refused(resource, latest.access_token, TOKEN_CACHE_TTL + 2) <= TOKEN_CACHE_TTL + 1


# -- revocation ------------------------------------------------------------------------------------


def test_a_revoked_token_gets_401_within_the_cache_bound_and_the_sdk_signs_in_again(
    interop_proxy: GunicornProxy,
) -> None:
    resource = interop_proxy.url + "/mcp"
    sdk = SdkClient(interop_proxy.url, resource)
    timings: dict[str, float] = {}

    async def scenario() -> str:
        async with sdk.connect("legacy") as client:
            await sdk.whoami(client)
            assert sdk.storage.tokens is not None and sdk.storage.client_info is not None
            token = sdk.storage.tokens.access_token
            for _ in range(4):  # warm both workers' caches
                assert (await anyio.to_thread.run_sync(mcp_post, resource, token)).status_code != 401
            # RFC 7009, as a client does when its user signs out.
            revoked = await anyio.to_thread.run_sync(
                lambda: requests.post(
                    interop_proxy.url + "/revoke",
                    timeout=10,
                    data={"token": token, "client_id": sdk.storage.client_info.client_id},
                )
            )
            assert revoked.status_code == 200, revoked.text
            timings["refused after"] = await anyio.to_thread.run_sync(
                seconds_until_refused, resource, token, TOKEN_CACHE_TTL + 3
            )
            # The worker that handled /revoke refuses at once; the other one within TOKEN_CACHE_TTL. Past
            # that bound every worker refuses, so the SDK's next call certainly meets a 401.
            await anyio.sleep(max(0.0, TOKEN_CACHE_TTL + 0.3 - timings["refused after"]))
            # The same session goes on: the SDK meets the 401, signs in again (no consent page: this client
            # was approved in this browser), and the call succeeds with a new token.
            return (await sdk.whoami(client))["x-forwarded-user"]

    assert anyio.run(scenario) == "alice"
    assert timings["refused after"] <= TOKEN_CACHE_TTL + 1, timings
    assert len(sdk.authorize_urls) == 2 and sdk.consent_pages_seen == 1
    assert len(sdk.storage.token_history) == 2


# -- two users -------------------------------------------------------------------------------------


def test_two_users_through_one_proxy_each_seen_as_themselves(interop_proxy: GunicornProxy) -> None:
    resource = interop_proxy.url + "/mcp"
    clients = {
        "alice": SdkClient(interop_proxy.url, resource, login_hint="alice"),
        "bob": SdkClient(interop_proxy.url, resource, login_hint="bob"),
    }
    seen: dict[str, list[dict[str, str]]] = {"alice": [], "bob": []}

    async def use(name: str) -> None:
        sdk = clients[name]
        async with sdk.connect("legacy") as client:
            for _ in range(4):
                seen[name].append(await sdk.whoami(client))
                await anyio.sleep(0.01)

    async def scenario() -> None:
        async with anyio.create_task_group() as group:  # both at once, interleaved on the same workers
            group.start_soon(use, "alice")
            group.start_soon(use, "bob")

    anyio.run(scenario)

    emails = {"alice": "alice@example.com", "bob": "bob@example.org"}
    upstream_tokens = {}
    for name, headers_seen in seen.items():
        assert len(headers_seen) == 4
        for headers in headers_seen:
            assert headers["x-forwarded-user"] == name and headers["x-forwarded-email"] == emails[name]
            assert "authorization" not in headers
        upstream_tokens[name] = {headers["x-forwarded-access-token"] for headers in headers_seen}
        assert len(upstream_tokens[name]) == 1
    assert upstream_tokens["alice"].isdisjoint(upstream_tokens["bob"])
    sessions = {name: {headers["mcp-session-id"] for headers in seen[name]} for name in seen}
    assert sessions["alice"].isdisjoint(sessions["bob"])


# -- allowlist -------------------------------------------------------------------------------------


def test_a_user_outside_the_allowlist_is_refused_and_the_client_told_access_denied(
    interop_proxy: GunicornProxy,
) -> None:
    carol = SdkClient(interop_proxy.url, interop_proxy.url + "/mcp", login_hint="carol")
    error, elapsed = run_expecting_failure(carol)

    failed = find_cause(error, AuthorizationFailed)
    assert isinstance(failed, AuthorizationFailed), repr(error)
    assert failed.params["error"] == "access_denied"
    assert failed.params["state"] == query_of(carol.authorize_urls[0])["state"]
    assert failed.params["iss"] == interop_proxy.url
    assert elapsed < NO_HANG
    assert carol.storage.tokens is None
    # The person was told why on the way back.
    assert carol.browser is not None and carol.browser.last_page is not None
    assert "carol@outsider.test is not allowed" in carol.browser.last_page.text


# -- step-up: a route that needs an extra scope ----------------------------------------------------


def test_a_route_needing_an_extra_scope_gets_403_and_the_sdk_reauthorizes_with_the_union(
    start_gunicorn: StartGunicorn, mcp_downstream: McpDownstream, tmp_path: Path
) -> None:
    routes_file = tmp_path / "routes.toml"
    route = {"name": "files", "path": "/files", "url": mcp_downstream.url}
    write_routes(routes_file, [{**route, "scopes": ["files:read"]}])
    proxy = start_gunicorn(
        MCP_SERVER_URL="",
        MCP_ROUTES_FILE=str(routes_file),
        GRACEFUL_TIMEOUT="1",
        SCOPES_SUPPORTED="openid,email,profile,files:read,files:write",
    )
    resource = proxy.url + "/files"
    sdk = SdkClient(proxy.url, resource)
    statuses: list[int] = []

    def challenge() -> str:
        return requests.post(resource, json={}, timeout=5).headers.get("WWW-Authenticate", "")

    async def connect_and_call() -> str:
        async with sdk.connect("auto") as client:
            return (await sdk.whoami(client))["x-forwarded-user"]

    try:
        assert anyio.run(connect_and_call) == "alice"
        # The operator now requires files:write on this route too, and reloads gunicorn (SIGHUP). The client is
        # disconnected meanwhile: an old worker keeps serving a pooled keep-alive connection with the old
        # configuration until it exits.
        assert sdk.browser is not None
        sdk.browser.session.close()
        write_routes(routes_file, [{**route, "scopes": ["files:read", "files:write"]}])
        reload_gunicorn(proxy, lambda: 'scope="files:read files:write"' in challenge())
        assert sdk.storage.tokens is not None
        refused = mcp_post(resource, sdk.storage.tokens.access_token)
        statuses.append(refused.status_code)
        assert 'error="insufficient_scope"' in refused.headers["WWW-Authenticate"]
        # The client comes back with its stored token: 403 insufficient_scope → re-authorization → success.
        assert anyio.run(connect_and_call) == "alice"
    finally:
        proxy.stop()

    assert statuses == [403]
    first_scope, second_scope = (query_of(url)["scope"] for url in sdk.authorize_urls)
    assert first_scope.split() == ["files:read"]
    assert set(second_scope.split()) == {"files:read", "files:write"}  # the union, not just the new scope
    assert sdk.storage.tokens is not None and set(sdk.storage.tokens.scope.split()) >= {"files:read", "files:write"}


# -- audience --------------------------------------------------------------------------------------


def test_a_token_for_one_route_is_refused_on_another(interop_proxy: GunicornProxy) -> None:
    sdk = SdkClient(interop_proxy.url, interop_proxy.url + "/mcp")

    async def connect_and_call() -> str:
        async with sdk.connect("auto") as client:
            return (await sdk.whoami(client))["x-forwarded-user"]

    assert anyio.run(connect_and_call) == "alice"
    assert sdk.storage.tokens is not None
    mcp_token = sdk.storage.tokens.access_token

    refused = mcp_post(interop_proxy.url + "/other", mcp_token)
    assert refused.status_code == 401
    challenge = refused.headers["WWW-Authenticate"]
    assert 'error="invalid_token"' in challenge
    assert f'resource_metadata="{interop_proxy.url}/.well-known/oauth-protected-resource/other"' in challenge

    # The same client, pointed at the other route with the credentials it holds, authorizes for that resource.
    sdk.resource_url = interop_proxy.url + "/other"
    assert anyio.run(connect_and_call) == "alice"
    assert len(sdk.authorize_urls) == 2
    assert query_of(sdk.authorize_urls[1])["resource"] == interop_proxy.url + "/other"
    assert sdk.storage.tokens.access_token != mcp_token
    assert mcp_post(interop_proxy.url + "/mcp", mcp_token).status_code != 401  # still good where it belongs
    assert mcp_post(interop_proxy.url + "/mcp", sdk.storage.tokens.access_token).status_code == 401


# -- the upstream provider denies or fails ---------------------------------------------------------


@pytest.mark.parametrize(("login_hint", "error"), [("deny", "access_denied"), ("error", "server_error")])
def test_the_provider_denies_or_fails_and_the_client_gets_an_oauth_error(
    interop_proxy: GunicornProxy, login_hint: str, error: str
) -> None:
    sdk = SdkClient(interop_proxy.url, interop_proxy.url + "/mcp", login_hint=login_hint)
    raised, elapsed = run_expecting_failure(sdk)

    failed = find_cause(raised, AuthorizationFailed)
    assert isinstance(failed, AuthorizationFailed), repr(raised)
    assert failed.params["error"] == error and failed.params["iss"] == interop_proxy.url
    assert failed.params["state"] == query_of(sdk.authorize_urls[0])["state"]
    assert elapsed < NO_HANG
    assert sdk.storage.tokens is None


def test_an_unreachable_provider_gives_the_client_an_oauth_error_not_a_hang(
    start_oidc_provider: Callable[..., OidcProvider], start_gunicorn: StartGunicorn, mcp_downstream: McpDownstream
) -> None:
    provider: OidcProvider = start_oidc_provider()
    proxy = start_gunicorn(provider=provider, MCP_SERVER_URL=mcp_downstream.url)
    try:
        provider.stop()
        sdk = SdkClient(proxy.url, proxy.url + "/mcp")
        raised, elapsed = run_expecting_failure(sdk)
    finally:
        proxy.stop()

    failed = find_cause(raised, AuthorizationFailed)
    assert isinstance(failed, AuthorizationFailed), repr(raised)
    assert failed.params["error"] in ("temporarily_unavailable", "server_error"), failed.params
    assert failed.params["iss"] == proxy.url
    assert elapsed < NO_HANG
