"""Building providers under test: settings, a Flask app, discovery served from memory, a browser walking the login."""

from __future__ import annotations

import socket
import time
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest
import requests
from flask import Flask

from oauthproxy.config import Settings
from oauthproxy.providers import (
    OAuthProvider,
    OpenIDConnectProvider,
    ProviderIdentity,
    ProviderTokens,
    error_from_callback,
)

TIMEOUT = 10.0  # seconds: PROVIDER_HTTP_TIMEOUT's default
REDIRECT_URI = "http://127.0.0.1:9/callback"  # never contacted: the walk stops at it


def make_settings(authorize_url: str = "https://idp.example.com", **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "public_url": "http://127.0.0.1:8080",
        "oauth_client_id": "proxy-client",
        "oauth_client_secret": "proxy-secret",
        "oauth_authorize_url": authorize_url,
        "mcp_server_url": "http://127.0.0.1:9000/mcp",
        "encryption_keys": (b"k" * 32,),
        "database_dsn": "sqlite://",
    }
    values.update(overrides)
    return Settings(**values)


def with_app(provider: OAuthProvider) -> OAuthProvider:
    provider.init_app(Flask(__name__))
    return provider


class FakeDiscovery:
    """Stands in for `_fetch_metadata`: serves documents by URL, records what was asked."""

    def __init__(self, documents: dict[str, dict[str, Any]]):
        self.documents = documents
        self.requested: list[str] = []

    def __call__(self, url: str) -> tuple[dict[str, Any] | None, str]:
        self.requested.append(url)
        if url in self.documents:
            return dict(self.documents[url]), ""
        return None, "HTTP 404"


def oidc_document(issuer: str, **extra: Any) -> dict[str, Any]:
    return {
        "issuer": issuer,
        "authorization_endpoint": f"{issuer}/authorize",
        "token_endpoint": f"{issuer}/token",
        "userinfo_endpoint": f"{issuer}/userinfo",
        "jwks_uri": f"{issuer}/jwks",
        **extra,
    }


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def walk(url: str, login_hint: str, stop_prefix: str = REDIRECT_URI, max_hops: int = 20) -> dict[str, str]:
    """Act as the user's browser: follow the provider's redirects hop by hop (its automatic
    login/consent) until it sends us to the redirect URI; return that callback's query."""
    from tests.provider_fixture import follow_redirects_until

    with requests.Session() as browser:
        browser.trust_env = False
        location = follow_redirects_until(browser, f"{url}&login_hint={login_hint}", stop_prefix, max_hops)
    return dict(parse_qsl(urlsplit(location).query))


def login(
    provider: OAuthProvider, login_hint: str, granted: list[str] | None = None
) -> tuple[ProviderTokens, ProviderIdentity]:
    url, stored = provider.create_authorization_url(REDIRECT_URI, provider.scopes_for(granted or []))
    callback = walk(url, login_hint)
    assert error_from_callback(callback) is None
    assert callback["state"] == stored["state"]
    return provider.exchange_code(callback["code"], REDIRECT_URI, stored)


def oidc_settings(issuer_or_url: str, client: dict[str, str], **overrides: Any) -> Settings:
    return make_settings(
        issuer_or_url, oauth_client_id=client["client_id"], oauth_client_secret=client["client_secret"], **overrides
    )


TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"


def signed_id_token(key: Any, **claims: Any) -> str:
    from joserfc import jwt

    now = int(time.time())
    payload = {"aud": "proxy-client", "iat": now, "exp": now + 300, "nonce": "n-1", **claims}
    return jwt.encode({"alg": "RS256", "kid": "k1"}, payload, key)


def offline_provider(
    monkeypatch: pytest.MonkeyPatch, provider: OpenIDConnectProvider, document: dict[str, Any], key: Any
) -> OpenIDConnectProvider:
    """A provider whose discovery document and JWKS are served from memory."""
    monkeypatch.setattr(provider, "_fetch_metadata", lambda url: (dict(document), ""))
    with_app(provider)
    provider._app().server_metadata["jwks"] = {"keys": [key.as_dict(private=False)]}
    return provider
