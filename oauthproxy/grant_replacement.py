"""Grant replacement: a user's new sign-in through a client ends their earlier grants of that client and resource."""

from __future__ import annotations

from flask import current_app
from sqlalchemy import select

from oauthproxy.authorization_server import revoke_grant
from oauthproxy.config import Settings
from oauthproxy.models import Grant, db

#: `Grant.revoked_reason` and the `oauthproxy_grants_revoked_total{reason}` label of a replaced grant.
REPLACED_REASON = "replaced_by_new_sign_in"


def replace_previous_grants(grant: Grant) -> list[int]:
    """Revoke the user's other live grants of `grant`'s client and resource; the ids revoked.

    A client signs in again when it lost its tokens, or its user wanted to: the earlier login's refresh token
    then sits unused in a lost store (or a stolen one) for up to REFRESH_TOKEN_TTL. One live grant per user, client
    and MCP server (RFC 8707 resource) keeps what a person sees on the account page what can act for them.

    `grant` is flushed (it has its id) and not committed: the revocations commit with it and its authorization code
    (login.store_grant), so a sign-in that fails to store leaves the earlier grant working. Their cached tokens are
    dropped in this worker at once, and by every other worker and instance within a second (revocation_feed).
    Off with REPLACE_PREVIOUS_GRANTS=false: a client whose installations share one client id (a client metadata
    document URL) signs a user in on several machines at once, each with a grant of its own."""
    settings: Settings = current_app.config["SETTINGS"]
    if not settings.replace_previous_grants:
        return []
    previous = list(
        db.session.scalars(
            select(Grant.id).where(
                Grant.user_id == grant.user_id,
                Grant.client_id == grant.client_id,
                Grant.resource == grant.resource,
                Grant.revoked_at.is_(None),
                Grant.id != grant.id,
            )
        )
    )
    for grant_id in previous:
        revoke_grant(grant_id, REPLACED_REASON)
    return previous
