"""Unit tests of the URL rules (oauthproxy/urls.py): loopback, the redirect-URI policy, resource and origin forms."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oauthproxy.config import load_settings
from oauthproxy.urls import (
    SHOWN_TARGET_LENGTH,
    MalformedURL,
    canonical_resource,
    is_loopback_host,
    normalise_origin,
    redirect_target,
    redirect_uri_problem,
    split_url,
)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("localhost", True),
        ("LocalHost", True),
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("127.255.255.254", True),
        ("::1", True),
        ("[::1]", True),
        ("[0:0:0:0:0:0:0:1]", True),
        # Not loopback: the unspecified address, IPv4-mapped spellings, short forms, look-alike names.
        ("0.0.0.0", False),
        ("[::]", False),
        ("::ffff:127.0.0.1", False),
        ("[::ffff:127.0.0.1]", False),
        ("127.1", False),
        ("2130706433", False),
        ("0x7f.0.0.1", False),
        ("foo.localhost", False),
        ("localhost.", False),
        ("127.0.0.1.attacker.example", False),
        ("localhost.attacker.example", False),
        ("", False),
        ("[::1", False),
        # IPv6 zone ids, in every spelling: the address is loopback, the spelling is refused.
        ("[::1%25eth0]", False),
        ("::1%25eth0", False),
        ("[::1%eth0]", False),
        ("[::1%251]", False),
        ("[::1%2525eth0]", False),
        ("[0:0:0:0:0:0:0:1%25lo]", False),
        ("[::1%25]", False),
        ("[::1%25ETH0]", False),
    ],
)
def test_one_definition_of_loopback(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


@pytest.mark.parametrize(
    "uri",
    [
        "https://client.example.test/cb",
        "http://127.0.0.1:33418/",
        "http://127.0.0.2:9/cb",
        "http://[::1]:9/cb",
        "http://localhost/cb",
        "cursor://anysphere.cursor-retrieval/oauth/user-mcp/callback",
        "vscode://cb",
        "com.example.app:/oauth2redirect",
    ],
)
def test_redirect_uris_allowed_by_default(uri: str) -> None:
    assert redirect_uri_problem(uri) is None


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("javascript:alert(1)", "never allowed"),
        ("JavaScript://%0aalert(1)", "never allowed"),
        ("data:text/html,hi", "never allowed"),
        ("file:///etc/passwd", "never allowed"),
        ("vbscript:msgbox(1)", "never allowed"),
        ("about:blank", "never allowed"),
        ("blob:https://x/1", "never allowed"),
        ("http://evil.example/cb", "not loopback"),
        ("http://0.0.0.0:9/cb", "not loopback"),
        ("http://[::ffff:127.0.0.1]:9/cb", "not loopback"),
        ("http://127.0.0.1.attacker.example/cb", "not loopback"),
        ("https://accounts.google.com@evil.example/cb", "user name or password"),
        ("http://user@127.0.0.1:9/cb", "user name or password"),
        ("cursor://me@cb/x", "user name or password"),
        ("https://client.example.test/cb#frag", "fragment"),
        ("cursor://cb#x", "fragment"),
        ("https://evil.example%40accounts.google.com/cb", "not a plain DNS name"),
        ("https://evil.example%2F@x/cb", "user name or password"),
        ("https://-x.example/cb", "not a plain DNS name"),
        ("https:///cb", "no host"),
        ("/relative/cb", "no scheme"),
        ("cb", "no scheme"),
        ("http://[::1", "not a well-formed URL"),
        ("http://127.0.0.1:99999/cb", "not a well-formed URL"),
        ("http://127.0.0.1:x/cb", "not a well-formed URL"),
        ("ftp://client.example.test/cb", "ftp: scheme"),
        ("wss://client.example.test/cb", "wss: scheme"),
        ("https://client.example.test/caf\u00e9", "non-ASCII"),
        ("https://client.example.test/a b", "spaces"),
        ("", "non-empty string"),
        (42, "non-empty string"),
        ("http://[::1%25eth0]/cb", "zone id"),
        ("http://[::1%eth0]:9/cb", "zone id"),
        ("HTTP://[::1%25ETH0]/cb", "zone id"),
        ("http://[::1%2525eth0]/cb", "zone id"),
        ("http://[0:0:0:0:0:0:0:1%25lo]:8080/cb", "zone id"),
        ("http://[::1%251]/cb", "zone id"),
        ("https://[fe80::1%25eth0]/cb", "zone id"),
        ("https://[2001:db8::1%25en0]:443/cb", "zone id"),
    ],
)
def test_redirect_uris_never_allowed(uri: object, why: str) -> None:
    problem = redirect_uri_problem(uri)
    assert problem is not None and why in problem


def test_private_use_schemes_may_be_restricted() -> None:
    assert redirect_uri_problem("cursor://cb", frozenset()) is not None
    assert redirect_uri_problem("cursor://cb", frozenset({"cursor"})) is None
    assert "allowed: vscode:" in (redirect_uri_problem("cursor://cb", frozenset({"vscode"})) or "")
    # The restriction is about private-use schemes: https and loopback http stay allowed.
    assert redirect_uri_problem("https://client.example.test/cb", frozenset()) is None
    assert redirect_uri_problem("http://127.0.0.1:9/cb", frozenset()) is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", None),
        ("true", None),
        ("yes", None),
        ("false", frozenset()),
        ("0", frozenset()),
        ("cursor,vscode", frozenset({"cursor", "vscode"})),
        ("Cursor://", frozenset({"cursor"})),
    ],
)
def test_allow_custom_redirect_schemes_setting(value: str, expected: frozenset[str] | None) -> None:
    env = {
        "OAUTH_CLIENT_ID": "x",
        "OAUTH_CLIENT_SECRET": "y",
        "OAUTH_AUTHORIZE_URL": "https://idp.example.test",
        "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
        "ENCRYPTION_KEY": "A" * 43 + "=",
        "ALLOW_CUSTOM_REDIRECT_SCHEMES": value,
    }
    assert load_settings(env).private_use_redirect_schemes == expected


@pytest.mark.parametrize("value", ["javascript", "https", "cursor,data", "not a scheme!"])
def test_allow_custom_redirect_schemes_refuses_schemes_that_are_not_private_use(value: str) -> None:
    env = {
        "OAUTH_CLIENT_ID": "x",
        "OAUTH_CLIENT_SECRET": "y",
        "OAUTH_AUTHORIZE_URL": "https://idp.example.test",
        "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
        "ENCRYPTION_KEY": "A" * 43 + "=",
        "ALLOW_CUSTOM_REDIRECT_SCHEMES": value,
    }
    with pytest.raises(Exception, match="ALLOW_CUSTOM_REDIRECT_SCHEMES"):
        load_settings(env)


@pytest.mark.parametrize(
    ("uri", "target"),
    [
        ("http://127.0.0.1:33418/cb", "127.0.0.1:33418"),
        ("https://client.example.test/cb?x=1", "client.example.test"),
        ("cursor://anysphere.cursor-retrieval/oauth/user-mcp/callback", "the app that handles cursor:// links"),
        ("com.example.app:/oauth2redirect", "the app that handles com.example.app: links"),
        ("https://accounts.google.com@evil.example/cb", "evil.example"),  # never the user part, should one slip by
    ],
)
def test_redirect_target_says_where_the_user_goes(uri: str, target: str) -> None:
    assert redirect_target(uri) == target


def test_redirect_target_is_cut_to_what_a_page_can_show() -> None:
    """A URI may have 2048 characters. A host keeps its end (where the user really goes), a scheme its start (the
    reverse-DNS owner) and end."""
    host = "accounts.google.com." + "x" * 200 + ".evil.example:8443"
    shown = redirect_target(f"https://{host}/cb")
    assert len(shown) == SHOWN_TARGET_LENGTH and shown.startswith("…") and shown.endswith(".evil.example:8443")
    assert "google" not in shown
    scheme = "com.example." + "a" * 2000 + ".app"
    shown = redirect_target(f"{scheme}:/cb")
    app = shown.removeprefix("the app that handles ").removesuffix(" links")
    assert len(app) == SHOWN_TARGET_LENGTH and app.startswith("com.example.aaa") and app.endswith("aaa.app:")
    assert "…" in app
    exact = "com.example." + "a" * (SHOWN_TARGET_LENGTH - len("com.example.") - 1)  # 64 with its colon: not cut
    assert redirect_target(f"{exact}:/cb") == f"the app that handles {exact}: links"


@pytest.mark.parametrize("url", ["http://[::1", "http://[::1]:x/", "https://h:65536/", "http://[zz]/"])
def test_malformed_urls_raise_a_named_error(url: str) -> None:
    with pytest.raises(MalformedURL, match="not a well-formed URL"):
        split_url(url)
    # The comparison forms never raise: a malformed value simply matches nothing served here.
    assert canonical_resource(url) == url
    assert normalise_origin(url) == url.lower()


def test_canonical_resource_and_origin_forms() -> None:
    assert canonical_resource(" HTTPS://MCP.Example.com/mcp/?x=1 ") == "https://mcp.example.com/mcp"
    assert normalise_origin("HTTP://LocalHost:6274") == "http://localhost:6274"
    assert normalise_origin("null") == "null"


# --- properties: whatever the input, the rules answer; they never raise --------------------------------------------

URL_ALPHABET = st.sampled_from(list("abc019:/?#[]@%.-_~!$&'()*+,;= \\\"<>\x00\x7f\u00e9")) | st.characters()
URLS = st.one_of(
    st.text(URL_ALPHABET, max_size=60),
    st.builds(
        lambda scheme, rest: f"{scheme}:{rest}",
        st.sampled_from(["http", "https", "HTTP", "cursor", "javascript", "data", "com.example.app", "x"]),
        st.text(URL_ALPHABET, max_size=50),
    ),
)


@settings(max_examples=500, deadline=None)
@given(URLS)
def test_url_rules_never_raise(url: str) -> None:
    problem = redirect_uri_problem(url)
    assert problem is None or isinstance(problem, str)
    assert isinstance(redirect_target(url), str)
    assert isinstance(canonical_resource(url), str) and isinstance(normalise_origin(url), str)
    if problem is None:
        # What the policy allows is absolute, has no fragment and no user part, and is http(s) only with a host.
        parts = split_url(url)
        assert "#" not in url and "@" not in parts.netloc and parts.scheme
        if parts.scheme.lower() == "http":
            assert is_loopback_host(parts.hostname or "")
