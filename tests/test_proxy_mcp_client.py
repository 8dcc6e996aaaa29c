"""The MCP Python SDK client (`OAuthClientProvider`) from nothing to streamed tool calls, through gunicorn, to a real MCP server."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable

import anyio
import httpx2
import pytest
from mcp import Client
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientMetadata

from tests.flows import Browser, MemoryStorage, query_of
from tests.proxy_fixtures import GunicornProxy, McpDownstream

REDIRECT_URI = "http://127.0.0.1:9/sdk-callback"  # never contacted: the browser stops at this prefix


class BrowserAuthorization:
    """redirect_handler and callback_handler driven by a separate cookie-keeping browser (not the authed client:
    the provider holds a lock while it waits, so re-entering it would deadlock)."""

    def __init__(self, proxy_url: str, login_hint: str = "alice"):
        self.browser = Browser(proxy_url, login_hint=login_hint)
        self.authorize_urls: list[str] = []
        self.result: dict[str, str] = {}

    async def redirect_handler(self, authorization_url: str) -> None:
        self.authorize_urls.append(authorization_url)
        final = await asyncio.to_thread(self.browser.authorize, authorization_url, REDIRECT_URI)
        self.result = query_of(final)

    async def callback_handler(self) -> AuthorizationCodeResult:
        return AuthorizationCodeResult(
            code=self.result["code"], state=self.result.get("state"), iss=self.result.get("iss")
        )


def sdk_auth(
    proxy: GunicornProxy, resource_url: str
) -> tuple[OAuthClientProvider, BrowserAuthorization, MemoryStorage]:
    browser = BrowserAuthorization(proxy.url)
    storage = MemoryStorage()
    provider = OAuthClientProvider(
        resource_url,
        OAuthClientMetadata(
            client_name="SDK test client",
            redirect_uris=[REDIRECT_URI],
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
        ),
        storage,
        redirect_handler=browser.redirect_handler,
        callback_handler=browser.callback_handler,
    )
    return provider, browser, storage


@pytest.fixture
def sdk_proxy(start_gunicorn: Callable[..., GunicornProxy], mcp_downstream: McpDownstream) -> GunicornProxy:
    # MCP_SERVER_URL with a path, as in the README: clients reach it at PUBLIC_URL/mcp.
    return start_gunicorn(MCP_SERVER_URL=mcp_downstream.url, WEB_CONCURRENCY="2", ACCESS_LOG="-")


@pytest.mark.parametrize("mode", ["auto", "legacy"])
def test_sdk_client_from_nothing_to_a_streamed_tool_call(
    sdk_proxy: GunicornProxy, mcp_downstream: McpDownstream, mode: str
) -> None:
    resource_url = sdk_proxy.url + "/mcp"
    provider, browser, storage = sdk_auth(sdk_proxy, resource_url)
    progress: list[tuple[float, float]] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((time.monotonic(), value))

    async def scenario() -> tuple[object, object, float, float]:
        async with (
            httpx2.AsyncClient(auth=provider, timeout=30) as http,
            Client(streamable_http_client(resource_url, http_client=http), mode=mode) as client,
        ):
            started = time.monotonic()
            result = await client.call_tool("progress", {"steps": 4, "pause": 0.5}, progress_callback=on_progress)
            finished = time.monotonic()
            headers = await client.call_tool("whoami", {})
            return result, headers, started, finished

    result, headers, started, finished = anyio.run(scenario)

    # The whole OAuth dance happened: discovery from our 401, registration, consent, upstream login, token.
    assert len(browser.authorize_urls) == 1
    assert query_of(browser.authorize_urls[0])["resource"] == resource_url
    assert storage.tokens is not None and storage.client_info is not None
    assert result.is_error is False and result.structured_content == {"result": "finished 4 steps"}

    # Streamed: each progress notification arrived when the tool sent it, not all at the end.
    assert [value for _, value in progress] == [1, 2, 3, 4]
    arrivals = [at - started for at, _ in progress]
    assert arrivals[0] < 1.2, arrivals
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert all(gap > 0.3 for gap in gaps), arrivals
    assert finished - started - arrivals[0] > 1.2, (arrivals, finished - started)

    # What the downstream saw: identity from the grant, its own Host, never the client's token.
    seen = {key.lower(): value for key, value in headers.structured_content.items()}
    assert seen["x-forwarded-user"] == "alice"
    assert seen["x-forwarded-email"] == "alice@example.com"
    assert seen["x-forwarded-name"] == "Alice Liddell"
    assert "x-forwarded-access-token" not in seen  # the provider token only where a route asks for it
    assert "authorization" not in seen
    assert storage.tokens.access_token not in str(seen)
    assert seen["host"] == f"127.0.0.1:{mcp_downstream.port}"  # SDK servers answer 421 to a foreign Host
    assert seen["x-forwarded-host"] == sdk_proxy.url.split("//", 1)[1]
    assert seen["x-forwarded-proto"] == "http"

    access_log = sdk_proxy.logs()
    assert '"POST /mcp HTTP/1.1" 401' in access_log  # the unauthenticated first try that starts discovery
    if mode == "legacy":
        # initialize, a session, the standalone GET stream and the DELETE that ends the session all passed.
        assert seen["mcp-session-id"]
        # The GET stream's line is written when the stream ends, the DELETE's when its answer is done: on a busy
        # machine either may come last.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (
            '"GET /mcp HTTP/1.1" 200' in access_log and '"DELETE /mcp HTTP/1.1" 200' in access_log
        ):
            time.sleep(0.1)
            access_log = sdk_proxy.logs()
        assert '"GET /mcp HTTP/1.1" 200' in access_log
        assert '"DELETE /mcp HTTP/1.1" 200' in access_log
    else:
        assert seen["mcp-method"] == "tools/call" and seen["mcp-name"] == "whoami"
