"""Groups from the login provider: reading them (claim shapes, bounds, overage), allowlists by group, refresh, the header.

Provider tests run against the real oidc-provider (its `groups` claim through userinfo or the ID token, and its
GitHub-shaped `/user/orgs` and `/user/teams`); the end-to-end tests run the proxy on SQLite and PostgreSQL with a
real MCP server behind it.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import anyio
import httpx2
import pytest
import requests
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from oauthproxy.allowlists import user_is_listed
from oauthproxy.config import ConfigError, load_settings
from oauthproxy.downstream_credentials import Caller, credential_header_names, downstream_auth_headers
from oauthproxy.groups import (
    MAX_GROUP_LENGTH,
    MAX_GROUPS,
    GroupsUnreadable,
    configuration_uses_groups,
    group_names,
    groups_column,
    groups_from_column,
    groups_header_value,
    groups_in_claims,
)
from oauthproxy.providers import (
    GitHubProvider,
    GoogleProvider,
    MicrosoftProvider,
    OAuthProvider,
    build_login_provider,
)
from tests.conftest import RunningProxy
from tests.connect_fixtures import ROUTE_PATH, ConnectProxy, submit_key, to_connect_page
from tests.flows import query_of
from tests.provider_fixture import OidcProvider
from tests.providers.harness import (
    TENANT,
    login,
    make_settings,
    offline_provider,
    oidc_document,
    oidc_settings,
    signed_id_token,
    with_app,
)
from tests.proxy_fixtures import EchoServer, Login, McpDownstream, log_in, write_routes
from tests.support.settings import TEST_KEY
from tests.test_account_page import account_browser
from tests.test_proxy_headers import grant_of

GOOD = {
    "OAUTH_CLIENT_ID": "c",
    "OAUTH_CLIENT_SECRET": "s",
    "OAUTH_AUTHORIZE_URL": "https://idp.example.com",
    "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
    "ENCRYPTION_KEY": TEST_KEY,
}

#: Claim values no provider should send, each with what the log says about it: the sign-in is refused, never a
#: part of the list taken.
ODD_CLAIMS: list[tuple[str, Any, str]] = [
    ("a number", 42, "is a number, not a list"),
    ("an object", {"eng": True}, "is a object, not a list"),
    ("a boolean", True, "is a boolean, not a list"),
    ("a nested list", [["eng"], "staff"], "entry that is a list"),
    ("a number in the list", ["eng", 7], "entry that is a number"),
    ("an object in the list", ["eng", {"name": "staff"}], "entry that is a object"),
    ("a null in the list", ["eng", None], "entry that is a null"),
    ("an empty name", ["eng", ""], "empty entry"),
    ("a blank name", ["eng", "   "], "empty entry"),
    ("a huge list", [f"g{n}" for n in range(MAX_GROUPS + 1)], f"lists {MAX_GROUPS + 1} groups"),
    ("a huge list of one name", ["eng"] * (MAX_GROUPS + 1), f"lists {MAX_GROUPS + 1} groups"),
    ("a very long name", ["eng", "x" * (MAX_GROUP_LENGTH + 1)], f"name of {MAX_GROUP_LENGTH + 1} characters"),
    ("a line break", ["eng", "staff\r\nX-Forwarded-User: admin"], "control characters"),
    ("a NUL", ["eng", "st\x00aff"], "control characters"),
    ("a C1 control", ["eng", "st\x85aff"], "control characters"),
]


def new_user(provider: OidcProvider, **claims: Any) -> str:
    """A user of its own at the shared provider (tests must not change alice's groups under other tests)."""
    name = f"g{secrets.token_hex(4)}"
    provider.add_user(name, f"{name}@example.net", name.title(), **claims)
    return name


# -- reading a claim ------------------------------------------------------------------------------------------


def test_a_list_of_names_is_read_as_it_is() -> None:
    assert group_names(["eng", "Eng", "/eng/backend", "org:acme", "Domain Users", "ingénieurs"]) == {
        "eng",
        "Eng",  # case-sensitive: another group
        "/eng/backend",
        "org:acme",
        "Domain Users",
        "ingénieurs",
    }
    assert group_names(["eng", "eng", "staff"]) == {"eng", "staff"}  # duplicates merged
    assert group_names([]) == frozenset()
    assert group_names(["x" * MAX_GROUP_LENGTH] * 2 + [f"g{n}" for n in range(MAX_GROUPS - 2)]) != frozenset()


def test_a_single_name_instead_of_a_list_is_one_group() -> None:
    # Keycloak's single-valued mappers and ADFS with one group send a string.
    assert group_names("eng") == {"eng"}
    assert group_names("a,b") == {"a,b"}  # never split: a comma may be part of a name


@pytest.mark.parametrize(
    ("value", "said"), [(value, said) for _, value, said in ODD_CLAIMS], ids=[i for i, _, _ in ODD_CLAIMS]
)
def test_a_claim_of_an_odd_shape_is_unreadable_as_a_whole(value: Any, said: str) -> None:
    with pytest.raises(GroupsUnreadable, match=said):
        group_names(value)


def test_a_claim_is_found_by_name_or_dotted_path() -> None:
    claims = {
        "groups": ["eng"],
        "https://example.com/groups": ["auth0-admins"],  # Auth0: a namespaced claim, dots and all
        "realm_access": {"roles": ["offline_access", "admin"]},  # Keycloak's realm roles
        "nested": {"deeper": "not-an-object"},
    }
    assert groups_in_claims(claims, "groups") == {"eng"}
    assert groups_in_claims(claims, "https://example.com/groups") == {"auth0-admins"}
    assert groups_in_claims(claims, "realm_access.roles") == {"offline_access", "admin"}
    assert groups_in_claims(claims, "roles") is None  # absent: nothing said
    assert groups_in_claims(claims, "nested.deeper.more") is None
    assert groups_in_claims({"groups": None}, "groups") is None
    with pytest.raises(GroupsUnreadable):
        groups_in_claims(claims, "realm_access")  # an object


def test_entra_groups_overage_is_unreadable() -> None:
    # More groups than fit in the token: Entra ID leaves the claim out and points at Graph instead.
    overage = {
        "_claim_names": {"groups": "src1"},
        "_claim_sources": {"src1": {"endpoint": "https://graph.microsoft.com/v1.0/users/x/getMemberObjects"}},
    }
    with pytest.raises(GroupsUnreadable, match="overage"):
        groups_in_claims(overage, "groups")
    with pytest.raises(GroupsUnreadable, match="overage"):
        groups_in_claims({"hasgroups": True}, "groups")  # the implicit flow's indicator
    # Another claim's distributed source says nothing about groups.
    assert groups_in_claims({"_claim_names": {"address": "src1"}, "groups": ["eng"]}, "groups") == {"eng"}


def test_stored_groups_round_trip_and_a_hand_edit_reads_as_none(caplog: pytest.LogCaptureFixture) -> None:
    assert groups_column(frozenset()) is None
    stored = groups_column(frozenset({"staff", "eng", "ingénieurs"}))
    assert stored == '["eng", "ingénieurs", "staff"]'
    assert groups_from_column(stored) == {"eng", "staff", "ingénieurs"}
    assert groups_from_column(None) == frozenset()
    with caplog.at_level(logging.ERROR, logger="oauthproxy.groups"):
        assert groups_from_column('{"eng": 1}') == frozenset()
        assert groups_from_column("not json") == frozenset()
    assert "taken as none" in caplog.text


# -- allowlists -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("email", "groups", "emails", "domains", "allowed", "expected"),
    [
        (None, frozenset(), set(), set(), set(), True),  # no list: everyone
        (None, {"eng"}, set(), set(), {"eng"}, True),
        ("a@example.com", {"sales"}, set(), set(), {"eng"}, False),
        ("a@example.com", frozenset(), set(), set(), {"eng"}, False),
        ("a@example.com", {"Eng"}, set(), set(), {"eng"}, False),  # exact names
        # Any entry of the list admits: the email, its domain, or a group.
        ("a@example.com", frozenset(), set(), {"example.com"}, {"eng"}, True),
        ("a@other.org", {"eng"}, set(), {"example.com"}, {"eng"}, True),
        ("a@other.org", {"sales"}, {"b@other.org"}, {"example.com"}, {"eng"}, False),
        ("b@other.org", {"sales"}, {"b@other.org"}, set(), {"eng"}, True),
    ],
)
def test_an_allowlist_admits_on_any_entry(
    email: str | None, groups: Any, emails: Any, domains: Any, allowed: Any, expected: bool
) -> None:
    assert (
        user_is_listed(email, frozenset(groups), frozenset(emails), frozenset(domains), frozenset(allowed)) is expected
    )


def test_allowed_groups_settings(tmp_path: Path) -> None:
    settings = load_settings({**GOOD, "ALLOWED_GROUPS": " eng , Domain Users,org:acme ,"})
    assert settings.allowed_groups == {"eng", "Domain Users", "org:acme"}  # commas only: names have spaces
    assert settings.user_is_allowed("x@example.com", frozenset({"Domain Users"}))
    assert not settings.user_is_allowed("x@example.com", frozenset({"Domain"}))
    assert settings.reads_groups and not load_settings(GOOD).reads_groups
    assert load_settings({**GOOD, "GROUPS_CLAIM": "https://example.com/groups"}).groups_claim == (
        "https://example.com/groups"
    )

    with pytest.raises(ConfigError) as error:
        load_settings({**GOOD, "ALLOWED_GROUPS": "eng," + "x" * 300, "GROUPS_CLAIM": "my groups"})
    problems = "\n".join(error.value.problems)
    assert "ALLOWED_GROUPS: a group name is longer than 256 characters" in problems
    assert "GROUPS_CLAIM must be a claim name" in problems

    routes = write_routes(
        tmp_path / "routes.toml",
        [
            {"name": "a", "path": "/a", "url": "http://127.0.0.1:9/a", "allowed_groups": ["eng", "ops"]},
            {"name": "b", "path": "/b", "url": "http://127.0.0.1:9/b", "groups_header": True},
            {"name": "c", "path": "/c", "url": "http://127.0.0.1:9/c"},
        ],
    )
    settings = load_settings({**GOOD, "MCP_SERVER_URL": "", "MCP_ROUTES_FILE": routes})
    a, b, c = settings.routes
    assert a.allowed_groups == {"eng", "ops"} and not a.groups_header
    assert b.groups_header and not b.allowed_groups
    assert a.user_is_allowed(None, frozenset({"ops"})) and not a.user_is_allowed("x@example.com", frozenset())
    assert c.user_is_allowed(None, frozenset())
    assert settings.reads_groups and not settings.allowed_groups

    bad = write_routes(
        tmp_path / "bad.toml",
        [
            {"name": "a", "path": "/a", "url": "http://127.0.0.1:9/a", "allowed_groups": [["eng"]]},
            {"name": "b", "path": "/b", "url": "http://127.0.0.1:9/b", "groups_header": "maybe"},
            {
                "name": "c",
                "path": "/c",
                "url": "http://127.0.0.1:9/c",
                "credential": "static",
                "credential_header": "X-Forwarded-Groups",
                "credential_env": "X",
            },
            {"name": "d", "path": "/d", "url": "http://127.0.0.1:9/d", "allowed_groups": ["a\nb"]},
        ],
    )
    with pytest.raises(ConfigError) as error:
        load_settings({**GOOD, "MCP_SERVER_URL": "", "MCP_ROUTES_FILE": bad, "X": "secret"})
    problems = "\n".join(error.value.problems)
    assert "#1: allowed_groups must be a list of group names" in problems
    assert "#2: groups_header must be true or false" in problems
    assert "#3: credential_header X-Forwarded-Groups is set by the proxy itself" in problems
    assert "#4: allowed_groups: the group 'a\\nb' contains a control character" in problems


def test_groups_are_read_only_when_the_configuration_uses_them() -> None:
    assert not configuration_uses_groups(load_settings(GOOD))
    assert configuration_uses_groups(load_settings({**GOOD, "ALLOWED_GROUPS": "eng"}))
    assert configuration_uses_groups(load_settings({**GOOD, "DOWNSTREAM_GROUPS_HEADER": "true"}))

    github = build_login_provider(load_settings({**GOOD, "OAUTH_AUTHORIZE_URL": "https://github.com"}))
    assert not github.reads_groups and "read:org" not in github.scopes_for([])
    github = build_login_provider(
        load_settings({**GOOD, "OAUTH_AUTHORIZE_URL": "https://github.com", "ALLOWED_GROUPS": "org:acme"})
    )
    # read:org lists the user's organisations and teams; asked only when groups are used.
    assert github.reads_groups and github.scopes_for([]) == ["read:user", "user:email", "read:org"]


def test_the_groups_scope_is_asked_only_where_the_provider_lists_it(oidc_provider: OidcProvider) -> None:
    client = {"client_id": "groups-scope", "client_secret": "s"}
    uses = build_login_provider(oidc_settings(oidc_provider.issuer, client, allowed_groups=frozenset({"eng"})))
    assert "groups" in uses.scopes_for([])  # oidc-provider lists it in scopes_supported, as Okta does
    assert "groups" not in build_login_provider(oidc_settings(oidc_provider.issuer, client)).scopes_for([])


# -- the header -----------------------------------------------------------------------------------------------


def test_the_groups_header_value_is_one_line_of_percent_encoded_names() -> None:
    groups = frozenset({"org:acme", "acme/platform", "/eng/backend", "a,b", "Domain Users", "100%", "ingé", 'q"t;x'})
    value = groups_header_value(groups)
    assert value == ",".join(
        ["/eng/backend", "100%25", "Domain%20Users", "a%2Cb", "acme/platform", "ing%C3%A9", "org:acme", "q%22t%3Bx"]
    )
    assert value.isascii() and not any(ch in value for ch in "\r\n\x00 ")
    assert {unquote(item) for item in value.split(",")} == groups  # what a downstream reads back


def test_the_groups_header_goes_only_where_the_route_asks(tmp_path: Path) -> None:
    routes = write_routes(
        tmp_path / "routes.toml",
        [
            {"name": "a", "path": "/a", "url": "http://127.0.0.1:9/a", "groups_header": True},
            {"name": "b", "path": "/b", "url": "http://127.0.0.1:9/b"},
        ],
    )
    a, b = load_settings({**GOOD, "MCP_SERVER_URL": "", "MCP_ROUTES_FILE": routes}).routes
    caller = Caller("u1", "u1@example.com", "U", groups=frozenset({"eng", "a b"}))
    assert ("X-Forwarded-Groups", "a%20b,eng") in downstream_auth_headers(a, caller)
    assert not any(name == "X-Forwarded-Groups" for name, _ in downstream_auth_headers(b, caller))
    # No groups: no header (a downstream reads its absence as none).
    assert not any(name == "X-Forwarded-Groups" for name, _ in downstream_auth_headers(a, Caller("u2", None, None)))
    # A client's own copy is dropped on every route, whether the route sends one or not.
    assert "x-forwarded-groups" in credential_header_names(a) and "x-forwarded-groups" in credential_header_names(b)


# -- providers: OpenID Connect against oidc-provider --------------------------------------------------------


def groups_provider(idp: OidcProvider, client_name: str = "groups", **overrides: Any) -> OAuthProvider:
    client = {"client_id": f"{client_name}-{secrets.token_hex(3)}", "client_secret": secrets.token_urlsafe(16)}
    idp.register_client(client["client_id"], client["client_secret"], ["http://127.0.0.1:9/callback"])
    settings = oidc_settings(idp.issuer, client, allowed_groups=frozenset({"eng"}), **overrides)
    return with_app(build_login_provider(settings))


@pytest.fixture(scope="module")
def idp_with_claims(start_oidc_provider: Callable[..., OidcProvider]) -> OidcProvider:
    """oidc-provider putting the scopes' claims in the ID token too (Keycloak, Entra ID and Okta do)."""
    return start_oidc_provider(id_token_claims=True)


def test_oidc_groups_come_from_userinfo_and_from_the_id_token(
    oidc_provider: OidcProvider, idp_with_claims: OidcProvider
) -> None:
    for idp in (oidc_provider, idp_with_claims):
        provider = groups_provider(idp)
        assert login(provider, "alice")[1].groups == {"eng", "staff"}
        bob = login(provider, "bob")[1]  # bob has no groups claim at all
        assert (bob.groups, bob.groups_problem) == (frozenset(), None)
    # Not read when nothing uses them: not even asked for.
    plain = with_app(
        build_login_provider(oidc_settings(oidc_provider.issuer, {"client_id": "x", "client_secret": "y"}))
    )
    assert "groups" not in plain.scopes_for([])


@pytest.mark.parametrize(
    ("value", "said"), [(value, said) for _, value, said in ODD_CLAIMS], ids=[i for i, _, _ in ODD_CLAIMS]
)
def test_oidc_odd_group_claims_leave_no_groups_and_say_why(
    oidc_provider: OidcProvider, idp_with_claims: OidcProvider, value: Any, said: str
) -> None:
    for idp in (oidc_provider, idp_with_claims):
        user = new_user(idp, groups=value)
        identity = login(groups_provider(idp), user)[1]
        assert identity.groups == frozenset()
        assert identity.groups_problem is not None and said in identity.groups_problem


def test_oidc_distributed_groups_are_an_overage(oidc_provider: OidcProvider, idp_with_claims: OidcProvider) -> None:
    for idp in (oidc_provider, idp_with_claims):
        user = new_user(
            idp,
            claimNames={"groups": "src1"},
            claimSources={"src1": {"endpoint": "https://graph.microsoft.com/v1.0/users/x/getMemberObjects"}},
        )
        identity = login(groups_provider(idp), user)[1]
        assert identity.groups == frozenset() and "overage" in (identity.groups_problem or "")


def test_oidc_groups_after_a_refresh_are_the_providers_of_now(
    oidc_provider: OidcProvider, idp_with_claims: OidcProvider
) -> None:
    for idp in (oidc_provider, idp_with_claims):
        provider = groups_provider(idp)
        user = new_user(idp, groups=["eng", "staff"])
        tokens, identity = login(provider, user)
        assert identity.groups == {"eng", "staff"}
        idp.add_user(user, f"{user}@example.net", user.title(), groups=["staff"])
        assert tokens.refresh_token
        refreshed, response = provider.refresh_response(tokens.refresh_token)
        assert "id_token" in response  # validated without a nonce (OIDC Core §12.2)
        assert provider.current_groups(response, user) == {"staff"}
        idp.add_user(user, f"{user}@example.net", user.title(), groups=42)
        with pytest.raises(GroupsUnreadable):
            provider.current_groups({"access_token": refreshed.access_token}, user)
        # Another user's token never speaks for this one.
        with pytest.raises(Exception, match="another user"):
            provider.current_groups(response, "alice")


@pytest.fixture(name="signing_key", scope="module")
def signing_key_fixture() -> Any:
    from joserfc.jwk import RSAKey

    return RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig"})


def test_a_namespaced_claim_in_the_id_token(monkeypatch: pytest.MonkeyPatch, signing_key: Any) -> None:
    settings = make_settings("https://tenant.auth0.example", allowed_groups=frozenset({"admins"}))
    provider = offline_provider(
        monkeypatch,
        build_login_provider(settings),  # type: ignore[arg-type]
        oidc_document("https://tenant.auth0.example"),
        signing_key,
    )
    provider.groups_claim = "https://example.com/groups"
    monkeypatch.setattr(provider, "_userinfo", lambda token: {"sub": "auth0|1"})
    token = signed_id_token(
        signing_key, iss="https://tenant.auth0.example", sub="auth0|1", **{"https://example.com/groups": ["admins"]}
    )
    identity = provider._identity({"access_token": "at", "id_token": token}, {"nonce": "n-1"})
    assert identity.groups == {"admins"}


# -- providers: Microsoft, Google ----------------------------------------------------------------------------


def test_microsoft_groups_and_their_overage(monkeypatch: pytest.MonkeyPatch, signing_key: Any) -> None:
    settings = make_settings(
        f"https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/authorize", allowed_groups=frozenset({"g"})
    )
    microsoft = build_login_provider(settings)
    assert isinstance(microsoft, MicrosoftProvider)
    issuer = f"https://login.microsoftonline.com/{TENANT}/v2.0"
    offline_provider(monkeypatch, microsoft, oidc_document(issuer), signing_key)
    monkeypatch.setattr(microsoft, "_userinfo", lambda token: {"sub": "ms-sub", "name": "A"})  # Graph: no groups
    guid = "8a4b1c9e-0f6d-4c2b-9a8e-3f1d2e5c7b90"
    token = signed_id_token(signing_key, iss=issuer, tid=TENANT, sub="ms-sub", name="A", groups=[guid])
    assert microsoft._identity({"access_token": "at", "id_token": token}, {"nonce": "n-1"}).groups == {guid}
    overage = signed_id_token(
        signing_key,
        iss=issuer,
        tid=TENANT,
        sub="ms-sub",
        name="A",
        _claim_names={"groups": "src1"},
        _claim_sources={"src1": {"endpoint": "https://graph.microsoft.com/v1.0/users/ms-sub/getMemberObjects"}},
    )
    identity = microsoft._identity({"access_token": "at", "id_token": overage}, {"nonce": "n-1"})
    assert identity.groups == frozenset() and "overage" in (identity.groups_problem or "")


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({"hd": "Example.com", "email": "a@example.com", "email_verified": True}, {"domain:example.com"}),
        # The domain only with an address Google vouches for.
        ({"hd": "example.com", "email": "a@example.com", "email_verified": False}, frozenset()),
        ({"hd": "example.com"}, frozenset()),
        # A consumer account: no hd, nothing (its userinfo says nothing more).
        ({"email": "a@gmail.com", "email_verified": True}, frozenset()),
    ],
)
def test_google_workspace_domain(
    monkeypatch: pytest.MonkeyPatch, signing_key: Any, claims: dict[str, Any], expected: frozenset[str]
) -> None:
    settings = make_settings("https://accounts.google.com", allowed_groups=frozenset({"domain:example.com"}))
    google = build_login_provider(settings)
    assert isinstance(google, GoogleProvider)
    offline_provider(monkeypatch, google, oidc_document("https://accounts.google.com"), signing_key)
    monkeypatch.setattr(google, "_userinfo", lambda token: {"sub": "1234567890", **claims})
    token = signed_id_token(signing_key, iss="https://accounts.google.com", sub="1234567890", name="A", **claims)
    identity = google._identity({"access_token": "at", "id_token": token}, {"nonce": "n-1"})
    assert (identity.groups, identity.groups_problem) == (expected, None)


# -- providers: GitHub's API -----------------------------------------------------------------------------------


def github_provider(idp: OidcProvider, reads_groups: bool = True) -> GitHubProvider:
    client = {"client_id": f"gh-{secrets.token_hex(3)}", "client_secret": secrets.token_urlsafe(16)}
    idp.register_client(client["client_id"], client["client_secret"], ["http://127.0.0.1:9/callback"])
    provider = GitHubProvider(
        oidc_settings(idp.issuer, client),
        api_base_url=idp.issuer,
        authorize_url=f"{idp.issuer}/auth",
        token_url=f"{idp.issuer}/token",
        timeout=10,
    )
    provider.reads_groups = reads_groups
    return with_app(provider)  # type: ignore[return-value]


def test_github_organisations_and_teams(oidc_provider: OidcProvider) -> None:
    identity = login(github_provider(oidc_provider), "alice")[1]
    assert identity.groups == {"org:acme", "acme/platform"}  # lower-cased: GitHub ignores case in both
    assert login(github_provider(oidc_provider), "bob")[1].groups == frozenset()
    assert login(github_provider(oidc_provider, reads_groups=False), "alice")[1].groups == frozenset()


def test_github_lists_are_read_page_by_page_to_the_bound(oidc_provider: OidcProvider) -> None:
    many = new_user(
        oidc_provider,
        orgs=[f"Org{n}" for n in range(250)],
        teams=[{"org": "Org1", "slug": f"team-{n}"} for n in range(150)],
    )
    identity = login(github_provider(oidc_provider), many)[1]
    assert len(identity.groups) == 400 and "org:org249" in identity.groups and "org1/team-149" in identity.groups

    too_many = new_user(oidc_provider, orgs=[f"Org{n}" for n in range(MAX_GROUPS + 1)])
    identity = login(github_provider(oidc_provider), too_many)[1]
    assert identity.groups == frozenset() and f"more than {MAX_GROUPS}" in (identity.groups_problem or "")


def test_github_next_page_elsewhere_is_not_followed(oidc_provider: OidcProvider, echo_downstream: EchoServer) -> None:
    user = new_user(oidc_provider, orgs=[f"Org{n}" for n in range(150)], apiLinkBase=echo_downstream.url)
    identity = login(github_provider(oidc_provider), user)[1]
    assert identity.groups == frozenset() and "next page outside" in (identity.groups_problem or "")
    assert echo_downstream.seen == []  # the user's token went nowhere else


def test_github_without_read_org_cannot_say_the_groups(oidc_provider: OidcProvider) -> None:
    # A grant from before groups were used: its token lacks read:org, and GitHub refuses /user/teams.
    tokens, _identity = login(github_provider(oidc_provider, reads_groups=False), "alice")
    with pytest.raises(GroupsUnreadable, match="403"):
        github_provider(oidc_provider).current_groups({"access_token": tokens.access_token}, "1001")


# -- end to end ----------------------------------------------------------------------------------------------


def refused_login(proxy: RunningProxy, user: str, path: str = "/mcp/eng") -> requests.Response:
    """A login that ends on the proxy's page instead of back at the client; the page."""
    browser = proxy.browser(user)
    with pytest.raises(AssertionError, match="403"):
        proxy.register_client().login(browser, resource=proxy.url + path)
    assert browser.last_page is not None
    return browser.last_page


def whoami(url: str, login: Login, **headers: str) -> dict[str, str]:
    async def scenario() -> dict[str, str]:
        async with (
            httpx2.AsyncClient(headers={**login.bearer, **headers}, timeout=30) as http,
            Client(streamable_http_client(url, http_client=http)) as client,
        ):
            result = await client.call_tool("whoami", {})
            assert result.is_error is False, result
            assert isinstance(result.structured_content, dict)
            return {key.lower(): value for key, value in result.structured_content.items()}

    return anyio.run(scenario)


@pytest.fixture
def eng_proxy(start_proxy: Callable[..., RunningProxy], mcp_downstream: McpDownstream, tmp_path: Path) -> RunningProxy:
    """ALLOWED_GROUPS=eng, a route for eng that passes the groups on, and one for ops."""
    routes = write_routes(
        tmp_path / "routes.toml",
        [
            {
                "name": "eng",
                "path": "/mcp/eng",
                "url": mcp_downstream.url,
                "allowed_groups": ["eng"],
                "groups_header": True,
                "identity_assertion": True,
            },
            {"name": "ops", "path": "/mcp/ops", "url": mcp_downstream.url, "allowed_groups": ["ops"]},
        ],
    )
    return start_proxy(ALLOWED_GROUPS="eng", MCP_SERVER_URL="", MCP_ROUTES_FILE=routes)


def test_a_user_in_the_group_passes_and_the_downstream_sees_the_groups(
    eng_proxy: RunningProxy, oidc_provider: OidcProvider
) -> None:
    user = new_user(oidc_provider, groups=["eng", "Domain Users", "a,b"])
    url = eng_proxy.url + "/mcp/eng"
    session = log_in(eng_proxy.url, url, login_hint=user)
    assert grant_of(eng_proxy.app, session.access_token).user_groups == '["Domain Users", "a,b", "eng"]'
    # A client's own X-Forwarded-Groups never reaches the downstream: the proxy's replaces it.
    seen = whoami(url, session, **{"X-Forwarded-Groups": "admins", "X-Forwarded-Groups-Extra": "x"})
    assert seen["x-forwarded-groups"] == "Domain%20Users,a%2Cb,eng"
    assert "x-forwarded-groups-extra" not in seen
    assert seen["x-forwarded-user"] == user
    # The signed identity says the same, as a JSON list (identity_assertions.py).
    payload = seen["x-forwarded-identity"].split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["groups"] == ["Domain Users", "a,b", "eng"]

    # The route for ops: eng is not enough (the global list passes, the route's does not), said at sign-in.
    page = refused_login(eng_proxy, user, "/mcp/ops")
    assert "it is in none of the groups this server admits" in page.text


def test_a_user_without_the_group_is_refused_at_login(eng_proxy: RunningProxy, oidc_provider: OidcProvider) -> None:
    user = new_user(oidc_provider, groups=["sales"])
    page = refused_login(eng_proxy, user)
    assert page.status_code == 403
    assert f"{user}@example.net is not allowed to use this server" in page.text
    assert "it is in none of the groups this server admits" in page.text  # which ones is the operator's to say
    assert "error=access_denied" in page.text  # the link back to the client


@pytest.mark.parametrize(
    ("claims", "said"),
    [
        ({"groups": value}, said)
        for label, value, said in ODD_CLAIMS
        if label in ("a number", "a nested list", "a huge list", "a very long name", "a NUL", "a line break")
    ]
    + [
        (
            {"groups": ["eng"], "claimNames": {"groups": "src1"}, "claimSources": {"src1": {"endpoint": "https://x"}}},
            "overage",
        )
    ],
)
def test_groups_that_cannot_be_read_refuse_the_sign_in_and_say_why(
    eng_proxy: RunningProxy, oidc_provider: OidcProvider, caplog: pytest.LogCaptureFixture, claims: Any, said: str
) -> None:
    user = new_user(oidc_provider, **claims)
    with caplog.at_level(logging.WARNING, logger="oauthproxy.login"):
        page = refused_login(eng_proxy, user)
    assert "list of groups for this account could not be read" in page.text
    assert f"user {user}: the provider's groups cannot be read, sign-in refused" in caplog.text
    assert said in caplog.text


@pytest.mark.parametrize("value", ["eng", ["eng", "eng", "staff", "eng"]], ids=["a string", "duplicates"])
def test_a_lone_name_or_repeated_names_pass(eng_proxy: RunningProxy, oidc_provider: OidcProvider, value: Any) -> None:
    user = new_user(oidc_provider, groups=value)
    session = log_in(eng_proxy.url, eng_proxy.url + "/mcp/eng", login_hint=user)
    assert groups_from_column(grant_of(eng_proxy.app, session.access_token).user_groups) <= {"eng", "staff"}


def test_leaving_the_group_at_the_provider_ends_the_grant_at_the_next_refresh(
    eng_proxy: RunningProxy, oidc_provider: OidcProvider
) -> None:
    user = new_user(oidc_provider, groups=["eng"])
    url = eng_proxy.url + "/mcp/eng"
    session = log_in(eng_proxy.url, url, login_hint=user)
    first = session.client.refresh(session.refresh_token)
    assert first.status_code == 200, first.text  # still in eng: the provider was asked again, and said so

    oidc_provider.add_user(user, f"{user}@example.net", user.title(), groups=["sales"])
    response = session.client.refresh(first.json()["refresh_token"])
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant", response.text
    grant = grant_of(eng_proxy.app, session.access_token)
    assert grant.revoked_at is not None and grant.revoked_reason == "user_not_allowed"
    assert grant.user_groups == '["sales"]'  # stored with the provider's refreshed tokens


def test_groups_that_became_unreadable_end_the_grant(eng_proxy: RunningProxy, oidc_provider: OidcProvider) -> None:
    user = new_user(oidc_provider, groups=["eng"])
    session = log_in(eng_proxy.url, eng_proxy.url + "/mcp/eng", login_hint=user)
    oidc_provider.add_user(user, f"{user}@example.net", user.title(), groups=[["eng"]])
    response = session.client.refresh(session.refresh_token)
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant", response.text
    assert grant_of(eng_proxy.app, session.access_token).revoked_reason == "groups_unreadable"


def test_a_provider_that_cannot_answer_at_a_refresh_is_a_503_and_nothing_is_spent(
    eng_proxy: RunningProxy, provider_failure_reset: OidcProvider
) -> None:
    user = new_user(provider_failure_reset, groups=["eng"])
    session = log_in(eng_proxy.url, eng_proxy.url + "/mcp/eng", login_hint=user)
    provider_failure_reset.set_failure("refresh_server_error")
    response = session.client.refresh(session.refresh_token)
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "temporarily_unavailable" and response.headers["Retry-After"] == "10"
    provider_failure_reset.set_failure(None)
    assert session.client.refresh(session.refresh_token).status_code == 200  # the refresh token was not spent


def test_an_email_or_a_group_admits(start_proxy: Callable[..., RunningProxy], oidc_provider: OidcProvider) -> None:
    proxy = start_proxy(ALLOWED_EMAILS="bob@example.org", ALLOWED_GROUPS="eng")
    client = proxy.register_client()
    assert "code" in client.login(proxy.browser("alice"))  # in eng
    assert "code" in client.login(proxy.browser("bob"))  # listed by address, in no group
    with pytest.raises(AssertionError, match="403"):
        client.login(proxy.browser("carol"))  # neither


def test_github_organisations_through_the_proxy(
    start_proxy: Callable[..., RunningProxy], oidc_provider: OidcProvider, echo_downstream: EchoServer
) -> None:
    proxy = start_proxy(
        OAUTH_AUTHORIZE_URL=f"{oidc_provider.issuer}/auth",
        OAUTH_TOKEN_URL=f"{oidc_provider.issuer}/token",
        GITHUB_API_URL=oidc_provider.issuer,
        ALLOWED_GROUPS="org:acme",
        MCP_SERVER_URL=echo_downstream.url + "/mcp",
        DOWNSTREAM_GROUPS_HEADER="true",
    )
    alice = log_in(proxy.url, proxy.url + "/mcp", login_hint="alice")
    assert requests.post(proxy.url + "/mcp", headers=alice.bearer, json={}, timeout=5).status_code == 200
    assert echo_downstream.last().header("X-Forwarded-Groups") == "acme/platform,org:acme"
    # GitHub's OAuth apps issue no refresh token: a refresh asks GitHub again with the access token.
    assert alice.client.refresh(alice.refresh_token).status_code == 200
    with pytest.raises(AssertionError, match="403"):
        log_in(proxy.url, proxy.url + "/mcp", login_hint="bob")  # in no organisation


def test_too_many_groups_for_the_header_are_refused_not_cut(
    start_proxy: Callable[..., RunningProxy], oidc_provider: OidcProvider, echo_downstream: EchoServer
) -> None:
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp", DOWNSTREAM_GROUPS_HEADER="true")
    user = new_user(oidc_provider, groups=[f"{n:03d}-" + "g" * 100 for n in range(100)])  # about 10 KB
    session = log_in(proxy.url, proxy.url + "/mcp", login_hint=user)
    response = requests.post(proxy.url + "/mcp", headers=session.bearer, json={}, timeout=5)
    assert response.status_code == 403 and "too many groups" in response.json()["error_description"]
    assert echo_downstream.seen == []


def test_a_client_sent_groups_header_never_reaches_the_downstream(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp", DOWNSTREAM_GROUPS_HEADER="true")
    forged = {"X-Forwarded-Groups": "admins", "X_Forwarded_Groups": "admins"}
    bob = log_in(proxy.url, proxy.url + "/mcp", login_hint="bob")  # in no group
    assert requests.post(proxy.url + "/mcp", headers={**bob.bearer, **forged}, json={}, timeout=5).status_code == 200
    assert echo_downstream.last().all("X-Forwarded-Groups") == []
    assert not any("groups" in name for name in echo_downstream.last().names)
    alice = log_in(proxy.url, proxy.url + "/mcp", login_hint="alice")
    assert requests.post(proxy.url + "/mcp", headers={**alice.bearer, **forged}, json={}, timeout=5).status_code == 200
    assert echo_downstream.last().all("X-Forwarded-Groups") == ["eng,staff"]


@pytest.fixture(scope="module")
def short_lived_idp(start_oidc_provider: Callable[..., OidcProvider]) -> OidcProvider:
    """Access tokens of 30 s: within UPSTREAM_REFRESH_SKEW, so every forwarded request refreshes them first."""
    return start_oidc_provider(access_token_ttl=30)


def test_groups_are_refreshed_with_the_providers_tokens_at_the_mcp_endpoint(
    start_proxy: Callable[..., RunningProxy], short_lived_idp: OidcProvider, echo_downstream: EchoServer
) -> None:
    proxy = start_proxy(
        provider=short_lived_idp,
        MCP_SERVER_URL=echo_downstream.url + "/mcp",
        DOWNSTREAM_FORWARD_ACCESS_TOKEN="true",
        ALLOWED_GROUPS="eng",
        TOKEN_CACHE_TTL="0",  # every request reads the grant: what a cache entry's expiry leads to
    )
    user = new_user(short_lived_idp, groups=["eng"])
    session = log_in(proxy.url, proxy.url + "/mcp", login_hint=user)

    def call() -> requests.Response:
        return requests.post(proxy.url + "/mcp", headers=session.bearer, json={}, timeout=5)

    short_lived_idp.add_user(user, f"{user}@example.net", user.title(), groups=["eng", "ops"])
    assert call().status_code == 200
    assert grant_of(proxy.app, session.access_token).user_groups == '["eng", "ops"]'

    # Out of eng: the request whose refresh learns it is refused, and the grant is over.
    short_lived_idp.add_user(user, f"{user}@example.net", user.title(), groups=["ops"])
    refused = call()
    assert refused.status_code == 401 and "no longer allowed" in refused.json()["error_description"]
    grant = grant_of(proxy.app, session.access_token)
    assert (grant.revoked_reason, grant.user_groups) == ("user_not_allowed", '["ops"]')

    # Groups that can no longer be read end the grant at the refresh.
    other = new_user(short_lived_idp, groups=["eng"])
    session = log_in(proxy.url, proxy.url + "/mcp", login_hint=other)
    short_lived_idp.add_user(other, f"{other}@example.net", other.title(), groups={"eng": True})
    assert call().status_code == 401
    assert grant_of(proxy.app, session.access_token).revoked_reason == "groups_unreadable"


def test_groups_wait_with_the_login_through_the_connect_step(start_connect_proxy: Callable[..., ConnectProxy]) -> None:
    connect = start_connect_proxy("user_api_key", allowed_groups=["eng"], groups_header=True)
    client, browser = connect.client(), connect.browser()
    page_url = to_connect_page(connect, client, browser)  # alice, in eng: on to the key page
    response = submit_key(browser, page_url, "sk-test-" + "k" * 40)
    assert response.status_code == 302, response.text[:800]
    token = client.exchange(query_of(response.headers["Location"])["code"])
    assert token.status_code == 200, token.text
    # The groups were sealed with the pending login and stored with the grant once the key was given.
    assert grant_of(connect.proxy.app, token.json()["access_token"]).user_groups == '["eng", "staff"]'
    page = refused_login(connect.proxy, "bob", ROUTE_PATH)  # in no group: refused before any key is asked
    assert "it is in none of the groups this server admits" in page.text


def test_the_account_page_admits_by_group(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(ALLOWED_GROUPS="eng")
    browser = account_browser(proxy, "alice")  # in eng, and not listed by address
    assert "Signed in as" in browser.session.get(proxy.url + "/account", timeout=15).text
    with pytest.raises(AssertionError, match="403"):  # the account page refuses bob, in no group
        account_browser(proxy, "bob")


def test_tool_rules_by_group(
    start_proxy: Callable[..., RunningProxy], mcp_downstream: McpDownstream, tmp_path: Path
) -> None:
    rules = [{"allow": ["whoami"], "groups": ["eng"]}, {"deny": ["whoami"]}, {"allow": ["*"]}]
    routes = write_routes(
        tmp_path / "routes.toml", [{"name": "t", "path": "/mcp/t", "url": mcp_downstream.url, "tool_rules": rules}]
    )
    proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=routes)  # no allowlist: the rules alone read groups
    url = proxy.url + "/mcp/t"

    async def tools_of(login: Login) -> set[str]:
        async with (
            httpx2.AsyncClient(headers=login.bearer, timeout=30) as http,
            Client(streamable_http_client(url, http_client=http)) as client,
        ):
            return {tool.name for tool in (await client.list_tools()).tools}

    assert "whoami" in anyio.run(tools_of, log_in(proxy.url, url, login_hint="alice"))  # in eng
    assert "whoami" not in anyio.run(tools_of, log_in(proxy.url, url, login_hint="bob"))  # in no group
