"""Per-user downstream credentials (issue 13), the proxy's side: each user's connection to a route's downstream is
stored sealed, loaded with the access token (no query of its own), sent as the route says, refreshed once across
threads and instances against a real second OpenID provider, and refused (401, authorize again) when it is missing,
dead, or refused by the downstream."""

from __future__ import annotations

import base64
import json
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import anyio
import pytest
import requests
from flask import Flask
from sqlalchemy import event, select, update

from oauthproxy.components import components
from oauthproxy.connection_providers import CONNECT_CALLBACK_PATH, connection_provider
from oauthproxy.crypto import DecryptionError
from oauthproxy.database import rotate_encryption_key
from oauthproxy.downstream_connections import (
    ConnectionAccess,
    connection_refused,
    connections_of,
    disconnect,
    live_connection,
    refuse_sent_credential,
    sealing_context,
    store_connection,
)
from oauthproxy.models import DownstreamConnection, db, utcnow
from oauthproxy.providers import ProviderError, ProviderTokens
from oauthproxy.routes import Route
from tests.conftest import RunningProxy
from tests.flows import query_of, with_query
from tests.interop_fixtures import SdkClient
from tests.provider_fixture import OidcProvider, follow_redirects_until
from tests.proxy_fixtures import EchoServer, McpDownstream, log_in
from tests.support.settings import TEST_KEY

#: Who signs in at the downstream's own authorization server (its subject there has nothing to do with ours).
DOWNSTREAM_USER = "alice"


# -- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture
def user(oidc_provider: OidcProvider) -> str:
    """A user of the login provider for this test alone: the session's database is shared, and no other test's
    connection may be theirs (nor theirs another test's)."""
    login = f"conn-{secrets.token_hex(4)}"
    oidc_provider.add_user(login, f"{login}@example.com", "Connection Tester")
    return login


@pytest.fixture(scope="module")
def downstream_provider(start_oidc_provider: Callable[..., OidcProvider]) -> OidcProvider:
    """The downstream's own authorization server: a second, independent oidc-provider."""
    return start_oidc_provider()


@pytest.fixture
def downstream_as(downstream_provider: OidcProvider) -> Iterator[OidcProvider]:
    downstream_provider.set_failure(None)
    downstream_provider.reset_stats()
    yield downstream_provider
    downstream_provider.set_failure(None)
    downstream_provider.reset_stats()


@pytest.fixture
def oauth_proxy(
    start_proxy: Callable[..., RunningProxy], downstream_as: OidcProvider, tmp_path: Path
) -> Callable[..., RunningProxy]:
    """Factory: a proxy whose route `files` (/mcp) takes each user's connection to `downstream_as`."""
    client_id, client_secret = f"conn-{secrets.token_hex(4)}", f"conn-secret-{secrets.token_hex(8)}"

    def start(downstream_url: str, **env: str) -> RunningProxy:
        path = tmp_path / "routes.toml"
        path.write_text(
            "[[routes]]\n"
            'name = "files"\n'
            'path = "/mcp"\n'
            f"url = {json.dumps(downstream_url)}\n"
            'credential = "oauth"\n'
            f'oauth = {{ authorize_url = "{downstream_as.issuer}", client_id = "{client_id}", '
            'client_secret_env = "FILES_OAUTH_SECRET" }\n'
        )
        proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=str(path), FILES_OAUTH_SECRET=client_secret, **env)
        downstream_as.register_client(client_id, client_secret, [proxy.url + CONNECT_CALLBACK_PATH])
        return proxy

    return start


def route_of(app: Flask, name: str = "files") -> Route:
    return components(app).routes[name]


def connect_at_provider(proxy: RunningProxy, user: str) -> ProviderTokens:
    """The connect step's hops, driven from the test: a real code flow at the downstream's authorization server
    through the route's own provider object, and the tokens stored as the connection."""
    app = proxy.app
    with app.test_request_context():
        route = route_of(app)
        downstream = connection_provider(route)
        callback = app.config["SETTINGS"].public_url + CONNECT_CALLBACK_PATH
        url, secrets_ = downstream.provider.create_authorization_url(
            callback, list(downstream.scopes), downstream.authorize_params
        )
        with requests.Session() as browser:
            landing = follow_redirects_until(browser, with_query(url, login_hint=DOWNSTREAM_USER), callback)
        tokens, _ = downstream.provider.redeem_code(
            query_of(landing)["code"], callback, secrets_, downstream.token_params
        )
        assert tokens.refresh_token, "the downstream's provider issued no refresh token"
        store_connection(route, user, tokens=tokens, provider=downstream.issuer, scope=" ".join(downstream.scopes))
    return tokens


def connection_row(app: Flask, user_id: str, route: str = "files") -> DownstreamConnection | None:
    with app.app_context():
        row = db.session.scalar(
            select(DownstreamConnection).where(
                DownstreamConnection.route == route, DownstreamConnection.user_id == user_id
            )
        )
        if row is not None:
            db.session.expunge(row)
        db.session.rollback()
        return row


def opened(app: Flask, row: DownstreamConnection, column: str = "access_token") -> str:
    return components(app).secret_box.decrypt(getattr(row, column), sealing_context(row.id, column))


def expire_connection(app: Flask, user: str, seconds: int = 10) -> None:
    """As if the connection's access token expired within the refresh skew (60 s by default)."""
    with app.app_context():
        db.session.execute(
            update(DownstreamConnection)
            .where(DownstreamConnection.user_id == user)
            .values(expires_at=utcnow() + timedelta(seconds=seconds))
        )
        db.session.commit()


def call(url: str, bearer: dict[str, str], suffix: str = "") -> requests.Response:
    return requests.post(url + suffix, headers=bearer, json={}, timeout=30)


def challenge_error(response: requests.Response) -> str:
    assert response.status_code == 401, response.text
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge, challenge
    assert "resource_metadata=" in challenge
    assert response.json()["error"] == "invalid_token"
    return response.json()["error_description"]


def user_api_key_proxy(start_proxy: Callable[..., RunningProxy], echo: EchoServer, **env: str) -> RunningProxy:
    return start_proxy(MCP_SERVER_URL=echo.url + "/mcp", DOWNSTREAM_CREDENTIAL="user_api_key", **env)


# -- the store ----------------------------------------------------------------------------------------------------


def test_connections_are_sealed_upserted_refused_and_deleted(
    user: str, start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    proxy = user_api_key_proxy(start_proxy, echo_downstream)
    app = proxy.app
    with app.app_context():
        route = route_of(app, "mcp")
        assert live_connection(route, user) is None and connections_of(user) == []
        with pytest.raises(ValueError):
            store_connection(route, user, tokens=ProviderTokens("at", "rt", None))  # an API-key route takes a key
        store_connection(route, user, api_key="key-one")

    first = connection_row(app, user, "mcp")
    assert first is not None and first.kind == "user_api_key" and first.refused_at is None
    assert "key-one" not in first.access_token and opened(app, first) == "key-one"
    with pytest.raises(DecryptionError):  # bound to its row: under another id it does not open
        components(app).secret_box.decrypt(first.access_token, sealing_context(first.id + 1, "access_token"))

    with app.app_context():
        live = live_connection(route, user)
        assert live is not None and live.id == first.id
        connection_refused(route, user, "a test says so")
        assert live_connection(route, user) is None
        [listed] = connections_of(user)
        assert listed.refused_at is not None and listed.route == "mcp"

        store_connection(route, user, api_key="key-two")  # the user connects again: same row, new key, not refused
    second = connection_row(app, user, "mcp")
    assert second is not None and second.id == first.id and second.refused_at is None
    assert opened(app, second) == "key-two"

    with app.app_context():
        # A refusal names the credential that was sent: one stored since is not refused with it.
        old = ConnectionAccess(first.id, "key-one", None, False, first.updated_at)
        refuse_sent_credential(app, route, user, old)
        assert live_connection(route, user) is not None
        assert disconnect(route, user) is True
        assert disconnect(route, user) is False
        assert live_connection(route, user) is None and connections_of(user) == []


def test_an_oauth_connection_is_live_while_it_can_be_refreshed(
    user: str, oauth_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    proxy = oauth_proxy(echo_downstream.url + "/mcp")
    app = proxy.app
    with app.app_context():
        route = route_of(app)
        with pytest.raises(ValueError):
            store_connection(route, user, api_key="not for an oauth route")
        past = utcnow() - timedelta(minutes=5)
        store_connection(route, user, tokens=ProviderTokens("at-1", "rt-1", past), provider="https://as", scope="s")
        assert live_connection(route, user) is not None  # expired, but its refresh token can renew it
        store_connection(route, user, tokens=ProviderTokens("at-2", None, past))
        assert live_connection(route, user) is None  # expired with nothing to renew it
        store_connection(route, user, tokens=ProviderTokens("at-3", None, None))
        assert live_connection(route, user) is not None  # no lifetime given: live until refused
    row = connection_row(app, user)
    assert row is not None and row.refresh_token is None and opened(app, row) == "at-3"


# -- the proxy path -----------------------------------------------------------------------------------------------


def test_the_users_connection_token_reaches_the_downstream_as_a_bearer_token(
    user: str, oauth_proxy: Callable[..., RunningProxy], mcp_downstream: McpDownstream, downstream_as: OidcProvider
) -> None:
    proxy = oauth_proxy(mcp_downstream.url)
    tokens = connect_at_provider(proxy, user)
    client = SdkClient(proxy.url, proxy.url + "/mcp", login_hint=user)  # a real MCP client, through its login

    async def scenario() -> dict[str, str]:
        async with client.connect() as session:
            return await client.whoami(session)

    seen = anyio.run(scenario)
    assert seen["authorization"] == f"Bearer {tokens.access_token}"
    assert seen["x-forwarded-user"] == user
    assert client.storage.tokens is not None and client.storage.tokens.access_token not in json.dumps(seen)
    # What the downstream received is a real token of its own authorization server, for alice.
    me = requests.get(downstream_as.url("/me"), headers={"Authorization": seen["authorization"]}, timeout=5)
    assert me.status_code == 200 and me.json()["sub"] == DOWNSTREAM_USER


def test_a_user_api_key_is_sent_in_the_routes_header_and_scheme(
    user: str, start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    for env, header, expected in (
        ({}, "Authorization", "Bearer k-123"),
        ({"DOWNSTREAM_CREDENTIAL_SCHEME": "Token"}, "Authorization", "Token k-123"),
        ({"DOWNSTREAM_CREDENTIAL_HEADER": "X-Api-Key"}, "X-Api-Key", "k-123"),
    ):
        proxy = user_api_key_proxy(start_proxy, echo_downstream, **env)
        with proxy.app.app_context():
            store_connection(route_of(proxy.app, "mcp"), user, api_key="k-123")
        login = log_in(proxy.url, proxy.url + "/mcp", login_hint=user)
        forged = {**login.bearer, "X-Api-Key": "the client's own", "Authorization-Extra": "x"}
        assert call(proxy.url + "/mcp", forged).status_code == 200
        seen = echo_downstream.last()
        assert seen.header(header) == expected  # once: the client's copy of the header is dropped
        assert login.access_token not in json.dumps(seen.headers)
        with proxy.app.app_context():
            disconnect(route_of(proxy.app, "mcp"), user)


def test_without_a_usable_connection_the_client_is_told_to_authorize_again(
    user: str, start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    proxy = user_api_key_proxy(start_proxy, echo_downstream)
    app = proxy.app
    with app.app_context():
        route = route_of(app, "mcp")
        store_connection(route, user, api_key="k-1")
    login = log_in(proxy.url, proxy.url + "/mcp", login_hint=user)
    url = proxy.url + "/mcp"
    assert call(url, login.bearer).status_code == 200
    forwarded = len(echo_downstream.seen)

    with app.app_context():
        disconnect(route, user)  # also drops the token from this worker's cache
    assert "authorize again to connect" in challenge_error(call(url, login.bearer))

    with app.app_context():
        store_connection(route, user, api_key="k-2")
        connection_refused(route, user, "a test says so")
    assert "authorize again to reconnect" in challenge_error(call(url, login.bearer))

    # A sealed value that cannot be opened in its row (moved from another one) is refused, not a 500.
    with app.app_context():
        store_connection(route, user, api_key="k-3")
        row = connection_row(app, user, "mcp")
        assert row is not None
        moved = components(app).secret_box.encrypt("k-3", sealing_context(row.id + 7, "access_token"))
        db.session.execute(
            update(DownstreamConnection).where(DownstreamConnection.id == row.id).values(access_token=moved)
        )
        db.session.commit()
    assert "authorize again to reconnect" in challenge_error(call(url, login.bearer))
    refused = connection_row(app, user, "mcp")
    assert refused is not None and refused.refused_at is not None
    assert len(echo_downstream.seen) == forwarded  # the downstream saw none of these

    with app.app_context():
        store_connection(route, user, api_key="k-4")  # connected again
    assert call(url, login.bearer).status_code == 200
    assert echo_downstream.last().header("Authorization") == "Bearer k-4"


def test_a_cached_token_costs_no_query_for_its_connection(
    user: str, start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    proxy = user_api_key_proxy(start_proxy, echo_downstream)
    with proxy.app.app_context():
        store_connection(route_of(proxy.app, "mcp"), user, api_key="k-cached")
        engine = db.engine
    login = log_in(proxy.url, proxy.url + "/mcp", login_hint=user)
    statements: list[str] = []

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        if (
            threading.current_thread().name != "audit-flush"
        ):  # the audit trail's batched writes are off the request path
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        assert call(proxy.url + "/mcp", login.bearer).status_code == 200
        assert len(statements) == 1, statements  # token, grant and connection in one query
        assert "downstream_connections" in statements[0]
        statements.clear()
        for _ in range(5):
            assert call(proxy.url + "/mcp", login.bearer).status_code == 200
            assert echo_downstream.last().header("Authorization") == "Bearer k-cached"
        assert statements == []
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_a_downstream_401_refuses_the_connection(
    user: str, start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    proxy = user_api_key_proxy(start_proxy, echo_downstream)
    app = proxy.app
    with app.app_context():
        route = route_of(app, "mcp")
        store_connection(route, user, api_key="k-revoked")
    login = log_in(proxy.url, proxy.url + "/mcp", login_hint=user)
    url = proxy.url + "/mcp"
    assert call(url, login.bearer).status_code == 200  # cached now

    refused = call(url, login.bearer, "/status/401")  # the downstream says no to this key
    description = challenge_error(refused)
    assert "refused your connection" in description and "downstream says no" not in refused.text
    assert 'realm="downstream"' not in refused.headers["WWW-Authenticate"]
    row = connection_row(app, user, "mcp")
    assert row is not None and row.refused_at is not None
    forwarded = len(echo_downstream.seen)
    challenge_error(call(url, login.bearer))  # the cached token was dropped: the refusal holds at once
    assert len(echo_downstream.seen) == forwarded
    with app.app_context():
        assert live_connection(route, user) is None  # so the next authorization asks for the key again


# -- refreshing an oauth connection -------------------------------------------------------------------------------


def test_an_expiring_connection_is_refreshed_before_forwarding(
    user: str, oauth_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, downstream_as: OidcProvider
) -> None:
    proxy = oauth_proxy(echo_downstream.url + "/mcp")
    first = connect_at_provider(proxy, user)
    login = log_in(proxy.url, proxy.url + "/mcp", login_hint=user)
    url = proxy.url + "/mcp"
    expire_connection(proxy.app, user)
    downstream_as.reset_stats()
    assert call(url, login.bearer).status_code == 200
    row = connection_row(proxy.app, user)
    assert row is not None and row.refused_at is None and row.refresh_claim is None
    renewed = opened(proxy.app, row)
    assert renewed != first.access_token
    assert echo_downstream.last().header("Authorization") == f"Bearer {renewed}"
    assert row.expires_at is not None and row.expires_at > utcnow() + timedelta(seconds=3000)
    assert downstream_as.stats()["refresh_requests"] == 1
    me = requests.get(downstream_as.url("/me"), headers={"Authorization": f"Bearer {renewed}"}, timeout=5)
    assert me.status_code == 200 and me.json()["sub"] == DOWNSTREAM_USER

    for _ in range(3):  # fresh now: no further refresh
        assert call(url, login.bearer).status_code == 200
        assert echo_downstream.last().header("Authorization") == f"Bearer {renewed}"
    assert downstream_as.stats()["refresh_requests"] == 1

    # What was stored keeps working: a new access token (not cached) reads the row, and the next expiry refreshes.
    expire_connection(proxy.app, user)
    second = login.client.refresh(login.refresh_token).json()["access_token"]
    assert call(url, {"Authorization": f"Bearer {second}"}).status_code == 200
    assert downstream_as.stats()["refresh_requests"] == 2
    third = connection_row(proxy.app, user)
    assert third is not None and opened(proxy.app, third) not in (renewed, first.access_token)


def test_concurrent_requests_on_two_instances_refresh_a_connection_once(
    user: str, oauth_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, downstream_as: OidcProvider
) -> None:
    first = oauth_proxy(echo_downstream.url + "/mcp")
    settings = first.app.config["SETTINGS"]
    # A second instance of the same deployment: same public URL, clients and database; its own locks and cache.
    second = oauth_proxy(
        echo_downstream.url + "/mcp",
        PUBLIC_URL=first.url,
        OAUTH_CLIENT_ID=settings.oauth_client_id,
        OAUTH_CLIENT_SECRET=settings.oauth_client_secret,
    )
    connect_at_provider(first, user)
    login = log_in(first.url, first.url + "/mcp", login_hint=user)
    expire_connection(first.app, user)
    downstream_as.reset_stats()
    downstream_as.set_failure("token_delay", delay_ms=1000)  # a slow refresh: the requests overlap

    instances = [first, second] * 4
    with ThreadPoolExecutor(max_workers=len(instances)) as pool:
        statuses = list(
            pool.map(
                lambda proxy: call(f"http://127.0.0.1:{proxy.server.server_port}/mcp", login.bearer).status_code,
                instances,
            )
        )

    assert statuses == [200] * len(instances)
    assert downstream_as.stats()["refresh_requests"] == 1  # a second refresh would spend a rotated refresh token
    row = connection_row(first.app, user)
    assert row is not None
    assert {seen.header("Authorization") for seen in echo_downstream.seen} == {f"Bearer {opened(first.app, row)}"}


def test_a_refused_refresh_token_sends_the_client_back_to_connect(
    user: str, oauth_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, downstream_as: OidcProvider
) -> None:
    proxy = oauth_proxy(echo_downstream.url + "/mcp")
    connect_at_provider(proxy, user)
    login = log_in(proxy.url, proxy.url + "/mcp", login_hint=user)
    expire_connection(proxy.app, user, seconds=-1)
    downstream_as.reset_stats()
    downstream_as.set_failure("refresh_invalid_grant")

    for _ in range(2):
        assert "authorize again" in challenge_error(call(proxy.url + "/mcp", login.bearer))
    assert echo_downstream.seen == []  # the downstream never saw a dead token
    assert downstream_as.stats()["refresh_requests"] == 1  # refused once: not asked again
    row = connection_row(proxy.app, user)
    assert row is not None and row.refused_at is not None and row.refresh_claim is None
    with proxy.app.app_context():
        assert live_connection(route_of(proxy.app), user) is None
    # A client that refreshes on 401 before it re-authorizes is sent to the browser too, not round in circles.
    refreshed = login.client.refresh(login.refresh_token)
    assert refreshed.status_code == 400 and refreshed.json()["error"] == "invalid_grant", refreshed.text
    assert "authorize again to reconnect" in refreshed.json()["error_description"]


def test_a_transient_refresh_failure_is_a_503_and_the_connection_survives(
    user: str, oauth_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, downstream_as: OidcProvider
) -> None:
    proxy = oauth_proxy(echo_downstream.url + "/mcp")
    connect_at_provider(proxy, user)
    login = log_in(proxy.url, proxy.url + "/mcp", login_hint=user)
    expire_connection(proxy.app, user)
    downstream_as.set_failure("refresh_server_error")

    response = call(proxy.url + "/mcp", login.bearer)
    assert response.status_code == 503 and response.headers["Retry-After"] == "10"
    assert response.json()["error"] == "temporarily_unavailable"
    assert echo_downstream.seen == []
    row = connection_row(proxy.app, user)
    assert row is not None and row.refused_at is None and row.refresh_claim is None

    downstream_as.set_failure(None)
    assert call(proxy.url + "/mcp", login.bearer).status_code == 200


def test_disconnecting_revokes_the_tokens_at_the_downstreams_authorization_server(
    user: str, oauth_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, downstream_as: OidcProvider
) -> None:
    proxy = oauth_proxy(echo_downstream.url + "/mcp")
    tokens = connect_at_provider(proxy, user)
    bearer = {"Authorization": f"Bearer {tokens.access_token}"}
    assert requests.get(downstream_as.url("/me"), headers=bearer, timeout=5).status_code == 200

    with proxy.app.app_context():
        route = route_of(proxy.app)
        assert disconnect(route, user) is True
        assert connection_row(proxy.app, user) is None
        with pytest.raises(ProviderError) as refused:
            connection_provider(route).provider.refresh(tokens.refresh_token or "")
    assert refused.value.kind == "invalid_grant"
    assert requests.get(downstream_as.url("/me"), headers=bearer, timeout=5).status_code == 401


def test_rotate_key_re_encrypts_connections(
    user: str, start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    old_key, new_key = TEST_KEY, base64.b64encode(os.urandom(32)).decode()
    proxy = user_api_key_proxy(start_proxy, echo_downstream)
    with proxy.app.app_context():
        store_connection(route_of(proxy.app, "mcp"), user, api_key="k-rotated")
    rotated = user_api_key_proxy(start_proxy, echo_downstream, ENCRYPTION_KEY=f"{new_key},{old_key}")
    with rotated.app.app_context():
        assert rotate_encryption_key() >= 1
    try:
        only_new = user_api_key_proxy(start_proxy, echo_downstream, ENCRYPTION_KEY=new_key)
        row = connection_row(only_new.app, user, "mcp")
        assert row is not None and opened(only_new.app, row) == "k-rotated"
    finally:  # the session's database goes back under the suite's key
        back = user_api_key_proxy(start_proxy, echo_downstream, ENCRYPTION_KEY=f"{old_key},{new_key}")
        with back.app.app_context():
            rotate_encryption_key()
