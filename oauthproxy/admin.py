"""The admin page's logic: who is an admin (ADMIN_EMAILS), what it lists (users, clients, grants, connections), what
it revokes, and the audit search's filters."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from flask import current_app
from sqlalchemy import case, func, select

from oauthproxy import account
from oauthproxy.account import AccountPageError, AccountUser
from oauthproxy.authorization_server import revoke_grant
from oauthproxy.client_metadata import is_metadata_document_client_id
from oauthproxy.clients import Client
from oauthproxy.components import components
from oauthproxy.config import Settings
from oauthproxy.downstream_connections import disconnect
from oauthproxy.models import DownstreamConnection, Grant, OAuthClient, Token, db
from oauthproxy.routes import Route
from oauthproxy.urls import redirect_target

log = logging.getLogger(__name__)

#: `Grant.revoked_reason` (and the metrics label) of a grant an admin revoked on the admin page.
REVOKED_REASON = "revoked_by_admin"
#: Each table shows at most this many rows (the most recent first); the page says so, and the filters narrow it.
ROW_CAP = 200
#: Bounds of what the filters and forms accept: the columns' own sizes (models.py).
MAX_USER_ID = 255
MAX_CLIENT_ID = 2048
MAX_ROUTE = 64
MAX_TOOL = 256
#: A grant id is a database integer: PostgreSQL's `integer` ends at 2**31 - 1 (a larger one there is an error, not
#: a row that is not found).
GRANT_ID = re.compile(r"^[0-9]{1,10}$")
MAX_GRANT_ID = 2**31 - 1
AUDIT_DEFAULT_LIMIT = 100
AUDIT_MAX_LIMIT = 500
#: What the audit search's date fields accept: a date, or a date and time (a browser's datetime-local), in UTC.
AUDIT_TIME_FORMATS = ("%Y-%m-%d", "%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d %H:%M:%S")


class AdminPageError(AccountPageError):
    """An error page of the admin page; its button leads back to the admin page."""

    back_endpoint = "admin.admin_page"
    back_label = "Back to the admin page"


class NotAnAdmin(AdminPageError):
    """The 403 page of a signed-in person who is no admin: its button leads to their own account page (where they
    can sign out and sign in as someone else), not back to the page that refused them."""

    back_endpoint = "account.account_page"
    back_label = "Go to your account page"


def _settings() -> Settings:
    return current_app.config["SETTINGS"]


# -- who is an admin ---------------------------------------------------------------------------------------------------


def is_admin(user: AccountUser) -> bool:
    """Listed in ADMIN_EMAILS as configured now, by the email the provider verified at the sign-in (the account
    session holds only that one: `storable_identity` keeps no unverified address)."""
    return _settings().user_is_admin(user.email)


def signed_in_admin() -> AccountUser | None:
    """The admin signed in in this browser; None when nobody is signed in; a 403 page for a signed-in non-admin.

    Asked on every admin request: taking an address off ADMIN_EMAILS (and restarting) ends that admin's access at
    their next request, whatever their session says."""
    user = account.signed_in_user()
    if user is None:
        return None
    if not is_admin(user):
        log.info("user %s is not an admin (admin page refused)", user.user_id)
        who = user.email or "This account (the provider vouched for no email)"
        raise NotAnAdmin(
            403,
            "Not an administrator",
            f"{who} is not listed in ADMIN_EMAILS, so the admin page is closed to it. Ask the operator to add you.",
        )
    return user


# -- what the page lists -----------------------------------------------------------------------------------------------

RowT = TypeVar("RowT")


@dataclass
class Listing(Generic[RowT]):
    """At most ROW_CAP rows of a table; `truncated` when more exist."""

    rows: list[RowT]
    truncated: bool = False


def _capped(rows: list[RowT]) -> Listing[RowT]:
    return Listing(rows[:ROW_CAP], len(rows) > ROW_CAP)


@dataclass
class UserRow:
    user_id: str
    email: str | None
    name: str | None
    live_grants: int
    connections: int
    last_used: datetime | None
    last_grant: datetime


_LIVE = case((Grant.revoked_at.is_(None), 1), else_=0)


def users_overview() -> Listing[UserRow]:
    """Every user holding a grant (live or not), the most recently active first."""
    found = db.session.execute(
        select(Grant.user_id, func.sum(_LIVE), func.max(Grant.created_at), func.max(Grant.id))
        .group_by(Grant.user_id)
        .order_by(func.max(Grant.created_at).desc(), Grant.user_id)
        .limit(ROW_CAP + 1)
    ).all()
    ids = [row[0] for row in found]
    if not ids:
        return Listing([])
    # Who they are, as their latest grant recorded it (the provider may have changed a name since).
    identities = {
        row.user_id: row
        for row in db.session.execute(
            select(Grant.user_id, Grant.user_email, Grant.user_name).where(Grant.id.in_([row[3] for row in found]))
        )
    }
    last_used = dict(
        db.session.execute(
            select(Token.user_id, func.max(Token.issued_at)).where(Token.user_id.in_(ids)).group_by(Token.user_id)
        ).all()
    )
    connections = dict(
        db.session.execute(
            select(DownstreamConnection.user_id, func.count())
            .where(DownstreamConnection.user_id.in_(ids))
            .group_by(DownstreamConnection.user_id)
        ).all()
    )
    rows = [
        UserRow(
            user_id=user_id,
            email=identities[user_id].user_email if user_id in identities else None,
            name=identities[user_id].user_name if user_id in identities else None,
            live_grants=int(live or 0),
            connections=int(connections.get(user_id, 0)),
            last_used=last_used.get(user_id),
            last_grant=created,
        )
        for user_id, live, created, _ in found
    ]
    return _capped(rows)


@dataclass
class ClientRow:
    client_id: str
    name: str
    #: "registered" (dynamic client registration) or "metadata document" (a URL client id).
    kind: str
    #: The name is the client's own word (registration, or a document not fetched lately): the page says so.
    named_by_itself: bool
    redirect_hosts: list[str]
    live_grants: int
    last_active: datetime | None


def describe_clients(client_ids: set[str]) -> dict[str, Client]:
    """What is known of these clients without a request anywhere: registered clients' rows (their secrets not
    decrypted), metadata documents as cached by the last fetch (each one fetched here could take seconds)."""
    settings = _settings()
    described: dict[str, Client] = {}
    registered = [cid for cid in client_ids if len(cid) <= 64]
    if registered:
        for row in db.session.scalars(select(OAuthClient).where(OAuthClient.client_id.in_(registered))):
            described[row.client_id] = Client.from_metadata(row.client_id, row.client_metadata)
    for client_id in client_ids:
        if is_metadata_document_client_id(client_id, settings.allow_private_client_metadata_urls):
            document = components().client_metadata_fetcher.cached(client_id)
            if document is not None:
                described[client_id] = Client.from_metadata(client_id, document, from_metadata_document=True)
    return described


def _redirect_hosts(client: Client | None) -> list[str]:
    return sorted({redirect_target(uri) for uri in client.redirect_uris}) if client else []


def clients_overview() -> Listing[ClientRow]:
    """Registered clients and the metadata-document clients grants were issued to, the most recently active first."""
    registered = list(
        db.session.execute(
            select(OAuthClient.client_id, OAuthClient.last_used_at)
            .order_by(OAuthClient.last_used_at.desc(), OAuthClient.client_id)
            .limit(ROW_CAP + 1)
        ).all()
    )
    # URL client ids are never registered: the grants are where they are seen. Registered ids are at most 64
    # characters of the registration's alphabet, never a URL.
    documents = list(
        db.session.execute(
            select(Grant.client_id, func.max(Grant.created_at))
            .where(Grant.client_id.like("http%://%"))
            .group_by(Grant.client_id)
            .order_by(func.max(Grant.created_at).desc(), Grant.client_id)
            .limit(ROW_CAP + 1)
        ).all()
    )
    activity: dict[str, datetime | None] = {client_id: at for client_id, at in registered + documents}
    ids = sorted(activity, key=lambda cid: (activity[cid] or datetime.min, cid), reverse=True)[: ROW_CAP + 1]
    live: dict[str, int] = dict(
        db.session.execute(
            select(Grant.client_id, func.sum(_LIVE)).where(Grant.client_id.in_(ids)).group_by(Grant.client_id)
        ).all()
    )
    described = describe_clients(set(ids))
    rows = []
    for client_id in ids:
        client = described.get(client_id)
        rows.append(
            ClientRow(
                client_id=client_id,
                name=client.client_name if client else client_id,
                kind="metadata document" if len(client_id) > 64 or "://" in client_id else "registered",
                named_by_itself=not (client and client.from_metadata_document),
                redirect_hosts=_redirect_hosts(client),
                live_grants=int(live.get(client_id) or 0),
                last_active=activity[client_id],
            )
        )
    truncated = len(rows) > ROW_CAP or len(registered) > ROW_CAP or len(documents) > ROW_CAP
    return Listing(rows[:ROW_CAP], truncated)


@dataclass
class GrantRow:
    id: int
    user_id: str
    user_email: str | None
    client_id: str
    client_name: str
    routes: list[Route]
    resource: str
    created_at: datetime
    last_used: datetime | None
    revoked_at: datetime | None
    revoked_reason: str | None


@dataclass(frozen=True)
class GrantFilter:
    """The grants table's filters (query parameters `user` and `client`), validated."""

    user: str | None = None
    client: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.user or self.client)


def _filter_value(args: Any, name: str, label: str, limit: int) -> str | None:
    value = args.get(name, "")
    if not isinstance(value, str) or not value:
        return None
    if len(value) > limit:
        raise AdminPageError(
            400, "Filter too long", f"The {label} filter is at most {limit} characters; got {len(value)}."
        )
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        raise AdminPageError(400, "Unusable filter", f"The {label} filter contains a control character.")
    return value


def grant_filter(args: Any) -> GrantFilter:
    """The filters a request asked for; an error page for one no user id or client id could match."""
    return GrantFilter(
        user=_filter_value(args, "user", "user", MAX_USER_ID),
        client=_filter_value(args, "client", "client", MAX_CLIENT_ID),
    )


def grants_overview(wanted: GrantFilter) -> Listing[GrantRow]:
    """Grants, live and ended, the newest first, of the filter's user and client."""
    query = select(Grant).order_by(Grant.id.desc()).limit(ROW_CAP + 1)
    if wanted.user:
        query = query.where(Grant.user_id == wanted.user)
    if wanted.client:
        query = query.where(Grant.client_id == wanted.client)
    grants = list(db.session.scalars(query))
    if not grants:
        return Listing([])
    last_used = account.last_token_issued([grant.id for grant in grants])
    described = describe_clients({grant.client_id for grant in grants})
    rows = [
        GrantRow(
            id=grant.id,
            user_id=grant.user_id,
            user_email=grant.user_email,
            client_id=grant.client_id,
            client_name=described[grant.client_id].client_name if grant.client_id in described else grant.client_id,
            routes=account.routes_of(grant.resource),
            resource=grant.resource,
            created_at=grant.created_at,
            last_used=last_used.get(grant.id),
            revoked_at=grant.revoked_at,
            revoked_reason=grant.revoked_reason,
        )
        for grant in grants
    ]
    return _capped(rows)


@dataclass
class ConnectionRow:
    user_id: str
    route_name: str
    #: Still configured as a per-user route: only then can the page disconnect it (and revoke at its provider).
    route: Route | None
    kind: str
    provider: str
    since: datetime
    expires_at: datetime | None
    refused_at: datetime | None


def connections_overview(user: str | None = None) -> Listing[ConnectionRow]:
    """Every user's downstream connections (or only `user`'s), the most recently changed first; no secret read."""
    query = (
        select(
            DownstreamConnection.user_id,
            DownstreamConnection.route,
            DownstreamConnection.kind,
            DownstreamConnection.provider,
            DownstreamConnection.created_at,
            DownstreamConnection.expires_at,
            DownstreamConnection.refused_at,
        )
        .order_by(DownstreamConnection.updated_at.desc(), DownstreamConnection.id.desc())
        .limit(ROW_CAP + 1)
    )
    if user:
        query = query.where(DownstreamConnection.user_id == user)
    rows = []
    for row in db.session.execute(query):
        route = account.per_user_route(row.route)
        label = route.oauth.display_name if route is not None and route.oauth is not None else None
        rows.append(
            ConnectionRow(
                user_id=row.user_id,
                route_name=row.route,
                route=route,
                kind=row.kind,
                provider=label or row.provider or ("the user's API key" if row.kind == "user_api_key" else ""),
                since=row.created_at,
                expires_at=row.expires_at,
                refused_at=row.refused_at,
            )
        )
    return _capped(rows)


# -- what the page's forms do ------------------------------------------------------------------------------------------


def parse_grant_id(value: object) -> int:
    """A grant id from a form; an error page for anything that is not one."""
    if not isinstance(value, str) or not GRANT_ID.fullmatch(value) or int(value) > MAX_GRANT_ID:
        raise AdminPageError(400, "Not a grant id", "A grant id is a number, as the grants table shows it.")
    return int(value)


def _revoke_all(admin: AccountUser, grant_ids: list[int], what: str) -> int:
    for grant_id in grant_ids:
        revoke_grant(grant_id, REVOKED_REASON)
    # The commit announces them on the revocation feed: every worker of every instance drops their tokens.
    db.session.commit()
    log.info("admin %s revoked %s (%d grant(s))", admin.user_id, what, len(grant_ids))
    return len(grant_ids)


def revoke_one_grant(admin: AccountUser, grant_id: int) -> Grant | None:
    """Revoke a live grant; None when there is no live grant of that id."""
    grant = db.session.get(Grant, grant_id)
    if grant is None or grant.revoked_at is not None:
        return None
    _revoke_all(admin, [grant_id], f"grant {grant_id} of user {grant.user_id}")
    return grant


def _live_grant_ids(*conditions: Any) -> list[int]:
    return list(db.session.scalars(select(Grant.id).where(Grant.revoked_at.is_(None), *conditions)))


def revoke_user_grants(admin: AccountUser, user_id: str) -> int:
    """Revoke every live grant of a user; how many there were."""
    ids = _live_grant_ids(Grant.user_id == user_id)
    return _revoke_all(admin, ids, f"every grant of user {user_id}") if ids else 0


def revoke_client_grants(admin: AccountUser, client_id: str) -> int:
    """Revoke every live grant of a client, whoever's; how many there were."""
    ids = _live_grant_ids(Grant.client_id == client_id)
    return _revoke_all(admin, ids, f"every grant of client {client_id[:200]}") if ids else 0


def disconnect_user(admin: AccountUser, user_id: str, route: Route) -> bool:
    """Delete a user's connection to a per-user route (revoked at its provider where it can be)."""
    removed = disconnect(route, user_id)
    if removed:
        log.info("admin %s disconnected user %s from route %s", admin.user_id, user_id, route.name)
    return removed


# -- the audit search --------------------------------------------------------------------------------------------------


@dataclass
class AuditSearch:
    """The audit search form as submitted: the values to show back, the problems found, the filters to query."""

    values: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    filters: dict[str, Any] = field(default_factory=dict)

    @property
    def submitted(self) -> bool:
        return bool(self.values)


def _audit_time(label: str, value: str, problems: list[str]) -> datetime | None:
    text = value.strip().removesuffix("Z")
    for pattern in AUDIT_TIME_FORMATS:
        try:
            # Naive UTC, as every stored time (models.utcnow).
            return datetime.strptime(text, pattern).replace(tzinfo=None)
        except ValueError:
            continue
    problems.append(f"{label}: “{value[:40]}” is not a date; write 2026-11-30 or 2026-11-30T14:05 (UTC).")
    return None


def audit_search(args: Any) -> AuditSearch:
    """Read the audit search's query parameters: every problem in words, never an exception."""
    search = AuditSearch()
    bounds = {"user": MAX_USER_ID, "client": MAX_CLIENT_ID, "route": MAX_ROUTE, "tool": MAX_TOOL}
    for name in ("user", "client", "route", "tool", "since", "until", "limit"):
        value = args.get(name, "")
        if isinstance(value, str) and value.strip():
            search.values[name] = value[:4096]
    for name, limit in bounds.items():
        value = search.values.get(name, "").strip()
        if not value:
            continue
        if len(value) > limit:
            search.problems.append(f"The {name} filter is at most {limit} characters; got {len(value)}.")
        elif any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            search.problems.append(f"The {name} filter contains a control character.")
        else:
            search.filters[name] = value
    for name, label in (("since", "From"), ("until", "Until")):
        if name in search.values:
            at = _audit_time(label, search.values[name], search.problems)
            if at is not None:
                search.filters[name] = at
    since, until = search.filters.get("since"), search.filters.get("until")
    if since is not None and until is not None and since > until:
        search.problems.append("“From” is after “Until”: no event can match.")
    wanted = search.values.get("limit", "").strip()
    search.filters["limit"] = AUDIT_DEFAULT_LIMIT
    if wanted:
        if wanted.isascii() and wanted.isdigit() and 1 <= int(wanted) <= AUDIT_MAX_LIMIT:
            search.filters["limit"] = int(wanted)
        else:
            search.problems.append(f"Show at most: a number from 1 to {AUDIT_MAX_LIMIT}.")
    return search


@dataclass
class AuditResult:
    events: list[dict[str, Any]] = field(default_factory=list)
    columns: list[str] = field(default_factory=list)


#: The audit table shows at most this many columns, and this much of each value.
AUDIT_MAX_COLUMNS = 12
AUDIT_MAX_VALUE = 300


def run_audit_search(search: AuditSearch) -> AuditResult:
    """The events matching the search, from the audit trail (oauthproxy/audit.py)."""
    from oauthproxy.audit import query_events  # deferred, as every view's module is: audit imports the models

    if search.problems:
        return AuditResult()
    events = [dict(event) for event in query_events(**search.filters)]
    columns: list[str] = []
    for event in events:
        columns.extend(key for key in event if key not in columns)
    return AuditResult(events, columns[:AUDIT_MAX_COLUMNS])


def audit_cell(value: object) -> str:
    """One value of an event as the audit table shows it: times in UTC to the second, everything cut to a bound."""
    if value is None:
        return ""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%d %H:%M:%S UTC")
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= AUDIT_MAX_VALUE else text[:AUDIT_MAX_VALUE] + "…"
