"""`build_login_provider`: which provider class the settings select, and what it needs to be built."""

from __future__ import annotations

import dataclasses

import pytest

from oauthproxy.providers import (
    GitHubProvider,
    GoogleProvider,
    MicrosoftProvider,
    OAuth2Provider,
    OpenIDConnectProvider,
    ProviderError,
    build_login_provider,
    detect_provider,
)
from tests.providers.harness import make_settings


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("https://accounts.google.com", "google"),
        ("https://accounts.google.com/o/oauth2/v2/auth", "google"),
        ("https://login.microsoftonline.com/common/oauth2/v2.0/authorize", "microsoft"),
        ("https://login.microsoftonline.com", "microsoft"),
        ("https://login.microsoftonline.us/contoso.onmicrosoft.us/v2.0", "microsoft"),
        ("https://github.com/login/oauth/authorize", "github"),
        ("https://github.com", "github"),
        ("https://GitHub.com/login/oauth/authorize", "github"),
        ("https://idp.example.com/realms/acme", "generic"),
        ("https://accounts.google.com.evil.example/", "generic"),
        ("https://github.example.com/login/oauth/authorize", "generic"),
    ],
)
def test_detect_provider(url: str, kind: str) -> None:
    assert detect_provider(url) == kind


def test_build_login_provider_picks_the_class() -> None:
    google = build_login_provider(make_settings("https://accounts.google.com"))
    assert isinstance(google, GoogleProvider)
    assert google.name == "google"
    assert google.default_scopes == ("openid", "email", "profile")

    microsoft = build_login_provider(
        make_settings("https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize")
    )
    assert isinstance(microsoft, MicrosoftProvider)
    assert microsoft.name == "microsoft"
    assert microsoft.tenant == "contoso.onmicrosoft.com"
    assert microsoft.url == "https://login.microsoftonline.com/contoso.onmicrosoft.com/v2.0"

    github = build_login_provider(make_settings("https://github.com/login/oauth/authorize"))
    assert isinstance(github, GitHubProvider)
    assert github.name == "github"
    assert github.default_scopes == ("read:user", "user:email")
    assert github.load_metadata() == {
        "authorization_endpoint": "https://github.com/login/oauth/authorize",
        "token_endpoint": "https://github.com/login/oauth/access_token",
        "userinfo_endpoint": "https://api.github.com/user",
    }

    oidc = build_login_provider(make_settings("https://idp.example.com/realms/acme"))
    assert type(oidc) is OpenIDConnectProvider
    assert oidc.name == "oidc"

    oauth2 = build_login_provider(
        make_settings(
            "https://chat.example/oauth2/authorize",
            oauth_token_url="https://chat.example/api/oauth2/token",
            oauth_userinfo_url="https://chat.example/api/users/@me",
        )
    )
    assert type(oauth2) is OAuth2Provider
    assert oauth2.name == "oauth2"
    assert oauth2.default_scopes == ()
    assert oauth2.load_metadata() == {  # explicit endpoints, no discovery
        "authorization_endpoint": "https://chat.example/oauth2/authorize",
        "token_endpoint": "https://chat.example/api/oauth2/token",
        "userinfo_endpoint": "https://chat.example/api/users/@me",
    }
    assert oauth2.metadata_url is None


def test_explicit_endpoints_need_a_userinfo_url() -> None:
    with pytest.raises(ProviderError) as info:
        build_login_provider(
            make_settings("https://chat.example/authorize", oauth_token_url="https://chat.example/token")
        )
    assert info.value.kind == "misconfigured"
    assert "OAUTH_USERINFO_URL" in info.value.description


def test_settings_replace_keeps_protocol_compatible() -> None:
    # The real Settings satisfies LoginProviderSettings (a guard against renamed fields).
    settings = dataclasses.replace(make_settings("https://github.com"), upstream_scopes=("repo",))
    assert build_login_provider(settings).scopes_for([]) == ["read:user", "user:email", "repo"]
