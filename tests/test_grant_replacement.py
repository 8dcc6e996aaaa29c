"""A user who signs in again through the same client, for the same MCP server, keeps one live grant: the new one."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from pathlib import Path

import requests
from sqlalchemy import select

from oauthproxy.grant_replacement import REPLACED_REASON, replace_previous_grants
from oauthproxy.models import Grant, Token, db
from tests.conftest import RunningProxy
from tests.flows import Browser, McpOAuthClient
from tests.proxy_fixtures import Login, write_routes


def sign_in(proxy: RunningProxy, client: McpOAuthClient, login_hint: str = "alice", path: str = "/mcp") -> Login:
    result = client.login(Browser(proxy.url, login_hint=login_hint), resource=proxy.url + path)
    assert "code" in result, result
    token = client.exchange(result["code"])
    assert token.status_code == 200, token.text
    body = token.json()
    return Login(client, body["access_token"], body["refresh_token"], body.get("scope", ""))


def new_client(proxy: RunningProxy) -> McpOAuthClient:
    return McpOAuthClient.register(proxy.url, client_name=f"Replacing Client {secrets.token_hex(4)}")


def grants_of(proxy: RunningProxy, client: McpOAuthClient) -> list[Grant]:
    with proxy.app.app_context():
        rows = list(db.session.scalars(select(Grant).where(Grant.client_id == client.client_id).order_by(Grant.id)))
        db.session.expunge_all()
        return rows


def mcp_status(proxy: RunningProxy, login: Login) -> int:
    # The downstream (127.0.0.1:9) never answers: a token the proxy accepts gets 502, a refused one 401.
    return requests.post(proxy.url + "/mcp", json={}, headers=login.bearer, timeout=10).status_code


def test_a_second_sign_in_through_the_same_client_replaces_the_first(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    first = sign_in(proxy, client)
    assert mcp_status(proxy, first) == 502
    second = sign_in(proxy, client)

    refused = client.refresh(first.refresh_token)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant", refused.text
    assert mcp_status(proxy, first) == 401  # its cached validation was dropped with the grant
    assert client.refresh(second.refresh_token).status_code == 200
    grants = grants_of(proxy, client)
    assert [g.revoked_reason for g in grants] == [REPLACED_REASON, None]  # one live grant
    with proxy.app.app_context():
        tokens = db.session.scalars(select(Token).where(Token.grant_id == grants[0].id)).all()
    assert tokens and all(token.revoked_at is not None for token in tokens)


def test_other_users_clients_and_servers_keep_their_grants(
    start_proxy: Callable[..., RunningProxy], tmp_path: Path
) -> None:
    # Two MCP servers: a grant for one is not replaced by a sign-in for the other.
    routes = [
        {"name": "a", "path": "/mcp/a", "url": "http://127.0.0.1:9/a"},
        {"name": "b", "path": "/mcp/b", "url": "http://127.0.0.1:9/b"},
    ]
    proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=write_routes(tmp_path / "routes.toml", routes))
    client, other_client = new_client(proxy), new_client(proxy)
    alice_a = sign_in(proxy, client, path="/mcp/a")
    alice_b = sign_in(proxy, client, path="/mcp/b")
    bob_a = sign_in(proxy, client, login_hint="bob", path="/mcp/a")
    alice_other = sign_in(proxy, other_client, path="/mcp/a")
    for login in (alice_a, alice_b, bob_a, alice_other):
        assert login.client.refresh(login.refresh_token).status_code == 200
    assert all(g.revoked_at is None for g in grants_of(proxy, client) + grants_of(proxy, other_client))


def test_replacement_can_be_switched_off(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(REPLACE_PREVIOUS_GRANTS="false")
    client = new_client(proxy)
    first = sign_in(proxy, client)
    second = sign_in(proxy, client)
    assert client.refresh(first.refresh_token).status_code == 200
    assert client.refresh(second.refresh_token).status_code == 200
    assert [g.revoked_at for g in grants_of(proxy, client)] == [None, None]


def test_the_replacement_commits_with_the_new_grant_or_not_at_all(proxy: RunningProxy) -> None:
    """Without a request: the earlier grant is revoked in the new grant's transaction; a rollback keeps it."""
    client = new_client(proxy)
    first = sign_in(proxy, client)
    (earlier,) = grants_of(proxy, client)
    with proxy.app.app_context():
        fields = {"client_id": client.client_id, "user_id": earlier.user_id, "resource": earlier.resource}
        new = Grant(**fields)
        db.session.add(new)
        db.session.flush()
        assert replace_previous_grants(new) == [earlier.id]
        db.session.rollback()  # the code could not be stored: nothing of the new sign-in remains
        assert db.session.get(Grant, earlier.id).revoked_at is None
        assert client.refresh(first.refresh_token).status_code == 200

        new = Grant(**fields)
        db.session.add(new)
        db.session.flush()
        assert replace_previous_grants(new) == [earlier.id]
        db.session.commit()
        assert db.session.get(Grant, earlier.id).revoked_reason == REPLACED_REASON
        assert replace_previous_grants(new) == []  # nothing else was live
