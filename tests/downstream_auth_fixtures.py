"""Fixtures for downstream authorization (issue 13): the downstream's own OpenID provider, MCP servers behind it.

A pytest plugin (in `pytest_plugins` of tests/conftest.py). Session fixtures:

* `downstream_provider`: a second oidc-provider, the downstream's authorization server, with open dynamic client
  registration (discovered mode) and resource indicators (opaque access tokens for a loopback resource, checked by
  introspection, revocable).
* `protected_downstream`: tests/mcp_protected_downstream.py in OAuth mode against `downstream_provider`
  (`whoami` reports the token's subject), requiring the scope `mcp:tools`.
* `api_key_downstream`: the same server in API-key mode, keys in `X-API-Key`; alice's and bob's keys are
  `api_key_downstream.keys["alice"]` and `["bob"]`.

Helpers: `register_proxy_client` (the proxy as a configured client of the downstream's provider),
`downstream_tokens` (a real code + PKCE flow at that provider), `oauth_route` / `api_key_route` /
`write_routes_toml` (a proxy routes file for these downstreams).
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import requests

from oauthproxy.connection_providers import CONNECT_CALLBACK_PATH
from tests.provider_fixture import OidcProvider, follow_redirects_until, pkce_pair
from tests.support.processes import ModuleServer, launch_module_server

#: The scope the protected downstream requires (and its provider knows for loopback resources).
DOWNSTREAM_SCOPE = "mcp:tools"
#: Where a test-side client of the downstream's provider is sent back; never contacted.
TEST_CLIENT_REDIRECT = "http://127.0.0.1:9/downstream-callback"
API_KEY_HEADER = "X-API-Key"


class ProtectedDownstream(ModuleServer):
    """An MCP server doing its own OAuth (RFC 9728 metadata, introspection at its provider)."""

    issuer: str = ""

    @property
    def resource(self) -> str:
        """Its resource identifier (RFC 8707 / RFC 9728 `resource`): the URL clients call."""
        return self.url

    @property
    def metadata_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/oauth-protected-resource/mcp"

    def events(self) -> list[dict[str, Any]]:
        return requests.get(f"http://127.0.0.1:{self.port}/test/events", timeout=5).json()


class ApiKeyDownstream(ModuleServer):
    """An MCP server checking a per-user key in `X-API-Key`."""

    keys: dict[str, str]
    header: str = API_KEY_HEADER

    def set_key(self, user: str, key: str | None) -> None:
        """Give `user` a new key (None: none), as a user rotating or revoking a key at the service would."""
        response = requests.post(
            f"http://127.0.0.1:{self.port}/test/api-keys", json={"user": user, "key": key}, timeout=5
        )
        response.raise_for_status()
        if key is None:
            self.keys.pop(user, None)
        else:
            self.keys[user] = key

    def events(self) -> list[dict[str, Any]]:
        return requests.get(f"http://127.0.0.1:{self.port}/test/events", timeout=5).json()


@pytest.fixture(scope="session")
def downstream_provider(start_oidc_provider: Callable[..., OidcProvider]) -> OidcProvider:
    """The downstream MCP server's own authorization server (not the proxy's login provider)."""
    return start_oidc_provider(registration=True, resource_indicators=True, resource_scopes=DOWNSTREAM_SCOPE)


def register_introspection_client(provider: OidcProvider) -> tuple[str, str]:
    """A resource server's client: it only authenticates at the introspection endpoint (no grant of its own)."""
    client_id = f"resource-server-{secrets.token_hex(4)}"
    client_secret = secrets.token_urlsafe(24)
    provider.register_client(client_id, client_secret, [], grant_types=[], response_types=[])
    return client_id, client_secret


def launch_protected_downstream(provider: OidcProvider, log_dir: Path) -> ProtectedDownstream:
    client_id, client_secret = register_introspection_client(provider)
    server = launch_module_server(
        "tests.mcp_protected_downstream",
        log_dir,
        "--issuer",
        provider.issuer,
        f"--client-id={client_id}",
        # One argument with "=": a secret that starts with "-" (token_urlsafe's alphabet has it)
        # would otherwise be read by argparse as an option.
        f"--client-secret={client_secret}",
        "--scopes",
        DOWNSTREAM_SCOPE,
        kind=ProtectedDownstream,
    )
    server.issuer = provider.issuer
    return server


@pytest.fixture(scope="session")
def protected_downstream(
    downstream_provider: OidcProvider, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProtectedDownstream]:
    server = launch_protected_downstream(downstream_provider, tmp_path_factory.mktemp("protected-downstream"))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def api_key_downstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiKeyDownstream]:
    keys = {user: f"{user}-key-{secrets.token_hex(8)}" for user in ("alice", "bob")}
    spec = ",".join(f"{user}={key}" for user, key in keys.items())
    server = launch_module_server(
        "tests.mcp_protected_downstream",
        tmp_path_factory.mktemp("api-key-downstream"),
        "--api-keys",
        spec,
        "--api-key-header",
        API_KEY_HEADER,
        kind=ApiKeyDownstream,
    )
    server.keys = keys
    yield server
    server.stop()


# -- helpers ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderClient:
    """A client registered at the downstream's provider."""

    client_id: str
    client_secret: str
    redirect_uri: str


def register_proxy_client(
    provider: OidcProvider, proxy_url: str, default_resource: str | None = None
) -> ProviderClient:
    """Register the proxy at the downstream's provider as an operator would for a configured route: redirect URI
    `PUBLIC_URL/connect/callback`. `default_resource`: the provider then issues its tokens for that resource even
    when the proxy names none (an authorization server that knows which API a client is for)."""
    client = ProviderClient(
        f"proxy-connect-{secrets.token_hex(4)}", secrets.token_urlsafe(24), proxy_url + CONNECT_CALLBACK_PATH
    )
    metadata: dict[str, Any] = {}
    if default_resource is not None:
        metadata["default_resource"] = default_resource
    provider.register_client(client.client_id, client.client_secret, [client.redirect_uri], **metadata)
    return client


def register_test_client(provider: OidcProvider) -> ProviderClient:
    """A confidential client of the test itself, sent back to a URL nobody listens on."""
    client = ProviderClient(f"test-client-{secrets.token_hex(4)}", secrets.token_urlsafe(24), TEST_CLIENT_REDIRECT)
    provider.register_client(client.client_id, client.client_secret, [client.redirect_uri])
    return client


def downstream_tokens(
    provider: OidcProvider,
    client: ProviderClient,
    *,
    resource: str | None,
    login_hint: str = "alice",
    scope: str = f"{DOWNSTREAM_SCOPE} offline_access",
) -> dict[str, Any]:
    """A real authorization code flow with PKCE at the downstream's provider; the token response."""
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(8)
    params = {
        "response_type": "code",
        "client_id": client.client_id,
        "redirect_uri": client.redirect_uri,
        "scope": scope,
        "state": state,
        "code_challenge": challenge,
        "code_challenge_method": "S256",
        "login_hint": login_hint,
        "prompt": "consent",  # offline_access is granted only with consent asked for
    }
    if resource is not None:
        params["resource"] = resource
    endpoint = provider.discovery()["authorization_endpoint"]
    with requests.Session() as browser:
        browser.trust_env = False
        location = follow_redirects_until(browser, f"{endpoint}?{urlencode(params)}", client.redirect_uri)
    query = {key: values[0] for key, values in parse_qs(urlsplit(location).query).items()}
    assert query.get("state") == state and "code" in query, query
    response = requests.post(
        provider.discovery()["token_endpoint"],
        data={
            "grant_type": "authorization_code",
            "code": query["code"],
            "redirect_uri": client.redirect_uri,
            "code_verifier": verifier,
        },
        auth=(client.client_id, client.client_secret),
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{key} = {_toml_value(item)}" for key, item in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(value)  # a JSON string or number is a TOML one


def write_routes_toml(path: Path, routes: list[Mapping[str, Any]]) -> str:
    """A routes file (`MCP_ROUTES_FILE`); nested tables such as `oauth` become inline tables. Returns its path."""
    lines: list[str] = []
    for route in routes:
        lines.append("[[routes]]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in route.items())
        lines.append("")
    path.write_text("\n".join(lines))
    return str(path)


@dataclass
class RouteSpec:
    """A proxy route and the settings it needs (environment variables such as the client secret)."""

    route: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)


def oauth_route(
    name: str,
    downstream: ProtectedDownstream,
    *,
    provider: OidcProvider | None = None,
    client: ProviderClient | None = None,
    scopes: tuple[str, ...] = (DOWNSTREAM_SCOPE, "offline_access"),
) -> RouteSpec:
    """A `credential = "oauth"` route to `downstream`: configured (at `provider` as `client`), or discovered when
    neither is given."""
    route: dict[str, Any] = {"name": name, "path": f"/mcp/{name}", "url": downstream.url, "credential": "oauth"}
    env: dict[str, str] = {}
    if client is None:
        route["oauth"] = "discover"
    else:
        assert provider is not None
        secret_env = "DOWNSTREAM_" + re.sub(r"[^A-Z0-9]", "_", name.upper()) + "_CLIENT_SECRET"
        route["oauth"] = {
            "authorize_url": provider.issuer,
            "client_id": client.client_id,
            "client_secret_env": secret_env,
            "scopes": list(scopes),
        }
        env[secret_env] = client.client_secret
    return RouteSpec(route, env)


def api_key_route(name: str, downstream: ApiKeyDownstream) -> RouteSpec:
    """A `credential = "user_api_key"` route to `downstream`, the key sent in its header."""
    return RouteSpec(
        {
            "name": name,
            "path": f"/mcp/{name}",
            "url": downstream.url,
            "credential": "user_api_key",
            "credential_header": downstream.header,
        }
    )
