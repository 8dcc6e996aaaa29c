"""Bad input at /callback: missing, unknown, reused, expired or cross-browser upstream states are pages, not logins."""

from __future__ import annotations

from datetime import timedelta
from urllib.parse import urlencode

import pytest
from sqlalchemy import update

from oauthproxy.models import Grant, PendingAuthorization, db, utcnow
from tests.bad_input_fixtures import (
    assert_garbage_never_causes_a_server_error,
    assert_page,
    callback_url,
    consent_form,
    count,
    get,
    new_client,
)
from tests.conftest import RunningProxy
from tests.flows import query_of

# --- /callback -------------------------------------------------------------------------------------------------------


def test_callback_without_state_is_a_page(proxy: RunningProxy) -> None:
    before = count(proxy, Grant)
    assert_page(get(proxy.url + "/callback?code=whatever"))
    assert_page(get(proxy.url + "/callback"))
    assert count(proxy, Grant) == before


@pytest.mark.parametrize(
    "query",
    [{"code": "x", "state": "unknown"}, {"error": "access_denied", "state": "unknown"}, {"code": "x", "state": ""}],
)
def test_callback_with_unknown_state_is_a_page(proxy: RunningProxy, query: dict[str, str]) -> None:
    before = count(proxy, Grant)
    assert_page(get(proxy.url + "/callback?" + urlencode(query)))
    assert count(proxy, Grant) == before


def test_callback_state_is_single_use(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    browser = proxy.browser()
    url = callback_url(proxy, client, browser)
    first = get(url, browser.session)
    assert first.status_code == 302 and first.headers["Location"].startswith(client.redirect_uri)
    assert "code" in query_of(first.headers["Location"])
    before = count(proxy, Grant)
    assert_page(get(url, browser.session))
    assert count(proxy, Grant) == before


def test_callback_in_another_browser_is_a_page(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    url = callback_url(proxy, client, proxy.browser())
    other = proxy.browser()
    consent_form(proxy, new_client(proxy), other)  # a browser with a session of its own
    before = count(proxy, Grant)
    assert_page(get(url, other.session), text="another browser")
    assert_page(get(url))  # no cookies at all
    assert count(proxy, Grant) == before


def test_callback_for_expired_pending_login_is_a_page(proxy: RunningProxy) -> None:
    client = new_client(proxy)
    browser = proxy.browser()
    url = callback_url(proxy, client, browser)
    with proxy.app.app_context():
        db.session.execute(
            update(PendingAuthorization)
            .where(PendingAuthorization.client_id == client.client_id)
            .values(expires_at=utcnow() - timedelta(seconds=1))
        )
        db.session.commit()
    before = count(proxy, Grant)
    assert_page(get(url, browser.session), text="expired")
    assert count(proxy, Grant) == before


@pytest.mark.parametrize("path", ["/callback"])  # the garbage sweep of tests.bad_input_fixtures, at this endpoint
def test_garbage_never_causes_a_server_error(sweep_proxy: RunningProxy, path: str) -> None:
    assert_garbage_never_causes_a_server_error(sweep_proxy, path)
