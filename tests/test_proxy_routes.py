"""Routes and MCP-endpoint settings: MCP_SERVER_URL alone, the routes TOML file, and every validation message."""

from __future__ import annotations

from pathlib import Path

import pytest

from oauthproxy.config import ConfigError, load_settings
from oauthproxy.proxy.streaming import DownstreamProxy
from oauthproxy.proxy.transport import DownstreamError
from oauthproxy.routes import ProxySettings, build_route
from tests.proxy_fixtures import write_routes
from tests.support.settings import TEST_KEY

BASE = {
    "OAUTH_CLIENT_ID": "client",
    "OAUTH_CLIENT_SECRET": "secret",
    "OAUTH_AUTHORIZE_URL": "http://127.0.0.1:9999",
    "ENCRYPTION_KEY": TEST_KEY,
    "PUBLIC_URL": "https://mcp.example.com",
    "SCOPES_SUPPORTED": "openid,email,profile,repo",
}


def problems_for(**env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings({**BASE, **env})
    return caught.value.problems


def test_mcp_server_url_with_a_path_is_one_route_at_that_path() -> None:
    settings = load_settings({**BASE, "MCP_SERVER_URL": "http://localhost:9000/mcp/gmail"})
    (route,) = settings.routes
    assert (route.name, route.path, route.downstream_url) == ("gmail", "/mcp/gmail", "http://localhost:9000/mcp/gmail")
    assert route.resource == settings.mcp_resource == "https://mcp.example.com/mcp/gmail"
    assert route.metadata_path == "/.well-known/oauth-protected-resource/mcp/gmail"
    assert route.identity_headers and route.credential.kind == "none" and not route.required_scopes
    assert settings.proxy.allowed_origins == {"https://mcp.example.com"}
    assert settings.proxy.token_cache_ttl == 30


def test_single_route_credential_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load_settings(
        {
            **BASE,
            "MCP_SERVER_URL": "http://localhost:9000/mcp",
            "DOWNSTREAM_CREDENTIAL": "static",
            "DOWNSTREAM_CREDENTIAL_HEADER": "X-API-Key",
            "DOWNSTREAM_CREDENTIAL_ENV": "MY_KEY",
            "MY_KEY": "k-123",
            "DOWNSTREAM_IDENTITY_HEADERS": "false",
            "MCP_REQUIRED_SCOPES": "email repo",
        }
    )
    (route,) = settings.routes
    assert (route.credential.kind, route.credential.header, route.credential.value) == ("static", "X-API-Key", "k-123")
    assert not route.identity_headers and route.required_scopes == ("email", "repo")


def test_routes_file_declares_several_protected_resources(tmp_path: Path) -> None:
    secret_file = tmp_path / "github-key"
    secret_file.write_text("ghp-secret-value\n")
    path = write_routes(
        tmp_path / "routes.toml",
        [
            {
                "name": "gmail",
                "path": "/mcp/gmail",
                "url": "http://127.0.0.1:9001/mcp",
                "credential": "upstream_token",
                "scopes": ["email"],
                "allowed_email_domains": ["@Example.com"],
            },
            {
                "path": "/mcp/github/",
                "url": "http://127.0.0.1:9002/mcp/",
                "credential": "static",
                "credential_file": str(secret_file),
                "identity_headers": False,
                "allowed_emails": ["Bob@Example.org"],
            },
            {
                "path": "/tools",
                "url": "http://127.0.0.1:9003/",
                "credential": "static",
                "credential_header": "X-API-Key",
                "credential_env": "TOOLS_KEY",
            },
        ],
    )
    settings = load_settings({**BASE, "MCP_ROUTES_FILE": path, "TOOLS_KEY": "tools-secret"})
    gmail, github, tools = settings.routes
    assert gmail.credential.kind == "upstream_token" and gmail.credential.header == "Authorization"
    assert gmail.required_scopes == ("email",) and gmail.allowed_email_domains == {"example.com"}
    assert gmail.user_is_allowed("alice@example.com") and not gmail.user_is_allowed("carol@outsider.test")
    assert (github.name, github.path, github.downstream_url) == ("github", "/mcp/github", "http://127.0.0.1:9002/mcp")
    assert github.credential.value == "Bearer ghp-secret-value"  # Authorization defaults to the Bearer scheme
    assert github.user_is_allowed("bob@example.org") and not github.user_is_allowed(None)
    assert tools.credential.header == "X-API-Key" and tools.credential.value == "tools-secret"
    assert [route.resource for route in settings.routes] == [
        "https://mcp.example.com/mcp/gmail",
        "https://mcp.example.com/mcp/github",
        "https://mcp.example.com/tools",
    ]
    assert settings.mcp_resource == gmail.resource  # the default resource when a client sends none
    # A secret is never part of a representation that might be logged.
    assert "ghp-secret-value" not in repr(settings) and "tools-secret" not in repr(settings)


@pytest.mark.parametrize(
    ("routes", "env", "expected"),
    [
        ([{"path": "/a", "url": "http://x/mcp", "credentail": "none"}], {}, "unknown key(s) credentail"),
        ([{"path": "/a", "url": "http://x/mcp", "credential": "magic"}], {}, "credential must be one of"),
        ([{"path": "/a", "url": "http://x/mcp", "credential": "static"}], {}, "exactly one of credential_env"),
        (
            [{"path": "/a", "url": "http://x/mcp", "credential": "static", "credential_env": "UNSET_KEY"}],
            {},
            "UNSET_KEY (credential_env) is unset or empty",
        ),
        (
            [{"path": "/a", "url": "http://x/mcp", "credential": "static", "credential_file": "/nonexistent/key"}],
            {},
            "cannot read credential_file /nonexistent/key",
        ),
        (
            [
                {
                    "path": "/a",
                    "url": "http://x/mcp",
                    "credential": "static",
                    "credential_env": "K",
                    "credential_header": "Bad Header",
                }
            ],
            {"K": "v"},
            "credential_header must be an HTTP header name",
        ),
        (
            [
                {
                    "path": "/a",
                    "url": "http://x/mcp",
                    "credential": "static",
                    "credential_env": "K",
                    "credential_header": "X-Forwarded-User",
                }
            ],
            {"K": "v"},
            "is set by the proxy itself",
        ),
        (
            [{"path": "/a", "url": "http://x/mcp", "credential": "static", "credential_env": "K"}],
            {"K": "a\r\nb"},
            "contains a line break",
        ),
        ([{"path": "/mcp", "url": "http://x/1"}, {"path": "/mcp/gmail", "url": "http://x/2"}], {}, "overlap"),
        (
            [{"path": "/mcp", "url": "http://x/1"}, {"path": "/mcp", "url": "http://x/2", "name": "other"}],
            {},
            "overlap",
        ),
        (
            [{"path": "/a", "url": "http://x/1", "name": "n"}, {"path": "/b", "url": "http://x/2", "name": "n"}],
            {},
            "two routes are named 'n'",
        ),
        ([{"path": "/token", "url": "http://x/1"}], {}, "would shadow an authorization server endpoint"),
        ([{"path": "/.well-known/x", "url": "http://x/1"}], {}, "would shadow an authorization server endpoint"),
        ([{"path": "mcp", "url": "http://x/1"}], {}, "path must start with /"),
        ([{"path": "/a/../b", "url": "http://x/1"}], {}, "without query, fragment, // or dot segments"),
        ([{"path": "/a", "url": "ftp://x/1"}], {}, "url must be an absolute http(s) URL"),
        ([{"path": "/a", "url": "http://user:pw@x/1"}], {}, "must not carry a fragment or credentials"),
        ([{"path": "/a", "url": "http://x/1", "scopes": ["admin"]}], {}, "scopes admin are not in SCOPES_SUPPORTED"),
        (
            [{"path": "/a", "url": "http://x/1", "identity_headers": "maybe"}],
            {},
            "identity_headers must be true or false",
        ),
    ],
)
def test_routes_file_problems_are_reported_clearly(
    tmp_path: Path, routes: list[dict], env: dict[str, str], expected: str
) -> None:
    problems = problems_for(MCP_ROUTES_FILE=write_routes(tmp_path / "routes.toml", routes), **env)
    assert any(expected in problem for problem in problems), problems
    assert not any("a\r\nb" in problem or "pw@" in problem for problem in problems)  # secrets are never echoed


def test_routes_file_and_server_url_together_are_refused(tmp_path: Path) -> None:
    path = write_routes(tmp_path / "routes.toml", [{"path": "/a", "url": "http://x/1"}])
    assert any("not both" in p for p in problems_for(MCP_ROUTES_FILE=path, MCP_SERVER_URL="http://x/mcp"))


def test_routes_file_must_exist_parse_and_declare_routes(tmp_path: Path) -> None:
    assert any("cannot read" in p for p in problems_for(MCP_ROUTES_FILE=str(tmp_path / "missing.toml")))
    broken = tmp_path / "broken.toml"
    broken.write_text("[[routes]\npath = ")
    assert any("is not valid TOML" in p for p in problems_for(MCP_ROUTES_FILE=str(broken)))
    empty = tmp_path / "empty.toml"
    empty.write_text("[server]\nx = 1\n")
    problems = problems_for(MCP_ROUTES_FILE=str(empty))
    assert any("at least one [[routes]] table" in p for p in problems)
    assert any("unknown top-level key(s) server" in p for p in problems)


def test_missing_mcp_server_url_is_still_required_without_a_routes_file() -> None:
    assert any(p.startswith("MCP_SERVER_URL is required") for p in problems_for())


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("ALLOWED_ORIGINS", "localhost:6274", "ALLOWED_ORIGINS entries must be origins"),
        ("TOKEN_CACHE_TTL", "600", "TOKEN_CACHE_TTL must be between 0 and 300"),
        ("DOWNSTREAM_CONNECT_TIMEOUT", "soon", "DOWNSTREAM_CONNECT_TIMEOUT must be a number of seconds"),
        ("UPSTREAM_REFRESH_SKEW", "-1", "UPSTREAM_REFRESH_SKEW must be between 0 and 3600"),
    ],
)
def test_proxy_settings_are_validated(name: str, value: str, expected: str) -> None:
    problems = problems_for(MCP_SERVER_URL="http://x/mcp", **{name: value})
    assert any(expected in p for p in problems), problems


def test_allowed_origins_are_normalised_and_include_the_public_origin() -> None:
    settings = load_settings(
        {**BASE, "MCP_SERVER_URL": "http://x/mcp", "ALLOWED_ORIGINS": "http://LOCALHOST:6274/, https://app.example.net"}
    )
    proxy = settings.proxy
    assert proxy.origin_is_allowed("http://localhost:6274") and proxy.origin_is_allowed("https://mcp.example.com")
    assert not proxy.origin_is_allowed("https://evil.example") and not proxy.origin_is_allowed("null")
    assert load_settings({**BASE, "MCP_SERVER_URL": "http://x/mcp", "ALLOWED_ORIGINS": "*"}).proxy.origin_is_allowed(
        "https://anything.example"
    )


@pytest.mark.parametrize(
    ("public_path", "downstream", "raw_uri", "expected"),
    [
        ("/mcp/gmail", "http://127.0.0.1:9000/mcp", "/mcp/gmail", "http://127.0.0.1:9000/mcp"),
        ("/mcp/gmail", "http://127.0.0.1:9000/mcp", "/mcp/gmail/", "http://127.0.0.1:9000/mcp/"),
        (
            "/mcp/gmail",
            "http://127.0.0.1:9000/mcp",
            "/mcp/gmail/a%20b/c?x=1&y=%2F",
            "http://127.0.0.1:9000/mcp/a%20b/c?x=1&y=%2F",
        ),
        (
            "/mcp/gmail",
            "http://127.0.0.1:9000/mcp?tenant=7",
            "/mcp/gmail?x=1",
            "http://127.0.0.1:9000/mcp?tenant=7&x=1",
        ),
        (
            "/mcp/gmail",
            "http://127.0.0.1:9000/mcp",
            "/mcp/gmail?access_token=t&keep=1",
            "http://127.0.0.1:9000/mcp?keep=1",
        ),
        ("/", "http://127.0.0.1:9000/mcp", "/", "http://127.0.0.1:9000/mcp"),
        ("/", "http://127.0.0.1:9000", "/", "http://127.0.0.1:9000/"),
    ],
)
def test_public_paths_map_onto_the_downstream_url(
    public_path: str, downstream: str, raw_uri: str, expected: str
) -> None:
    route = build_route({"path": public_path, "url": downstream}, "test", "https://mcp.example.com", {}, (), [])
    proxy = DownstreamProxy(ProxySettings(), "https://mcp.example.com", frozenset())
    path, _, query = raw_uri.partition("?")
    environ = {"RAW_URI": raw_uri, "PATH_INFO": path, "QUERY_STRING": query}
    assert proxy.downstream_url(route, environ) == expected


@pytest.mark.parametrize("raw_uri", ["/mcp/../admin", "/mcp/a/%2E%2e/b", "/mcp/./x", "/mcp/x/.."])
def test_dot_segments_never_leave_the_route(raw_uri: str) -> None:
    route = build_route({"path": "/mcp", "url": "http://127.0.0.1:9000/mcp"}, "test", "https://m.example", {}, (), [])
    proxy = DownstreamProxy(ProxySettings(), "https://m.example", frozenset())
    with pytest.raises(DownstreamError) as caught:
        proxy.downstream_url(route, {"RAW_URI": raw_uri, "PATH_INFO": raw_uri, "QUERY_STRING": ""})
    assert caught.value.status == 400


GITHUB_OAUTH = {
    "authorize_url": "https://github.com/login/oauth/authorize",
    "client_id": "Iv1.abc",
    "client_secret_env": "GITHUB_MCP_SECRET",
    "scopes": ["repo", "read:org"],
}


def test_a_route_with_its_own_oauth_provider_and_one_with_user_keys(tmp_path: Path) -> None:
    path = write_routes(
        tmp_path / "routes.toml",
        [
            {
                "path": "/mcp/github",
                "url": "https://api.githubcopilot.com/mcp",
                "credential": "oauth",
                "oauth": GITHUB_OAUTH,
            },
            {"path": "/mcp/linear", "url": "https://mcp.linear.app/mcp", "credential": "oauth", "oauth": "discover"},
            {
                "path": "/mcp/search",
                "url": "http://127.0.0.1:9000/mcp",
                "credential": "user_api_key",
                "credential_header": "X-API-Key",
                "api_key_help_url": "https://search.example.com/keys",
                "api_key_verify": True,
            },
        ],
    )
    github, linear, search = load_settings({**BASE, "MCP_ROUTES_FILE": path, "GITHUB_MCP_SECRET": "s3cret"}).routes
    assert github.credential.per_user and github.credential.header_value("tok") == "Bearer tok"
    assert github.oauth is not None and github.oauth.client_secret == "s3cret" and not github.oauth.discover
    assert github.oauth.scopes == ("repo", "read:org") and "s3cret" not in repr(github)
    assert linear.oauth is not None and linear.oauth.discover and linear.credential.kind == "oauth"
    assert search.credential.header == "X-API-Key" and search.credential.header_value("k") == "k"
    assert search.api_key is not None and search.api_key.verify
    assert search.api_key.help_url == "https://search.example.com/keys"
    assert not github.forwards_upstream_token and not search.forwards_upstream_token


def test_the_single_route_can_discover_its_downstream_authorization_server() -> None:
    settings = load_settings(
        {
            **BASE,
            "MCP_SERVER_URL": "http://localhost:9000/mcp",
            "DOWNSTREAM_CREDENTIAL": "oauth",
            "DOWNSTREAM_OAUTH": "discover",
        }
    )
    (route,) = settings.routes
    assert route.oauth is not None and route.oauth.discover


@pytest.mark.parametrize(
    ("route", "expected"),
    [
        ({"credential": "oauth"}, 'needs oauth = "discover" or an [routes.oauth] table'),
        ({"credential": "oauth", "oauth": "yes"}, 'oauth must be "discover"'),
        ({"credential": "none", "oauth": "discover"}, 'set credential = "oauth"'),
        ({"credential": "oauth", "oauth": {"client_id": "c"}}, "authorize_url is required"),
        ({"credential": "oauth", "oauth": {"authorize_url": "https://idp.example.com"}}, "client_id is required"),
        ({"credential": "oauth", "oauth": {**GITHUB_OAUTH, "colour": "red"}}, "unknown key(s) colour"),
        (
            {"credential": "oauth", "oauth": {**GITHUB_OAUTH, "authorize_url": "idp"}},
            "authorize_url must be an absolute",
        ),
        (
            {"credential": "oauth", "oauth": {**GITHUB_OAUTH, "client_secret_env": "NOT_SET_ANYWHERE"}},
            "NOT_SET_ANYWHERE (client_secret_env) is unset or empty",
        ),
        (
            {"credential": "oauth", "oauth": {**GITHUB_OAUTH, "authorize_params": {"state": "x"}}},
            "must not set state",
        ),
        (
            {"credential": "oauth", "oauth": {**GITHUB_OAUTH, "authorize_params": ["x"]}},
            "authorize_params must be a table",
        ),
        ({"credential": "user_api_key", "credential_env": "K"}, "takes each user's own key"),
        ({"credential": "user_api_key", "credential_header": "Host"}, "is set by the proxy itself"),
        ({"credential": "user_api_key", "api_key_verify": "maybe"}, "api_key_verify must be true or false"),
        (
            {"credential": "static", "credential_env": "K", "api_key_help_url": "https://x"},
            'for credential = "user_api_key"',
        ),
    ],
)
def test_per_user_credential_problems_are_reported_clearly(tmp_path: Path, route: dict, expected: str) -> None:
    path = write_routes(tmp_path / "routes.toml", [{"path": "/a", "url": "http://x/1", **route}])
    problems = problems_for(MCP_ROUTES_FILE=path, K="v", GITHUB_MCP_SECRET="s3cret")
    assert any(expected in problem for problem in problems), problems
    assert not any("s3cret" in problem for problem in problems)
