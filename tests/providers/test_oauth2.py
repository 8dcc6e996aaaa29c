"""A plain OAuth 2.0 provider with explicit endpoints: no discovery, the user from its profile URL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from oauthproxy.providers import OAuth2Provider, ProviderError, ProviderIdentity, build_login_provider
from tests.providers.harness import TIMEOUT, login, make_settings, oidc_settings, with_app


def test_explicit_endpoints_without_discovery(idp: Any, registered: Callable[..., dict[str, str]]) -> None:
    settings = oidc_settings(
        f"{idp.issuer}/auth",
        registered(),
        oauth_token_url=f"{idp.issuer}/token",
        oauth_userinfo_url=f"{idp.issuer}/me",
        upstream_scopes=("openid", "email", "profile"),
    )
    provider = with_app(build_login_provider(settings))
    assert type(provider) is OAuth2Provider
    tokens, identity = login(provider, "bob")
    assert identity == ProviderIdentity(id="bob", email="bob@example.org", name="Bob Builder")
    assert provider.refresh(tokens.refresh_token or "").access_token


def test_userinfo_normalisation() -> None:
    provider = OAuth2Provider(
        make_settings(
            "https://chat.example/authorize",
            oauth_token_url="https://chat.example/token",
            oauth_userinfo_url="https://chat.example/me",
        ),
        timeout=TIMEOUT,
    )
    assert provider._identity_from_userinfo(
        {"id": 80351110224678912, "username": "nelly", "email": "n@x.io", "verified": True}
    ) == (ProviderIdentity(id="80351110224678912", email="n@x.io", name="nelly"))
    assert provider._identity_from_userinfo({"id": "7", "global_name": "N", "email": "n@x.io", "verified": False}) == (
        ProviderIdentity(id="7", email=None, name="N")
    )
    assert provider._identity_from_userinfo({"sub": "s-1", "name": "Sam", "preferred_username": "sam"}) == (
        ProviderIdentity(id="s-1", email=None, name="Sam")
    )
    with pytest.raises(ProviderError) as info:
        provider._identity_from_userinfo({"id": True, "email": "x@y.z"})
    assert info.value.kind == "misconfigured"
