"""GitHub and GitHub Enterprise Server: fixed endpoints, the user and verified email from the REST API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from oauthproxy.providers import GitHubProvider, ProviderError, ProviderIdentity, github_email
from tests.providers.harness import REDIRECT_URI, TIMEOUT, login, make_settings, oidc_settings, with_app


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


def test_github_scopes() -> None:
    github = GitHubProvider(make_settings("https://github.com", upstream_scopes=("repo",)), timeout=TIMEOUT)
    assert github.scopes_for(["read:org", "offline_access"]) == ["read:user", "user:email", "repo", "read:org"]


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
