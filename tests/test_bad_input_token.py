"""Bad input at /token: PKCE, codes, refresh tokens and client authentication each fail with their RFC 6749 error."""

from __future__ import annotations

import secrets
from datetime import timedelta
from urllib.parse import urlencode

import pytest
import requests
from sqlalchemy import update

from oauthproxy.crypto import hash_token
from oauthproxy.models import AuthorizationCode, Token, db, utcnow
from tests.bad_input_fixtures import (
    assert_garbage_never_causes_a_server_error,
    assert_token_error,
    count,
    login_code,
    new_client,
    tokens_for,
)
from tests.conftest import RunningProxy
from tests.flows import pkce_pair, query_of
from tests.support.databases import SQLITE_ONLY

# --- /token ----------------------------------------------------------------------------------------------------------


def test_token_without_code_verifier_is_refused(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    code = login_code(proxy, client)
    before = count(proxy, Token)
    response = client.token_request(
        {"grant_type": "authorization_code", "code": code, "redirect_uri": client.redirect_uri}
    )
    assert_token_error(response, 400, "invalid_request", "invalid_grant")
    assert count(proxy, Token) == before


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
def test_token_without_code_verifier_is_refused_for_confidential_clients(proxy: RunningProxy, auth_method: str) -> None:
    """PKCE must not be skippable because the client has a secret."""
    client = new_client(proxy, auth_method=auth_method)
    code = login_code(proxy, client)
    response = client.token_request(
        {"grant_type": "authorization_code", "code": code, "redirect_uri": client.redirect_uri}
    )
    assert_token_error(response, 400, "invalid_request", "invalid_grant")


@pytest.mark.parametrize("verifier", ["wrong", "challenge", ""], ids=["other-verifier", "challenge-itself", "empty"])
def test_token_with_wrong_code_verifier_is_invalid_grant(proxy: RunningProxy, verifier: str) -> None:
    client = new_client(proxy)
    url = client.authorize_url()
    challenge = query_of(url)["code_challenge"]
    code = query_of(proxy.browser().authorize(url, client.redirect_uri))["code"]
    value = {"wrong": pkce_pair()[0], "challenge": challenge, "": ""}[verifier]
    before = count(proxy, Token)
    response = client.exchange(code, code_verifier=value)
    assert_token_error(response, 400, "invalid_grant", "invalid_request")
    assert count(proxy, Token) == before


@pytest.mark.parametrize(
    "redirect_uri",
    ["http://127.0.0.1:9/other", "https://attacker.example/cb", None],
    ids=["other-path", "other-host", "missing"],
)
def test_token_with_wrong_redirect_uri_is_invalid_grant(proxy: RunningProxy, redirect_uri: str | None) -> None:
    client = new_client(proxy)
    code = login_code(proxy, client)
    data = {"grant_type": "authorization_code", "code": code, "code_verifier": client.verifier}
    if redirect_uri is not None:
        data["redirect_uri"] = redirect_uri
    assert_token_error(client.token_request(data), 400, "invalid_grant")


def test_code_issued_to_one_client_is_refused_to_another(proxy: RunningProxy) -> None:
    alice_client = new_client(proxy)
    code = login_code(proxy, alice_client)
    thief = new_client(proxy)
    thief.verifier = alice_client.verifier
    assert thief.client_id != alice_client.client_id
    before = count(proxy, Token)
    assert_token_error(thief.exchange(code), 400, "invalid_grant")
    assert count(proxy, Token) == before


@SQLITE_ONLY
@pytest.mark.parametrize(
    "grant_type",
    [
        "password",
        "client_credentials",
        "implicit",
        "urn:ietf:params:oauth:grant-type:device_code",
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
        "AUTHORIZATION_CODE",
    ],
)
def test_unsupported_grant_type_is_refused(proxy: RunningProxy, grant_type: str) -> None:
    client = new_client(proxy, auth_method="client_secret_basic")
    response = client.token_request({"grant_type": grant_type, "username": "alice", "password": "x", "scope": "openid"})
    assert_token_error(response, 400, "unsupported_grant_type", "unauthorized_client")


@SQLITE_ONLY
def test_missing_grant_type_is_refused(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    response = client.token_request({"code": "x", "redirect_uri": client.redirect_uri})
    assert_token_error(response, 400, "unsupported_grant_type", "invalid_request")


@pytest.mark.parametrize("auth_method", ["client_secret_basic", "client_secret_post"])
def test_confidential_client_with_wrong_secret_is_invalid_client(proxy: RunningProxy, auth_method: str) -> None:
    client = new_client(proxy, auth_method=auth_method)
    code = login_code(proxy, client)
    client.client_secret = secrets.token_urlsafe(32)
    before = count(proxy, Token)
    response = client.exchange(code)
    assert_token_error(response, 401, "invalid_client")
    if auth_method == "client_secret_basic":
        assert response.headers["WWW-Authenticate"].startswith("Basic")  # RFC 6749 §5.2
    assert count(proxy, Token) == before


def test_confidential_client_without_its_secret_is_invalid_client(proxy: RunningProxy) -> None:
    client = new_client(proxy, auth_method="client_secret_post")
    code = login_code(proxy, client)
    client.auth_method = "none"  # sends only client_id
    assert_token_error(client.exchange(code), 401, "invalid_client")


def test_public_client_presenting_a_secret_method_is_invalid_client(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    code = login_code(proxy, client)
    client.auth_method, client.client_secret = "client_secret_basic", "made-up"
    assert_token_error(client.exchange(code), 401, "invalid_client")


@pytest.mark.parametrize("client_id", ["no-such-client", "x" * 300, "https://client.invalid/client.json"])
def test_unknown_client_at_token_is_invalid_client(proxy: RunningProxy, client_id: str) -> None:
    response = requests.post(
        proxy.url + "/token",
        data={
            "grant_type": "authorization_code",
            "code": "x",
            "client_id": client_id,
            "code_verifier": "y",
            "redirect_uri": "http://127.0.0.1:9/callback",
        },
        timeout=15,
    )
    assert_token_error(response, 401, "invalid_client")


def test_expired_code_is_invalid_grant(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    code = login_code(proxy, client)
    with proxy.app.app_context():
        db.session.execute(
            update(AuthorizationCode)
            .where(AuthorizationCode.code_hash == hash_token(code))
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        db.session.commit()
    before = count(proxy, Token)
    assert_token_error(client.exchange(code), 400, "invalid_grant")
    assert count(proxy, Token) == before


@pytest.mark.parametrize("code", ["garbage", "", "x" * 5000])
def test_unknown_code_is_invalid_grant(proxy: RunningProxy, code: str) -> None:
    client = new_client(proxy)
    client.verifier = pkce_pair()[0]
    assert_token_error(client.exchange(code), 400, "invalid_grant", "invalid_request")


@pytest.mark.parametrize("resource", ["https://elsewhere.example/mcp", "{proxy}/other"])
def test_token_resource_differing_from_the_authorized_one_is_invalid_target(proxy: RunningProxy, resource: str) -> None:
    client = new_client(proxy)
    code = login_code(proxy, client, resource=proxy.app.config["SETTINGS"].mcp_resource)
    before = count(proxy, Token)
    response = client.exchange(code, resource=resource.format(proxy=proxy.url))
    assert_token_error(response, 400, "invalid_target")
    assert count(proxy, Token) == before


def test_refresh_resource_differing_from_the_authorized_one_is_invalid_target(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    tokens = tokens_for(proxy, client)
    assert_token_error(
        client.refresh(tokens["refresh_token"], resource="https://elsewhere.example/mcp"), 400, "invalid_target"
    )
    # the refused request neither rotated nor revoked the token
    assert client.refresh(tokens["refresh_token"]).status_code == 200


def test_refresh_token_of_one_client_is_refused_to_another(proxy: RunningProxy) -> None:
    owner = new_client(proxy)
    tokens = tokens_for(proxy, owner)
    thief = new_client(proxy)
    before = count(proxy, Token)
    assert_token_error(thief.refresh(tokens["refresh_token"]), 400, "invalid_grant")
    assert count(proxy, Token) == before
    assert owner.refresh(tokens["refresh_token"]).status_code == 200


@pytest.mark.parametrize("refresh_token", ["garbage", "x" * 5000, "\u00e9\u00e8"], ids=["short", "long", "non-ascii"])
def test_garbage_refresh_token_is_invalid_grant(proxy: RunningProxy, refresh_token: str) -> None:
    client = new_client(proxy)
    assert_token_error(client.refresh(refresh_token), 400, "invalid_grant")


def test_missing_refresh_token_is_invalid_request(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    assert_token_error(client.token_request({"grant_type": "refresh_token"}), 400, "invalid_request")


def test_access_token_used_as_refresh_token_is_invalid_grant(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    tokens = tokens_for(proxy, client)
    assert_token_error(client.refresh(tokens["access_token"]), 400, "invalid_grant")


def test_token_responses_are_json_and_never_cached(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    code = login_code(proxy, client)
    bad = client.exchange(code, code_verifier=pkce_pair()[0])
    assert_token_error(bad, 400, "invalid_grant")
    good = client.exchange(code)
    assert good.status_code == 200 and good.headers["Cache-Control"] == "no-store"
    assert good.headers["Content-Type"].startswith("application/json")
    assert_token_error(client.refresh("nope"), 400, "invalid_grant")
    unauthenticated = requests.post(
        proxy.url + "/token",
        data={"grant_type": "refresh_token", "refresh_token": "x", "client_id": "nobody"},
        timeout=15,
    )
    assert_token_error(unauthenticated, 401, "invalid_client")


@SQLITE_ONLY
def test_token_request_with_json_body_is_a_400(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    code = login_code(proxy, client)
    response = requests.post(
        proxy.url + "/token",
        json={
            "grant_type": "authorization_code",
            "code": code,
            "client_id": client.client_id,
            "redirect_uri": client.redirect_uri,
            "code_verifier": client.verifier,
        },
        timeout=15,
    )
    assert_token_error(response, 400, "invalid_request", "unsupported_grant_type")


def test_token_request_with_a_repeated_parameter_is_invalid_request(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    code = login_code(proxy, client)
    body = urlencode(
        [
            ("grant_type", "authorization_code"),
            ("code", code),
            ("code", "other"),
            ("client_id", client.client_id),
            ("redirect_uri", client.redirect_uri),
            ("code_verifier", client.verifier),
        ]
    )
    response = requests.post(
        proxy.url + "/token", data=body, timeout=15, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert_token_error(response, 400, "invalid_request", "invalid_grant")


def test_token_parameters_in_the_query_string_are_not_used(proxy: RunningProxy) -> None:
    """OAuth 2.1 §3.2: token requests are POST bodies; a code in the URL (and so in access logs) is not honoured."""
    client = new_client(proxy)
    code = login_code(proxy, client)
    query = urlencode(
        {
            "grant_type": "authorization_code",
            "code": code,
            "client_id": client.client_id,
            "redirect_uri": client.redirect_uri,
            "code_verifier": client.verifier,
        }
    )
    response = requests.post(proxy.url + "/token?" + query, timeout=15)
    assert 400 <= response.status_code < 500, response.text
    assert "access_token" not in response.text


@pytest.mark.parametrize("path", ["/token"])  # the garbage sweep of tests.bad_input_fixtures, at this endpoint
def test_garbage_never_causes_a_server_error(sweep_proxy: RunningProxy, path: str) -> None:
    assert_garbage_never_causes_a_server_error(sweep_proxy, path)
