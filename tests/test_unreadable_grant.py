"""A grant whose sealed upstream secret cannot be decrypted: a JSON 401 or 503 for the MCP client, never an HTML 500,
and `oauthproxy rotate-key` names every such row."""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Callable

import pytest
import requests
from sqlalchemy import select, update

from oauthproxy.components import components
from oauthproxy.models import Grant, db, utcnow
from tests.conftest import RunningProxy
from tests.proxy_fixtures import EchoServer, Login, log_in
from tests.support.settings import TEST_KEY
from tests.test_proxy_refresh import expire_upstream_token, grant_id_of

# The route that forwards the user's provider token is the one that decrypts it on every request.
FORWARDING = {"DOWNSTREAM_CREDENTIAL": "upstream_token"}


def swap_ciphertext(proxy: RunningProxy, grant_id: int, column: str, other_grant_id: int) -> None:
    """Copy another grant's sealed value into this row: a ciphertext moved between rows must not open."""
    with proxy.app.app_context():
        value = db.session.scalar(select(getattr(Grant, column)).where(Grant.id == other_grant_id))
        db.session.execute(update(Grant).where(Grant.id == grant_id).values({column: value}))
        db.session.commit()


def revoked_reason(proxy: RunningProxy, grant_id: int) -> str | None:
    with proxy.app.app_context():
        return db.session.scalar(select(Grant.revoked_reason).where(Grant.id == grant_id))


def two_logins(proxy: RunningProxy) -> tuple[Login, int, int]:
    login = log_in(proxy.url, proxy.url + "/mcp")
    other = log_in(proxy.url, proxy.url + "/mcp", login_hint="bob")
    return login, grant_id_of(proxy.app, login.access_token), grant_id_of(proxy.app, other.access_token)


def assert_reauthorize(response: requests.Response) -> None:
    assert response.status_code == 401, (response.status_code, response.text[:500])
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.json()["error"] == "invalid_token"
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_a_moved_access_token_ciphertext_is_a_401_and_ends_the_grant(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp", **FORWARDING)
    login, grant_id, other_id = two_logins(proxy)
    swap_ciphertext(proxy, grant_id, "upstream_access_token", other_id)
    with caplog.at_level(logging.INFO):
        response = requests.post(proxy.url + "/mcp", headers=login.bearer, json={}, timeout=10)
    assert_reauthorize(response)
    assert f"grant {grant_id}: its upstream_access_token can never be decrypted" in caplog.text
    assert not [r for r in caplog.records if r.exc_info], "no traceback"
    assert echo_downstream.seen == []
    assert revoked_reason(proxy, grant_id) == "undecryptable"
    # The client's refresh fails too, so it signs in again instead of looping on a dead grant.
    assert login.client.refresh(login.refresh_token).json()["error"] == "invalid_grant"
    assert revoked_reason(proxy, other_id) is None  # the grant whose ciphertext was copied is untouched


def test_a_moved_refresh_token_ciphertext_at_upstream_refresh_is_a_401(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp", **FORWARDING)
    login, grant_id, other_id = two_logins(proxy)
    swap_ciphertext(proxy, grant_id, "upstream_refresh_token", other_id)
    expire_upstream_token(proxy.app, grant_id)
    assert_reauthorize(requests.post(proxy.url + "/mcp", headers=login.bearer, json={}, timeout=10))
    assert revoked_reason(proxy, grant_id) == "undecryptable"
    assert echo_downstream.seen == []


def test_a_missing_encryption_key_is_a_503_and_keeps_the_grant(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp", **FORWARDING)
    login = log_in(proxy.url, proxy.url + "/mcp")
    grant_id = grant_id_of(proxy.app, login.access_token)
    # Another instance on the same database that was given only a new key (a rolling key change gone wrong).
    new_key = base64.b64encode(os.urandom(32)).decode()
    keyless = start_proxy(
        MCP_SERVER_URL=echo_downstream.url + "/mcp", ENCRYPTION_KEY=new_key, PUBLIC_URL=proxy.url, **FORWARDING
    )  # the same public URL: one service, two instances
    keyless_url = f"http://127.0.0.1:{keyless.server.server_port}"
    with caplog.at_level(logging.INFO):
        response = requests.post(keyless_url + "/mcp", headers=login.bearer, json={}, timeout=10)
    assert response.status_code == 503, (response.status_code, response.text[:500])
    assert response.json()["error"] == "temporarily_unavailable" and response.headers["Retry-After"] == "60"
    assert f"grant {grant_id}: cannot decrypt its upstream_access_token" in caplog.text
    assert revoked_reason(proxy, grant_id) is None
    # The instance that has the key still serves the same grant.
    assert requests.post(proxy.url + "/mcp", headers=login.bearer, json={}, timeout=10).status_code == 200


def test_rotate_key_names_every_row_it_cannot_decrypt(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy()
    _, grant_id, other_id = two_logins(proxy)
    swap_ciphertext(proxy, grant_id, "upstream_refresh_token", other_id)
    new_key = base64.b64encode(os.urandom(32)).decode()
    rotating = start_proxy(ENCRYPTION_KEY=f"{new_key},{TEST_KEY}")
    try:
        result = rotating.app.test_cli_runner().invoke(args=["rotate-key"])
        assert result.exit_code == 1, result.output
        assert f"cannot decrypt grant {grant_id} (upstream_refresh_token)" in result.output
        assert f"grant {other_id}" not in result.output
        assert "Nothing was changed" in result.output and "oauthproxy grants revoke ID" in result.output
        with rotating.app.app_context():  # all or nothing: the readable rows were not rotated either
            sealed = db.session.scalar(select(Grant.upstream_access_token).where(Grant.id == other_id))
            assert components(rotating.app).secret_box.needs_rotation(sealed)
        # Without the old key, rows sealed under it are named with the fix for that case.
        only_new = start_proxy(ENCRYPTION_KEY=new_key)
        result = only_new.app.test_cli_runner().invoke(args=["rotate-key"])
        assert result.exit_code == 1 and f"grant {other_id} (upstream_access_token)" in result.output
        assert "ENCRYPTION_KEY=new,old" in result.output
    finally:
        # What the message says to do; it also keeps the shared test database rotatable for other tests.
        assert proxy.app.test_cli_runner().invoke(args=["grants", "revoke", str(grant_id)]).exit_code == 0
    assert rotating.app.test_cli_runner().invoke(args=["rotate-key"]).exit_code == 0
    with rotating.app.app_context():
        assert (
            components(rotating.app).secret_box.needs_rotation(
                db.session.scalar(select(Grant.upstream_access_token).where(Grant.id == other_id))
            )
            is False
        )
        assert db.session.scalar(select(Grant.revoked_at).where(Grant.id == grant_id)) <= utcnow()
    # and back under the suite's key, as the other rotation test leaves it
    back = start_proxy(ENCRYPTION_KEY=f"{TEST_KEY},{new_key}")
    assert back.app.test_cli_runner().invoke(args=["rotate-key"]).exit_code == 0
