"""Discovery: which metadata URLs are tried, what a document must hold, what reaches Authlib."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from oauthproxy.providers import (
    OAuth2Provider,
    OpenIDConnectProvider,
    ProviderError,
    build_login_provider,
    choose_token_auth_method,
    discovery_candidates,
)
from tests.providers.harness import (
    REDIRECT_URI,
    TIMEOUT,
    FakeDiscovery,
    closed_port,
    login,
    make_settings,
    oidc_document,
    oidc_settings,
    with_app,
)


def test_discovery_candidates_for_an_issuer_with_a_path() -> None:
    urls = [url for url, exact in discovery_candidates("https://idp.example.com/realms/acme/") if exact]
    assert urls == [
        "https://idp.example.com/realms/acme/.well-known/openid-configuration",
        "https://idp.example.com/realms/acme/.well-known/oauth-authorization-server",
        "https://idp.example.com/.well-known/oauth-authorization-server/realms/acme",
        "https://idp.example.com/.well-known/openid-configuration/realms/acme",
    ]
    shorter = [url for url, exact in discovery_candidates("https://idp.example.com/realms/acme") if not exact]
    assert shorter[-2:] == [
        "https://idp.example.com/.well-known/openid-configuration",
        "https://idp.example.com/.well-known/oauth-authorization-server",
    ]


def test_discovery_candidates_for_an_origin_and_a_pasted_metadata_url() -> None:
    assert discovery_candidates("https://IdP.example.com") == [
        ("https://idp.example.com/.well-known/openid-configuration", True),
        ("https://idp.example.com/.well-known/oauth-authorization-server", True),
    ]
    pasted = discovery_candidates("https://idp.example.com/tenant/.well-known/openid-configuration")
    assert pasted[0] == ("https://idp.example.com/tenant/.well-known/openid-configuration", True)


def test_discovery_falls_back_to_rfc8414(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = OpenIDConnectProvider(make_settings("https://as.example.com/tenant1"), timeout=TIMEOUT)
    document = {
        "issuer": "https://as.example.com/tenant1",
        "authorization_endpoint": "https://as.example.com/tenant1/authorize",
        "token_endpoint": "https://as.example.com/tenant1/token",
        "scopes_supported": ["email", "profile", "files.read"],
    }
    fake = FakeDiscovery({"https://as.example.com/.well-known/oauth-authorization-server/tenant1": document})
    monkeypatch.setattr(provider, "_fetch_metadata", fake)
    assert provider.load_metadata()["token_endpoint"] == "https://as.example.com/tenant1/token"
    assert fake.requested == [
        "https://as.example.com/tenant1/.well-known/openid-configuration",
        "https://as.example.com/tenant1/.well-known/oauth-authorization-server",
        "https://as.example.com/.well-known/oauth-authorization-server/tenant1",
    ]
    assert provider.metadata_url == fake.requested[-1]
    # Not OIDC (no jwks_uri) and openid not listed: only the listed identity scopes are requested.
    assert provider.scopes_for([]) == ["email", "profile"]
    # Cached after the first success.
    provider.load_metadata()
    assert len(fake.requested) == 3


def test_discovery_from_a_full_authorize_url_tries_shorter_prefixes(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = OpenIDConnectProvider(
        make_settings("https://sso.example.com/oauth2/default/v1/authorize"), timeout=TIMEOUT
    )
    org = oidc_document("https://sso.example.com")  # another server: its authorize URL is not ours
    org["authorization_endpoint"] = "https://sso.example.com/oauth2/v1/authorize"
    custom = oidc_document("https://sso.example.com/oauth2/default")
    custom["authorization_endpoint"] = "https://sso.example.com/oauth2/default/v1/authorize"
    fake = FakeDiscovery(
        {
            "https://sso.example.com/.well-known/openid-configuration": org,
            "https://sso.example.com/oauth2/default/.well-known/openid-configuration": custom,
        }
    )
    monkeypatch.setattr(provider, "_fetch_metadata", fake)
    assert provider.load_metadata()["issuer"] == "https://sso.example.com/oauth2/default"


def test_discovery_failure_names_the_urls_tried(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = OpenIDConnectProvider(make_settings("https://sso.example.com/login"), timeout=TIMEOUT)
    fake = FakeDiscovery(
        {"https://sso.example.com/.well-known/openid-configuration": oidc_document("https://sso.example.com")}
    )
    monkeypatch.setattr(provider, "_fetch_metadata", fake)
    with pytest.raises(ProviderError) as info:
        provider.load_metadata()
    assert info.value.kind == "misconfigured"
    assert "https://sso.example.com/login/.well-known/openid-configuration (HTTP 404)" in info.value.description
    assert "authorization_endpoint https://sso.example.com/authorize" in info.value.description
    assert "OAUTH_TOKEN_URL" in info.value.description
    # Not cached: the next call tries again.
    with pytest.raises(ProviderError):
        provider.load_metadata()
    assert len(fake.requested) == 2 * len(discovery_candidates("https://sso.example.com/login"))


def test_token_endpoint_auth_method_choice() -> None:
    assert choose_token_auth_method({}) == "client_secret_basic"  # RFC 8414 §2 default
    assert (
        choose_token_auth_method({"token_endpoint_auth_methods_supported": ["client_secret_post"]})
        == "client_secret_post"
    )
    assert (
        choose_token_auth_method(
            {"token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"]}
        )
        == "client_secret_post"  # Authlib's Basic header skips RFC 6749 §2.3.1 form-encoding
    )
    assert (
        choose_token_auth_method({"token_endpoint_auth_methods_supported": ["client_secret_basic"]})
        == "client_secret_basic"
    )


def test_metadata_is_filtered_before_it_reaches_authlib(monkeypatch: pytest.MonkeyPatch) -> None:
    provider = OpenIDConnectProvider(make_settings("https://idp.example.com"), timeout=TIMEOUT)
    hostile = oidc_document("https://idp.example.com", verify=False, code_challenge_method=None, proxies={"https": "x"})
    monkeypatch.setattr(
        provider,
        "_fetch_metadata",
        FakeDiscovery({"https://idp.example.com/.well-known/openid-configuration": hostile}),
    )
    with_app(provider)
    url, secrets_ = provider.create_authorization_url(REDIRECT_URI, ["openid"])
    query = dict(parse_qsl(urlsplit(url).query))
    assert query["code_challenge_method"] == "S256"
    assert "verify" not in provider._client.server_metadata
    assert secrets_["code_verifier"]


def test_plain_http_endpoints_are_refused_off_loopback() -> None:
    provider = OAuth2Provider(
        make_settings(
            "http://idp.example.com/authorize",
            oauth_token_url="http://idp.example.com/token",
            oauth_userinfo_url="https://idp.example.com/me",
        ),
        timeout=TIMEOUT,
    )
    with pytest.raises(ProviderError) as info:
        provider.load_metadata()
    assert info.value.kind == "misconfigured"
    assert "https" in info.value.description


def test_discovery_from_the_full_authorize_url(idp: Any, registered: Callable[..., dict[str, str]]) -> None:
    provider = with_app(build_login_provider(oidc_settings(f"{idp.issuer}/auth", registered())))
    assert provider.load_metadata()["issuer"] == idp.issuer
    assert provider.metadata_url == f"{idp.issuer}/.well-known/openid-configuration"
    assert login(provider, "carol")[1].email == "carol@outsider.test"


def test_discovery_misconfigured(idp: Any, registered: Callable[..., dict[str, str]]) -> None:
    provider = build_login_provider(oidc_settings(f"{idp.issuer}/no/such/issuer", registered()))
    with pytest.raises(ProviderError) as info:
        provider.load_metadata()
    assert info.value.kind == "misconfigured"
    assert f"{idp.issuer}/no/such/issuer/.well-known/openid-configuration (HTTP 404)" in info.value.description


def test_unreachable_provider_is_transient() -> None:
    port = closed_port()
    provider = with_app(build_login_provider(make_settings(f"http://127.0.0.1:{port}")))
    with pytest.raises(ProviderError) as info:
        provider.create_authorization_url(REDIRECT_URI, ["openid"])
    assert info.value.kind == "transient"
    assert f"http://127.0.0.1:{port}/.well-known/openid-configuration" in info.value.description

    explicit = with_app(
        build_login_provider(
            make_settings(
                f"http://127.0.0.1:{port}/authorize",
                oauth_token_url=f"http://127.0.0.1:{port}/token",
                oauth_userinfo_url=f"http://127.0.0.1:{port}/me",
            )
        )
    )
    with pytest.raises(ProviderError) as info:
        explicit.refresh("r")
    assert info.value.kind == "transient"
    assert f"http://127.0.0.1:{port}/token" in info.value.description
