"""An attacker's review of the URL, allowlist and grant rules through the running proxy: each test is a hole that was open."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import requests

from oauthproxy.allowlists import email_is_allowed
from tests.conftest import RunningProxy
from tests.flows import query_of
from tests.support.databases import SQLITE_ONLY

#: Refusals that store nothing run on one database.


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    yield
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info], caplog.text[-3000:]


def get(url: str, **headers: str) -> requests.Response:
    return requests.get(url, allow_redirects=False, timeout=10, headers=headers)


@SQLITE_ONLY
@pytest.mark.parametrize(
    "redirect_uri",
    [
        "https://client.example.test/cb\u00e9",
        'https://client.example.test/cb"',
        "https://client.example.test\\cb",
        "https://client.example.test/cb\r\nSet-Cookie: x=1",
        "https://client.example.test/cb\x00",
    ],
    ids=["non-ascii", "quote", "backslash", "crlf", "nul"],
)
def test_an_unregistered_redirect_uri_with_any_character_is_a_page_not_a_500(
    proxy: RunningProxy, redirect_uri: str, no_tracebacks
) -> None:
    """Authlib quotes the requested redirect URI in its error and raised ValueError on these: an HTML 500."""
    client = proxy.register_client(redirect_uri="https://client.example.test/cb")
    response = get(client.authorize_url(redirect_uri=redirect_uri))
    assert response.status_code == 400 and "Location" not in response.headers, response.text[:300]
    assert "redirect_uri is not one this client registered" in response.text
    response = get(client.authorize_url(redirect_uri=redirect_uri), Accept="application/json")
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"


@SQLITE_ONLY
@pytest.mark.parametrize(
    "response_type",
    ["cod\u00e9", 'code"', "code\\", "\u0441ode"],
    ids=["non-ascii", "quote", "backslash", "cyrillic-lookalike"],
)
def test_an_unsupported_response_type_with_any_character_is_an_error_redirect(
    proxy: RunningProxy, response_type: str, no_tracebacks
) -> None:
    client = proxy.register_client(redirect_uri="https://client.example.test/cb")
    response = get(client.authorize_url(response_type=response_type))
    assert response.status_code == 302, response.text[:300]
    result = query_of(response.headers["Location"])
    assert result["error"] == "unsupported_response_type" and result["state"] == client.state


@pytest.mark.parametrize("email", ["\u212aate@example.test", "kate@\u212aexample.test"], ids=["local-part", "domain"])
def test_a_unicode_letter_that_lower_cases_to_ascii_does_not_pass_an_allowlist(email: str) -> None:
    """KELVIN SIGN lower-cases to `k`: a provider vouching for `\u212aate@...` vouches for another mailbox."""
    assert not email_is_allowed(email, frozenset({"kate@example.test"}), frozenset())
    assert not email_is_allowed(email, frozenset(), frozenset({"kexample.test"}))
    assert email_is_allowed("KATE@Example.TEST", frozenset({"kate@example.test"}), frozenset())


@SQLITE_ONLY
@pytest.mark.parametrize(
    "redirect_uri",
    [
        "search:query=invoice&crumb=location:%5C%5Cevil.example%5Cshare",  # search-ms under its other name
        "SEARCH:query=x",
        "ms-officecmd:%7B%22id%22:3%7D",
        "ms-word:ofe%7Cu%7Chttps://evil.example/doc.docx",
        "shell:startup",
        "ms-its:mhtml:file://evil.example/x.chm::/x.htm",
        "itms-services://?action=download-manifest",
    ],
    ids=["search", "search-upper", "ms-officecmd", "ms-word", "shell", "ms-its", "itms-services"],
)
def test_a_dangerous_handler_under_another_name_is_never_a_redirect_uri(proxy: RunningProxy, redirect_uri: str) -> None:
    """search-ms was refused but `search:`, the same handler, was registered and named on the consent page."""
    response = requests.post(
        proxy.url + "/register",
        timeout=10,
        json={"client_name": "x", "redirect_uris": [redirect_uri], "token_endpoint_auth_method": "none"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_redirect_uri"
    assert "never allowed" in response.json()["error_description"]


def test_access_token_expiry_is_judged_on_the_database_clock(
    start_proxy: Callable[..., RunningProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The expiry is stamped by the database; an instance whose clock runs 2 minutes ahead refused every fresh
    token of a 60 s lifetime as expired (and one running behind kept accepting expired ones as long)."""
    from oauthproxy import resource_server

    proxy = start_proxy(ACCESS_TOKEN_TTL="60")
    client = proxy.register_client()
    tokens = client.exchange(client.login(proxy.browser())["code"]).json()
    real = time.time
    monkeypatch.setattr(resource_server, "time", SimpleNamespace(time=lambda: real() + 120, monotonic=time.monotonic))
    response = requests.post(
        proxy.url + "/mcp", json={}, timeout=10, headers={"Authorization": f"Bearer {tokens['access_token']}"}
    )
    # Past the token check: the downstream (a closed port) is what fails, not the token.
    assert response.status_code == 502, (response.status_code, response.text[:300])


@SQLITE_ONLY
@pytest.mark.parametrize(
    "requested",
    ["http://127.0.0.1:45123/callback#", "http://127.0.0.1:45123/callback#x"],
    ids=["empty-fragment", "fragment"],
)
def test_the_loopback_port_exception_does_not_relax_the_redirect_uri_policy(
    proxy: RunningProxy, requested: str
) -> None:
    """Any port on loopback (RFC 8252 section 7.3), but the URI is still one the policy accepts: no fragment."""
    client = proxy.register_client(redirect_uri="http://127.0.0.1:33418/callback")
    response = get(client.authorize_url(redirect_uri=requested))
    assert response.status_code == 400 and "Location" not in response.headers, response.text[:300]
