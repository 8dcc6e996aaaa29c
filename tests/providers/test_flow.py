"""The flow every provider shares (base.OAuthProvider): code exchange with PKCE, refresh, and their failures."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from oauthproxy.providers import (
    GitHubProvider,
    OAuthProvider,
    OpenIDConnectProvider,
    ProviderError,
    ProviderTokens,
    build_login_provider,
    error_from_callback,
)
from oauthproxy.providers.base import tokens_from
from tests.providers.harness import REDIRECT_URI, TIMEOUT, login, make_settings, oidc_settings, walk, with_app


def test_tokens_keep_the_old_refresh_token() -> None:
    now = int(time.time())
    tokens = tokens_from({"access_token": "a2", "expires_at": now + 60}, fallback_refresh_token="r1")
    assert tokens == ProviderTokens(access_token="a2", refresh_token="r1", expires_at=tokens.expires_at)
    assert tokens.expires_at is not None and tokens.expires_at.tzinfo is None  # naive UTC
    assert abs((tokens.expires_at - datetime.fromtimestamp(now + 60, UTC).replace(tzinfo=None)).total_seconds()) < 1
    assert tokens_from({"access_token": "a", "refresh_token": "r2"}, "r1").refresh_token == "r2"
    assert tokens_from({"access_token": "a"}).expires_at is None
    with pytest.raises(ProviderError) as info:
        tokens_from({"token_type": "bearer"})
    assert info.value.kind == "misconfigured"


def test_exchange_without_a_code_verifier_is_refused() -> None:
    provider = with_app(GitHubProvider(make_settings("https://github.com"), timeout=TIMEOUT))
    with pytest.raises(ProviderError) as info:
        provider.exchange_code("code", REDIRECT_URI, {"state": "s", "nonce": None})
    assert info.value.kind == "invalid_grant"


def test_use_before_init_app_is_a_clear_error() -> None:
    provider = GitHubProvider(make_settings("https://github.com"), timeout=TIMEOUT)
    with pytest.raises(RuntimeError, match="init_app"):
        provider.create_authorization_url(REDIRECT_URI, ["read:user"])


def test_codes_are_single_use_and_pkce_bound(oidc: OAuthProvider) -> None:
    url, stored = oidc.create_authorization_url(REDIRECT_URI, oidc.scopes_for([]))
    callback = walk(url, "alice")
    with pytest.raises(ProviderError) as wrong_verifier:
        oidc.exchange_code(callback["code"], REDIRECT_URI, {**stored, "code_verifier": "x" * 50})
    assert wrong_verifier.value.kind == "invalid_grant"

    url, stored = oidc.create_authorization_url(REDIRECT_URI, oidc.scopes_for([]))
    callback = walk(url, "alice")
    _tokens, identity = oidc.exchange_code(callback["code"], REDIRECT_URI, stored)
    assert identity.id == "alice"
    with pytest.raises(ProviderError) as replay:
        oidc.exchange_code(callback["code"], REDIRECT_URI, stored)
    assert replay.value.kind == "invalid_grant"


def test_refresh_error_classification(idp: Any, oidc: OAuthProvider) -> None:
    tokens, _identity = login(oidc, "carol")
    assert tokens.refresh_token

    idp.set_failure("refresh_invalid_grant")
    with pytest.raises(ProviderError) as info:
        oidc.refresh(tokens.refresh_token)
    assert info.value.kind == "invalid_grant"
    assert info.value.error == "invalid_grant"

    idp.set_failure("refresh_server_error")
    with pytest.raises(ProviderError) as info:
        oidc.refresh(tokens.refresh_token)
    assert info.value.kind == "transient"

    idp.set_failure(None)
    with pytest.raises(ProviderError) as info:
        oidc.refresh("not-a-refresh-token")
    assert info.value.kind == "invalid_grant"

    assert oidc.refresh(tokens.refresh_token).access_token  # the grant survived


def test_refresh_timeout_is_transient(idp: Any, registered: Callable[..., dict[str, str]]) -> None:
    provider = OpenIDConnectProvider(oidc_settings(idp.issuer, registered()), timeout=0.5)
    with_app(provider)
    tokens, _identity = login(provider, "alice")
    idp.set_failure("token_delay", delay_ms=1500)
    started = time.monotonic()
    with pytest.raises(ProviderError) as info:
        provider.refresh(tokens.refresh_token or "")
    assert info.value.kind == "transient"
    assert time.monotonic() - started < 1.4


def test_wrong_client_secret_is_misconfigured(idp: Any, registered: Callable[..., dict[str, str]]) -> None:
    client = registered()
    provider = with_app(build_login_provider(oidc_settings(idp.issuer, {**client, "client_secret": "wrong"})))
    url, stored = provider.create_authorization_url(REDIRECT_URI, provider.scopes_for([]))
    callback = walk(url, "alice")
    with pytest.raises(ProviderError) as info:
        provider.exchange_code(callback["code"], REDIRECT_URI, stored)
    assert info.value.kind == "misconfigured"
    assert info.value.error == "invalid_client"


@pytest.mark.parametrize(("hint", "kind"), [("deny", "access_denied"), ("error", "transient")])
def test_refusal_at_the_provider(oidc: OAuthProvider, hint: str, kind: str) -> None:
    url, _stored = oidc.create_authorization_url(REDIRECT_URI, oidc.scopes_for([]))
    callback = walk(url, hint)
    error = error_from_callback(callback)
    assert error is not None
    assert error.kind == kind
    assert oidc.error_from_callback(callback) is not None  # also reachable as a method
