"""Which email a provider vouches for: only an explicit yes counts."""

from __future__ import annotations

from typing import Any

import pytest

from oauthproxy.providers import verified_email


@pytest.mark.parametrize(
    ("claims", "email"),
    [
        ({"email": "a@example.com", "email_verified": True}, "a@example.com"),
        ({"email": " a@example.com ", "email_verified": True}, "a@example.com"),
        ({"email": "a@example.com", "email_verified": "true"}, "a@example.com"),  # Cognito's string booleans
        ({"email": "a@example.com", "email_verified": " TRUE "}, "a@example.com"),
        # Only an explicit yes vouches for the address.
        ({"email": "a@example.com"}, None),
        ({"email": "a@example.com", "email_verified": None}, None),
        ({"email": "a@example.com", "email_verified": False}, None),
        ({"email": "a@example.com", "email_verified": "false"}, None),
        ({"email": "a@example.com", "email_verified": 0}, None),
        ({"email": "a@example.com", "email_verified": 1}, None),
        ({"email": "a@example.com", "email_verified": "no"}, None),
        ({"email": "a@example.com", "email_verified": "yes"}, None),
        ({"email": "a@example.com", "email_verified": [True]}, None),
        # Exactly one @, something on both sides.
        ({"email": "mallory@evil.example@example.test", "email_verified": True}, None),
        ({"email": "@example.test", "email_verified": True}, None),
        ({"email": "mallory@", "email_verified": True}, None),
        ({"email": "a b@example.test", "email_verified": True}, None),
        ({"email": "not-an-address", "email_verified": True}, None),
        ({"email": None}, None),
        ({}, None),
    ],
)
def test_verified_email(claims: dict[str, Any], email: str | None) -> None:
    assert verified_email(claims) == email
