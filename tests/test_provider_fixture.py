"""The loopback oidc-provider fixture works like a real upstream provider."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.provider_fixture import OidcProvider, follow_redirects_until, pkce_pair

REDIRECT_URI = "http://127.0.0.1:9/callback"  # never contacted: the walk stops at it


@pytest.fixture
def client(provider_failure_reset: OidcProvider) -> dict[str, str]:
    client_id = f"client-{secrets.token_hex(4)}"
    client_secret = secrets.token_urlsafe(24)
    provider_failure_reset.register_client(client_id, client_secret, [REDIRECT_URI])
    return {"client_id": client_id, "client_secret": client_secret}


def authorize(
    provider: OidcProvider,
    client: dict[str, str],
    login_hint: str,
    scope: str = "openid email profile",
    **extra: str,
) -> tuple[dict[str, list[str]], str]:
    """Walk /auth -> login -> consent -> redirect URI; return (callback query, verifier)."""
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(8)
    params = {
        "response_type": "code",
        "client_id": client["client_id"],
        "redirect_uri": REDIRECT_URI,
        "scope": scope,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "login_hint": login_hint,
        **extra,
    }
    authorization_endpoint = provider.discovery()["authorization_endpoint"]
    with requests.Session() as browser:
        browser.trust_env = False
        location = follow_redirects_until(browser, f"{authorization_endpoint}?{urlencode(params)}", REDIRECT_URI)
    query = parse_qs(urlsplit(location).query)
    assert query["state"] == [state]
    assert query["iss"] == [provider.issuer]
    return query, verifier


def token_request(provider: OidcProvider, client: dict[str, str], **form: str) -> requests.Response:
    return requests.post(
        provider.url("/token"),
        data=form,
        auth=(client["client_id"], client["client_secret"]),
        timeout=10,
    )


def login(provider: OidcProvider, client: dict[str, str], login_hint: str, **extra: str) -> dict[str, Any]:
    query, verifier = authorize(provider, client, login_hint, **extra)
    response = token_request(
        provider,
        client,
        grant_type="authorization_code",
        code=query["code"][0],
        redirect_uri=REDIRECT_URI,
        code_verifier=verifier,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_discovery(oidc_provider: OidcProvider) -> None:
    document = oidc_provider.discovery()
    issuer = oidc_provider.issuer
    assert issuer == f"http://127.0.0.1:{oidc_provider.port}"
    assert document["issuer"] == issuer
    assert document["authorization_endpoint"] == f"{issuer}/auth"
    assert document["token_endpoint"] == f"{issuer}/token"
    assert document["userinfo_endpoint"] == f"{issuer}/me"
    assert document["jwks_uri"] == f"{issuer}/jwks"
    assert document["revocation_endpoint"] == f"{issuer}/token/revocation"
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert {"openid", "email", "profile", "offline_access"} <= set(document["scopes_supported"])
    assert {"authorization_code", "refresh_token"} <= set(document["grant_types_supported"])
    assert document["authorization_response_iss_parameter_supported"] is True


def test_code_flow_with_pkce_refresh_and_github_endpoints(
    provider_failure_reset: OidcProvider, client: dict[str, str]
) -> None:
    provider = provider_failure_reset
    tokens = login(provider, client, "bob")
    assert tokens["token_type"] == "Bearer"
    assert tokens["expires_in"] == 3600
    assert set(tokens["scope"].split()) == {"openid", "email", "profile"}
    assert tokens["refresh_token"]
    assert tokens["id_token"].count(".") == 2
    access_token = tokens["access_token"]
    assert access_token.count(".") == 0  # opaque: no resource was requested

    bearer = {"Authorization": f"Bearer {access_token}"}
    me = requests.get(provider.url("/me"), headers=bearer, timeout=10)
    assert me.status_code == 200, me.text
    assert me.json() == {
        "sub": "bob",
        "email": "bob@example.org",
        "email_verified": True,
        "name": "Bob Builder",
        "preferred_username": "bob",
    }

    user = requests.get(provider.url("/user"), headers={"Authorization": f"token {access_token}"}, timeout=10)
    assert user.status_code == 200, user.text
    assert user.json()["id"] == 1002
    assert user.json()["login"] == "bob"
    assert user.json()["name"] == "Bob Builder"
    assert user.json()["email"] is None  # private, like GitHub

    emails = requests.get(provider.url("/user/emails"), headers=bearer, timeout=10)
    assert emails.status_code == 200, emails.text
    primary = [entry for entry in emails.json() if entry["primary"]]
    assert primary == [{"email": "bob@example.org", "primary": True, "verified": True, "visibility": "private"}]
    assert len(emails.json()) == 2

    bad = requests.get(provider.url("/user"), headers={"Authorization": "Bearer nope"}, timeout=10)
    assert bad.status_code == 401
    assert bad.json()["message"] == "Bad credentials"

    assert provider.stats() == {"token_requests": 1, "refresh_requests": 0, "authorization_code_requests": 1}
    refreshed = token_request(provider, client, grant_type="refresh_token", refresh_token=tokens["refresh_token"])
    assert refreshed.status_code == 200, refreshed.text
    new_tokens = refreshed.json()
    assert new_tokens["access_token"] != access_token
    assert set(new_tokens["scope"].split()) == {"openid", "email", "profile"}
    assert provider.stats() == {"token_requests": 2, "refresh_requests": 1, "authorization_code_requests": 1}
    me = requests.get(
        provider.url("/me"), headers={"Authorization": f"Bearer {new_tokens['access_token']}"}, timeout=10
    )
    assert me.json()["email"] == "bob@example.org"


def test_github_user_shows_public_email(provider_failure_reset: OidcProvider, client: dict[str, str]) -> None:
    tokens = login(provider_failure_reset, client, "alice", scope="read:user user:email")
    assert "id_token" not in tokens  # plain OAuth 2.0 without openid
    assert tokens["refresh_token"]
    user = requests.get(
        provider_failure_reset.url("/user"), headers={"Authorization": f"Bearer {tokens['access_token']}"}, timeout=10
    )
    assert user.json() == {
        "id": 1001,
        "login": "alice",
        "node_id": "U_1001",
        "type": "User",
        "name": "Alice Liddell",
        "email": "alice@example.com",
    }


def test_offline_access_with_prompt_consent_still_works(
    provider_failure_reset: OidcProvider, client: dict[str, str]
) -> None:
    tokens = login(provider_failure_reset, client, "dave", scope="openid email offline_access", prompt="consent")
    assert "offline_access" in tokens["scope"].split()
    assert tokens["refresh_token"]
    me = requests.get(
        provider_failure_reset.url("/me"), headers={"Authorization": f"Bearer {tokens['access_token']}"}, timeout=10
    )
    assert me.json() == {"sub": "dave", "email": "dave@example.com", "email_verified": False}


@pytest.mark.parametrize(
    ("hint", "error"),
    [("deny", "access_denied"), ("error", "server_error"), ("nobody", "access_denied")],
)
def test_refusals_reach_the_redirect_uri(
    oidc_provider: OidcProvider, client: dict[str, str], hint: str, error: str
) -> None:
    query, _verifier = authorize(oidc_provider, client, hint)
    assert query["error"] == [error]
    assert "code" not in query


def test_refresh_failure_modes(provider_failure_reset: OidcProvider, client: dict[str, str]) -> None:
    provider = provider_failure_reset
    tokens = login(provider, client, "carol")
    refresh: Callable[[], requests.Response] = lambda: token_request(  # noqa: E731
        provider, client, grant_type="refresh_token", refresh_token=tokens["refresh_token"]
    )

    provider.set_failure("refresh_invalid_grant")
    response = refresh()
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"

    provider.set_failure("refresh_server_error")
    response = refresh()
    assert response.status_code == 503
    assert response.json()["error"] == "server_error"

    provider.set_failure("token_delay", delay_ms=300)
    started = time.monotonic()
    response = refresh()
    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200, response.text  # the injected failures left the token alone

    provider.set_failure(None)
    assert refresh().status_code == 200
    assert provider.stats() == {"token_requests": 5, "refresh_requests": 4, "authorization_code_requests": 1}


def test_short_access_token_ttl(start_oidc_provider: Callable[..., OidcProvider]) -> None:
    provider = start_oidc_provider(access_token_ttl=2)
    client = {"client_id": "short", "client_secret": "short-secret"}
    provider.register_client(client["client_id"], client["client_secret"], [REDIRECT_URI])
    tokens = login(provider, client, "alice")
    assert tokens["expires_in"] == 2
    bearer = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert requests.get(provider.url("/me"), headers=bearer, timeout=10).status_code == 200
    time.sleep(2.5)
    assert requests.get(provider.url("/me"), headers=bearer, timeout=10).status_code == 401
    assert requests.get(provider.url("/user"), headers=bearer, timeout=10).status_code == 401
    refreshed = token_request(provider, client, grant_type="refresh_token", refresh_token=tokens["refresh_token"])
    assert refreshed.status_code == 200, refreshed.text


def test_public_client_and_client_secret_post(oidc_provider: OidcProvider) -> None:
    metadata = oidc_provider.register_client("public-app", None, [REDIRECT_URI], token_endpoint_auth_method="none")
    assert metadata["token_endpoint_auth_method"] == "none"
    metadata = oidc_provider.register_client(
        "post-app", "post-secret", [REDIRECT_URI], token_endpoint_auth_method="client_secret_post"
    )
    assert metadata["grant_types"] == ["authorization_code", "refresh_token"]
    query, verifier = authorize(oidc_provider, {"client_id": "post-app"}, "alice")
    response = requests.post(
        oidc_provider.url("/token"),
        data={
            "grant_type": "authorization_code",
            "code": query["code"][0],
            "redirect_uri": REDIRECT_URI,
            "code_verifier": verifier,
            "client_id": "post-app",
            "client_secret": "post-secret",
        },
        timeout=10,
    )
    assert response.status_code == 200, response.text


def test_one_cookie_jar_can_switch_users(oidc_provider: OidcProvider, client: dict[str, str]) -> None:
    verifier, challenge = pkce_pair()
    authorization_endpoint = oidc_provider.discovery()["authorization_endpoint"]

    def walk(browser: requests.Session, hint: str) -> dict[str, list[str]]:
        params = {
            "response_type": "code",
            "client_id": client["client_id"],
            "redirect_uri": REDIRECT_URI,
            "scope": "openid email",
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "login_hint": hint,
        }
        location = follow_redirects_until(browser, f"{authorization_endpoint}?{urlencode(params)}", REDIRECT_URI)
        return parse_qs(urlsplit(location).query)

    with requests.Session() as browser:
        alice = walk(browser, "alice")
        bob = walk(browser, "bob")
        denied = walk(browser, "deny")
    response = token_request(
        oidc_provider,
        client,
        grant_type="authorization_code",
        code=bob["code"][0],
        redirect_uri=REDIRECT_URI,
        code_verifier=verifier,
    )
    me = requests.get(
        oidc_provider.url("/me"), headers={"Authorization": f"Bearer {response.json()['access_token']}"}, timeout=10
    )
    assert "code" in alice
    assert me.json()["sub"] == "bob"
    assert denied["error"] == ["access_denied"]


@pytest.mark.parametrize("id_token_claims", [False, True])
def test_id_token(start_oidc_provider: Callable[..., OidcProvider], id_token_claims: bool) -> None:
    provider = start_oidc_provider(id_token_claims=id_token_claims)
    client = {"client_id": "rp", "client_secret": "rp-secret"}
    provider.register_client(client["client_id"], client["client_secret"], [REDIRECT_URI])
    tokens = login(provider, client, "alice", nonce="n-0S6_WzA2Mj")
    jwks = requests.get(provider.discovery()["jwks_uri"], timeout=10).json()
    token = jwt.decode(tokens["id_token"], KeySet.import_key_set(jwks), algorithms=["RS256"])
    registry = jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": provider.issuer},
        aud={"essential": True, "value": client["client_id"]},
    )
    registry.validate(token.claims)
    claims = token.claims
    assert claims["sub"] == "alice"
    assert claims["nonce"] == "n-0S6_WzA2Mj"
    if id_token_claims:
        assert claims["email"] == "alice@example.com"
        assert claims["email_verified"] is True
        assert claims["name"] == "Alice Liddell"
    else:
        assert "email" not in claims
