"""Who the provider says logged in: `ProviderIdentity`, and the rules for reading subjects, names and verified emails."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from oauthproxy.allowlists import email_address


@dataclass(frozen=True)
class ProviderIdentity:
    """Who logged in.  `id` is the provider's stable subject (OIDC `sub`, GitHub's numeric id as str);
    `email` is set only when the provider affirms it is verified (see `verified_email`); `groups` are the groups the
    provider states (oauthproxy.groups), read only when the provider's `reads_groups` says so, and
    `groups_problem` says why they could not be read whole (then `groups` is empty)."""

    id: str
    email: str | None
    name: str | None
    groups: frozenset[str] = field(default=frozenset())
    groups_problem: str | None = None


def is_affirmed(value: Any) -> bool:
    """Only an explicit yes counts: JSON `true` (OIDC Core §5.1), or the string "true" that some providers
    (AWS Cognito) send.  Absent, null, 0, 1, "yes", "false": not affirmed."""
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def verified_email(claims: Mapping[str, Any], *verified_keys: str) -> str | None:
    """The `email` claim when one of `verified_keys` (default `email_verified`) affirms it, else None.

    An address the provider does not vouch for must not pass an email allowlist nor reach a downstream:
    anyone can type someone else's address into a sign-up form."""
    email = email_address(claims.get("email"))
    if email is None:
        return None
    return email if any(is_affirmed(claims.get(key)) for key in verified_keys or ("email_verified",)) else None


def text_claim(value: Any) -> str | None:
    """A claim as display text: a non-blank string, stripped; anything else is absent."""
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


def subject_claim(value: Any) -> str | None:
    """A claim as a subject id: a non-blank string, or an integer as its decimal text."""
    # GitHub and many OAuth 2.0 APIs give numeric ids; bool is an int subclass, refuse it.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return text_claim(value)
