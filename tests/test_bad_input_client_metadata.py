"""Bad input through Client ID Metadata Documents: wrong, unreachable or private-address documents are pages."""

from __future__ import annotations

import socket
from html import unescape

import pytest

from tests.bad_input_fixtures import (
    assert_page,
    document_client,
    get,
)
from tests.conftest import RunningProxy
from tests.flows import McpOAuthClient
from tests.support.databases import SQLITE_ONLY
from tests.support.ports import free_port
from tests.support.servers import JsonDocumentServer

# --- Client ID Metadata Documents ------------------------------------------------------------------------------------


@SQLITE_ONLY
def test_metadata_document_naming_another_client_id_is_a_page(
    dev_proxy: RunningProxy, document_server: JsonDocumentServer
) -> None:
    client = document_client(
        dev_proxy, document_server, client_id=f"http://127.0.0.1:{document_server.server_port}/oauth/someone-else.json"
    )
    response = get(client.authorize_url())
    assert_page(response, text="client_id")
    assert document_server.hits >= 1


@SQLITE_ONLY
def test_metadata_document_redirect_uri_not_listed_is_a_page(
    dev_proxy: RunningProxy, document_server: JsonDocumentServer
) -> None:
    client = document_client(dev_proxy, document_server)
    assert get(client.authorize_url()).status_code == 200  # the document itself is fine
    assert_page(get(client.authorize_url(redirect_uri="http://127.0.0.1:9/elsewhere")))
    assert_page(get(client.authorize_url(redirect_uri="https://attacker.example/cimd-callback")))


@SQLITE_ONLY
def test_unreachable_metadata_document_is_a_page_naming_the_problem(dev_proxy: RunningProxy) -> None:
    closed_port = free_port()
    client_id = f"http://127.0.0.1:{closed_port}/oauth/client.json"
    client = McpOAuthClient(dev_proxy.url, client_id, redirect_uri="http://127.0.0.1:9/cimd-callback")
    response = get(client.authorize_url())
    assert_page(response, text=client_id)
    assert "could not connect" in unescape(response.text), response.text[:1500]


@SQLITE_ONLY
@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "169.254.169.254", "10.0.0.1", "0.0.0.0"])
def test_metadata_document_on_a_private_address_is_refused_without_fetching(proxy: RunningProxy, host: str) -> None:
    """With CLIENT_METADATA_ALLOW_PRIVATE_NETWORKS off, https URLs that resolve to non-public addresses are refused
    before any connection (SSRF guard)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.settimeout(0.5)
        port = listener.getsockname()[1]
        client_id = f"https://{host}:{port}/oauth/client.json"
        client = McpOAuthClient(proxy.url, client_id, redirect_uri="http://127.0.0.1:9/cimd-callback")
        response = get(client.authorize_url())
        assert_page(response, text="Refusing to fetch")
        # Not a DNS oracle: the page does not say what the host resolves to, nor what kind of address it is.
        page = unescape(response.text).replace(client_id, "")
        assert "resolves to" not in page and "loopback" not in page and "private" not in page, page[:1500]
        if host == "localhost":
            assert "127.0.0.1" not in page and "::1" not in page
        with pytest.raises(TimeoutError):
            listener.accept()  # nothing connected


@SQLITE_ONLY
def test_http_metadata_document_is_not_fetched_in_production(
    proxy: RunningProxy, document_server: JsonDocumentServer
) -> None:
    client = document_client(proxy, document_server)
    assert_page(get(client.authorize_url()))
    assert document_server.hits == 0
