"""The downstream peers of issue 13 behave like real ones: an MCP server doing its own OAuth at its own provider
(found through RFC 9728, tokens checked by introspection, revocation seen at once), and one checking per-user keys.
"""

from __future__ import annotations

from typing import Any

import anyio
import httpx2
import requests
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.downstream_auth_fixtures import (
    DOWNSTREAM_SCOPE,
    ApiKeyDownstream,
    ProtectedDownstream,
    ProviderClient,
    downstream_tokens,
    register_proxy_client,
    register_test_client,
)
from tests.provider_fixture import OidcProvider

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "peer-test", "version": "0"},
    },
}
MCP_ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


def initialize(url: str, headers: dict[str, str] | None = None) -> requests.Response:
    """One raw MCP `initialize` POST: what any client sends first."""
    return requests.post(url, json=INITIALIZE, headers={**MCP_ACCEPT, **(headers or {})}, timeout=10)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def call_whoami(url: str, headers: dict[str, str]) -> dict[str, Any]:
    """The MCP Python SDK client calls the `whoami` tool with these request headers; its structured result."""

    async def scenario() -> dict[str, Any]:
        async with (
            httpx2.AsyncClient(headers=headers, timeout=30) as http,
            Client(streamable_http_client(url, http_client=http)) as client,
        ):
            result = await client.call_tool("whoami", {})
            assert result.is_error is False, result
            assert isinstance(result.structured_content, dict)
            return result.structured_content

    return anyio.run(scenario)


def revoke(provider: OidcProvider, client: ProviderClient, token: str, hint: str) -> None:
    response = requests.post(
        provider.discovery()["revocation_endpoint"],
        data={"token": token, "token_type_hint": hint},
        auth=(client.client_id, client.client_secret),
        timeout=10,
    )
    assert response.status_code == 200, response.text


def test_without_a_token_it_answers_401_naming_its_metadata_which_names_its_provider(
    protected_downstream: ProtectedDownstream, downstream_provider: OidcProvider
) -> None:
    response = initialize(protected_downstream.url)
    assert response.status_code == 401
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert f'resource_metadata="{protected_downstream.metadata_url}"' in challenge

    metadata = requests.get(protected_downstream.metadata_url, timeout=10)
    assert metadata.status_code == 200
    document = metadata.json()
    assert document["resource"] == protected_downstream.resource
    assert document["authorization_servers"] == [downstream_provider.issuer]
    assert document["scopes_supported"] == [DOWNSTREAM_SCOPE]
    # What discovered mode needs from that authorization server: metadata with open registration.
    discovery = downstream_provider.discovery()
    assert discovery["issuer"] == downstream_provider.issuer
    assert discovery["registration_endpoint"] == f"{downstream_provider.issuer}/reg"
    assert "S256" in discovery["code_challenge_methods_supported"]


def test_a_token_its_provider_issued_for_it_lets_the_sdk_client_call_whoami_as_that_subject(
    protected_downstream: ProtectedDownstream, downstream_provider: OidcProvider
) -> None:
    client = register_test_client(downstream_provider)
    tokens = downstream_tokens(downstream_provider, client, resource=protected_downstream.resource, login_hint="bob")
    assert tokens["scope"].split() == [DOWNSTREAM_SCOPE] and tokens.get("refresh_token")

    caller = call_whoami(protected_downstream.url, bearer(tokens["access_token"]))

    assert caller == {
        "subject": "bob",
        "client_id": client.client_id,
        "scopes": [DOWNSTREAM_SCOPE],
        "audience": protected_downstream.resource,
        "issuer": downstream_provider.issuer,
    }
    checked = [event for event in protected_downstream.events() if event["event"] == "token_checked"]
    assert checked and all(event["active"] and event["subject"] == "bob" for event in checked[-2:])


def test_a_token_revoked_at_its_provider_is_refused_at_once(
    protected_downstream: ProtectedDownstream, downstream_provider: OidcProvider
) -> None:
    client = register_test_client(downstream_provider)
    tokens = downstream_tokens(downstream_provider, client, resource=protected_downstream.resource)
    assert initialize(protected_downstream.url, bearer(tokens["access_token"])).status_code == 200

    revoke(downstream_provider, client, tokens["access_token"], "access_token")

    refused = initialize(protected_downstream.url, bearer(tokens["access_token"]))
    assert refused.status_code == 401
    assert 'error="invalid_token"' in refused.headers["WWW-Authenticate"]
    assert protected_downstream.events()[-1]["refusal"] == "inactive"


def test_a_user_revoking_the_app_at_the_provider_ends_its_access_and_refresh_tokens(
    protected_downstream: ProtectedDownstream, downstream_provider: OidcProvider
) -> None:
    client = register_test_client(downstream_provider)
    tokens = downstream_tokens(downstream_provider, client, resource=protected_downstream.resource, login_hint="carol")
    assert initialize(protected_downstream.url, bearer(tokens["access_token"])).status_code == 200

    assert downstream_provider.revoke_grants("carol", client.client_id) == 1

    assert initialize(protected_downstream.url, bearer(tokens["access_token"])).status_code == 401
    refresh = requests.post(
        downstream_provider.discovery()["token_endpoint"],
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        auth=(client.client_id, client.client_secret),
        timeout=10,
    )
    assert refresh.status_code == 400 and refresh.json()["error"] == "invalid_grant"


def test_tokens_for_another_resource_for_none_or_not_access_tokens_are_refused(
    protected_downstream: ProtectedDownstream, downstream_provider: OidcProvider
) -> None:
    client = register_test_client(downstream_provider)
    elsewhere = downstream_tokens(downstream_provider, client, resource="http://127.0.0.1:9/mcp")
    unbound = downstream_tokens(downstream_provider, client, resource=None, scope="openid offline_access")
    good = downstream_tokens(downstream_provider, client, resource=protected_downstream.resource)

    for token, why in (
        (elsewhere["access_token"], "another audience"),
        (unbound["access_token"], "another audience"),
        (good["refresh_token"], "not an access token"),
        ("not-a-token", "inactive"),
    ):
        response = initialize(protected_downstream.url, bearer(token))
        assert response.status_code == 401, why
        assert protected_downstream.events()[-1]["refusal"] == why
    # The provider itself refuses a resource it does not serve (RFC 8707 §2: invalid_target).
    refused = requests.get(
        downstream_provider.discovery()["authorization_endpoint"],
        params={
            "response_type": "code",
            "client_id": client.client_id,
            "redirect_uri": client.redirect_uri,
            "scope": DOWNSTREAM_SCOPE,
            "resource": "https://api.example.com/mcp",
        },
        allow_redirects=False,
        timeout=10,
    )
    assert refused.status_code in (302, 303)
    assert "error=invalid_target" in refused.headers["Location"]


def test_a_client_registered_with_a_default_resource_gets_tokens_for_it_and_refreshes_keep_it(
    protected_downstream: ProtectedDownstream, downstream_provider: OidcProvider
) -> None:
    """What configured mode relies on: the proxy names no resource, its provider knows which server it is for."""
    client = register_proxy_client(
        downstream_provider, "http://127.0.0.1:9", default_resource=protected_downstream.resource
    )
    assert client.redirect_uri == "http://127.0.0.1:9/connect/callback"
    tokens = downstream_tokens(downstream_provider, client, resource=None, scope=f"openid {DOWNSTREAM_SCOPE}")
    assert call_whoami(protected_downstream.url, bearer(tokens["access_token"]))["subject"] == "alice"

    before = downstream_provider.stats()["refresh_requests"]
    refreshed = requests.post(
        downstream_provider.discovery()["token_endpoint"],
        data={"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
        auth=(client.client_id, client.client_secret),
        timeout=10,
    )
    assert refreshed.status_code == 200, refreshed.text
    assert downstream_provider.stats()["refresh_requests"] == before + 1
    new_token = refreshed.json()["access_token"]
    assert new_token != tokens["access_token"]
    assert call_whoami(protected_downstream.url, bearer(new_token))["audience"] == protected_downstream.resource


def test_a_dynamically_registered_client_gets_tokens_for_the_resource_it_names(
    protected_downstream: ProtectedDownstream, downstream_provider: OidcProvider
) -> None:
    """What discovered mode relies on: RFC 7591 registration, then `resource` in the authorization request."""
    before = downstream_provider.endpoint_stats()["registration_requests"]
    registration = requests.post(
        downstream_provider.discovery()["registration_endpoint"],
        json={
            "client_name": "oauthproxy",
            "redirect_uris": ["http://127.0.0.1:9/connect/callback"],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "client_secret_basic",
            "scope": f"{DOWNSTREAM_SCOPE} offline_access",  # from the resource's metadata, as MCP clients do
        },
        timeout=10,
    )
    assert registration.status_code == 201, registration.text
    assert downstream_provider.endpoint_stats()["registration_requests"] == before + 1
    body = registration.json()
    client = ProviderClient(body["client_id"], body["client_secret"], body["redirect_uris"][0])

    tokens = downstream_tokens(downstream_provider, client, resource=protected_downstream.resource, login_hint="bob")
    assert call_whoami(protected_downstream.url, bearer(tokens["access_token"]))["client_id"] == client.client_id


def test_the_api_key_server_knows_alice_by_her_key_and_refuses_any_other(
    api_key_downstream: ApiKeyDownstream,
) -> None:
    alice_key = api_key_downstream.keys["alice"]
    assert call_whoami(api_key_downstream.url, {"X-API-Key": alice_key}) == {"user": "alice"}
    assert call_whoami(api_key_downstream.url, {"X-API-Key": api_key_downstream.keys["bob"]}) == {"user": "bob"}

    for headers, reason in (
        ({}, "missing"),
        ({"X-API-Key": alice_key + "x"}, "unknown"),
        ({"Authorization": f"Bearer {alice_key}"}, "missing"),  # the key counts only in its own header
    ):
        response = initialize(api_key_downstream.url, headers)
        assert response.status_code == 401
        assert response.json()["error"] == "invalid_api_key"
        last = api_key_downstream.events()[-1]
        assert (last["event"], last["reason"]) == ("api_key_refused", reason)
    assert not any(alice_key in str(event) for event in api_key_downstream.events())


def test_a_key_replaced_at_the_api_key_server_stops_working(api_key_downstream: ApiKeyDownstream) -> None:
    old_key = api_key_downstream.keys["bob"]
    api_key_downstream.set_key("bob", "bob-rotated-key")
    try:
        assert initialize(api_key_downstream.url, {"X-API-Key": old_key}).status_code == 401
        assert call_whoami(api_key_downstream.url, {"X-API-Key": "bob-rotated-key"}) == {"user": "bob"}
    finally:
        api_key_downstream.set_key("bob", old_key)
