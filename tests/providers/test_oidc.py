"""A generic OpenID Connect provider: discovery, scopes, the code flow against oidc-provider, ID token validation."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import pytest
import requests

from oauthproxy.providers import (
    OAuthProvider,
    OpenIDConnectProvider,
    ProviderError,
    ProviderIdentity,
    build_login_provider,
)
from tests.providers.harness import (
    REDIRECT_URI,
    TIMEOUT,
    FakeDiscovery,
    login,
    make_settings,
    offline_provider,
    oidc_document,
    oidc_settings,
    signed_id_token,
    walk,
    with_app,
)


def test_generic_oidc_scopes(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(
        "https://idp.example.com",
        upstream_scopes=("groups", "email"),
        scopes_supported=("mcp:read", "mcp:write", "offline_access"),
    )
    provider = OpenIDConnectProvider(settings, timeout=TIMEOUT)
    doc = oidc_document("https://idp.example.com", scopes_supported=["openid", "email", "profile", "offline_access"])
    monkeypatch.setattr(
        provider, "_fetch_metadata", FakeDiscovery({"https://idp.example.com/.well-known/openid-configuration": doc})
    )
    assert provider.scopes_for(["mcp:read", "evil:admin", "mcp:read", "offline_access"]) == [
        "openid",
        "email",
        "profile",
        "offline_access",
        "groups",
        "mcp:read",
    ]
    # OIDC Core §11: offline_access is honoured only with prompt=consent.
    url, _secrets = with_app(provider).create_authorization_url(REDIRECT_URI, ["openid", "offline_access"])
    assert dict(parse_qsl(urlsplit(url).query))["prompt"] == "consent"

    without = OpenIDConnectProvider(settings, timeout=TIMEOUT)
    doc = oidc_document("https://idp.example.com", scopes_supported=["openid", "email"])
    monkeypatch.setattr(
        without, "_fetch_metadata", FakeDiscovery({"https://idp.example.com/.well-known/openid-configuration": doc})
    )
    assert without.scopes_for(["offline_access"]) == ["openid", "email", "profile", "groups"]
    url, _secrets = with_app(without).create_authorization_url(REDIRECT_URI, ["openid"])
    assert "prompt" not in dict(parse_qsl(urlsplit(url).query))


def test_oidc_discovery_code_flow_and_refresh(idp: Any, oidc: OAuthProvider) -> None:
    assert type(oidc) is OpenIDConnectProvider
    metadata = oidc.load_metadata()
    assert metadata["issuer"] == idp.issuer
    assert oidc.metadata_url == f"{idp.issuer}/.well-known/openid-configuration"

    scopes = oidc.scopes_for([])
    assert scopes == ["openid", "email", "profile", "offline_access"]  # discovery lists offline_access
    url, stored = oidc.create_authorization_url(REDIRECT_URI, scopes)
    query = parse_qs(urlsplit(url).query)
    assert url.startswith(f"{idp.issuer}/auth?")
    assert query["code_challenge_method"] == ["S256"]
    assert query["scope"] == ["openid email profile offline_access"]
    assert query["prompt"] == ["consent"]
    assert query["nonce"] == [stored["nonce"]]
    assert set(stored) == {"state", "code_verifier", "nonce"}

    callback = walk(url, "bob")
    assert callback["iss"] == idp.issuer  # RFC 9207
    started = datetime.now(UTC).replace(tzinfo=None)  # naive UTC, like ProviderTokens
    tokens, identity = oidc.exchange_code(callback["code"], REDIRECT_URI, stored)
    # The ID token carries only sub here (oidc-provider's default): email and name come from /me.
    assert identity == ProviderIdentity(id="bob", email="bob@example.org", name="Bob Builder")
    assert tokens.refresh_token
    assert tokens.expires_at is not None
    assert timedelta(seconds=3590) < tokens.expires_at - started < timedelta(seconds=3610)
    assert idp.stats()["authorization_code_requests"] == 1

    refreshed = oidc.refresh(tokens.refresh_token)
    assert refreshed.access_token != tokens.access_token
    assert refreshed.refresh_token
    assert refreshed.expires_at is not None
    me = requests.get(f"{idp.issuer}/me", headers={"Authorization": f"Bearer {refreshed.access_token}"}, timeout=10)
    assert me.json()["sub"] == "bob"
    # ...and the refreshed refresh token keeps working.
    again = oidc.refresh(refreshed.refresh_token)
    assert again.access_token not in (tokens.access_token, refreshed.access_token)
    assert idp.stats()["refresh_requests"] == 2


def test_nonce_mismatch_is_refused(oidc: OAuthProvider) -> None:
    url, stored = oidc.create_authorization_url(REDIRECT_URI, oidc.scopes_for([]))
    callback = walk(url, "alice")
    with pytest.raises(ProviderError) as info:
        oidc.exchange_code(callback["code"], REDIRECT_URI, {**stored, "nonce": "another-login"})
    assert info.value.kind == "invalid_grant"
    assert "nonce" in info.value.description


def test_unverified_email_is_dropped(oidc: OAuthProvider) -> None:
    _tokens, identity = login(oidc, "dave")
    assert identity == ProviderIdentity(id="dave", email=None, name="Dave Unverified")


def test_identity_from_id_token_claims(start_oidc_provider: Callable[..., Any]) -> None:
    idp = start_oidc_provider(id_token_claims=True)
    client = {"client_id": "rp-claims", "client_secret": "rp-claims-secret"}
    idp.register_client(client["client_id"], client["client_secret"], [REDIRECT_URI])
    provider = with_app(build_login_provider(oidc_settings(idp.issuer, client)))
    assert login(provider, "alice")[1] == ProviderIdentity(id="alice", email="alice@example.com", name="Alice Liddell")
    assert login(provider, "dave")[1] == ProviderIdentity(id="dave", email=None, name="Dave Unverified")


def test_id_token_for_another_client_is_refused(
    idp: Any, oidc: OAuthProvider, registered: Callable[..., dict[str, str]]
) -> None:
    url, stored = oidc.create_authorization_url(REDIRECT_URI, ["openid"])
    callback = walk(url, "alice")
    token = oidc._app().fetch_access_token(
        redirect_uri=REDIRECT_URI, code=callback["code"], code_verifier=stored["code_verifier"]
    )
    other = with_app(build_login_provider(oidc_settings(idp.issuer, registered())))
    assert isinstance(other, OpenIDConnectProvider)
    with pytest.raises(ProviderError) as info:
        other._id_token_claims(token, stored["nonce"])
    assert info.value.kind == "misconfigured"
    assert "aud" in info.value.description


def test_id_token_signed_by_another_key_is_refused(monkeypatch: pytest.MonkeyPatch, signing_key: Any) -> None:
    from joserfc.jwk import RSAKey

    provider = offline_provider(
        monkeypatch,
        OpenIDConnectProvider(make_settings("https://idp.example.com"), timeout=TIMEOUT),
        oidc_document("https://idp.example.com"),
        signing_key,
    )
    forged = signed_id_token(
        RSAKey.generate_key(2048, parameters={"kid": "k1"}), iss="https://idp.example.com", sub="x"
    )
    with pytest.raises(ProviderError) as info:
        provider._id_token_claims({"access_token": "at", "id_token": forged}, "n-1")
    assert info.value.kind == "invalid_grant"
    expired = signed_id_token(signing_key, iss="https://idp.example.com", sub="x", exp=int(time.time()) - 3600)
    with pytest.raises(ProviderError) as info:
        provider._id_token_claims({"access_token": "at", "id_token": expired}, "n-1")
    assert info.value.kind == "invalid_grant"
