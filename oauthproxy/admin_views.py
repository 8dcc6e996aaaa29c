"""HTTP views of the admin page (`/admin...`): the overview tables, the revoke and disconnect forms, the audit search."""

from __future__ import annotations

from urllib.parse import urlencode

from flask import Blueprint, Response, flash, redirect, request, url_for
from werkzeug.wrappers import Response as BaseResponse

from oauthproxy import account, admin, consent
from oauthproxy.account import AccountUser
from oauthproxy.account_views import render_page as _page
from oauthproxy.admin import AdminPageError
from oauthproxy.endpoints import limit_request_body

blueprint = Blueprint("admin", __name__)
# The same 32 KiB bound on form bodies as the account page's forms.
blueprint.before_request(limit_request_body)


def _back_to_admin(**query: str) -> BaseResponse:
    url = account.account_url().removesuffix("/account") + "/admin"
    wanted = {name: value for name, value in query.items() if value}
    # 303: the browser GETs the page after a POST; the filters the admin was looking at are kept.
    return redirect(url + ("?" + urlencode(wanted) if wanted else ""), code=303)


def _checked_form() -> AccountUser:
    """The admin behind a form POST with a valid CSRF token; an error page otherwise."""
    if not consent.csrf_is_valid(request.form.get("csrf_token")):
        raise AdminPageError(
            400,
            "This page has expired",
            "The form could not be verified (it may be stale, or from another browser). Reload the admin page and "
            "try again.",
        )
    user = admin.signed_in_admin()
    if user is None:
        raise AdminPageError(403, "Your session has ended", "Sign in again on the admin page, then try again.")
    return user


def _form_text(name: str, label: str, limit: int) -> str:
    value = request.form.get(name, "")
    if not value:
        raise AdminPageError(400, f"No {label} given", f"The form names no {label}. Reload the admin page.")
    if len(value) > limit:
        raise AdminPageError(400, f"Not a {label}", f"A {label} is at most {limit} characters; got {len(value)}.")
    return value


def _kept_filters() -> dict[str, str]:
    """The filters of the page the form was on (hidden fields), when they are still valid ones."""
    try:
        kept = admin.grant_filter(request.form)
    except AdminPageError:
        return {}
    return {"user": kept.user or "", "client": kept.client or ""}


@blueprint.route("/admin", methods=["GET"])
def admin_page() -> Response:
    user = admin.signed_in_admin()
    if user is None:
        return _page("admin.html", user=None)
    wanted = admin.grant_filter(request.args)
    return _page(
        "admin.html",
        user=user,
        wanted=wanted,
        users=admin.users_overview(),
        clients=admin.clients_overview(),
        grants=admin.grants_overview(wanted),
        connections=admin.connections_overview(wanted.user),
        row_cap=admin.ROW_CAP,
    )


@blueprint.route("/admin/sign-in", methods=["POST"])
def sign_in() -> BaseResponse:
    # A form, not a link: another site cannot start sign-ins (pending rows) in a visitor's browser.
    if not consent.csrf_is_valid(request.form.get("csrf_token")):
        raise AdminPageError(400, "This page has expired", "Reload the admin page and sign in from there.")
    return account.begin_account_login(return_to="/admin")


@blueprint.route("/admin/sign-out", methods=["POST"])
def sign_out() -> BaseResponse:
    if not consent.csrf_is_valid(request.form.get("csrf_token")):
        raise AdminPageError(400, "This page has expired", "Reload the admin page and sign out from there.")
    account.sign_out()
    flash("You are signed out.")
    return _back_to_admin()


@blueprint.route("/admin/grants/revoke", methods=["POST"])
def revoke_grant() -> BaseResponse:
    user = _checked_form()
    grant_id = admin.parse_grant_id(request.form.get("grant_id"))
    grant = admin.revoke_one_grant(user, grant_id)
    if grant is None:
        raise AdminPageError(404, "No such grant", f"No live grant has the id {grant_id}: it may be revoked already.")
    flash(f"Grant {grant_id} of {grant.user_email or grant.user_id} is revoked.")
    return _back_to_admin(**_kept_filters())


@blueprint.route("/admin/users/revoke", methods=["POST"])
def revoke_user() -> BaseResponse:
    user = _checked_form()
    user_id = _form_text("user_id", "user id", admin.MAX_USER_ID)
    count = admin.revoke_user_grants(user, user_id)
    if not count:
        raise AdminPageError(404, "No live grants", "That user holds no live grant (any more).")
    flash(f"Revoked {count} grant(s) of user {user_id}.")
    return _back_to_admin(**_kept_filters())


@blueprint.route("/admin/clients/revoke", methods=["POST"])
def revoke_client() -> BaseResponse:
    user = _checked_form()
    client_id = _form_text("client_id", "client id", admin.MAX_CLIENT_ID)
    count = admin.revoke_client_grants(user, client_id)
    if not count:
        raise AdminPageError(404, "No live grants", "That client holds no live grant (any more).")
    flash(f"Revoked {count} grant(s) of client {client_id}.")
    return _back_to_admin(**_kept_filters())


@blueprint.route("/admin/connections/disconnect", methods=["POST"])
def disconnect() -> BaseResponse:
    user = _checked_form()
    user_id = _form_text("user_id", "user id", admin.MAX_USER_ID)
    route = account.per_user_route(request.form.get("route", ""))
    if route is None or not admin.disconnect_user(user, user_id, route):
        raise AdminPageError(404, "No such connection", "That user has no connection to an MCP server of that name.")
    flash(f"Disconnected user {user_id} from {route.name}. Their stored credentials for it are deleted.")
    return _back_to_admin(**_kept_filters())


@blueprint.route("/admin/audit", methods=["GET"])
def audit() -> Response:
    user = admin.signed_in_admin()
    if user is None:
        return redirect(url_for("admin.admin_page"))  # type: ignore[return-value]
    search = admin.audit_search(request.args)
    return _page(
        "admin_audit.html",
        400 if search.problems else 200,
        user=user,
        search=search,
        result=admin.run_audit_search(search) if search.submitted else admin.AuditResult(),
        max_limit=admin.AUDIT_MAX_LIMIT,
    )


@blueprint.app_template_filter("audit_cell")
def audit_cell(value: object) -> str:
    return admin.audit_cell(value)
