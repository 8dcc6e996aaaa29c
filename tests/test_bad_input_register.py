"""Bad input at /register: malformed or unsupported client metadata gets its RFC 7591 error and stores nothing."""

from __future__ import annotations

import secrets

import pytest
import requests

from oauthproxy.models import OAuthClient
from tests.bad_input_fixtures import (
    assert_garbage_never_causes_a_server_error,
    assert_register_error,
    count,
)
from tests.conftest import RunningProxy
from tests.support.databases import SQLITE_ONLY

# --- /register -------------------------------------------------------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"client_name=x&redirect_uris=http://127.0.0.1:9/cb", "application/x-www-form-urlencoded"),
        (b'{"redirect_uris": ["http://127.0.0.1:9/cb"]', "application/json"),
        (b'{"redirect_uris": ["http://127.0.0.1:9/cb"]}', "text/plain"),
        (b"", "application/json"),
        (b"\xff\xfe\x00garbage", "application/json"),
        (b"null", "application/json"),
        (b'"a string"', "application/json"),
        (b"42", "application/json"),
    ],
    ids=["form", "broken-json", "text-plain", "empty", "binary", "null", "string", "number"],
)
def test_register_with_non_json_object_body_is_invalid_client_metadata(
    proxy: RunningProxy, body: bytes, content_type: str
) -> None:
    before = count(proxy, OAuthClient)
    response = requests.post(proxy.url + "/register", data=body, headers={"Content-Type": content_type}, timeout=15)
    assert_register_error(response, "invalid_client_metadata")
    assert count(proxy, OAuthClient) == before


@SQLITE_ONLY
def test_register_with_json_array_is_invalid_client_metadata(proxy: RunningProxy) -> None:
    before = count(proxy, OAuthClient)
    response = requests.post(proxy.url + "/register", json=[{"redirect_uris": ["http://127.0.0.1:9/cb"]}], timeout=15)
    assert_register_error(response, "invalid_client_metadata")
    assert count(proxy, OAuthClient) == before


def register(proxy: RunningProxy, **metadata) -> requests.Response:
    body = {
        "client_name": f"Bad Input {secrets.token_hex(6)}",
        "redirect_uris": ["http://127.0.0.1:9/cb"],
        "token_endpoint_auth_method": "none",
        **metadata,
    }
    return requests.post(proxy.url + "/register", json={k: v for k, v in body.items() if v is not None}, timeout=15)


@SQLITE_ONLY
@pytest.mark.parametrize(
    "redirect_uris",
    [None, [], "http://127.0.0.1:9/cb", [42], [""], [None]],
    ids=["missing", "empty", "string", "number", "empty-string", "null"],
)
def test_register_without_usable_redirect_uris_is_invalid_redirect_uri(proxy: RunningProxy, redirect_uris) -> None:
    before = count(proxy, OAuthClient)
    response = register(proxy, redirect_uris=redirect_uris)
    expected = "invalid_redirect_uri" if redirect_uris in (None, []) else response.json().get("error")
    assert expected in ("invalid_redirect_uri", "invalid_client_metadata"), response.text
    assert_register_error(response, expected)
    assert count(proxy, OAuthClient) == before


@SQLITE_ONLY
@pytest.mark.parametrize(
    "uri",
    [
        "http://client.example.test/cb",
        "http://192.168.1.10/cb",
        "http://127.0.0.1.attacker.example/cb",
        "http://localhost.attacker.example/cb",
        "https:///cb",
        "/relative/cb",
        "javascript:alert(1)",
        "data:text/html,hi",
        "file:///etc/passwd",
        "ftp://client.example.test/cb",
        "http://client.example.test/caf\u00e9",
        'http://client.example.test/it\'s"quoted"\\',
    ],
    ids=[
        "http-host",
        "http-private-ip",
        "loopback-prefix-host",
        "localhost-prefix-host",
        "no-host",
        "relative",
        "javascript",
        "data",
        "file",
        "ftp",
        "non-ascii",
        "quotes-backslash",
    ],
)
def test_register_with_unsafe_redirect_uri_is_invalid_redirect_uri(proxy: RunningProxy, uri: str) -> None:
    before = count(proxy, OAuthClient)
    assert_register_error(register(proxy, redirect_uris=["http://127.0.0.1:9/ok", uri]), "invalid_redirect_uri")
    assert count(proxy, OAuthClient) == before


@SQLITE_ONLY
@pytest.mark.parametrize("uri", ["https://client.example.test/cb#frag", "http://127.0.0.1:9/cb#", "cursor://cb#x"])
def test_register_with_fragment_in_redirect_uri_is_invalid_redirect_uri(start_proxy, uri: str) -> None:
    proxy = start_proxy(ALLOW_CUSTOM_REDIRECT_SCHEMES="true")
    before = count(proxy, OAuthClient)
    assert_register_error(register(proxy, redirect_uris=[uri]), "invalid_redirect_uri")
    assert count(proxy, OAuthClient) == before


@SQLITE_ONLY
@pytest.mark.parametrize(
    "uri", ["cursor://anysphere.cursor-retrieval/oauth/callback", "vscode://cb", "com.example.app:/oauth2redirect"]
)
def test_register_private_use_scheme_is_refused_when_turned_off(start_proxy, uri: str) -> None:
    proxy = start_proxy(ALLOW_CUSTOM_REDIRECT_SCHEMES="false")
    before = count(proxy, OAuthClient)
    assert_register_error(register(proxy, redirect_uris=[uri]), "invalid_redirect_uri")
    assert count(proxy, OAuthClient) == before


def test_register_private_use_scheme_is_accepted_when_allowed(start_proxy) -> None:
    proxy = start_proxy(ALLOW_CUSTOM_REDIRECT_SCHEMES="true")
    response = register(proxy, redirect_uris=["cursor://anysphere.cursor-retrieval/oauth/callback"])
    assert response.status_code == 201, response.text
    assert response.json()["redirect_uris"] == ["cursor://anysphere.cursor-retrieval/oauth/callback"]
    # http on a public host stays refused even then
    assert_register_error(register(proxy, redirect_uris=["http://client.example.test/cb"]), "invalid_redirect_uri")


UNSUPPORTED_METADATA = [
    *(("token_endpoint_auth_method", method) for method in ["private_key_jwt", "client_secret_jwt", "tls_client_auth"]),
    ("token_endpoint_auth_method", "garbage"),
    ("token_endpoint_auth_method", 42),
    *(
        ("grant_types", grant_types)
        for grant_types in [
            ["password"],
            ["client_credentials"],
            ["implicit"],
            ["authorization_code", "password"],
            "authorization_code",
            [42],
        ]
    ),
    *(("response_types", response_types) for response_types in [["token"], ["code", "token"], ["id_token"], "code"]),
]


@SQLITE_ONLY
@pytest.mark.parametrize(("field", "value"), UNSUPPORTED_METADATA)
def test_register_unsupported_metadata_is_invalid_client_metadata(proxy: RunningProxy, field: str, value) -> None:
    """An authentication method, grant type or response type this server does not support."""
    before = count(proxy, OAuthClient)
    assert_register_error(register(proxy, **{field: value}), "invalid_client_metadata")
    assert count(proxy, OAuthClient) == before


@SQLITE_ONLY
@pytest.mark.parametrize(
    "metadata",
    [
        {"client_name": ["not", "a", "string"]},
        {"scope": 42},
        {"client_uri": "javascript:alert(1)"},
        {"logo_uri": "not a url"},
        {"jwks": []},
        {"jwks": "x"},
        {"jwks": 1},
        {"jwks": {}},
        {"jwks": {"keys": "x"}},
        {"jwks": {"keys": [1]}},
        {"jwks": {"keys": [{}]}},
    ],
    ids=[
        "name-list",
        "scope-number",
        "client-uri-javascript",
        "logo-uri-garbage",
        "jwks-list",
        "jwks-string",
        "jwks-number",
        "jwks-no-keys",
        "jwks-keys-string",
        "jwks-keys-number",
        "jwks-key-empty",
    ],
)
def test_register_with_ill_typed_metadata_is_invalid_client_metadata(proxy: RunningProxy, metadata: dict) -> None:
    before = count(proxy, OAuthClient)
    assert_register_error(register(proxy, **metadata), "invalid_client_metadata")
    assert count(proxy, OAuthClient) == before


@SQLITE_ONLY
def test_register_with_a_null_jwks_is_invalid_client_metadata(proxy: RunningProxy) -> None:
    """Found by the registration fuzzer: `"jwks": null` was a 500 (Authlib reads it as a JWK Set)."""
    before = count(proxy, OAuthClient)
    response = requests.post(
        proxy.url + "/register",
        timeout=15,
        json={"redirect_uris": ["http://127.0.0.1:9/cb"], "token_endpoint_auth_method": "none", "jwks": None},
    )
    assert_register_error(response, "invalid_client_metadata")
    assert count(proxy, OAuthClient) == before


def test_identical_public_registrations_share_one_client(proxy: RunningProxy) -> None:
    name = f"Re-registering Client {secrets.token_hex(6)}"
    before = count(proxy, OAuthClient)
    first = register(proxy, client_name=name)
    second = register(proxy, client_name=name)
    assert first.status_code == second.status_code == 201, (first.text, second.text)
    assert first.json()["client_id"] == second.json()["client_id"]
    assert count(proxy, OAuthClient) == before + 1


def test_registration_is_rate_limited_per_address(start_proxy) -> None:
    proxy = start_proxy(REGISTER_RATE_LIMIT="3 per minute")
    for _ in range(3):
        assert register(proxy).status_code == 201
    before = count(proxy, OAuthClient)
    limited = register(proxy)
    assert limited.status_code == 429, limited.text
    assert int(limited.headers["Retry-After"]) > 0
    assert limited.json()["error"]
    assert count(proxy, OAuthClient) == before


@pytest.mark.parametrize("auth_method", ["none", "client_secret_basic", "client_secret_post", None])
def test_successful_registration_is_201_with_issued_at(proxy: RunningProxy, auth_method: str | None) -> None:
    response = register(proxy, token_endpoint_auth_method=auth_method)
    assert response.status_code == 201, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["Cache-Control"] == "no-store"
    body = response.json()
    assert body["client_id"] and isinstance(body["client_id_issued_at"], int)
    if auth_method == "none":
        assert "client_secret" not in body
    else:
        assert body["token_endpoint_auth_method"] == (auth_method or "client_secret_basic")
        assert len(body["client_secret"]) >= 32
        assert body.get("client_secret_expires_at", 0) == 0


@pytest.mark.parametrize("path", ["/register"])  # the garbage sweep of tests.bad_input_fixtures, at this endpoint
def test_garbage_never_causes_a_server_error(sweep_proxy: RunningProxy, path: str) -> None:
    assert_garbage_never_causes_a_server_error(sweep_proxy, path)
