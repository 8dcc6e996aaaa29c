"""Settings that used to be constants in code reach the code that uses them: lifetimes, metadata fetch limits."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from oauthproxy import create_app
from oauthproxy.components import components
from oauthproxy.consent import load_authorization_request, sign_authorization_request
from oauthproxy.models import AuthorizationCode, PendingAuthorization, db, utcnow
from tests.conftest import RunningProxy
from tests.support.settings import TEST_KEY

ENV = {
    "OAUTH_CLIENT_ID": "id",
    "OAUTH_CLIENT_SECRET": "secret",
    "OAUTH_AUTHORIZE_URL": "https://idp.example.com/authorize",
    "OAUTH_TOKEN_URL": "https://idp.example.com/token",
    "OAUTH_USERINFO_URL": "https://idp.example.com/userinfo",
    "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
    "ENCRYPTION_KEY": TEST_KEY,
}


def test_the_metadata_fetcher_is_built_from_the_settings(tmp_path: Path) -> None:
    app = create_app(
        {
            **ENV,
            "DATABASE_DSN": str(tmp_path / "proxy.db"),
            "CLIENT_METADATA_FETCH_TIMEOUT": "2.5",
            "CLIENT_METADATA_MAX_BYTES": "2048",
            "CLIENT_METADATA_CACHE_SIZE": "10",
            "CLIENT_METADATA_CACHE_TTL": "120",
            "CLIENT_METADATA_MIN_CACHE_TTL": "30",
            "CLIENT_METADATA_MAX_CACHE_TTL": "600",
            "CLIENT_METADATA_FAILURE_TTL": "5",
        }
    )
    fetcher = components(app).client_metadata_fetcher
    assert (fetcher.timeout, fetcher.max_bytes, fetcher.max_entries) == (2.5, 2048, 10)
    assert (fetcher.default_ttl, fetcher.min_ttl, fetcher.max_ttl, fetcher.failure_ttl) == (120, 30, 600, 5)
    assert fetcher._ttl_from_headers({"Cache-Control": "max-age=0"}) == 30
    assert fetcher._ttl_from_headers({"Cache-Control": "max-age=100000"}) == 600


def test_the_consent_page_expires_after_consent_page_ttl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    app = create_app({**ENV, "DATABASE_DSN": str(tmp_path / "proxy.db"), "CONSENT_PAGE_TTL": "60"})
    with app.test_request_context():
        token = sign_authorization_request({"client_id": "c"})
        assert load_authorization_request(token) == {"client_id": "c"}
        now = time.time()
        monkeypatch.setattr(time, "time", lambda: now + 59)
        assert load_authorization_request(token) == {"client_id": "c"}
        monkeypatch.setattr(time, "time", lambda: now + 62)
        assert load_authorization_request(token) is None


def _seconds_left(expires_at: datetime) -> float:
    return (expires_at - utcnow()).total_seconds()


def test_login_code_and_consent_lifetimes_come_from_the_settings(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(PENDING_LOGIN_TTL="120", AUTHORIZATION_CODE_TTL="45", CONSENT_TTL="7200")
    client = proxy.register_client()
    browser = proxy.browser()
    browser.authorize(client.authorize_url(), proxy.provider.issuer)  # consent given, now at the provider's login
    with proxy.app.app_context():
        pending = db.session.scalars(select(PendingAuthorization)).all()
        assert any(110 < _seconds_left(row.expires_at) <= 120 for row in pending), pending
    consent = next(cookie for cookie in browser.session.cookies if cookie.name.endswith("oauthproxy-consent"))
    assert consent.expires is not None and 7100 < consent.expires - time.time() <= 7200
    code = client.login(browser)["code"]
    with proxy.app.app_context():
        codes = db.session.scalars(select(AuthorizationCode)).all()
        assert any(35 < _seconds_left(row.expires_at) <= 45 for row in codes), codes
    assert client.exchange(code).status_code == 200
