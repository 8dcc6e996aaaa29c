"""A real browser: Debian's chromium, driven by Playwright for Python, walks the consent page as a person would.

The browser reads the page, approves (or denies), goes through the real OpenID provider and lands on the client's
redirect URI, where a real loopback listener answers, as a native MCP client's would. Screenshots of what the
person saw go to the test artifacts (`test-artifacts/consent.png`, `test-artifacts/access-denied.png`).

Chromium comes from Debian (`scripts/install-test-deps` installs it when missing); Playwright never downloads a
browser here.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from playwright.sync_api import Page, expect

from tests.flows import McpOAuthClient, with_query
from tests.interop_fixtures import ON_INTEROP_DATABASE, RedirectListener, StartGunicorn
from tests.proxy_fixtures import GunicornProxy, McpDownstream

pytestmark = ON_INTEROP_DATABASE

SCOPES = ["openid", "email", "profile"]


@pytest.fixture(scope="module")
def browser_proxy(start_gunicorn: StartGunicorn, mcp_downstream: McpDownstream) -> Iterator[GunicornProxy]:
    # carol@outsider.test is outside the allowlist: the refusal page is part of what a person may see.
    proxy = start_gunicorn(MCP_SERVER_URL=mcp_downstream.url, ALLOWED_EMAIL_DOMAINS="example.com,example.org")
    yield proxy
    proxy.stop()


def register(proxy: GunicornProxy, listener: RedirectListener, name: str) -> McpOAuthClient:
    return McpOAuthClient.register(proxy.url, redirect_uri=listener.redirect_uri, client_name=name)


def provider_of(proxy: GunicornProxy) -> str:
    """The upstream OpenID provider's issuer this proxy signs people in with."""
    return proxy.env["OAUTH_AUTHORIZE_URL"]


def visited(requests_seen: list[str], prefix: str) -> list[str]:
    return [url for url in requests_seen if url.startswith(prefix)]


def test_a_person_reads_the_consent_page_approves_and_lands_on_the_redirect_uri(
    browser_proxy: GunicornProxy, page: Page, redirect_listener: RedirectListener, artifacts_dir: Path
) -> None:
    client = register(browser_proxy, redirect_listener, "Playwright Notes App")
    resource = browser_proxy.url + "/mcp"
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url))

    page.goto(client.authorize_url(resource=resource, scope=" ".join(SCOPES)))

    # What a person must see before deciding: who asks, where the answer goes, what it may do, for which server.
    expect(page.get_by_role("heading", level=1)).to_have_text("Allow Playwright Notes App to use this MCP server?")
    facts = page.locator("dl.facts")
    expect(facts).to_contain_text("Playwright Notes App")
    expect(facts).to_contain_text("name given by the application itself")  # DCR names are self-asserted
    redirect_host = f"127.0.0.1:{redirect_listener.server_port}"
    expect(page.locator(".redirect-host")).to_have_text(redirect_host)
    expect(facts).to_contain_text("an application on this computer")
    for scope in SCOPES:
        expect(page.locator("ul.scopes")).to_contain_text(scope)
    expect(facts).to_contain_text(resource)
    approve = page.get_by_role("button", name="Approve")
    deny = page.get_by_role("button", name="Deny")
    expect(approve).to_be_visible()
    expect(deny).to_be_visible()
    page.screenshot(path=str(artifacts_dir / "consent.png"), full_page=True)
    # The same page as people with a dark theme or a phone see it.
    page.emulate_media(color_scheme="dark")
    page.screenshot(path=str(artifacts_dir / "consent-dark.png"), full_page=True)
    page.emulate_media(color_scheme="light")
    page.set_viewport_size({"width": 390, "height": 844})
    expect(approve).to_be_in_viewport()
    page.screenshot(path=str(artifacts_dir / "consent-phone.png"), full_page=True)

    approve.click()
    page.wait_for_url(f"{redirect_listener.redirect_uri}?**")
    expect(page.locator("body")).to_contain_text("You can close this window.")

    answer = redirect_listener.last()
    assert answer["state"] == client.state and answer["iss"] == browser_proxy.url and answer["code"]
    assert visited(seen, provider_of(browser_proxy) + "/auth"), seen  # signed in upstream after approving

    # The client redeems the code and reaches the MCP server through the proxy.
    token = client.exchange(answer["code"])
    assert token.status_code == 200, token.text
    hello = {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "browser-test", "version": "1"},
    }
    initialize = requests.post(
        resource,
        timeout=10,
        json={"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": hello},
        headers={
            "Authorization": f"Bearer {token.json()['access_token']}",
            "Accept": "application/json, text/event-stream",
        },
    )
    assert initialize.status_code == 200 and "proxy-test-downstream" in initialize.text, initialize.text

    # The same person, the same client, later: approval is remembered, no consent page.
    consent_pages: list[str] = []
    page.on(
        "response",
        lambda response: (
            consent_pages.append(response.url)
            if response.url.startswith(browser_proxy.url + "/authorize") and response.status == 200
            else None
        ),
    )
    page.goto(client.authorize_url(resource=resource, scope=" ".join(SCOPES)))
    page.wait_for_url(f"{redirect_listener.redirect_uri}?**")
    assert consent_pages == []
    assert redirect_listener.last()["state"] == client.state and "code" in redirect_listener.last()


def test_a_person_denies_and_the_client_is_told_access_denied(
    browser_proxy: GunicornProxy, page: Page, redirect_listener: RedirectListener
) -> None:
    client = register(browser_proxy, redirect_listener, "Unknown Tool")
    seen: list[str] = []
    page.on("request", lambda request: seen.append(request.url))

    page.goto(client.authorize_url(resource=browser_proxy.url + "/mcp"))
    expect(page.get_by_role("heading", level=1)).to_contain_text("Unknown Tool")
    page.get_by_role("button", name="Deny").click()
    page.wait_for_url(f"{redirect_listener.redirect_uri}?**")

    answer = redirect_listener.last()
    assert answer["error"] == "access_denied" and answer["state"] == client.state
    assert answer["iss"] == browser_proxy.url and "code" not in answer
    assert not visited(seen, provider_of(browser_proxy)), "a denied request must never reach the provider"


def test_a_person_outside_the_allowlist_sees_why_and_returns_to_the_client(
    browser_proxy: GunicornProxy, page: Page, redirect_listener: RedirectListener, artifacts_dir: Path
) -> None:
    client = register(browser_proxy, redirect_listener, "Playwright Notes App")

    # Carol is already signed in at her identity provider, as people usually are. (Its login page is automatic
    # here; a login_hint picks the user. page.route cannot add one: redirected requests are not routed.)
    page.goto(
        with_query(
            provider_of(browser_proxy) + "/auth",
            client_id=browser_proxy.env["OAUTH_CLIENT_ID"],
            response_type="code",
            scope="openid",
            redirect_uri=browser_proxy.url + "/callback",
            state="signed-in-elsewhere",
            login_hint="carol",
        )
    )
    expect(page.get_by_role("heading", level=1)).to_have_text("Sign-in link expired")  # the proxy knows no such state

    page.goto(client.authorize_url(resource=browser_proxy.url + "/mcp"))
    page.get_by_role("button", name="Approve").click()

    expect(page.get_by_role("heading", level=1)).to_have_text("Access denied")
    expect(page.get_by_role("alert")).to_contain_text("carol@outsider.test is not allowed to use this server")
    back = page.get_by_role("link", name="Return to the application")
    expect(back).to_be_visible()
    page.screenshot(path=str(artifacts_dir / "access-denied.png"), full_page=True)

    back.click()
    page.wait_for_url(f"{redirect_listener.redirect_uri}?**")
    answer = redirect_listener.last()
    assert answer["error"] == "access_denied" and answer["state"] == client.state
    assert answer["iss"] == browser_proxy.url
