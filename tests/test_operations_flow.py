"""Metrics and log lines of real logins, refreshes and revocations (the real OpenID provider, SQLite)."""

from __future__ import annotations

import json
import logging

import pytest
from prometheus_client import REGISTRY

from oauthproxy.logs import ACCESS_LOGGER
from tests.conftest import RunningProxy
from tests.support.databases import SQLITE_ONLY

pytestmark = SQLITE_ONLY


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def snapshot() -> dict[str, float]:
    return {
        "code": sample("oauthproxy_tokens_issued_total", grant_type="authorization_code"),
        "refresh": sample("oauthproxy_tokens_issued_total", grant_type="refresh_token"),
        "grace": sample("oauthproxy_refresh_grace_total"),
        "reuse": sample("oauthproxy_grants_revoked_total", reason="authorization_code_reuse"),
        "revoked": sample("oauthproxy_grants_revoked_total", reason="revoked_by_client"),
        "invalid_grant": sample("oauthproxy_http_errors_total", route="/token", error="invalid_grant"),
        "code_exchange": sample("oauthproxy_upstream_request_duration_seconds_count", action="code_exchange"),
        "userinfo": sample("oauthproxy_upstream_request_duration_seconds_count", action="userinfo"),
        "discovery": sample("oauthproxy_upstream_request_duration_seconds_count", action="discovery"),
        "registrations": sample("oauthproxy_client_registrations_total"),
    }


def test_a_login_and_its_refreshes_are_counted_and_logged_without_secrets(
    proxy: RunningProxy, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    before = snapshot()
    client = proxy.register_client()
    result = client.login(proxy.browser("alice"))
    code = result["code"]
    tokens = client.exchange(code).json()
    replay = client.exchange(code)  # a second redemption fails and revokes what the first produced
    assert replay.status_code == 400

    client2 = proxy.register_client(client_name="Second")
    pair = client2.exchange(client2.login(proxy.browser("bob"))["code"]).json()
    first = client2.refresh(pair["refresh_token"]).json()
    again = client2.refresh(pair["refresh_token"])  # inside the grace window: a lost response, not theft
    assert again.status_code == 200
    assert client2.revoke(first["refresh_token"]).status_code == 200

    after = snapshot()
    delta = {key: after[key] - before[key] for key in before}
    assert delta["registrations"] == 2
    assert delta["code"] == 2 and delta["refresh"] == 2 and delta["grace"] == 1
    assert delta["reuse"] == 1 and delta["revoked"] == 1 and delta["invalid_grant"] == 1
    assert delta["code_exchange"] == 2 and delta["userinfo"] == 2 and delta["discovery"] >= 1

    lines = [record for record in caplog.records if record.name == ACCESS_LOGGER]
    by_path: dict[str, list[logging.LogRecord]] = {}
    for record in lines:
        by_path.setdefault(record.path, []).append(record)
    # The user is named on the lines where the proxy learns who it is: the callback and the token requests.
    assert [record.user_id for record in by_path["/callback"]] == ["alice", "bob"]
    assert {record.user_id for record in by_path["/token"] if record.status == 200} == {"alice", "bob"}
    assert all(record.request_id != "-" for record in lines)
    everything = "\n".join(record.getMessage() + json.dumps(record.__dict__, default=str) for record in caplog.records)
    for secret in (
        code,
        tokens["access_token"],
        tokens["refresh_token"],
        pair["refresh_token"],
        first["access_token"],
        result["state"],
    ):
        assert secret not in everything
