"""GitHub Enterprise Server: GITHUB_API_URL makes the proxy speak GitHub's OAuth and REST API on another host.

The test OpenID provider also answers GitHub's `/user` and `/user/emails` (tests/provider); with GITHUB_API_URL
pointing at it, the user is who that API says (GitHub's numeric id), not an OpenID Connect subject.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select

from oauthproxy.components import components
from oauthproxy.config import load_settings
from oauthproxy.crypto import hash_token
from oauthproxy.models import Grant, Token, db
from oauthproxy.providers import GitHubProvider, build_login_provider
from tests.conftest import RunningProxy
from tests.provider_fixture import OidcProvider
from tests.proxy_fixtures import log_in
from tests.support.settings import TEST_KEY


def test_a_login_through_github_enterprise_server_reads_the_user_from_its_api(
    start_proxy: Callable[..., RunningProxy], oidc_provider: OidcProvider
) -> None:
    proxy = start_proxy(
        OAUTH_AUTHORIZE_URL=f"{oidc_provider.issuer}/auth",
        OAUTH_TOKEN_URL=f"{oidc_provider.issuer}/token",
        GITHUB_API_URL=oidc_provider.issuer,
    )
    provider = components(proxy.app).login_provider
    assert isinstance(provider, GitHubProvider) and provider.api_base_url == oidc_provider.issuer + "/"
    login = log_in(proxy.url, proxy.url + "/mcp", login_hint="bob")  # bob's email is private: /user/emails
    with proxy.app.app_context():
        grant = db.session.scalars(
            select(Grant)
            .join(Token, Token.grant_id == Grant.id)
            .where(Token.access_token_hash == hash_token(login.access_token))
        ).one()
        assert (grant.user_id, grant.user_email) == ("1002", "bob@example.org")


def test_a_github_enterprise_host_alone_gets_githubs_paths() -> None:
    settings = load_settings(
        {
            "OAUTH_CLIENT_ID": "c",
            "OAUTH_CLIENT_SECRET": "s",
            "OAUTH_AUTHORIZE_URL": "https://github.example.com",
            "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
            "ENCRYPTION_KEY": TEST_KEY,
            "GITHUB_API_URL": "https://GitHub.example.com/api/v3/",
        }
    )
    provider = build_login_provider(settings)
    assert isinstance(provider, GitHubProvider)
    assert provider.load_metadata() == {
        "authorization_endpoint": "https://github.example.com/login/oauth/authorize",
        "token_endpoint": "https://github.example.com/login/oauth/access_token",
        "userinfo_endpoint": "https://github.example.com/api/v3/user",
    }
