"""Allowlists hold for grants made before they were narrowed: the next refresh, and the MCP endpoint, refuse."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import requests

from tests.conftest import RunningProxy
from tests.proxy_fixtures import EchoServer, Login, log_in, write_routes
from tests.test_proxy_headers import grant_of


def restarted(start_proxy: Callable[..., RunningProxy], before: RunningProxy, **env: str) -> RunningProxy:
    """The same deployment (PUBLIC_URL, database) started again with other settings; the old process stops.

    The new one listens on another port: its `url` is where it listens, its PUBLIC_URL stays the old one."""
    before.stop()
    after = start_proxy(PUBLIC_URL=before.url, **env)
    return replace(after, url=f"http://127.0.0.1:{after.server.server_port}")


def refresh_at(proxy: RunningProxy, login: Login) -> requests.Response:
    return replace(login.client, proxy_url=proxy.url).refresh(login.refresh_token)


def test_a_user_taken_off_the_global_allowlist_loses_access(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    mcp = {"MCP_SERVER_URL": echo_downstream.url + "/mcp"}
    before = start_proxy(**mcp)
    alice = log_in(before.url, before.url + "/mcp", login_hint="alice")  # alice@example.com
    bob = log_in(before.url, before.url + "/mcp", login_hint="bob")  # bob@example.org
    assert requests.post(before.url + "/mcp", headers=alice.bearer, json={}, timeout=5).status_code == 200

    after = restarted(start_proxy, before, ALLOWED_EMAIL_DOMAINS="example.org", **mcp)
    # The MCP endpoint: the token is loaded from the database (a new process has nothing cached).
    refused = requests.post(after.url + "/mcp", headers=alice.bearer, json={}, timeout=5)
    assert refused.status_code == 401, refused.text
    assert refused.json()["error"] == "invalid_token"
    assert "no longer allowed" in refused.json()["error_description"]
    # The refresh: refused, and the grant is over.
    response = refresh_at(after, alice)
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant", response.text
    grant = grant_of(after.app, alice.access_token)
    assert grant.revoked_at is not None and grant.revoked_reason == "user_not_allowed"

    # bob is still on the list: nothing changes for him.
    assert requests.post(after.url + "/mcp", headers=bob.bearer, json={}, timeout=5).status_code == 200
    assert refresh_at(after, bob).status_code == 200
    assert echo_downstream.last().header("X-Forwarded-User") == "bob"


def test_a_user_taken_off_a_routes_allowlist_loses_the_refresh(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, tmp_path: Path
) -> None:
    route = {"name": "files", "path": "/mcp/files", "url": echo_downstream.url + "/files"}
    before = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=write_routes(tmp_path / "before.toml", [route]))
    alice = log_in(before.url, before.url + "/mcp/files", login_hint="alice")
    narrowed = write_routes(tmp_path / "after.toml", [{**route, "allowed_emails": ["bob@example.org"]}])

    after = restarted(start_proxy, before, MCP_SERVER_URL="", MCP_ROUTES_FILE=narrowed)
    refused = requests.post(after.url + "/mcp/files", headers=alice.bearer, json={}, timeout=5)
    assert refused.status_code == 403 and refused.json()["error"] == "access_denied"
    response = refresh_at(after, alice)
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant", response.text
    assert grant_of(after.app, alice.access_token).revoked_reason == "user_not_allowed"
