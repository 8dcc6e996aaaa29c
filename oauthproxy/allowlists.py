"""Allowlists: who may use the proxy (ALLOWED_EMAILS, ALLOWED_EMAIL_DOMAINS, ALLOWED_GROUPS) and each route, at login and after."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from oauthproxy.config import Settings
    from oauthproxy.routes import Route


def email_address(value: Any) -> str | None:
    """`value` as an address with exactly one `@` and both sides non-empty, else None: the domain after the
    one `@` is what a domain allowlist compares (`a@evil.example@example.test` is no address at all)."""
    if not isinstance(value, str):
        return None
    email = value.strip()
    local, at, domain = email.partition("@")
    if not at or not local or not domain or "@" in domain or any(ch.isspace() for ch in email):
        return None
    return email


def email_is_allowed(email: str | None, emails: frozenset[str], domains: frozenset[str]) -> bool:
    """An allowlist check: no list allows everyone; otherwise the (verified) email or its domain must be listed.

    The lists are lower-cased when the settings are read; addresses compare case-insensitively as a whole
    (providers differ on the local part's case, none lets two accounts differ only by it). Only ASCII letters
    are folded: Unicode lower-casing maps other characters onto ASCII ones (KELVIN SIGN `\u212a` becomes `k`),
    so `\u212aate@example.test`, another mailbox, would otherwise pass for `kate@example.test`."""
    if not emails and not domains:
        return True
    return email_is_listed(email, emails, domains)


def email_is_listed(email: str | None, emails: frozenset[str], domains: frozenset[str] = frozenset()) -> bool:
    """Whether the (verified) email, or its domain, is on these lower-cased lists; empty lists list no one.

    The allowlists' comparison (`email_is_allowed`), also the one ADMIN_EMAILS uses."""
    address = email_address(email)
    if address is None:
        return False
    address = address.encode().lower().decode()  # bytes.lower() folds A-Z only
    return address in emails or address.partition("@")[2] in domains


def user_is_listed(
    email: str | None,
    groups: frozenset[str],
    emails: frozenset[str],
    domains: frozenset[str],
    allowed_groups: frozenset[str],
) -> bool:
    """One allowlist (the global one, or a route's): no list allows everyone; otherwise the user passes when any
    entry matches: the (verified) email, its domain, or one of the user's groups (exact names, case-sensitive).

    Any, not all: a list names who may come in, as ALLOWED_EMAILS and ALLOWED_EMAIL_DOMAINS already combine, and
    as Pomerium's allowed_users / allowed_domains / allowed_groups do. Both must hold where both levels are set
    (the global list and the route's): ALLOWED_EMAIL_DOMAINS=example.com with a route's allowed_groups = ["eng"]
    admits only example.com addresses in eng (what oauth2-proxy's --email-domain with --allowed-group means)."""
    if not allowed_groups:
        return email_is_allowed(email, emails, domains)
    if (emails or domains) and email_is_allowed(email, emails, domains):
        return True
    return not allowed_groups.isdisjoint(groups)


def route_for_resource(settings: Settings, resource: str) -> Route | None:
    """The route whose protected resource (RFC 8707 audience) a grant was issued for."""
    from oauthproxy.authorization_server import canonical_resource  # deferred: it imports the models

    wanted = canonical_resource(resource)
    return next((route for route in settings.routes if canonical_resource(route.resource) == wanted), None)


def grant_is_allowed(settings: Settings, email: str | None, groups: frozenset[str], resource: str) -> bool:
    """Whether a user with this (verified) email and these groups may still hold a grant for `resource`: the
    global list and the route's list as configured now, so narrowing either ends existing grants too. A grant
    for a resource no route serves (any more) answers to the global list alone: its tokens open no MCP endpoint
    anyway."""
    if not settings.user_is_allowed(email, groups):
        return False
    route = route_for_resource(settings, resource)
    return route is None or route.user_is_allowed(email, groups)
