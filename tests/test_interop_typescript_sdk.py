"""A second, independent client: the official MCP TypeScript SDK (`@modelcontextprotocol/sdk`, pinned in
tests/interop/package-lock.json), run by node from the suite, from nothing to a streamed tool call.

tests/interop/ts_client.mjs uses the SDK's `StreamableHTTPClientTransport` with an `OAuthClientProvider` that keeps
its registration and tokens in a file, as a desktop client would. The authorization URL it prints is walked by a
person's cookie-keeping browser (consent page, real OpenID provider); the landing URL goes back on its stdin.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.flows import Browser, query_of
from tests.interop_fixtures import ON_INTEROP_DATABASE, StartGunicorn, run_ts_client
from tests.proxy_fixtures import GunicornProxy, McpDownstream

pytestmark = ON_INTEROP_DATABASE

REDIRECT_URI = "http://127.0.0.1:9/ts-callback"  # never contacted: the browser stops at this prefix


@pytest.fixture(scope="module")
def ts_proxy(start_gunicorn: StartGunicorn, mcp_downstream: McpDownstream) -> Iterator[GunicornProxy]:
    proxy = start_gunicorn(workers=2, MCP_SERVER_URL=mcp_downstream.url, ACCESS_LOG="-")
    yield proxy
    proxy.stop()


def test_typescript_sdk_first_connection_stored_tokens_and_a_new_client(
    ts_proxy: GunicornProxy, interop_node: Path, tmp_path: Path
) -> None:
    resource = ts_proxy.url + "/mcp"
    browser = Browser(ts_proxy.url, login_hint="bob")
    state = tmp_path / "ts-client-state.json"

    # 1. From nothing: 401 → resource metadata → AS metadata → DCR → consent → provider → code → token → calls.
    first = run_ts_client(interop_node, resource, state, browser, REDIRECT_URI, toolArgs={"steps": 3, "pause": 0.4})
    assert first.returncode == 0, (first.events, first.stderr[-3000:])
    authorize = query_of(first.one("authorize")["url"])
    assert authorize["resource"] == resource  # it found our resource metadata, so it sends RFC 8707 resource
    assert authorize["code_challenge_method"] == "S256" and authorize["redirect_uri"] == REDIRECT_URI
    assert first.consent_pages_seen == 1
    assert first.one("connected")["sessionId"]  # this SDK speaks the session protocol (initialize, session id)
    assert "progress" in first.one("tools")["names"]

    # Streamed: each progress notification reached node when the tool sent it, before the result.
    progress = first.of("progress")
    assert [event["progress"] for event in progress] == [1, 2, 3]
    result = next(event for event in first.of("result") if event["tool"] == "progress")
    arrivals = [event["at"] - result["started"] for event in progress]
    assert arrivals[0] < 1000 and all(b - a > 250 for a, b in itertools.pairwise(arrivals)), arrivals
    assert result["at"] - progress[0]["at"] > 600
    assert result["result"]["structuredContent"] == {"result": "finished 3 steps"}

    whoami = next(event for event in first.of("result") if event["tool"] == "whoami")["result"]["structuredContent"]
    seen = {key.lower(): value for key, value in whoami.items()}
    assert seen["x-forwarded-user"] == "bob" and seen["x-forwarded-email"] == "bob@example.org"
    assert "authorization" not in seen

    log = ts_proxy.logs()
    assert '"GET /mcp HTTP/1.1" 200' in log  # its standalone SSE stream, through the proxy
    assert '"DELETE /mcp HTTP/1.1" 200' in log  # terminateSession()

    # 2. The client starts again with its stored registration and tokens: no browser.
    second = run_ts_client(interop_node, resource, state, browser, REDIRECT_URI)
    assert second.returncode == 0, (second.events, second.stderr[-3000:])
    assert second.of("authorize") == [] and second.consent_pages_seen == 0
    assert second.one("done")["clientId"] == first.one("done")["clientId"]

    # 3. The same program installed afresh registers identical metadata from the same address: the proxy hands
    #    back the same client (README: identical public re-registrations reuse one client), already approved.
    again = run_ts_client(interop_node, resource, tmp_path / "reinstalled.json", browser, REDIRECT_URI)
    assert again.returncode == 0, (again.events, again.stderr[-3000:])
    assert again.one("done")["clientId"] == first.one("done")["clientId"]
    assert len(again.of("authorize")) == 1 and again.consent_pages_seen == 0

    # 4. Another client in the same browser must be approved on its own.
    other = run_ts_client(
        interop_node,
        resource,
        tmp_path / "another-client.json",
        browser,
        REDIRECT_URI,
        clientName="Another TypeScript client",
    )
    assert other.returncode == 0, (other.events, other.stderr[-3000:])
    assert len(other.of("authorize")) == 1 and other.consent_pages_seen == 1
    assert other.one("done")["clientId"] != first.one("done")["clientId"]


def test_typescript_sdk_is_told_access_denied_when_the_person_denies(
    ts_proxy: GunicornProxy, interop_node: Path, tmp_path: Path
) -> None:
    # The person clicks Deny on the consent page: the client learns it at its redirect URI, with state and iss.
    browser = Browser(ts_proxy.url)
    run = run_ts_client(
        interop_node, ts_proxy.url + "/mcp", tmp_path / "state.json", browser, REDIRECT_URI, decision="deny", timeout=30
    )
    assert run.returncode == 1
    error = run.one("error")
    assert error["oauthError"] == "access_denied" and error["iss"] == ts_proxy.url, error
    assert run.consent_pages_seen == 1
