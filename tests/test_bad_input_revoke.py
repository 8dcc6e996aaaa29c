"""Bad input at /revoke: missing, unknown or another client's tokens are refused or ignored, never revoked."""

from __future__ import annotations

import secrets

import pytest
import requests
from sqlalchemy import select

from oauthproxy.crypto import hash_token
from oauthproxy.models import Grant, Token, db
from tests.bad_input_fixtures import (
    assert_garbage_never_causes_a_server_error,
    assert_token_error,
    new_client,
    tokens_for,
)
from tests.conftest import RunningProxy

# --- /revoke ---------------------------------------------------------------------------------------------------------


def test_revoke_without_token_is_invalid_request(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    response = requests.post(proxy.url + "/revoke", data={"client_id": client.client_id}, timeout=15)
    assert_token_error(response, 400, "invalid_request")


def test_revoke_unknown_token_is_200(proxy: RunningProxy) -> None:
    """RFC 7009 §2.2: an invalid token is not an error, so a client cannot probe for valid ones."""
    client = new_client(proxy)
    response = client.revoke(secrets.token_urlsafe(32))
    assert response.status_code == 200, response.text


def test_revoke_by_unknown_client_is_invalid_client(proxy: RunningProxy) -> None:
    response = requests.post(proxy.url + "/revoke", data={"client_id": "nobody", "token": "x"}, timeout=15)
    assert_token_error(response, 401, "invalid_client")


@pytest.mark.parametrize("which", ["access_token", "refresh_token"])
def test_revoking_another_clients_token_does_not_revoke_it(proxy: RunningProxy, which: str) -> None:
    owner = new_client(proxy)
    tokens = tokens_for(proxy, owner)
    other = new_client(proxy)
    response = other.revoke(tokens[which])
    assert response.status_code in (200, 400), response.text
    with proxy.app.app_context():
        row = db.session.scalar(select(Token).where(Token.access_token_hash == hash_token(tokens["access_token"])))
        assert row.revoked_at is None
        assert db.session.get(Grant, row.grant_id).revoked_at is None
    assert owner.refresh(tokens["refresh_token"]).status_code == 200


@pytest.mark.parametrize("path", ["/revoke"])  # the garbage sweep of tests.bad_input_fixtures, at this endpoint
def test_garbage_never_causes_a_server_error(sweep_proxy: RunningProxy, path: str) -> None:
    assert_garbage_never_causes_a_server_error(sweep_proxy, path)
