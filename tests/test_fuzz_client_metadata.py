"""Property-based fuzzing of client metadata documents (issue 9): documents served on loopback, fetched by the
proxy's fetcher and used as a URL client id at /authorize.

Whatever a document holds: the fetcher accepts it or refuses it with ClientMetadataError (nothing else escapes); an
accepted document fits the same field caps and redirect-URI rules as dynamic registration; /authorize never answers
5xx, never logs a traceback, and redirects only to a redirect URI that those rules allow.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from oauthproxy.client_metadata import ClientMetadataError, ClientMetadataFetcher
from oauthproxy.clients import redirect_uri_problem
from oauthproxy.metadata_limits import metadata_size_problem
from tests.conftest import RunningProxy
from tests.flows import pkce_pair
from tests.fuzzing import FUZZ, UNLIMITED, client_metadata, json_values, tracebacks
from tests.support.servers import serving
from tests.test_client_metadata import DocumentServer, serve

_paths = itertools.count()


@pytest.fixture(scope="module")
def documents() -> Iterator[DocumentServer]:
    with serving(DocumentServer()) as server:
        yield server


@pytest.fixture
def cimd_proxy(start_proxy) -> RunningProxy:
    # Loopback documents over http are allowed only in development (private networks allowed).
    return start_proxy(CLIENT_METADATA_ALLOW_PRIVATE_NETWORKS="true", **UNLIMITED)


@FUZZ
@given(
    fields=client_metadata(),
    client_id_matches=st.sampled_from([True, True, True, False]),
    raw=st.sampled_from([None, None, None]) | st.binary(max_size=200) | json_values,
    pick=st.integers(min_value=0, max_value=30),
)
@example(
    fields={"client_name": "Evil", "redirect_uris": ["javascript:alert(1)"]}, client_id_matches=True, raw=None, pick=0
)
@example(
    fields={"client_name": "Evil", "redirect_uris": ["https://accounts.google.com@evil.example/cb"]},
    client_id_matches=True,
    raw=None,
    pick=0,
)
@example(fields={"client_name": "Evil", "redirect_uris": ["http://[::1"]}, client_id_matches=True, raw=None, pick=0)
def test_fuzz_metadata_documents(
    cimd_proxy: RunningProxy,
    documents: DocumentServer,
    caplog: pytest.LogCaptureFixture,
    fields: dict,
    client_id_matches: bool,
    raw: object,
    pick: int,
) -> None:
    caplog.clear()
    path = f"/fuzz/{next(_paths)}.json"
    client_id = f"http://127.0.0.1:{documents.port}{path}"
    document = {**fields, "client_id": client_id if client_id_matches else fields.get("client_uri", "x")}
    body = raw if isinstance(raw, bytes) else json.dumps(raw if raw is not None else document).encode()
    serve(documents, path, body)
    settings = cimd_proxy.app.config["SETTINGS"]

    accepted: dict | None
    try:
        accepted = ClientMetadataFetcher(allow_private_networks=True).fetch(client_id)
    except ClientMetadataError:
        accepted = None
    if accepted is not None:
        assert metadata_size_problem(accepted) is None, accepted
        for uri in accepted["redirect_uris"]:
            assert redirect_uri_problem(uri, settings) is None, ("a document may list", uri)

    uris = document.get("redirect_uris")
    redirect_uri = uris[pick % len(uris)] if isinstance(uris, list) and uris else fields.get("client_uri")
    _, challenge = pkce_pair()
    query = {
        "response_type": "code",
        "client_id": client_id,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "state": "st",
        "resource": cimd_proxy.url + "/mcp",
    }
    if isinstance(redirect_uri, str):
        query["redirect_uri"] = redirect_uri
    response = cimd_proxy.app.test_client().get("/authorize", query_string=query)
    assert response.status_code < 500, (response.status_code, response.get_data()[:500])
    if 300 <= response.status_code < 400:
        location = response.headers["Location"]
        assert isinstance(redirect_uri, str) and location.startswith(redirect_uri), (location, redirect_uri)
        assert redirect_uri_problem(redirect_uri, settings) is None, ("redirected to", redirect_uri)
    found = tracebacks(caplog.records)
    assert not found, found
