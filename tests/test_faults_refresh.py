"""The upstream refresh lease under faults: a worker that died holding it delays the next refresh only until the
lease lapses (that a live lease is waited for, not doubled, tests/test_proxy_refresh.py shows)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import requests
from sqlalchemy import update

from oauthproxy.models import Grant, db, utcnow
from tests.conftest import RunningProxy
from tests.provider_fixture import OidcProvider
from tests.proxy_fixtures import EchoServer, log_in
from tests.test_proxy_refresh import expire_upstream_token, grant_id_of, grant_row


def claim(proxy: RunningProxy, grant_id: int, until_seconds: float) -> None:
    """As if another worker had taken the refresh lease (and, when it has lapsed, died holding it)."""
    with proxy.app.app_context():
        db.session.execute(
            update(Grant)
            .where(Grant.id == grant_id)
            .values(
                upstream_refresh_claim="someone-else",
                upstream_refresh_claimed_until=utcnow() + timedelta(seconds=until_seconds),
            )
        )
        db.session.commit()


def test_a_lease_left_by_a_dead_worker_lapses(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, provider_failure_reset: OidcProvider
) -> None:
    # A route that sends the user's provider token, so the proxy must refresh it.
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp", DOWNSTREAM_FORWARD_ACCESS_TOKEN="true")
    login = log_in(proxy.url, proxy.url + "/mcp")
    grant_id = grant_id_of(proxy.app, login.access_token)
    expire_upstream_token(proxy.app, grant_id)
    claim(proxy, grant_id, until_seconds=-1)
    provider_failure_reset.reset_stats()

    assert requests.post(proxy.url + "/mcp", headers=login.bearer, timeout=30).status_code == 200
    assert provider_failure_reset.stats()["refresh_requests"] == 1
    after = grant_row(proxy.app, grant_id)
    assert after.upstream_refresh_claim is None and after.upstream_expires_at > utcnow() + timedelta(seconds=600)
