"""The upstream provider client: pure logic with fakes, then the real flow against oidc-provider.

The integration tests need the `oidc_provider` fixture (tests/provider_fixture.py); run with
`-p tests.provider_fixture` when tests/conftest.py does not load it.
"""

from __future__ import annotations

import dataclasses
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import pytest
import requests
from flask import Flask

from oauthproxy.config import Settings
from oauthproxy.providers import (
    GitHubProvider,
    GoogleProvider,
    MicrosoftProvider,
    OAuth2Provider,
    OAuthProvider,
    OpenIDConnectProvider,
    ProviderError,
    ProviderIdentity,
    ProviderTokens,
    build_login_provider,
    choose_token_auth_method,
    classify_oauth_error,
    detect_provider,
    discovery_candidates,
    error_from_callback,
    github_email,
    microsoft_tenant,
    verified_email,
)
from oauthproxy.providers.base import tokens_from

TIMEOUT = 10.0  # seconds, PROVIDER_HTTP_TIMEOUT
REDIRECT_URI = "http://127.0.0.1:9/callback"  # never contacted: the walk stops at it


def make_settings(authorize_url: str = "https://idp.example.com", **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "public_url": "http://127.0.0.1:8080",
        "oauth_client_id": "proxy-client",
        "oauth_client_secret": "proxy-secret",
        "oauth_authorize_url": authorize_url,
        "mcp_server_url": "http://127.0.0.1:9000/mcp",
        "encryption_keys": (b"k" * 32,),
        "database_dsn": "sqlite://",
    }
    values.update(overrides)
    return Settings(**values)


def with_app(provider: OAuthProvider) -> OAuthProvider:
    provider.init_app(Flask(__name__))
    return provider


class FakeDiscovery:
    """Stands in for `_fetch_metadata`: serves documents by URL, records what was asked."""

    def __init__(self, documents: dict[str, dict[str, Any]]):
        self.documents = documents
        self.requested: list[str] = []

    def __call__(self, url: str) -> tuple[dict[str, Any] | None, str]:
        self.requested.append(url)
        if url in self.documents:
            return dict(self.documents[url]), ""
        return None, "HTTP 404"


def oidc_document(issuer: str, **extra: Any) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "authorization_endpoint": f"{issuer}/authorize",
        "token_endpoint": f"{issuer}/token",
        "userinfo_endpoint": f"{issuer}/userinfo",
        "jwks_uri": f"{issuer}/jwks",
        **extra,
    }


# ------------------------------------------------------------------------------------------------
# Detection and construction
# ------------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize(
    ("url", "tenant"),
    [
        ("https://login.microsoftonline.com", "common"),
        ("https://login.microsoftonline.com/", "common"),
        ("https://login.microsoftonline.com/common/oauth2/v2.0/authorize", "common"),
        ("https://login.microsoftonline.com/organizations/oauth2/v2.0/authorize", "organizations"),
        ("https://login.microsoftonline.com/consumers", "consumers"),
        (
            "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/authorize",
            "72f988bf-86f1-41af-91ab-2d7cd011db47",
        ),
        ("https://login.microsoftonline.com/contoso.onmicrosoft.com/v2.0", "contoso.onmicrosoft.com"),
        ("https://login.microsoftonline.com/contoso.com/oauth2/authorize", "contoso.com"),  # a v1 URL
        ("https://login.microsoftonline.com/oauth2/v2.0/authorize", "common"),
    ],
)
def test_microsoft_tenant(url: str, tenant: str) -> None:
    assert microsoft_tenant(url) == tenant


def test_microsoft_tenant_refuses_junk() -> None:
    with pytest.raises(ProviderError) as info:
        microsoft_tenant("https://login.microsoftonline.com/con%20toso/oauth2/v2.0/authorize")
    assert info.value.kind == "misconfigured"


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


def test_github_urls_are_overridable() -> None:
    provider = GitHubProvider(
        make_settings("https://github.com"),
        api_base_url="https://ghe.example.com/api/v3",
        authorize_url="https://ghe.example.com/login/oauth/authorize",
        token_url="https://ghe.example.com/login/oauth/access_token",
        timeout=TIMEOUT,
    )
    assert provider.api_base_url == "https://ghe.example.com/api/v3/"  # urljoin-safe
    assert provider.load_metadata()["userinfo_endpoint"] == "https://ghe.example.com/api/v3/user"


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


# ------------------------------------------------------------------------------------------------
# Discovery (fake HTTP)
# ------------------------------------------------------------------------------------------------


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
    assert provider._authorize_params(["openid", "offline_access"]) == {"prompt": "consent"}

    without = OpenIDConnectProvider(settings, timeout=TIMEOUT)
    doc = oidc_document("https://idp.example.com", scopes_supported=["openid", "email"])
    monkeypatch.setattr(
        without, "_fetch_metadata", FakeDiscovery({"https://idp.example.com/.well-known/openid-configuration": doc})
    )
    assert without.scopes_for(["offline_access"]) == ["openid", "email", "profile", "groups"]
    assert without._authorize_params(["openid"]) == {}


def test_provider_specific_scopes() -> None:
    settings = make_settings(
        "https://accounts.google.com", upstream_scopes=("https://www.googleapis.com/auth/drive.readonly",)
    )
    google = GoogleProvider(settings, timeout=TIMEOUT)
    # Google refuses the offline_access scope: it uses access_type=offline instead.
    assert google.scopes_for(["offline_access"]) == [
        "openid",
        "email",
        "profile",
        "https://www.googleapis.com/auth/drive.readonly",
    ]
    assert google._authorize_params([]) == {"access_type": "offline", "prompt": "consent"}

    microsoft = MicrosoftProvider(
        make_settings("https://login.microsoftonline.com/common", upstream_scopes=("User.Read",)), timeout=TIMEOUT
    )
    assert microsoft.scopes_for(["offline_access", "Mail.Read"]) == [
        "openid",
        "email",
        "profile",
        "offline_access",
        "User.Read",
        "Mail.Read",
    ]
    assert microsoft._authorize_params(microsoft.scopes_for([])) == {}  # never prompt=consent
    assert microsoft._refresh_params(None) == {"scope": "openid email profile offline_access User.Read"}
    assert microsoft._refresh_params(["openid", "Mail.Read"]) == {"scope": "openid Mail.Read"}

    github = GitHubProvider(make_settings("https://github.com", upstream_scopes=("repo",)), timeout=TIMEOUT)
    assert github.scopes_for(["read:org", "offline_access"]) == ["read:user", "user:email", "repo", "read:org"]


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


# ------------------------------------------------------------------------------------------------
# Identity normalisation and errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "email"),
    [
        ({"email": "a@example.com", "email_verified": True}, "a@example.com"),
        ({"email": " a@example.com ", "email_verified": True}, "a@example.com"),
        ({"email": "a@example.com", "email_verified": "true"}, "a@example.com"),  # Cognito's string booleans
        ({"email": "a@example.com", "email_verified": " TRUE "}, "a@example.com"),
        # Only an explicit yes vouches for the address.
        ({"email": "a@example.com"}, None),
        ({"email": "a@example.com", "email_verified": None}, None),
        ({"email": "a@example.com", "email_verified": False}, None),
        ({"email": "a@example.com", "email_verified": "false"}, None),
        ({"email": "a@example.com", "email_verified": 0}, None),
        ({"email": "a@example.com", "email_verified": 1}, None),
        ({"email": "a@example.com", "email_verified": "no"}, None),
        ({"email": "a@example.com", "email_verified": "yes"}, None),
        ({"email": "a@example.com", "email_verified": [True]}, None),
        # Exactly one @, something on both sides.
        ({"email": "mallory@evil.example@example.test", "email_verified": True}, None),
        ({"email": "@example.test", "email_verified": True}, None),
        ({"email": "mallory@", "email_verified": True}, None),
        ({"email": "a b@example.test", "email_verified": True}, None),
        ({"email": "not-an-address", "email_verified": True}, None),
        ({"email": None}, None),
        ({}, None),
    ],
)
def test_verified_email(claims: dict[str, Any], email: str | None) -> None:
    assert verified_email(claims) == email


def test_microsoft_email_needs_a_verified_domain() -> None:
    microsoft = MicrosoftProvider(make_settings("https://login.microsoftonline.com/common"), timeout=TIMEOUT)
    assert microsoft._email_from({"email": "a@contoso.com", "xms_edov": True}) == "a@contoso.com"
    assert microsoft._email_from({"email": "a@contoso.com", "xms_edov": "true"}) == "a@contoso.com"
    # nOAuth: an `email` claim without the tenant's proof is whatever an admin typed into the mail attribute.
    assert microsoft._email_from({"email": "ceo@victim.com"}) is None
    assert microsoft._email_from({"email": "ceo@victim.com", "xms_edov": False}) is None
    assert microsoft._email_from({"email": "ceo@victim.com", "xms_edov": 0}) is None
    # Entra ID never sends email_verified; one that appears proves nothing about the tenant.
    assert microsoft._email_from({"email": "ceo@victim.com", "email_verified": True}) is None


def test_microsoft_issuer_template_takes_the_token_tenant() -> None:
    microsoft = MicrosoftProvider(make_settings("https://login.microsoftonline.com/common"), timeout=TIMEOUT)
    option = microsoft._issuer_option({"issuer": "https://login.microsoftonline.com/{tenantid}/v2.0"})
    check = option["validate"]
    tid = "72f988bf-86f1-41af-91ab-2d7cd011db47"
    assert check({"tid": tid}, f"https://login.microsoftonline.com/{tid}/v2.0")
    assert not check({"tid": tid}, "https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000/v2.0")
    assert not check({}, f"https://login.microsoftonline.com/{tid}/v2.0")
    assert not check({"tid": tid}, f"https://evil.example/{tid}/v2.0")
    single = microsoft._issuer_option({"issuer": f"https://login.microsoftonline.com/{tid}/v2.0"})["validate"]
    assert single({"tid": tid}, f"https://login.microsoftonline.com/{tid}/v2.0")
    assert not single({"tid": "other"}, "https://login.microsoftonline.com/other/v2.0")


def test_google_accepts_both_issuer_spellings() -> None:
    google = GoogleProvider(make_settings("https://accounts.google.com"), timeout=TIMEOUT)
    assert google._issuer_option({"issuer": "https://accounts.google.com"})["values"] == [
        "https://accounts.google.com",
        "accounts.google.com",
    ]


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


@pytest.mark.parametrize(
    ("user", "emails", "expected"),
    [
        ({"email": None}, [{"email": "p@x.io", "primary": True, "verified": True}], "p@x.io"),
        (
            {"email": None},
            [
                {"email": "p@x.io", "primary": True, "verified": False},
                {"email": "o@x.io", "primary": False, "verified": True},
            ],
            None,
        ),
        (
            {"email": "pub@x.io"},
            [
                {"email": "p@x.io", "primary": True, "verified": True},
                {"email": "pub@x.io", "primary": False, "verified": True},
            ],
            "pub@x.io",
        ),
        ({"email": "pub@x.io"}, [{"email": "pub@x.io", "primary": True, "verified": False}], None),
        ({"email": "pub@x.io"}, None, None),  # no user:email scope: nothing says the address is verified
        ({"email": None}, [{"email": "a@b@x.io", "primary": True, "verified": True}], None),
        ({"email": None}, [{"email": "p@x.io", "primary": True, "verified": "true"}], None),  # GitHub: booleans
        ({"email": None}, None, None),
        ({"email": None}, [], None),
    ],
)
def test_github_email(user: dict[str, Any], emails: list[Any] | None, expected: str | None) -> None:
    assert github_email(user, emails) == expected


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("invalid_grant", "invalid_grant"),
        ("bad_verification_code", "invalid_grant"),  # GitHub's dialect
        ("bad_refresh_token", "invalid_grant"),
        ("temporarily_unavailable", "transient"),
        ("server_error", "transient"),
        ("invalid_client", "misconfigured"),
        ("incorrect_client_credentials", "misconfigured"),
        ("unauthorized_client", "misconfigured"),
        ("invalid_scope", "misconfigured"),
        ("access_denied", "access_denied"),
        ("something_new", "misconfigured"),
        (None, "misconfigured"),
    ],
)
def test_classify_oauth_error(error: str | None, kind: str) -> None:
    result = classify_oauth_error(error, "details\nmore", "refreshing")
    assert result.kind == kind
    assert result.description.startswith("refreshing: the identity provider answered")
    assert "\n" not in result.description


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        ({"error": "access_denied", "error_description": "The user cancelled", "state": "s"}, "access_denied"),
        ({"error": "consent_required"}, "access_denied"),
        ({"error": "interaction_required", "error_subcode": "x"}, "access_denied"),
        ({"error": "server_error"}, "transient"),
        ({"error": "temporarily_unavailable"}, "transient"),
        ({"error": "invalid_scope", "error_description": "AADSTS70011: bad scope"}, "misconfigured"),
        ({"error": "unauthorized_client"}, "misconfigured"),
        ({"error": "redirect_uri_mismatch"}, "misconfigured"),  # GitHub
        ({"error": "made_up_by_provider"}, "access_denied"),
        ({"state": "s"}, "access_denied"),  # neither code nor error
    ],
)
def test_error_from_callback(args: dict[str, str], kind: str) -> None:
    error = error_from_callback(args)
    assert error is not None
    assert error.kind == kind
    if "error_description" in args:
        assert args["error_description"] in error.description


def test_error_from_callback_success() -> None:
    assert error_from_callback({"code": "abc", "state": "s", "iss": "https://idp"}) is None


def test_tokens_keep_the_old_refresh_token() -> None:
    now = int(time.time())
    tokens = tokens_from({"access_token": "a2", "expires_at": now + 60}, fallback_refresh_token="r1")
    assert tokens == ProviderTokens(access_token="a2", refresh_token="r1", expires_at=tokens.expires_at)
    assert tokens.expires_at is not None and tokens.expires_at.tzinfo is None  # naive UTC
    assert abs((tokens.expires_at - datetime.fromtimestamp(now + 60, UTC).replace(tzinfo=None)).total_seconds()) < 1
    assert tokens_from({"access_token": "a", "refresh_token": "r2"}, "r1").refresh_token == "r2"
    assert tokens_from({"access_token": "a"}).expires_at is None
    with pytest.raises(ProviderError) as info:
        tokens_from({"token_type": "bearer"})
    assert info.value.kind == "misconfigured"


def test_exchange_without_a_code_verifier_is_refused() -> None:
    provider = with_app(GitHubProvider(make_settings("https://github.com"), timeout=TIMEOUT))
    with pytest.raises(ProviderError) as info:
        provider.exchange_code("code", REDIRECT_URI, {"state": "s", "nonce": None})
    assert info.value.kind == "invalid_grant"


def test_use_before_init_app_is_a_clear_error() -> None:
    provider = GitHubProvider(make_settings("https://github.com"), timeout=TIMEOUT)
    with pytest.raises(RuntimeError, match="init_app"):
        provider.create_authorization_url(REDIRECT_URI, ["read:user"])


def test_github_authorization_url() -> None:
    provider = with_app(GitHubProvider(make_settings("https://github.com"), timeout=TIMEOUT))
    url, secrets_ = provider.create_authorization_url(REDIRECT_URI, provider.scopes_for([]))
    parts = urlsplit(url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == "https://github.com/login/oauth/authorize"
    query = dict(parse_qsl(parts.query))
    assert query["client_id"] == "proxy-client"
    assert query["redirect_uri"] == REDIRECT_URI
    assert query["scope"] == "read:user user:email"
    assert query["state"] == secrets_["state"]
    assert query["code_challenge_method"] == "S256"
    assert "nonce" not in query
    assert secrets_["nonce"] is None
    assert len(secrets_["code_verifier"]) >= 43  # RFC 7636 §4.1


# ------------------------------------------------------------------------------------------------
# Integration: the real flow against oidc-provider
# ------------------------------------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def walk(url: str, login_hint: str, stop_prefix: str = REDIRECT_URI, max_hops: int = 20) -> dict[str, str]:
    """Act as the user's browser: follow the provider's redirects hop by hop (its automatic
    login/consent) until it sends us to the redirect URI; return that callback's query."""
    from tests.provider_fixture import follow_redirects_until

    with requests.Session() as browser:
        browser.trust_env = False
        location = follow_redirects_until(browser, f"{url}&login_hint={login_hint}", stop_prefix, max_hops)
    return dict(parse_qsl(urlsplit(location).query))


def login(
    provider: OAuthProvider, login_hint: str, granted: list[str] | None = None
) -> tuple[ProviderTokens, ProviderIdentity]:
    url, stored = provider.create_authorization_url(REDIRECT_URI, provider.scopes_for(granted or []))
    callback = walk(url, login_hint)
    assert error_from_callback(callback) is None
    assert callback["state"] == stored["state"]
    return provider.exchange_code(callback["code"], REDIRECT_URI, stored)


@pytest.fixture
def idp(provider_failure_reset: Any) -> Any:
    """The shared oidc-provider, failure mode and stats cleared."""
    return provider_failure_reset


@pytest.fixture
def registered(idp: Any) -> Callable[..., dict[str, str]]:
    def register(token_endpoint_auth_method: str = "client_secret_basic") -> dict[str, str]:
        client = {"client_id": f"proxy-{secrets.token_hex(4)}", "client_secret": secrets.token_urlsafe(24)}
        idp.register_client(
            client["client_id"],
            client["client_secret"],
            [REDIRECT_URI],
            token_endpoint_auth_method=token_endpoint_auth_method,
        )
        return client

    return register


def oidc_settings(issuer_or_url: str, client: dict[str, str], **overrides: Any) -> Settings:
    return make_settings(
        issuer_or_url, oauth_client_id=client["client_id"], oauth_client_secret=client["client_secret"], **overrides
    )


@pytest.fixture
def oidc(idp: Any, registered: Callable[..., dict[str, str]]) -> Iterator[OAuthProvider]:
    provider = build_login_provider(oidc_settings(idp.issuer, registered()))
    yield with_app(provider)


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


def test_codes_are_single_use_and_pkce_bound(oidc: OAuthProvider) -> None:
    url, stored = oidc.create_authorization_url(REDIRECT_URI, oidc.scopes_for([]))
    callback = walk(url, "alice")
    with pytest.raises(ProviderError) as wrong_verifier:
        oidc.exchange_code(callback["code"], REDIRECT_URI, {**stored, "code_verifier": "x" * 50})
    assert wrong_verifier.value.kind == "invalid_grant"

    url, stored = oidc.create_authorization_url(REDIRECT_URI, oidc.scopes_for([]))
    callback = walk(url, "alice")
    _tokens, identity = oidc.exchange_code(callback["code"], REDIRECT_URI, stored)
    assert identity.id == "alice"
    with pytest.raises(ProviderError) as replay:
        oidc.exchange_code(callback["code"], REDIRECT_URI, stored)
    assert replay.value.kind == "invalid_grant"


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


def test_refresh_error_classification(idp: Any, oidc: OAuthProvider) -> None:
    tokens, _identity = login(oidc, "carol")
    assert tokens.refresh_token

    idp.set_failure("refresh_invalid_grant")
    with pytest.raises(ProviderError) as info:
        oidc.refresh(tokens.refresh_token)
    assert info.value.kind == "invalid_grant"
    assert info.value.error == "invalid_grant"

    idp.set_failure("refresh_server_error")
    with pytest.raises(ProviderError) as info:
        oidc.refresh(tokens.refresh_token)
    assert info.value.kind == "transient"

    idp.set_failure(None)
    with pytest.raises(ProviderError) as info:
        oidc.refresh("not-a-refresh-token")
    assert info.value.kind == "invalid_grant"

    assert oidc.refresh(tokens.refresh_token).access_token  # the grant survived


def test_refresh_timeout_is_transient(idp: Any, registered: Callable[..., dict[str, str]]) -> None:
    provider = OpenIDConnectProvider(oidc_settings(idp.issuer, registered()), timeout=0.5)
    with_app(provider)
    tokens, _identity = login(provider, "alice")
    idp.set_failure("token_delay", delay_ms=1500)
    started = time.monotonic()
    with pytest.raises(ProviderError) as info:
        provider.refresh(tokens.refresh_token or "")
    assert info.value.kind == "transient"
    assert time.monotonic() - started < 1.4


def test_wrong_client_secret_is_misconfigured(idp: Any, registered: Callable[..., dict[str, str]]) -> None:
    client = registered()
    provider = with_app(build_login_provider(oidc_settings(idp.issuer, {**client, "client_secret": "wrong"})))
    url, stored = provider.create_authorization_url(REDIRECT_URI, provider.scopes_for([]))
    callback = walk(url, "alice")
    with pytest.raises(ProviderError) as info:
        provider.exchange_code(callback["code"], REDIRECT_URI, stored)
    assert info.value.kind == "misconfigured"
    assert info.value.error == "invalid_client"


@pytest.mark.parametrize(("hint", "kind"), [("deny", "access_denied"), ("error", "transient")])
def test_refusal_at_the_provider(oidc: OAuthProvider, hint: str, kind: str) -> None:
    url, _stored = oidc.create_authorization_url(REDIRECT_URI, oidc.scopes_for([]))
    callback = walk(url, hint)
    error = error_from_callback(callback)
    assert error is not None
    assert error.kind == kind
    assert oidc.error_from_callback(callback) is not None  # also reachable as a method


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


@pytest.fixture
def github(idp: Any, registered: Callable[..., dict[str, str]]) -> GitHubProvider:
    """GitHubProvider against the fixture's GitHub-shaped endpoints (client_secret_post, as GitHub)."""
    client = registered("client_secret_post")
    provider = GitHubProvider(
        oidc_settings("https://github.com", client),
        authorize_url=f"{idp.issuer}/auth",
        token_url=f"{idp.issuer}/token",
        api_base_url=idp.issuer,
        timeout=TIMEOUT,
    )
    with_app(provider)
    return provider


def test_github_flow(idp: Any, github: GitHubProvider) -> None:
    tokens, identity = login(github, "bob")  # bob's email is private: found via /user/emails
    assert identity == ProviderIdentity(id="1002", email="bob@example.org", name="Bob Builder")
    assert login(github, "alice")[1] == ProviderIdentity(id="1001", email="alice@example.com", name="Alice Liddell")
    # dave shows an unverified public email and his primary is unverified: no email.
    assert login(github, "dave")[1] == ProviderIdentity(id="1004", email=None, name="Dave Unverified")
    assert tokens.refresh_token
    refreshed = github.refresh(tokens.refresh_token)
    assert refreshed.access_token != tokens.access_token
    assert idp.stats()["refresh_requests"] == 1

    idp.set_failure("refresh_invalid_grant")
    with pytest.raises(ProviderError) as info:
        github.refresh(refreshed.refresh_token or "")
    assert info.value.kind == "invalid_grant"


def test_github_bad_token_at_the_api(github: GitHubProvider) -> None:
    with pytest.raises(ProviderError) as info:
        github._identity({"access_token": "nope", "token_type": "bearer"}, {})
    assert info.value.kind == "misconfigured"
    assert "401" in info.value.description


def test_settings_replace_keeps_protocol_compatible() -> None:
    # The real Settings satisfies UpstreamSettings (a guard against renamed fields).
    settings = dataclasses.replace(make_settings("https://github.com"), upstream_scopes=("repo",))
    assert build_login_provider(settings).scopes_for([]) == ["read:user", "user:email", "repo"]


# ------------------------------------------------------------------------------------------------
# ID token validation through Authlib for the provider quirks (locally signed tokens)
# ------------------------------------------------------------------------------------------------

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"


def signed_id_token(key: Any, **claims: Any) -> str:
    from joserfc import jwt

    now = int(time.time())
    payload = {"aud": "proxy-client", "iat": now, "exp": now + 300, "nonce": "n-1", **claims}
    return jwt.encode({"alg": "RS256", "kid": "k1"}, payload, key)


@pytest.fixture
def signing_key() -> Any:
    from joserfc.jwk import RSAKey

    return RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig"})


def offline_provider(
    monkeypatch: pytest.MonkeyPatch, provider: OpenIDConnectProvider, document: dict[str, Any], key: Any
) -> OpenIDConnectProvider:
    """A provider whose discovery document and JWKS are served from memory."""
    monkeypatch.setattr(provider, "_fetch_metadata", lambda url: (dict(document), ""))
    with_app(provider)
    provider._app().server_metadata["jwks"] = {"keys": [key.as_dict(private=False)]}
    return provider


def test_microsoft_multi_tenant_id_token(monkeypatch: pytest.MonkeyPatch, signing_key: Any) -> None:
    document = oidc_document("https://login.microsoftonline.com/{tenantid}/v2.0")
    document["userinfo_endpoint"] = "https://graph.microsoft.com/oidc/userinfo"
    provider = offline_provider(
        monkeypatch,
        MicrosoftProvider(make_settings("https://login.microsoftonline.com/common"), timeout=TIMEOUT),
        document,
        signing_key,
    )
    good = signed_id_token(
        signing_key,
        iss=f"https://login.microsoftonline.com/{TENANT}/v2.0",
        tid=TENANT,
        sub="ms-sub",
        email="a@contoso.com",
        xms_edov=True,
        name="A",
    )
    claims = provider._id_token_claims({"access_token": "at", "id_token": good}, "n-1")
    assert claims["sub"] == "ms-sub"
    identity = provider._identity({"access_token": "at", "id_token": good}, {"nonce": "n-1"})
    assert identity == ProviderIdentity(id="ms-sub", email="a@contoso.com", name="A")

    other_tenant = signed_id_token(
        signing_key, iss=f"https://login.microsoftonline.com/{TENANT}/v2.0", tid="someone-else", sub="x"
    )
    with pytest.raises(ProviderError) as info:
        provider._id_token_claims({"access_token": "at", "id_token": other_tenant}, "n-1")
    assert info.value.kind == "misconfigured"
    assert "iss" in info.value.description

    unverified = signed_id_token(
        signing_key,
        iss=f"https://login.microsoftonline.com/{TENANT}/v2.0",
        tid=TENANT,
        sub="ms-sub",
        email="ceo@victim.com",
        xms_edov=False,
        name="A",
    )
    userinfo_calls: list[Any] = []

    def fake_userinfo(token: Any) -> dict[str, Any]:  # Graph's userinfo has no xms_edov
        userinfo_calls.append(token)
        return {"sub": "ms-sub", "email": "ceo@victim.com", "name": "A"}

    monkeypatch.setattr(provider, "_userinfo", fake_userinfo)
    identity = provider._identity({"access_token": "at", "id_token": unverified}, {"nonce": "n-1"})
    assert identity == ProviderIdentity(id="ms-sub", email=None, name="A")
    assert userinfo_calls == []  # name present, email refused by the ID token: nothing to complete

    no_email = signed_id_token(
        signing_key, iss=f"https://login.microsoftonline.com/{TENANT}/v2.0", tid=TENANT, sub="ms-sub"
    )
    monkeypatch.setattr(provider, "_userinfo", lambda token: {"sub": "ms-sub", "email": "a@contoso.com", "name": "A"})
    identity = provider._identity({"access_token": "at", "id_token": no_email}, {"nonce": "n-1"})
    assert identity == ProviderIdentity(id="ms-sub", email=None, name="A")  # Graph's userinfo proves nothing

    without_proof = signed_id_token(
        signing_key,
        iss=f"https://login.microsoftonline.com/{TENANT}/v2.0",
        tid=TENANT,
        sub="ms-sub",
        email="ceo@victim.com",
        name="A",
    )
    identity = provider._identity({"access_token": "at", "id_token": without_proof}, {"nonce": "n-1"})
    assert identity == ProviderIdentity(id="ms-sub", email=None, name="A")  # nOAuth
    monkeypatch.setattr(provider, "_userinfo", lambda token: {"sub": "someone-else", "email": "x@contoso.com"})
    identity = provider._identity({"access_token": "at", "id_token": no_email}, {"nonce": "n-1"})
    assert identity == ProviderIdentity(id="ms-sub", email=None, name=None)  # OIDC Core §5.3.2


@pytest.mark.parametrize("issuer", ["https://accounts.google.com", "accounts.google.com"])
def test_google_id_token_issuers(monkeypatch: pytest.MonkeyPatch, signing_key: Any, issuer: str) -> None:
    provider = offline_provider(
        monkeypatch,
        GoogleProvider(make_settings("https://accounts.google.com"), timeout=TIMEOUT),
        oidc_document("https://accounts.google.com"),
        signing_key,
    )
    token = signed_id_token(
        signing_key, iss=issuer, sub="1234567890", email="a@gmail.com", email_verified=True, name="A"
    )
    assert provider._identity({"access_token": "at", "id_token": token}, {"nonce": "n-1"}) == ProviderIdentity(
        id="1234567890", email="a@gmail.com", name="A"
    )


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
