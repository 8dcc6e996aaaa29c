"""The connect pages in Debian's chromium, used with the keyboard alone: Enter on the key page sends the key (never
Cancel), a refused key is announced and the field is ready again, Continue leads through the downstream's sign-in."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Page, expect

from tests.connect_fixtures import ConnectProxy, mcp_initialize
from tests.flows import McpOAuthClient
from tests.interop_fixtures import RedirectListener
from tests.support.databases import SQLITE_ONLY

pytestmark = SQLITE_ONLY  # pages; what is stored is checked on both databases in test_connect_flow.py


def open_connect_page(connect: ConnectProxy, page: Page, listener: RedirectListener) -> McpOAuthClient:
    """Authorize in chromium (approve, the first provider signs Alice in) up to the connect page."""
    client = McpOAuthClient.register(connect.url, redirect_uri=listener.redirect_uri, client_name="Browser Client")
    page.goto(client.authorize_url(resource=connect.resource))
    page.get_by_role("button", name="Approve").click()
    page.wait_for_url(connect.url + "/connect/*")
    return client


def assert_client_can_use(connect: ConnectProxy, client: McpOAuthClient, listener: RedirectListener) -> None:
    assert listener.arrived.wait(15), "the client never got its redirect"
    result = listener.last()
    assert result["state"] == client.state, result
    response = client.exchange(result["code"])
    assert response.status_code == 200, response.text
    assert mcp_initialize(connect, response.json()["access_token"]).status_code == 200


def test_key_page_works_with_the_keyboard(
    start_connect_proxy, page: Page, redirect_listener: RedirectListener, artifacts_dir: Path
) -> None:
    connect = start_connect_proxy(
        "user_api_key", credential_header="X-API-Key", api_key_help_url="https://keys.example.test/help"
    )
    client = open_connect_page(connect, page, redirect_listener)
    expect(page.get_by_role("heading", level=1)).to_have_text("This MCP server needs your API key")
    key_field = page.get_by_label("API key")
    expect(key_field).to_be_focused()
    expect(key_field).to_have_attribute("type", "password")
    expect(page.get_by_role("link", name="How to get your API key")).to_have_attribute(
        "href", "https://keys.example.test/help"
    )
    page.screenshot(path=str(artifacts_dir / "connect-api-key.png"), full_page=True)

    # A key with a line break cannot be typed into a one-line field; one far too long can be pasted.
    page.keyboard.insert_text("k" * 5000)
    page.keyboard.press("Enter")
    expect(page.get_by_role("alert")).to_contain_text("longer than 4096 characters")
    key_field = page.get_by_label("API key")
    expect(key_field).to_be_focused()
    expect(key_field).to_have_value("")  # never echoed back
    expect(key_field).to_have_attribute("aria-invalid", "true")
    page.screenshot(path=str(artifacts_dir / "connect-api-key-refused.png"), full_page=True)

    page.keyboard.type("sk-browser-key")
    page.keyboard.press("Enter")  # the key form's own button, not Cancel
    assert_client_can_use(connect, client, redirect_listener)
    [connection] = connect.connections()
    assert connect.connection_secret(connection) == "sk-browser-key"


def test_cancel_is_reachable_by_keyboard(start_connect_proxy, page: Page, redirect_listener: RedirectListener) -> None:
    connect = start_connect_proxy("user_api_key", credential_header="X-API-Key")
    client = open_connect_page(connect, page, redirect_listener)
    # The field takes focus once the page has loaded (autofocus); Tab before that would start from the document.
    expect(page.get_by_label("API key")).to_be_focused()
    page.keyboard.press("Tab")  # from the key field to Cancel
    expect(page.get_by_role("button", name="Cancel")).to_be_focused()
    page.keyboard.press("Enter")
    assert redirect_listener.arrived.wait(15)
    result = redirect_listener.last()
    assert (result["error"], result["state"]) == ("access_denied", client.state)
    assert connect.connections() == []


def test_oauth_connect_page_works_with_the_keyboard(
    start_connect_proxy, page: Page, redirect_listener: RedirectListener, artifacts_dir: Path
) -> None:
    connect = start_connect_proxy("oauth")
    client = open_connect_page(connect, page, redirect_listener)
    expect(page.get_by_role("heading", level=1)).to_contain_text("This MCP server needs you to sign in to")
    continue_button = page.get_by_role("button", name="Continue to")
    expect(continue_button).to_be_focused()
    page.screenshot(path=str(artifacts_dir / "connect-oauth.png"), full_page=True)
    page.keyboard.press("Enter")  # to the second provider, which signs Alice in, and back
    assert_client_can_use(connect, client, redirect_listener)
    [connection] = connect.connections()
    assert connection.kind == "oauth"
