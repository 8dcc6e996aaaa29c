"""Bounded input on the authorization-server endpoints (issue 9): body caps answered 413, metadata field caps
answered invalid_client_metadata, gunicorn's header limits; nothing over a limit is stored."""

from __future__ import annotations

import json
import secrets
import select as io_select
import socket
from collections.abc import Callable

import pytest
import requests
from sqlalchemy import func, select

from oauthproxy import metadata_limits
from oauthproxy.client_metadata import ClientMetadataError, validate_metadata_document
from oauthproxy.endpoints import MAX_BODY_BYTES
from oauthproxy.models import OAuthClient, db
from tests.conftest import RunningProxy
from tests.flows import McpOAuthClient, hidden_inputs
from tests.proxy_fixtures import GunicornProxy
from tests.support.wire import content_length


def client_count(proxy: RunningProxy) -> int:
    with proxy.app.app_context():
        return db.session.scalar(select(func.count()).select_from(OAuthClient))


def registration(**changes: object) -> dict[str, object]:
    body: dict[str, object] = {
        "client_name": f"Limits {secrets.token_hex(6)}",
        "token_endpoint_auth_method": "none",
        "redirect_uris": ["http://127.0.0.1:33418/callback"],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
    }
    body.update(changes)
    return body


def assert_too_large(response: requests.Response) -> None:
    assert response.status_code == 413, (response.status_code, response.text[:300])
    assert response.headers["Content-Type"].startswith("application/json"), response.headers
    body = response.json()
    assert body["error"] == "invalid_request", body
    assert str(MAX_BODY_BYTES) in body["error_description"], body


# --- body size ----------------------------------------------------------------------------------------------------


def test_oversized_registration_is_413_and_not_stored(proxy: RunningProxy) -> None:
    before = client_count(proxy)
    body = json.dumps(registration(client_name="x" * (4 * 1024 * 1024)))
    response = requests.post(
        proxy.url + "/register", data=body, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert_too_large(response)
    assert client_count(proxy) == before


def test_registration_padded_with_unknown_fields_over_the_cap_is_413(proxy: RunningProxy) -> None:
    before = client_count(proxy)
    response = requests.post(proxy.url + "/register", json=registration(padding="p" * MAX_BODY_BYTES), timeout=30)
    assert_too_large(response)
    assert client_count(proxy) == before


@pytest.mark.parametrize("path", ["/token", "/revoke", "/authorize/consent"])
def test_oversized_form_is_413(proxy: RunningProxy, path: str) -> None:
    response = requests.post(
        proxy.url + path, data={"grant_type": "refresh_token", "x": "y" * (MAX_BODY_BYTES + 1)}, timeout=30
    )
    assert_too_large(response)


def test_many_part_multipart_form_is_413(proxy: RunningProxy) -> None:
    fields = {f"f{n}": (None, "v") for n in range(200)}  # well under the byte cap, over the parts cap
    response = requests.post(proxy.url + "/token", files=fields, timeout=30)
    assert response.status_code == 413, response.text[:300]
    assert response.json()["error"] == "invalid_request"


def test_real_consent_form_fits(proxy: RunningProxy) -> None:
    """The biggest legitimate body: the consent form with a long (URL-sized) state and scope."""
    client = proxy.register_client(client_name=f"Limits {secrets.token_hex(6)}")
    browser = proxy.browser()
    page = browser.session.get(client.authorize_url(state="s" * 1500), timeout=15)
    assert page.status_code == 200, page.text[:500]
    form = hidden_inputs(page.text)
    form["decision"] = "approve"
    response = browser.session.post(proxy.url + "/authorize/consent", data=form, allow_redirects=False, timeout=15)
    assert response.status_code in (302, 303), response.text[:500]


def chunked_post(proxy: GunicornProxy, path: str, content_type: str, total: int) -> tuple[int, bytes]:
    """POST up to `total` bytes of 'a' with chunked transfer coding, stopping as soon as an answer arrives (a server
    that closes with unread data resets the connection, which may discard an answer not yet read); its status and body.
    """
    host, port = proxy.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n".encode()
        )
        chunk = b"a" * 8192
        answer = b""
        try:
            for _ in range(total // len(chunk)):
                if io_select.select([sock], [], [], 0)[0]:
                    break
                sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            else:
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed between the check and this write: its answer may be waiting
        try:
            while b"\r\n\r\n" not in answer or len(answer.partition(b"\r\n\r\n")[2]) < content_length(
                answer, missing=1 << 30
            ):
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
        except OSError:
            pass  # reset after the answer: what was read is checked below
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head, "no answer before the connection closed"
    return int(head.split()[1]), body


def test_chunked_registration_over_the_cap_is_413_under_gunicorn(start_gunicorn: Callable[..., GunicornProxy]) -> None:
    """No Content-Length to refuse up front: the cap holds while the body streams in."""
    proxy = start_gunicorn()
    status, body = chunked_post(proxy, "/register", "application/json", 2 * 1024 * 1024)
    assert status == 413, body[:300]
    assert json.loads(body)["error"] == "invalid_request"


# --- gunicorn's request line and header limits ------------------------------------------------------------------------


def test_long_authorization_url_is_served(start_gunicorn: Callable[..., GunicornProxy]) -> None:
    """A URL client id (up to 2048 characters) plus redirect_uri, resource, state and PKCE does not fit in
    gunicorn's default 4094-byte request line; the proxy accepts request lines up to 8190 bytes."""
    proxy = start_gunicorn()
    client = McpOAuthClient.register(proxy.url, client_name=f"Limits {secrets.token_hex(6)}")
    response = requests.get(client.authorize_url(state="s" * 6000), timeout=15)
    assert response.status_code == 200, response.text[:300]
    assert 'action="/authorize/consent"' in response.text


def test_oversized_request_line_and_headers_are_refused(start_gunicorn: Callable[..., GunicornProxy]) -> None:
    proxy = start_gunicorn()
    assert requests.get(proxy.url + "/healthz", params={"q": "q" * 9000}, timeout=15).status_code in (400, 414)
    assert requests.get(proxy.url + "/healthz", headers={"X-Big": "b" * 9000}, timeout=15).status_code in (400, 431)
    many = {f"X-Header-{n}": "v" for n in range(120)}
    assert requests.get(proxy.url + "/healthz", headers=many, timeout=15).status_code in (400, 431)
    assert requests.get(proxy.url + "/healthz", timeout=15).status_code == 200


# --- registration metadata field caps ------------------------------------------------------------------------------

OVER_THE_CAPS = {
    "client_name": {"client_name": "n" * (metadata_limits.MAX_CLIENT_NAME_LENGTH + 1)},
    "redirect_uri_count": {
        "redirect_uris": [f"http://127.0.0.1:{9000 + n}/cb" for n in range(metadata_limits.MAX_REDIRECT_URIS + 1)]
    },
    "redirect_uri_length": {"redirect_uris": ["https://client.example/" + "p" * metadata_limits.MAX_URI_LENGTH]},
    "client_uri": {"client_uri": "https://client.example/" + "p" * metadata_limits.MAX_URI_LENGTH},
    "logo_uri": {"logo_uri": "https://client.example/" + "p" * metadata_limits.MAX_URI_LENGTH},
    "contacts_count": {"contacts": [f"a{n}@client.example" for n in range(metadata_limits.MAX_CONTACTS + 1)]},
    "contact_length": {"contacts": ["a" * metadata_limits.MAX_CONTACT_LENGTH + "@client.example"]},
    "scope": {"scope": "openid " * 200},
    "software_id": {"software_id": "s" * (metadata_limits.MAX_SHORT_STRING_LENGTH + 1)},
    "grant_types": {"grant_types": ["authorization_code"] * (metadata_limits.MAX_LIST_ITEMS + 1)},
    "jwks": {"jwks": {"keys": [{"kty": "oct", "k": "k" * metadata_limits.MAX_JWKS_BYTES}]}},
}


@pytest.mark.parametrize("changes", OVER_THE_CAPS.values(), ids=OVER_THE_CAPS.keys())
def test_registration_field_over_its_cap_is_invalid_client_metadata(proxy: RunningProxy, changes: dict) -> None:
    before = client_count(proxy)
    response = requests.post(proxy.url + "/register", json=registration(**changes), timeout=15)
    assert response.status_code == 400, (response.status_code, response.text[:300])
    body = response.json()
    assert body["error"] == "invalid_client_metadata", body
    assert "client_id" not in body
    assert client_count(proxy) == before


# What real clients send (captured from their registrations); each must fit comfortably.
REAL_REGISTRATIONS = {
    "vscode": {
        "client_name": "Visual Studio Code",
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token", "urn:ietf:params:oauth:grant-type:device_code"],
        "response_types": ["code"],
        "redirect_uris": ["http://127.0.0.1:33418", "https://vscode.dev/redirect"],
    },
    "claude-code": {
        "client_name": "Claude Code (oauthproxy)",
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "redirect_uris": ["http://localhost:53127/callback"],
    },
    "inspector": {
        "client_name": "MCP Inspector",
        "client_uri": "https://github.com/modelcontextprotocol/inspector",
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "scope": "openid email profile",
        "redirect_uris": ["http://localhost:6274/oauth/callback/debug", "http://localhost:6274/oauth/callback"],
    },
}


@pytest.mark.parametrize("body", REAL_REGISTRATIONS.values(), ids=REAL_REGISTRATIONS.keys())
def test_real_client_registrations_fit_the_caps(body: dict) -> None:
    assert metadata_limits.metadata_size_problem(body) is None
    assert len(json.dumps(body)) * 8 < MAX_BODY_BYTES


def test_metadata_document_field_over_its_cap_is_refused() -> None:
    """The same caps hold for client metadata documents."""
    client_id = "https://client.example/oauth/client.json"
    document = {
        "client_id": client_id,
        "client_name": "n" * (metadata_limits.MAX_CLIENT_NAME_LENGTH + 1),
        "redirect_uris": ["http://127.0.0.1:33418/callback"],
        "token_endpoint_auth_method": "none",
    }
    with pytest.raises(ClientMetadataError) as refused:
        validate_metadata_document(client_id, document)
    assert refused.value.error == "invalid_client_metadata"
    assert "client_name is longer than 200 characters" in refused.value.description
    document["client_name"] = "Example"
    document["redirect_uris"] = [
        f"http://127.0.0.1:{9000 + n}/cb" for n in range(metadata_limits.MAX_REDIRECT_URIS + 1)
    ]
    with pytest.raises(ClientMetadataError) as refused:
        validate_metadata_document(client_id, document)
    assert "redirect_uris lists 21 entries; at most 20 are accepted" in refused.value.description
