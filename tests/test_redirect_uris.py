"""One redirect-URI policy for dynamic registration and client metadata documents, through the running proxy."""

from __future__ import annotations

import re
from html import unescape

import pytest
import requests

from oauthproxy.models import OAuthClient
from oauthproxy.urls import SHOWN_TARGET_LENGTH
from tests.bad_input_fixtures import assert_page, assert_register_error, count, document_client, get
from tests.conftest import RunningProxy
from tests.flows import McpOAuthClient
from tests.support.databases import SQLITE_ONLY
from tests.support.servers import JsonDocumentServer

# Input checks that store nothing run on one database (the refusals are checked not to add a row).
pytestmark = SQLITE_ONLY

CURSOR = "cursor://anysphere.cursor-retrieval/oauth/user-mcp/callback"

UNSAFE = {
    "javascript": "javascript:alert(document.domain)//",
    "data": "data:text/html,<script>alert(1)</script>",
    "file": "file:///etc/passwd",
    "http-public-host": "http://evil.example/cb",
    "userinfo": "https://accounts.google.com@evil.example/cb",
    "fragment": "https://client.example.test/cb#x",
    "malformed": "http://[::1/cb",
    "ftp": "ftp://client.example.test/cb",
    "ipv6-zone-id": "http://[::1%25eth0]:9/cb",
}


def register(proxy: RunningProxy, *redirect_uris: str) -> requests.Response:
    return requests.post(
        proxy.url + "/register",
        timeout=10,
        json={"client_name": "Policy Test", "redirect_uris": list(redirect_uris), "token_endpoint_auth_method": "none"},
    )


@pytest.mark.parametrize("uri", list(UNSAFE.values()), ids=list(UNSAFE))
def test_registration_and_metadata_documents_refuse_the_same_redirect_uris(
    dev_proxy: RunningProxy, document_server: JsonDocumentServer, uri: str
) -> None:
    before = count(dev_proxy, OAuthClient)
    assert_register_error(register(dev_proxy, "http://127.0.0.1:9/ok", uri), "invalid_redirect_uri")
    assert count(dev_proxy, OAuthClient) == before

    client = document_client(dev_proxy, document_server, redirect_uris=["http://127.0.0.1:9/cimd-callback", uri])
    for redirect_uri in ("http://127.0.0.1:9/cimd-callback", uri):
        response = get(client.authorize_url(redirect_uri=redirect_uri))
        assert_page(response, 400)
        text = unescape(response.text)
        assert "Sends you back" not in text and "Approve" not in text
        assert "lists redirect URI" in text, text[:2000]  # the page names the document's fault


def test_consent_never_shows_a_userinfo_host(dev_proxy: RunningProxy, document_server: JsonDocumentServer) -> None:
    """The attack in the report: the consent page said "Sends you back to accounts.google.com@evil.example"."""
    uri = UNSAFE["userinfo"]
    client = document_client(dev_proxy, document_server, redirect_uris=[uri])
    response = get(client.authorize_url(redirect_uri=uri))
    assert response.status_code == 400
    assert "accounts.google.com@evil.example" not in response.text.split("lists redirect URI")[0]


def consent_page_of_new_client(proxy: RunningProxy, uri: str) -> str:
    """Register a client with this one redirect URI and open its consent page: the page's HTML."""
    response = register(proxy, uri)
    assert response.status_code == 201, response.text
    assert response.json()["redirect_uris"] == [uri]
    client = McpOAuthClient(proxy.url, response.json()["client_id"], redirect_uri=uri)
    page = get(client.authorize_url())
    assert page.status_code == 200, page.text[:1000]
    return page.text


def test_cursor_registers_and_is_named_on_the_consent_page_by_default(proxy: RunningProxy) -> None:
    assert "the app that handles cursor:// links" in unescape(consent_page_of_new_client(proxy, CURSOR))


def test_rfc_8252_example_form_registers_and_is_named_on_the_consent_page(proxy: RunningProxy) -> None:
    """`com.example.app:/oauth2redirect/example-provider` (RFC 8252 §7.1's own example: no `//`, so no host):
    Authlib's registration check asked for a host and refused it with "Invalid claim: 'redirect_uris'"."""
    page = consent_page_of_new_client(proxy, "com.example.app:/oauth2redirect/example-provider")
    assert "the app that handles com.example.app: links" in unescape(page)


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        (
            "com.example." + "a" * 1500 + ".app://oauth2redirect",
            ("the app that handles com.example.aaa", "aaa.app:// links"),
        ),
        ("https://accounts.google.com." + "x" * 1500 + ".evil.example/cb", ("…xxx", "xxx.evil.example")),
    ],
)
def test_consent_shows_a_long_scheme_or_host_cut_and_the_whole_uri_in_its_title(
    proxy: RunningProxy, uri: str, shown: tuple[str, str]
) -> None:
    """A registration cannot fill the consent page with its redirect target."""
    page = consent_page_of_new_client(proxy, uri)
    match = re.search(r'<strong class="redirect-host" title="([^"]*)">([^<]*)</strong>', page)
    assert match is not None, page[:2000]
    title, text = unescape(match[1]), unescape(match[2])
    assert title == uri
    assert text.startswith(shown[0]) and text.endswith(shown[1]) and "…" in text, text
    assert len(text) <= len("the app that handles  links") + SHOWN_TARGET_LENGTH


def test_metadata_document_with_a_private_use_scheme_works_by_default(
    dev_proxy: RunningProxy, document_server: JsonDocumentServer
) -> None:
    client = document_client(dev_proxy, document_server, redirect_uris=[CURSOR])
    page = get(client.authorize_url(redirect_uri=CURSOR))
    assert page.status_code == 200, page.text[:1000]
    assert "the app that handles cursor:// links" in unescape(page.text)


def test_private_use_schemes_can_be_turned_off_for_both_paths(start_proxy, document_server: JsonDocumentServer) -> None:
    proxy = start_proxy(CLIENT_METADATA_ALLOW_PRIVATE_NETWORKS="true", ALLOW_CUSTOM_REDIRECT_SCHEMES="false")
    assert_register_error(register(proxy, CURSOR), "invalid_redirect_uri")
    client = document_client(proxy, document_server, redirect_uris=[CURSOR])
    assert_page(get(client.authorize_url(redirect_uri=CURSOR)), 400, "ALLOW_CUSTOM_REDIRECT_SCHEMES")
    # https and loopback stay allowed
    assert register(proxy, "https://client.example.test/cb", "http://[::1]:9/cb").status_code == 201


def test_private_use_schemes_can_be_restricted_to_a_list(start_proxy) -> None:
    proxy = start_proxy(ALLOW_CUSTOM_REDIRECT_SCHEMES="vscode")
    assert register(proxy, "vscode://vscode.github-authentication/did-authenticate").status_code == 201
    assert_register_error(register(proxy, CURSOR), "invalid_redirect_uri")


@pytest.mark.parametrize("requested", ["http://[::1/cb", "http://127.0.0.1:99999/cb", "http://127.0.0.1:x/cb"])
def test_malformed_redirect_uri_at_authorize_is_a_page_not_a_500(proxy: RunningProxy, requested: str) -> None:
    client = proxy.register_client(redirect_uri="http://127.0.0.1:9/cb")
    assert_page(get(client.authorize_url(redirect_uri=requested)), 400)
