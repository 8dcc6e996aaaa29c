"""Malformed URLs anywhere a request carries one get a clear 4xx, never a 500 with a traceback."""

from __future__ import annotations

import logging

import pytest
import requests

from tests.conftest import RunningProxy
from tests.flows import Browser, McpOAuthClient, query_of
from tests.support.databases import SQLITE_ONLY

pytestmark = SQLITE_ONLY  # nothing here is stored

MALFORMED = ["http://[::1", "http://[::1/mcp", "https://127.0.0.1:99999/mcp", "http://h:x/", "http://[zz]/"]


@pytest.fixture
def no_tracebacks(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.INFO)
    yield
    assert "Traceback" not in caplog.text and not [r for r in caplog.records if r.exc_info], caplog.text[-3000:]


@pytest.mark.parametrize("url", MALFORMED)
def test_malformed_resource_at_authorize_is_invalid_target(proxy: RunningProxy, url: str, no_tracebacks) -> None:
    client = proxy.register_client()
    response = requests.get(client.authorize_url(resource=url), allow_redirects=False, timeout=10)
    assert response.status_code == 302, (response.status_code, response.text[:500])
    assert query_of(response.headers["Location"])["error"] == "invalid_target"


@pytest.mark.parametrize("url", MALFORMED)
def test_malformed_resource_at_token_is_invalid_target(proxy: RunningProxy, url: str, no_tracebacks) -> None:
    client = proxy.register_client()
    code = client.login(Browser(proxy.url))["code"]
    response = requests.post(
        proxy.url + "/token",
        timeout=10,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": client.redirect_uri,
            "client_id": client.client_id,
            "code_verifier": client.verifier,
            "resource": url,
        },
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_target"


@pytest.mark.parametrize("url", MALFORMED)
def test_malformed_redirect_uri_at_authorize_is_a_page(proxy: RunningProxy, url: str, no_tracebacks) -> None:
    client = proxy.register_client()
    response = requests.get(client.authorize_url(redirect_uri=url), allow_redirects=False, timeout=10)
    assert response.status_code == 400 and "Location" not in response.headers
    assert response.headers["Content-Type"].startswith("text/html")


@pytest.mark.parametrize("origin", MALFORMED)
def test_malformed_origin_on_the_mcp_endpoint_is_forbidden(proxy: RunningProxy, origin: str, no_tracebacks) -> None:
    response = requests.post(proxy.url + "/mcp", json={}, headers={"Origin": origin}, timeout=10)
    assert response.status_code == 403, response.text
    assert response.json()["error"] == "forbidden_origin"


@pytest.mark.parametrize("url", MALFORMED)
def test_malformed_redirect_uri_at_registration_is_invalid_redirect_uri(
    proxy: RunningProxy, url: str, no_tracebacks
) -> None:
    response = requests.post(proxy.url + "/register", timeout=10, json={"redirect_uris": [url]})
    assert response.status_code == 400 and response.json()["error"] == "invalid_redirect_uri", response.text


@pytest.mark.parametrize("field", ["client_uri", "logo_uri", "tos_uri", "policy_uri", "jwks_uri"])
@pytest.mark.parametrize("url", MALFORMED[:2])
def test_malformed_metadata_url_at_registration_is_invalid_client_metadata(
    proxy: RunningProxy, field: str, url: str, no_tracebacks
) -> None:
    response = requests.post(
        proxy.url + "/register", timeout=10, json={"redirect_uris": ["http://127.0.0.1:9/cb"], field: url}
    )
    assert response.status_code == 400 and response.json()["error"] == "invalid_client_metadata", response.text


@pytest.mark.parametrize("client_id", MALFORMED)
def test_malformed_url_client_id_at_authorize_is_a_page(proxy: RunningProxy, client_id: str, no_tracebacks) -> None:
    client = McpOAuthClient(proxy.url, client_id)
    response = requests.get(client.authorize_url(), allow_redirects=False, timeout=10)
    assert response.status_code in (400, 401) and "Location" not in response.headers, response.text[:500]
