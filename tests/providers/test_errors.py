"""How the provider's answers are classified: OAuth error codes at the token endpoint and at the callback."""

from __future__ import annotations

import pytest

from oauthproxy.providers import classify_oauth_error, error_from_callback


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("invalid_grant", "invalid_grant"),
        ("bad_verification_code", "invalid_grant"),  # GitHub's dialect
        ("bad_refresh_token", "invalid_grant"),
        ("temporarily_unavailable", "transient"),
        ("server_error", "transient"),
        ("invalid_client", "misconfigured"),
        ("incorrect_client_credentials", "misconfigured"),
        ("unauthorized_client", "misconfigured"),
        ("invalid_scope", "misconfigured"),
        ("access_denied", "access_denied"),
        ("something_new", "misconfigured"),
        (None, "misconfigured"),
    ],
)
def test_classify_oauth_error(error: str | None, kind: str) -> None:
    result = classify_oauth_error(error, "details\nmore", "refreshing")
    assert result.kind == kind
    assert result.description.startswith("refreshing: the identity provider answered")
    assert "\n" not in result.description


@pytest.mark.parametrize(
    ("args", "kind"),
    [
        ({"error": "access_denied", "error_description": "The user cancelled", "state": "s"}, "access_denied"),
        ({"error": "consent_required"}, "access_denied"),
        ({"error": "interaction_required", "error_subcode": "x"}, "access_denied"),
        ({"error": "server_error"}, "transient"),
        ({"error": "temporarily_unavailable"}, "transient"),
        ({"error": "invalid_scope", "error_description": "AADSTS70011: bad scope"}, "misconfigured"),
        ({"error": "unauthorized_client"}, "misconfigured"),
        ({"error": "redirect_uri_mismatch"}, "misconfigured"),  # GitHub
        ({"error": "made_up_by_provider"}, "access_denied"),
        ({"state": "s"}, "access_denied"),  # neither code nor error
    ],
)
def test_error_from_callback(args: dict[str, str], kind: str) -> None:
    error = error_from_callback(args)
    assert error is not None
    assert error.kind == kind
    if "error_description" in args:
        assert args["error_description"] in error.description


def test_error_from_callback_success() -> None:
    assert error_from_callback({"code": "abc", "state": "s", "iss": "https://idp"}) is None
