"""HTTP views of the account page (`/account...`): sign-in and sign-out, revoke a client, disconnect, replace a key."""

from __future__ import annotations

from datetime import datetime

from flask import Blueprint, Response, flash, redirect, render_template, request, session
from werkzeug.wrappers import Response as BaseResponse

from oauthproxy import account, consent
from oauthproxy.account import AccountPageError, AccountUser
from oauthproxy.components import components
from oauthproxy.endpoints import limit_request_body
from oauthproxy.routes import Route

blueprint = Blueprint("account", __name__)
# The same 32 KiB bound on form bodies as the authorization server's endpoints (a key is at most 4 KiB).
blueprint.before_request(limit_request_body)


def render_page(template: str, status: int = 200, **context: object) -> Response:
    """A page of the account (or admin) page: the login provider's name and the CSRF token at hand, the consent
    page's headers."""
    response = Response(
        render_template(
            template,
            provider_name=components().login_provider.display_name,
            csrf_token=consent.csrf_token(),
            **context,
        ),
        status=status,
    )
    # No framing (clickjacking a Revoke button), no caching, no referrer: as the consent page.
    response.headers.update(consent.CONSENT_PAGE_HEADERS)
    return response


def _back_to_account() -> BaseResponse:
    return redirect(account.account_url(), code=303)  # 303: the browser GETs the page after a POST


def _checked_form() -> AccountUser:
    """The signed-in user behind a form POST with a valid CSRF token; an error page otherwise."""
    if not consent.csrf_is_valid(request.form.get("csrf_token")):
        raise AccountPageError(
            400,
            "This page has expired",
            "The form could not be verified (it may be stale, or from another browser). Reload the account page "
            "and try again.",
        )
    user = account.signed_in_user()
    if user is None:
        raise AccountPageError(403, "Your session has ended", "Sign in again on the account page, then try again.")
    return user


def _key_route(route_name: str) -> Route:
    route = account.per_user_route(route_name)
    if route is None or route.credential.kind != "user_api_key":
        raise AccountPageError(404, "No such MCP server", "No MCP server here takes your own API key under that name.")
    return route


@blueprint.route("/account", methods=["GET"])
def account_page() -> Response:
    had_session = account.SESSION_KEY in session
    user = account.signed_in_user()
    if user is None:
        return render_page("account.html", user=None, session_ended=had_session)
    connections = account.connection_entries(user.user_id)
    return render_page(
        "account.html",
        user=user,
        clients=account.connected_clients(user.user_id),
        connections=connections,
        key_routes=account.unconnected_key_routes(user.user_id, connections),
        session_ended=False,
    )


@blueprint.route("/account/sign-in", methods=["POST"])
def sign_in() -> BaseResponse:
    # A form, not a link: another site cannot start sign-ins (pending rows) in a visitor's browser.
    if not consent.csrf_is_valid(request.form.get("csrf_token")):
        raise AccountPageError(400, "This page has expired", "Reload the account page and sign in from there.")
    return account.begin_account_login()


@blueprint.route("/account/sign-out", methods=["POST"])
def sign_out() -> BaseResponse:
    if not consent.csrf_is_valid(request.form.get("csrf_token")):
        raise AccountPageError(400, "This page has expired", "Reload the account page and sign out from there.")
    account.sign_out()
    flash("You are signed out of the account page.")
    return _back_to_account()


@blueprint.route("/account/clients/revoke", methods=["POST"])
def revoke_client() -> BaseResponse:
    user = _checked_form()
    client_id = request.form.get("client_id", "")
    revoked = account.revoke_client(user.user_id, client_id)
    if revoked is None:
        raise AccountPageError(404, "No such application", "None of your connected applications has that id.")
    client = account.describe_client(client_id)  # only now: an id the user does not hold is never looked up
    flash(
        f"{client.client_name if client else 'The application'} no longer has access. "
        "It asks you again before it can sign in."
    )
    response = _back_to_account()
    consent.forget_consent(request, response, client_id, revoked.resources)
    return response


@blueprint.route("/account/connections/disconnect", methods=["POST"])
def disconnect() -> BaseResponse:
    user = _checked_form()
    route = account.per_user_route(request.form.get("route", ""))
    if route is None or not account.disconnect_route(user.user_id, route):
        raise AccountPageError(404, "No such connection", "None of your connections is for that MCP server.")
    flash(f"Disconnected from {route.name}. Your stored credentials for it are deleted.")
    return _back_to_account()


@blueprint.route("/account/keys/<route_name>", methods=["GET", "POST"])
def replace_key(route_name: str) -> BaseResponse:
    if request.method == "GET":
        user = account.signed_in_user()
        if user is None:
            return _back_to_account()  # the account page offers the sign-in
        route = _key_route(route_name)
        return render_page("account_key.html", route=route, user=user, has_key=_has_key(user, route), problem=None)
    user = _checked_form()
    route = _key_route(route_name)
    problem = account.replace_api_key(user, route, request.form.get("api_key", ""))
    if problem is not None:
        # The key is never echoed back into the page.
        return render_page(
            "account_key.html", 400, route=route, user=user, has_key=_has_key(user, route), problem=problem
        )
    flash(f"Your key for {route.name} is saved.")
    return _back_to_account()


def _has_key(user: AccountUser, route: Route) -> bool:
    return any(entry.route_name == route.name for entry in account.connection_entries(user.user_id))


@blueprint.app_errorhandler(AccountPageError)
def account_page_error(error: AccountPageError) -> Response:
    response = render_page(
        "account_error.html",
        error.status,
        title=error.title,
        message=error.message,
        back_endpoint=error.back_endpoint,
        back_label=error.back_label,
    )
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


@blueprint.app_template_filter("account_time")
def account_time(value: datetime | None) -> str:
    """Stored times are naive UTC (models.utcnow): shown as such, to the minute."""
    return value.strftime("%Y-%m-%d %H:%M UTC") if value is not None else "never"
