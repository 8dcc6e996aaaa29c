"""Fixtures for the provider tests: the shared oidc-provider, clients registered at it, a provider logged in with it."""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from oauthproxy.providers import OAuthProvider, build_login_provider
from tests.providers.harness import REDIRECT_URI, oidc_settings, with_app


@pytest.fixture
def idp(provider_failure_reset: Any) -> Any:
    """The shared oidc-provider, failure mode and stats cleared."""
    return provider_failure_reset


@pytest.fixture
def registered(idp: Any) -> Callable[..., dict[str, str]]:
    def register(token_endpoint_auth_method: str = "client_secret_basic") -> dict[str, str]:
        client = {"client_id": f"proxy-{secrets.token_hex(4)}", "client_secret": secrets.token_urlsafe(24)}
        idp.register_client(
            client["client_id"],
            client["client_secret"],
            [REDIRECT_URI],
            token_endpoint_auth_method=token_endpoint_auth_method,
        )
        return client

    return register


@pytest.fixture
def oidc(idp: Any, registered: Callable[..., dict[str, str]]) -> Iterator[OAuthProvider]:
    provider = build_login_provider(oidc_settings(idp.issuer, registered()))
    yield with_app(provider)


@pytest.fixture
def signing_key() -> Any:
    from joserfc.jwk import RSAKey

    return RSAKey.generate_key(2048, parameters={"kid": "k1", "use": "sig"})
