"""The user's upstream token is refreshed before forwarding: once per grant across threads, workers and instances."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

import requests
from flask import Flask
from sqlalchemy import select, update

from oauthproxy import create_app
from oauthproxy.components import components
from oauthproxy.crypto import hash_token
from oauthproxy.models import Grant, Token, db, utcnow
from tests.conftest import RunningProxy
from tests.provider_fixture import OidcProvider
from tests.proxy_fixtures import EchoServer, GunicornProxy, log_in, write_routes


def grant_id_of(app: Flask, access_token: str) -> int:
    with app.app_context():
        return db.session.scalar(select(Token.grant_id).where(Token.access_token_hash == hash_token(access_token)))


def expire_upstream_token(app: Flask, grant_id: int, expires_at: datetime | None = None) -> None:
    """As if the provider's access token were about to expire (inside the default 60 s refresh skew)."""
    with app.app_context():
        db.session.execute(
            update(Grant)
            .where(Grant.id == grant_id)
            .values(upstream_expires_at=expires_at or utcnow() + timedelta(seconds=10))
        )
        db.session.commit()


def grant_row(app: Flask, grant_id: int) -> Grant:
    with app.app_context():
        grant = db.session.get(Grant, grant_id)
        db.session.expunge(grant)
        return grant


def upstream_token(app: Flask, grant: Grant) -> str:
    return components(app).secret_box.decrypt(grant.upstream_access_token, f"grant:{grant.id}:upstream_access_token")


def test_an_expiring_upstream_token_is_refreshed_before_forwarding(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, provider_failure_reset: OidcProvider
) -> None:
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp", DOWNSTREAM_FORWARD_ACCESS_TOKEN="true")
    login = log_in(proxy.url, proxy.url + "/mcp")
    grant_id = grant_id_of(proxy.app, login.access_token)
    before = grant_row(proxy.app, grant_id)
    expire_upstream_token(proxy.app, grant_id)
    provider_failure_reset.reset_stats()

    assert requests.post(proxy.url + "/mcp", headers=login.bearer, timeout=10).status_code == 200
    after = grant_row(proxy.app, grant_id)
    new_token = upstream_token(proxy.app, after)
    assert new_token != upstream_token(proxy.app, before)
    assert echo_downstream.last().header("X-Forwarded-Access-Token") == new_token
    assert after.upstream_expires_at > utcnow() + timedelta(seconds=3000)
    assert provider_failure_reset.stats()["refresh_requests"] == 1
    me = requests.get(provider_failure_reset.url("/me"), headers={"Authorization": f"Bearer {new_token}"}, timeout=5)
    assert me.status_code == 200 and me.json()["email"] == "alice@example.com"

    for _ in range(3):  # fresh now: no further refresh, the same token downstream
        assert requests.post(proxy.url + "/mcp", headers=login.bearer, timeout=10).status_code == 200
        assert echo_downstream.last().header("X-Forwarded-Access-Token") == new_token
    assert provider_failure_reset.stats()["refresh_requests"] == 1

    # What was stored keeps working: the next expiry is refreshed too (peers broke here; see lessons-from-peers).
    expire_upstream_token(proxy.app, grant_id)
    provider_failure_reset.reset_stats()
    # A new access token of the same grant is not cached yet, so it reads the (again expiring) row.
    second_token = login.client.refresh(login.refresh_token).json()["access_token"]
    assert (
        requests.post(proxy.url + "/mcp", headers={"Authorization": f"Bearer {second_token}"}, timeout=10).status_code
        == 200
    )
    assert provider_failure_reset.stats()["refresh_requests"] == 1
    third = upstream_token(proxy.app, grant_row(proxy.app, grant_id))
    assert third not in (new_token, upstream_token(proxy.app, before))
    assert echo_downstream.last().header("X-Forwarded-Access-Token") == third


def test_concurrent_requests_on_two_instances_refresh_once(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, provider_failure_reset: OidcProvider
) -> None:
    first = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp", DOWNSTREAM_FORWARD_ACCESS_TOKEN="true")
    settings = first.app.config["SETTINGS"]
    # A second instance of the same deployment: same public URL, upstream client and database.
    second = start_proxy(
        MCP_SERVER_URL=echo_downstream.url + "/mcp",
        DOWNSTREAM_FORWARD_ACCESS_TOKEN="true",
        PUBLIC_URL=first.url,
        OAUTH_CLIENT_ID=settings.oauth_client_id,
        OAUTH_CLIENT_SECRET=settings.oauth_client_secret,
    )
    login = log_in(first.url, first.url + "/mcp")
    grant_id = grant_id_of(first.app, login.access_token)
    expire_upstream_token(first.app, grant_id)
    provider_failure_reset.reset_stats()
    provider_failure_reset.set_failure("token_delay", delay_ms=1000)  # the refresh is slow: requests overlap

    instances = [first, second] * 4
    with ThreadPoolExecutor(max_workers=len(instances)) as pool:
        statuses = list(
            pool.map(
                lambda proxy: (
                    requests.post(
                        f"http://127.0.0.1:{proxy.server.server_port}/mcp", headers=login.bearer, timeout=30
                    ).status_code
                ),
                instances,
            )
        )

    assert statuses == [200] * len(instances)
    assert provider_failure_reset.stats()["refresh_requests"] == 1  # a second refresh would burn a rotated token
    tokens = {seen.header("X-Forwarded-Access-Token") for seen in echo_downstream.seen}
    assert tokens == {upstream_token(first.app, grant_row(first.app, grant_id))}


def test_gunicorn_workers_refresh_once(
    start_gunicorn: Callable[..., GunicornProxy], echo_downstream: EchoServer, provider_failure_reset: OidcProvider
) -> None:
    proxy = start_gunicorn(
        workers=2, MCP_SERVER_URL=echo_downstream.url + "/mcp", DOWNSTREAM_FORWARD_ACCESS_TOKEN="true"
    )
    app = create_app(proxy.env)
    try:
        login = log_in(proxy.url, proxy.url + "/mcp")
        grant_id = grant_id_of(app, login.access_token)
        expire_upstream_token(app, grant_id)
        provider_failure_reset.reset_stats()
        provider_failure_reset.set_failure("token_delay", delay_ms=1000)
        with ThreadPoolExecutor(max_workers=10) as pool:
            statuses = list(
                pool.map(
                    lambda _: requests.post(proxy.url + "/mcp", headers=login.bearer, timeout=30).status_code, range(10)
                )
            )
        assert statuses == [200] * 10
        assert provider_failure_reset.stats()["refresh_requests"] == 1
        assert len({seen.header("X-Forwarded-Access-Token") for seen in echo_downstream.seen}) == 1
    finally:
        with app.app_context():
            db.engine.dispose()


def test_an_upstream_invalid_grant_sends_the_client_back_to_sign_in(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, provider_failure_reset: OidcProvider
) -> None:
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp", DOWNSTREAM_FORWARD_ACCESS_TOKEN="true")
    login = log_in(proxy.url, proxy.url + "/mcp")
    grant_id = grant_id_of(proxy.app, login.access_token)
    expire_upstream_token(proxy.app, grant_id, utcnow() - timedelta(seconds=1))
    provider_failure_reset.set_failure("refresh_invalid_grant")

    for _ in range(2):
        response = requests.post(proxy.url + "/mcp", headers=login.bearer, timeout=10)
        assert response.status_code == 401
        challenge = response.headers["WWW-Authenticate"]
        assert 'error="invalid_token"' in challenge
        assert f'resource_metadata="{proxy.url}/.well-known/oauth-protected-resource/mcp"' in challenge
    assert echo_downstream.seen == []  # the downstream never saw a dead token
    assert provider_failure_reset.stats()["refresh_requests"] == 1  # the grant is gone: no second attempt

    assert grant_row(proxy.app, grant_id).revoked_reason == "upstream_invalid_grant"
    # The client's own refresh fails too, so it starts a new sign-in instead of looping.
    retry = login.client.refresh(login.refresh_token)
    assert retry.status_code == 400 and retry.json()["error"] == "invalid_grant"
    provider_failure_reset.set_failure(None)
    fresh = log_in(proxy.url, proxy.url + "/mcp")
    assert requests.post(proxy.url + "/mcp", headers=fresh.bearer, timeout=10).status_code == 200


def test_a_transient_upstream_failure_is_a_503_and_the_grant_survives(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, provider_failure_reset: OidcProvider
) -> None:
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp", DOWNSTREAM_FORWARD_ACCESS_TOKEN="true")
    login = log_in(proxy.url, proxy.url + "/mcp")
    grant_id = grant_id_of(proxy.app, login.access_token)
    expire_upstream_token(proxy.app, grant_id)
    provider_failure_reset.set_failure("refresh_server_error")

    response = requests.post(proxy.url + "/mcp", headers=login.bearer, timeout=10)
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "10"
    assert response.json()["error"] == "temporarily_unavailable"
    assert echo_downstream.seen == []
    assert grant_row(proxy.app, grant_id).revoked_at is None

    provider_failure_reset.set_failure(None)
    assert requests.post(proxy.url + "/mcp", headers=login.bearer, timeout=10).status_code == 200
    assert provider_failure_reset.stats()["refresh_requests"] == 2


def test_a_route_that_forwards_no_upstream_token_never_refreshes_it(
    start_proxy: Callable[..., RunningProxy],
    echo_downstream: EchoServer,
    tmp_path: Path,
    provider_failure_reset: OidcProvider,
) -> None:
    routes = write_routes(
        tmp_path / "routes.toml",
        [{"path": "/mcp/plain", "url": echo_downstream.url + "/plain", "identity_headers": False}],
    )
    proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=routes)
    login = log_in(proxy.url, proxy.url + "/mcp/plain")
    expire_upstream_token(proxy.app, grant_id_of(proxy.app, login.access_token), utcnow() - timedelta(hours=1))
    provider_failure_reset.reset_stats()
    assert requests.post(proxy.url + "/mcp/plain", headers=login.bearer, timeout=10).status_code == 200
    assert provider_failure_reset.stats()["refresh_requests"] == 0
