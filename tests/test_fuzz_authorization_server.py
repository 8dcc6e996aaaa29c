"""Property-based fuzzing of the authorization server (issue 9): /register bodies, /authorize and /token parameters.

Whatever is sent: never a 5xx, never a traceback in the log, never a registration stored beyond the caps, never a
redirect to a URI the client did not register, never a token without a valid grant. Requests go through the whole
application in process (Flask's test client), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import base64
import json
from urllib.parse import urlencode

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import func, select

from oauthproxy.clients import redirect_uri_problem
from oauthproxy.endpoints import MAX_BODY_BYTES
from oauthproxy.metadata_limits import metadata_size_problem
from oauthproxy.models import OAuthClient, db
from tests.conftest import RunningProxy
from tests.flows import pkce_pair
from tests.fuzzing import FUZZ, UNLIMITED, client_metadata, hostile_text, json_error, tracebacks, url_like


@pytest.fixture
def fuzz_proxy(start_proxy) -> RunningProxy:
    return start_proxy(**UNLIMITED)


def client_count(proxy: RunningProxy) -> int:
    return db.session.scalar(select(func.count()).select_from(OAuthClient))


def assert_no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    found = tracebacks(caplog.records)
    assert not found, found


raw_bodies = st.one_of(
    st.binary(max_size=512),
    st.sampled_from(
        [
            b"{",
            b"[]",
            b"null",
            b'{"redirect_uris": "http://127.0.0.1/cb"}',
            b"[" * 5000 + b"]" * 5000,
            b'{"a": ' * 2000 + b"1" + b"}" * 2000,
            b" " * (MAX_BODY_BYTES + 1),
            b'{"x": "\xff"}',
        ]
    ),
)


@FUZZ
@given(
    body=client_metadata(),
    raw=st.none() | raw_bodies,
    content_type=st.sampled_from(
        [
            "application/json",
            "application/json; charset=utf-8",
            "text/plain",
            "application/x-www-form-urlencoded",
            "",
            "application/JSON",
        ]
    ),
)
def test_fuzz_register(
    fuzz_proxy: RunningProxy, caplog: pytest.LogCaptureFixture, body: dict, raw: bytes | None, content_type: str
) -> None:
    caplog.clear()
    data = raw if raw is not None else json.dumps(body).encode()
    with fuzz_proxy.app.app_context():
        before = client_count(fuzz_proxy)
        response = fuzz_proxy.app.test_client().post("/register", data=data, headers={"Content-Type": content_type})
        assert response.status_code < 500, (response.status_code, response.get_data()[:500])
        answer = json_error(response.get_data())
        assert answer is not None, response.get_data()[:300]
        if response.status_code == 201:
            row = db.session.get(OAuthClient, answer["client_id"])
            assert row is not None
            stored = row.client_metadata
            assert metadata_size_problem(stored) is None, stored
            assert len(row.client_metadata_json) <= MAX_BODY_BYTES
            settings = fuzz_proxy.app.config["SETTINGS"]
            for uri in stored["redirect_uris"]:
                assert redirect_uri_problem(uri, settings.private_use_redirect_schemes) is None, uri
        else:
            assert answer.get("error"), answer
            assert client_count(fuzz_proxy) == before
        db.session.remove()
    assert_no_traceback(caplog)


AUTHORIZE_PARAMS = [
    "response_type",
    "client_id",
    "redirect_uri",
    "code_challenge",
    "code_challenge_method",
    "state",
    "scope",
    "resource",
    "prompt",
    "nonce",
    "request",
    "request_uri",
    "response_mode",
]


def authorize_queries() -> st.SearchStrategy[list[tuple[str, str]]]:
    """Query parameters: each known one absent, real, or hostile, sometimes repeated; plus strangers."""
    pair = st.tuples(st.sampled_from(AUTHORIZE_PARAMS) | hostile_text(12), url_like() | hostile_text())
    return st.lists(pair, max_size=14)


@FUZZ
@given(changes=authorize_queries(), keep=st.sets(st.sampled_from(AUTHORIZE_PARAMS)))
def test_fuzz_authorize(
    fuzz_proxy: RunningProxy, caplog: pytest.LogCaptureFixture, changes: list[tuple[str, str]], keep: set[str]
) -> None:
    caplog.clear()
    client = registered_client(fuzz_proxy)
    _, challenge = pkce_pair()
    valid = {
        "response_type": "code",
        "client_id": client["client_id"],
        "redirect_uri": client["redirect_uris"][0],
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": "st",
        "resource": fuzz_proxy.url + "/mcp",
        "scope": "openid",
    }
    query = [(name, value) for name, value in valid.items() if name in keep] + changes
    response = fuzz_proxy.app.test_client().get("/authorize", query_string=query)
    assert response.status_code < 500, (response.status_code, response.get_data()[:500])
    if 300 <= response.status_code < 400:
        location = response.headers["Location"]
        # An error goes back to the client only at a URI it registered; anything else is a page, never a redirect
        # (a remembered consent would send the browser to the provider, but this test client has no cookie).
        assert any(
            location.startswith(uri + "?") or location.startswith(uri + "&") for uri in client["redirect_uris"]
        ), location
    assert_no_traceback(caplog)


def registered_client(proxy: RunningProxy) -> dict:
    """One public and one confidential client per proxy, registered once."""
    clients = proxy.app.extensions.setdefault("fuzz_clients", {})
    if not clients:
        for method in ("none", "client_secret_basic"):
            response = proxy.app.test_client().post(
                "/register",
                json={
                    "client_name": f"Fuzz {method}",
                    "token_endpoint_auth_method": method,
                    "redirect_uris": ["http://127.0.0.1:33418/callback", "https://client.example/cb"],
                },
            )
            assert response.status_code == 201, response.get_data()
            clients[method] = response.get_json()
    return clients["none"]


TOKEN_PARAMS = [
    "grant_type",
    "code",
    "redirect_uri",
    "code_verifier",
    "refresh_token",
    "client_id",
    "client_secret",
    "scope",
    "resource",
    "token",
    "token_type_hint",
]


def basic_headers() -> st.SearchStrategy[dict[str, str]]:
    credentials = st.builds(lambda a, b: base64.b64encode(f"{a}:{b}".encode()).decode(), hostile_text(), hostile_text())
    return st.one_of(
        st.just({}),
        credentials.map(lambda c: {"Authorization": f"Basic {c}"}),
        hostile_text()
        .filter(lambda v: v.isascii() and "\r" not in v and "\n" not in v)
        .map(lambda v: {"Authorization": f"Basic {v}"}),
        hostile_text()
        .filter(lambda v: v.isascii() and "\r" not in v and "\n" not in v)
        .map(lambda v: {"Authorization": v}),
    )


@FUZZ
@given(
    path=st.sampled_from(["/token", "/revoke"]),
    params=st.lists(
        st.tuples(
            st.sampled_from(TOKEN_PARAMS) | hostile_text(12),
            st.sampled_from(["authorization_code", "refresh_token", "client_credentials", "password"])
            | url_like()
            | hostile_text(),
        ),
        max_size=12,
    ),
    use_client=st.sampled_from(["none", "client_secret_basic", None]),
    headers=basic_headers(),
    raw=st.none() | raw_bodies,
)
def test_fuzz_token_and_revoke(
    fuzz_proxy: RunningProxy,
    caplog: pytest.LogCaptureFixture,
    path: str,
    params: list[tuple[str, str]],
    use_client: str | None,
    headers: dict[str, str],
    raw: bytes | None,
) -> None:
    caplog.clear()
    registered_client(fuzz_proxy)
    if use_client is not None:
        client = fuzz_proxy.app.extensions["fuzz_clients"][use_client]
        params = [("client_id", client["client_id"]), *params]
    data = raw if raw is not None else urlencode(params).encode()
    response = fuzz_proxy.app.test_client().post(
        path, data=data, headers={**headers, "Content-Type": "application/x-www-form-urlencoded"}
    )
    assert response.status_code < 500, (response.status_code, response.get_data()[:500])
    body = json_error(response.get_data())
    if path == "/token":
        assert body is not None and body.get("error"), (response.status_code, response.get_data()[:300])
        assert "access_token" not in body and "refresh_token" not in body
    assert_no_traceback(caplog)


@pytest.mark.parametrize("path", ["/token", "/revoke"])
@pytest.mark.parametrize("header", ["Basic", "Basic ", "basic   "])
def test_basic_scheme_without_credentials_is_invalid_client(proxy: RunningProxy, path: str, header: str) -> None:
    """Found by the fuzzer: `Authorization: Basic` with nothing after it was a 500 from Authlib's parser."""
    response = proxy.app.test_client().post(
        path, data={"token": "x", "grant_type": "refresh_token"}, headers={"Authorization": header}
    )
    assert response.status_code == 401, response.get_data()[:300]
    assert response.get_json()["error"] == "invalid_client"
