"""Verified email only: an address the provider does not vouch for reaches no allowlist and no downstream."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import requests

from oauthproxy.allowlists import email_is_allowed
from tests.conftest import RunningProxy
from tests.proxy_fixtures import EchoServer, log_in

DOMAINS = frozenset({"example.test"})


@pytest.mark.parametrize(
    ("email", "allowed"),
    [
        ("mallory@example.test", True),
        ("Mallory@Example.TEST", True),  # domains compare case-insensitively
        (" mallory@example.test ", True),
        ("mallory@evil.example@example.test", False),  # two @: no address, whatever follows the last one
        ("mallory@example.test@evil.example", False),
        ("@example.test", False),
        ("example.test", False),
        ("mallory@sub.example.test", False),  # a domain is matched exactly, not its subdomains
        ("mallory@example.test.evil.example", False),
        ("", False),
        (None, False),
    ],
)
def test_domain_allowlist_needs_exactly_one_at(email: str | None, allowed: bool) -> None:
    assert email_is_allowed(email, frozenset(), DOMAINS) is allowed


def test_address_allowlist_compares_case_insensitively() -> None:
    assert email_is_allowed("Boss@Other.ORG", frozenset({"boss@other.org"}), frozenset())
    assert not email_is_allowed("boss@other.org@evil.example", frozenset({"boss@other.org"}), frozenset())


@pytest.mark.parametrize("login_hint", ["dave", "erin"])  # email_verified false, and absent
def test_unverified_email_is_neither_allowed_nor_forwarded(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, login_hint: str
) -> None:
    guarded = start_proxy(ALLOWED_EMAIL_DOMAINS="example.com")
    client = guarded.register_client()
    with pytest.raises(AssertionError, match="403"):
        client.login(guarded.browser(login_hint))  # @example.com, but not vouched for

    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp")
    login = log_in(proxy.url, proxy.url + "/mcp", login_hint=login_hint)

    assert requests.post(proxy.url + "/mcp", headers=login.bearer, json={}, timeout=5).status_code == 200
    seen = echo_downstream.last()
    assert seen.header("X-Forwarded-User") == login_hint
    assert seen.header("X-Forwarded-Email") is None
