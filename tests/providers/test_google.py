"""Google: access_type=offline and prompt=consent instead of offline_access, its two issuer spellings."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from oauthproxy.providers import GoogleProvider, ProviderIdentity
from tests.providers.harness import (
    REDIRECT_URI,
    TIMEOUT,
    FakeDiscovery,
    make_settings,
    offline_provider,
    oidc_document,
    signed_id_token,
    with_app,
)


def test_google_accepts_both_issuer_spellings() -> None:
    google = GoogleProvider(make_settings("https://accounts.google.com"), timeout=TIMEOUT)
    assert google._issuer_option({"issuer": "https://accounts.google.com"})["values"] == [
        "https://accounts.google.com",
        "accounts.google.com",
    ]


@pytest.mark.parametrize("issuer", ["https://accounts.google.com", "accounts.google.com"])
def test_google_id_token_issuers(monkeypatch: pytest.MonkeyPatch, signing_key: Any, issuer: str) -> None:
    provider = offline_provider(
        monkeypatch,
        GoogleProvider(make_settings("https://accounts.google.com"), timeout=TIMEOUT),
        oidc_document("https://accounts.google.com"),
        signing_key,
    )
    token = signed_id_token(
        signing_key, iss=issuer, sub="1234567890", email="a@gmail.com", email_verified=True, name="A"
    )
    assert provider._identity({"access_token": "at", "id_token": token}, {"nonce": "n-1"}) == ProviderIdentity(
        id="1234567890", email="a@gmail.com", name="A"
    )


def test_google_scopes_and_authorization_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(
        "https://accounts.google.com", upstream_scopes=("https://www.googleapis.com/auth/drive.readonly",)
    )
    google = GoogleProvider(settings, timeout=TIMEOUT)
    # Google refuses the offline_access scope: it uses access_type=offline instead.
    assert google.scopes_for(["offline_access"]) == [
        "openid",
        "email",
        "profile",
        "https://www.googleapis.com/auth/drive.readonly",
    ]
    fake = FakeDiscovery(
        {"https://accounts.google.com/.well-known/openid-configuration": oidc_document("https://accounts.google.com")}
    )
    monkeypatch.setattr(google, "_fetch_metadata", fake)
    url, _secrets = with_app(google).create_authorization_url(REDIRECT_URI, google.scopes_for([]))
    query = dict(parse_qsl(urlsplit(url).query))
    # A refresh token only with access_type=offline, and on every login only with prompt=consent.
    assert (query["access_type"], query["prompt"]) == ("offline", "consent")
    assert fake.requested == ["https://accounts.google.com/.well-known/openid-configuration"]  # no discovery walk
