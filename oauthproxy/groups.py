"""Group membership: reading a provider's groups (bounds, odd shapes, overage), storing them, and X-Forwarded-Groups.

Groups are names the login provider states about the user: an OpenID Connect claim (`GROUPS_CLAIM`, default
`groups`: Keycloak, Okta, Entra ID, Auth0 with a namespaced claim), GitHub organisations and teams (`org:<login>`,
`<org>/<team-slug>`), Google Workspace's domain (`domain:<hd>`). They are read only when the configuration decides
anything by them (`configuration_uses_groups`), taken whole or not at all: a claim this module cannot read whole
(`GroupsUnreadable`) never yields part of a list, since a partial list could pass someone an allow rule was not meant
for, or miss the group a deny rule names.
"""

from __future__ import annotations

import json
import logging
import unicodedata
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from oauthproxy.config import Settings
    from oauthproxy.routes import Route

log = logging.getLogger(__name__)

#: At most this many groups per user; a longer list is unreadable (never cut: which part to keep is arbitrary).
MAX_GROUPS = 1000
#: At most this many characters per group name (Entra ID's longest names, Keycloak paths and GitHub's
#: `org/team` fit); a longer one makes the whole list unreadable, as cutting it could make another group's name.
MAX_GROUP_LENGTH = 256
#: The largest X-Forwarded-Groups value sent: what common servers accept in one header field (gunicorn, Apache
#: and nginx allow 8 KiB). A caller whose groups need more is refused at the route rather than sent a cut list.
MAX_GROUPS_HEADER_BYTES = 8192
GROUPS_HEADER = "X-Forwarded-Groups"
#: Kept as they are in X-Forwarded-Groups: RFC 9110 token characters except `%` (the escape), plus `/`, `:` and `@`,
#: which group names use (`org:acme`, `acme/platform`, Keycloak's `/eng/backend`) and no header parser splits on.
_HEADER_SAFE = "!#$&'*+-.^_`|~/:@"


class GroupsUnreadable(Exception):
    """The provider's statement of the user's groups cannot be read whole; the message says why (for logs)."""


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _has_control_characters(text: str) -> bool:
    # Cc (C0, DEL, C1: CR and LF among them) and Cs (lone surrogates, which no database encoding accepts).
    return any(unicodedata.category(c) in ("Cc", "Cs") for c in text)


def group_names(value: Any, source: str = "the groups claim") -> frozenset[str]:
    """The group names `value` states: a list of names, or one name alone (Keycloak's single-valued mappers and
    ADFS send a string when there is one group). Raises `GroupsUnreadable` for anything else: another JSON type,
    an entry that is not a non-empty string, an entry with control characters or over MAX_GROUP_LENGTH, more than
    MAX_GROUPS entries (counted before duplicates are merged: a huge list is refused whatever it repeats).
    Names are kept exactly as sent: compared case-sensitively, never trimmed."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise GroupsUnreadable(f"{source} is a {_json_type(value)}, not a list of group names")
    if len(items) > MAX_GROUPS:
        raise GroupsUnreadable(f"{source} lists {len(items)} groups; at most {MAX_GROUPS} are read")
    for item in items:
        if not isinstance(item, str):
            raise GroupsUnreadable(f"{source} has an entry that is a {_json_type(item)}, not a group name")
        if not item.strip():
            raise GroupsUnreadable(f"{source} has an empty entry")
        if len(item) > MAX_GROUP_LENGTH:
            raise GroupsUnreadable(
                f"{source} has a name of {len(item)} characters; at most {MAX_GROUP_LENGTH} are read"
            )
        if _has_control_characters(item):
            raise GroupsUnreadable(f"{source} has a name with control characters")
    return frozenset(items)


def _claim_at(claims: Mapping[str, Any], name: str) -> tuple[bool, Any]:
    """(present, value) of the claim `name`: a top-level claim of that exact name (Auth0's namespaced
    `https://example.com/groups` has dots of its own), else a dotted path into nested objects
    (Keycloak's `realm_access.roles`)."""
    if name in claims:
        return True, claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return False, None
        value = value[part]
    return True, value


def groups_in_claims(claims: Mapping[str, Any], claim: str) -> frozenset[str] | None:
    """The groups a set of claims (an ID token's, a userinfo answer) states in `claim`; None when they say nothing
    about groups (the claim is absent). Raises `GroupsUnreadable` for a claim of the wrong shape, and for an
    overage indicator: the provider saying the user is in too many groups to list in the token (Entra ID's
    distributed claim `_claim_names: {"groups": "src1"}`, or `hasgroups: true`), which leaves the list unknown."""
    claim_names = claims.get("_claim_names")
    top = claim.split(".", 1)[0]
    if isinstance(claim_names, Mapping) and (claim in claim_names or top in claim_names):
        raise GroupsUnreadable(
            f"the provider lists this account's {claim!r} elsewhere (_claim_names: too many groups for the token, "
            "Entra ID's groups overage); emit fewer, e.g. only the groups assigned to the application"
        )
    if claim == "groups" and claims.get("hasgroups") is True:
        raise GroupsUnreadable(
            "the provider says this account has groups but did not list them (hasgroups: Entra ID's groups "
            "overage); emit fewer, e.g. only the groups assigned to the application"
        )
    present, value = _claim_at(claims, claim)
    if not present or value is None:
        return None
    return group_names(value, f"the {claim!r} claim")


# -- the configuration ---------------------------------------------------------------------------------------


def route_uses_groups(route: Route) -> bool:
    """Whether the route decides anything by groups, or passes them on."""
    rules = route.tool_policy.rules if route.tool_policy is not None else ()
    return bool(route.allowed_groups) or route.groups_header or any(rule.groups for rule in rules)


def configuration_uses_groups(settings: Settings) -> bool:
    """Whether anything in the configuration needs the users' groups: only then are they read at all (GitHub
    needs the read:org scope and two more API calls for them) and can an unreadable list refuse a sign-in."""
    return bool(settings.allowed_groups) or any(route_uses_groups(route) for route in settings.routes)


def groups_matter(settings: Settings, resource: str) -> bool:
    """Whether a grant for `resource` answers to groups: the global ALLOWED_GROUPS, or its route's use of them."""
    from oauthproxy.allowlists import route_for_resource  # deferred: allowlists imports this module

    if settings.allowed_groups:
        return True
    route = route_for_resource(settings, resource)
    return route is not None and route_uses_groups(route)


def read_group_list(value: Any, where: str, problems: list[str]) -> frozenset[str]:
    """An allowlist of groups from the configuration: a TOML list, or text separated by commas (only commas:
    group names have spaces, "Domain Users"). Each entry trimmed, non-empty, without control characters, at most
    MAX_GROUP_LENGTH characters (a longer one could never match)."""
    if isinstance(value, str):
        value = [item for item in value.split(",") if item.strip()]
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        problems.append(f'{where} must be a list of group names, e.g. ["eng", "org:acme"]')
        return frozenset()
    names = [item.strip() for item in value]
    for name in names:
        if _has_control_characters(name):
            problems.append(f"{where}: the group {name!r} contains a control character")
        elif len(name) > MAX_GROUP_LENGTH:
            problems.append(f"{where}: a group name is longer than {MAX_GROUP_LENGTH} characters, so none could match")
    if len(names) > MAX_GROUPS:
        problems.append(f"{where} lists {len(names)} groups; at most {MAX_GROUPS}")
    return frozenset(names)


# -- stored with the grant -----------------------------------------------------------------------------------


def groups_column(groups: Iterable[str]) -> str | None:
    """The grant column's value: a JSON list, sorted; None for no groups."""
    names = sorted(groups)
    return json.dumps(names, ensure_ascii=False) if names else None


def groups_from_column(value: str | None) -> frozenset[str]:
    """The groups stored with a grant. The column is only ever written by `groups_column`; anything else in it
    (a hand edit) reads as no groups, logged, so it grants nothing."""
    if not value:
        return frozenset()
    try:
        return group_names(json.loads(value), "the stored groups")
    except (ValueError, GroupsUnreadable) as error:
        log.error("a grant's stored groups cannot be read (%s); taken as none", error)
        return frozenset()


# -- passed on -----------------------------------------------------------------------------------------------


def groups_header_value(groups: Iterable[str]) -> str:
    """X-Forwarded-Groups: the names sorted, comma-separated, each percent-encoded (UTF-8) where it has a
    character outside RFC 9110's token characters other than `/`, `:` and `@` (a comma, a space, `%`, `"`, `;`,
    non-ASCII), so a downstream splits on `,` and percent-decodes each item."""
    return ",".join(quote(name, safe=_HEADER_SAFE) for name in sorted(groups))


def groups_header_fits(groups: Iterable[str]) -> bool:
    """Whether the caller's X-Forwarded-Groups fits in MAX_GROUPS_HEADER_BYTES."""
    return len(groups_header_value(groups)) <= MAX_GROUPS_HEADER_BYTES
