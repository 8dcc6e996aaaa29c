"""What a person sees on the consent page for a desktop app's private-use redirect URI, in Debian's chromium."""

from __future__ import annotations

from pathlib import Path

import requests
from playwright.sync_api import Page, expect

from tests.conftest import RunningProxy
from tests.flows import McpOAuthClient
from tests.support.databases import SQLITE_ONLY

pytestmark = SQLITE_ONLY  # a page, no storage checks

CURSOR = "cursor://anysphere.cursor-retrieval/oauth/user-mcp/callback"


def test_consent_page_names_the_app_behind_a_private_use_scheme(
    proxy: RunningProxy, page: Page, artifacts_dir: Path
) -> None:
    response = requests.post(
        proxy.url + "/register",
        timeout=10,
        json={"client_name": "Cursor", "redirect_uris": [CURSOR], "token_endpoint_auth_method": "none"},
    )
    assert response.status_code == 201, response.text
    client = McpOAuthClient(proxy.url, response.json()["client_id"], redirect_uri=CURSOR)

    page.goto(client.authorize_url())

    expect(page.get_by_role("heading", level=1)).to_have_text("Allow Cursor to use this MCP server?")
    expect(page.locator(".redirect-host")).to_have_text("the app that handles cursor:// links")
    facts = page.locator("dl.facts")
    expect(facts).to_contain_text("an application installed on this device")
    expect(facts).not_to_contain_text("an application on this computer")  # that note is for loopback http
    expect(page.get_by_role("button", name="Approve")).to_be_visible()
    page.screenshot(path=str(artifacts_dir / "consent-private-use-scheme.png"), full_page=True)
