"""Microsoft Entra ID: tenants, offline_access without prompt=consent, the {tenantid} issuer, nOAuth."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pytest

from oauthproxy.providers import MicrosoftProvider, ProviderError, ProviderIdentity, microsoft_tenant
from tests.providers.harness import (
    REDIRECT_URI,
    TENANT,
    TIMEOUT,
    FakeDiscovery,
    make_settings,
    offline_provider,
    oidc_document,
    signed_id_token,
    with_app,
)


@pytest.mark.parametrize(
    ("url", "tenant"),
    [
        ("https://login.microsoftonline.com", "common"),
        ("https://login.microsoftonline.com/", "common"),
        ("https://login.microsoftonline.com/common/oauth2/v2.0/authorize", "common"),
        ("https://login.microsoftonline.com/organizations/oauth2/v2.0/authorize", "organizations"),
        ("https://login.microsoftonline.com/consumers", "consumers"),
        (
            "https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47/oauth2/v2.0/authorize",
            "72f988bf-86f1-41af-91ab-2d7cd011db47",
        ),
        ("https://login.microsoftonline.com/contoso.onmicrosoft.com/v2.0", "contoso.onmicrosoft.com"),
        ("https://login.microsoftonline.com/contoso.com/oauth2/authorize", "contoso.com"),  # a v1 URL
        ("https://login.microsoftonline.com/oauth2/v2.0/authorize", "common"),
    ],
)
def test_microsoft_tenant(url: str, tenant: str) -> None:
    assert microsoft_tenant(url) == tenant


def test_microsoft_tenant_refuses_junk() -> None:
    with pytest.raises(ProviderError) as info:
        microsoft_tenant("https://login.microsoftonline.com/con%20toso/oauth2/v2.0/authorize")
    assert info.value.kind == "misconfigured"


def test_microsoft_email_needs_a_verified_domain() -> None:
    microsoft = MicrosoftProvider(make_settings("https://login.microsoftonline.com/common"), timeout=TIMEOUT)
    assert microsoft._email_from({"email": "a@contoso.com", "xms_edov": True}) == "a@contoso.com"
    assert microsoft._email_from({"email": "a@contoso.com", "xms_edov": "true"}) == "a@contoso.com"
    # nOAuth: an `email` claim without the tenant's proof is whatever an admin typed into the mail attribute.
    assert microsoft._email_from({"email": "ceo@victim.com"}) is None
    assert microsoft._email_from({"email": "ceo@victim.com", "xms_edov": False}) is None
    assert microsoft._email_from({"email": "ceo@victim.com", "xms_edov": 0}) is None
    # Entra ID never sends email_verified; one that appears proves nothing about the tenant.
    assert microsoft._email_from({"email": "ceo@victim.com", "email_verified": True}) is None


def test_microsoft_issuer_template_takes_the_token_tenant() -> None:
    microsoft = MicrosoftProvider(make_settings("https://login.microsoftonline.com/common"), timeout=TIMEOUT)
    option = microsoft._issuer_option({"issuer": "https://login.microsoftonline.com/{tenantid}/v2.0"})
    check = option["validate"]
    tid = "72f988bf-86f1-41af-91ab-2d7cd011db47"
    assert check({"tid": tid}, f"https://login.microsoftonline.com/{tid}/v2.0")
    assert not check({"tid": tid}, "https://login.microsoftonline.com/00000000-0000-0000-0000-000000000000/v2.0")
    assert not check({}, f"https://login.microsoftonline.com/{tid}/v2.0")
    assert not check({"tid": tid}, f"https://evil.example/{tid}/v2.0")
    single = microsoft._issuer_option({"issuer": f"https://login.microsoftonline.com/{tid}/v2.0"})["validate"]
    assert single({"tid": tid}, f"https://login.microsoftonline.com/{tid}/v2.0")
    assert not single({"tid": "other"}, "https://login.microsoftonline.com/other/v2.0")


def test_microsoft_multi_tenant_id_token(monkeypatch: pytest.MonkeyPatch, signing_key: Any) -> None:
    document = oidc_document("https://login.microsoftonline.com/{tenantid}/v2.0")
    document["userinfo_endpoint"] = "https://graph.microsoft.com/oidc/userinfo"
    provider = offline_provider(
        monkeypatch,
        MicrosoftProvider(make_settings("https://login.microsoftonline.com/common"), timeout=TIMEOUT),
        document,
        signing_key,
    )
    good = signed_id_token(
        signing_key,
        iss=f"https://login.microsoftonline.com/{TENANT}/v2.0",
        tid=TENANT,
        sub="ms-sub",
        email="a@contoso.com",
        xms_edov=True,
        name="A",
    )
    claims = provider._id_token_claims({"access_token": "at", "id_token": good}, "n-1")
    assert claims["sub"] == "ms-sub"
    identity = provider._identity({"access_token": "at", "id_token": good}, {"nonce": "n-1"})
    assert identity == ProviderIdentity(id="ms-sub", email="a@contoso.com", name="A")

    other_tenant = signed_id_token(
        signing_key, iss=f"https://login.microsoftonline.com/{TENANT}/v2.0", tid="someone-else", sub="x"
    )
    with pytest.raises(ProviderError) as info:
        provider._id_token_claims({"access_token": "at", "id_token": other_tenant}, "n-1")
    assert info.value.kind == "misconfigured"
    assert "iss" in info.value.description

    unverified = signed_id_token(
        signing_key,
        iss=f"https://login.microsoftonline.com/{TENANT}/v2.0",
        tid=TENANT,
        sub="ms-sub",
        email="ceo@victim.com",
        xms_edov=False,
        name="A",
    )
    userinfo_calls: list[Any] = []

    def fake_userinfo(token: Any) -> dict[str, Any]:  # Graph's userinfo has no xms_edov
        userinfo_calls.append(token)
        return {"sub": "ms-sub", "email": "ceo@victim.com", "name": "A"}

    monkeypatch.setattr(provider, "_userinfo", fake_userinfo)
    identity = provider._identity({"access_token": "at", "id_token": unverified}, {"nonce": "n-1"})
    assert identity == ProviderIdentity(id="ms-sub", email=None, name="A")
    assert userinfo_calls == []  # name present, email refused by the ID token: nothing to complete

    no_email = signed_id_token(
        signing_key, iss=f"https://login.microsoftonline.com/{TENANT}/v2.0", tid=TENANT, sub="ms-sub"
    )
    monkeypatch.setattr(provider, "_userinfo", lambda token: {"sub": "ms-sub", "email": "a@contoso.com", "name": "A"})
    identity = provider._identity({"access_token": "at", "id_token": no_email}, {"nonce": "n-1"})
    assert identity == ProviderIdentity(id="ms-sub", email=None, name="A")  # Graph's userinfo proves nothing

    without_proof = signed_id_token(
        signing_key,
        iss=f"https://login.microsoftonline.com/{TENANT}/v2.0",
        tid=TENANT,
        sub="ms-sub",
        email="ceo@victim.com",
        name="A",
    )
    identity = provider._identity({"access_token": "at", "id_token": without_proof}, {"nonce": "n-1"})
    assert identity == ProviderIdentity(id="ms-sub", email=None, name="A")  # nOAuth
    monkeypatch.setattr(provider, "_userinfo", lambda token: {"sub": "someone-else", "email": "x@contoso.com"})
    identity = provider._identity({"access_token": "at", "id_token": no_email}, {"nonce": "n-1"})
    assert identity == ProviderIdentity(id="ms-sub", email=None, name=None)  # OIDC Core §5.3.2


def test_microsoft_scopes_and_parameters(monkeypatch: pytest.MonkeyPatch) -> None:
    microsoft = MicrosoftProvider(
        make_settings("https://login.microsoftonline.com/common", upstream_scopes=("User.Read",)), timeout=TIMEOUT
    )
    assert microsoft.scopes_for(["offline_access", "Mail.Read"]) == [
        "openid",
        "email",
        "profile",
        "offline_access",
        "User.Read",
        "Mail.Read",
    ]
    document = oidc_document("https://login.microsoftonline.com/{tenantid}/v2.0")
    fake = FakeDiscovery({"https://login.microsoftonline.com/common/v2.0/.well-known/openid-configuration": document})
    monkeypatch.setattr(microsoft, "_fetch_metadata", fake)
    url, _secrets = with_app(microsoft).create_authorization_url(REDIRECT_URI, microsoft.scopes_for([]))
    query = dict(parse_qsl(urlsplit(url).query))
    assert query["scope"] == "openid email profile offline_access User.Read"
    assert "prompt" not in query  # never prompt=consent
    # The v2.0 token endpoint wants `scope` on a refresh: the login's, else the configured ones.
    assert microsoft._refresh_params(None) == {"scope": "openid email profile offline_access User.Read"}
    assert microsoft._refresh_params(["openid", "Mail.Read"]) == {"scope": "openid Mail.Read"}
