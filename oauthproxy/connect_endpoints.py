"""The connect step's pages: `/connect/<token>` (sign in to the downstream, or give a key) and the hop's callback."""

from __future__ import annotations

from flask import Blueprint, Response, redirect, render_template, request
from flask.blueprints import BlueprintSetupState
from werkzeug.routing import BaseConverter
from werkzeug.wrappers import Response as BaseResponse

from oauthproxy import connect, consent
from oauthproxy.connection_providers import CONNECT_CALLBACK_PATH
from oauthproxy.endpoints import MAX_BODY_BYTES
from oauthproxy.login import AuthorizationPageError

blueprint = Blueprint("connect", __name__)


class ConnectToken(BaseConverter):
    """A page token's shape (connect.TOKEN_SHAPE): other paths under /connect (the callback, the proxy's client
    metadata document) are never taken for a token, so a POST there is their 405, not this page's CSRF error."""

    regex = connect.TOKEN_SHAPE.pattern.removeprefix("^").removesuffix("$")


@blueprint.record_once
def register_converter(state: BlueprintSetupState) -> None:
    # Runs before the blueprint's rules are added (deferred functions run in the order they were recorded).
    state.app.url_map.converters["connect_token"] = ConnectToken


@blueprint.before_request
def limit_request_body() -> None:
    # The same bound as the authorization endpoints' forms: the key form is a few KB at most.
    request.max_content_length = MAX_BODY_BYTES


def _page(template: str, page: connect.ConnectPage, status: int = 200, error: str | None = None) -> Response:
    response = Response(
        render_template(template, page=page, error=error, csrf_token=consent.csrf_token()),
        status=status,
    )
    response.headers.update(consent.CONSENT_PAGE_HEADERS)
    if status == 503:
        response.headers["Retry-After"] = "5"
    return response


def render_connect_page(page: connect.ConnectPage, status: int = 200, error: str | None = None) -> Response:
    template = "connect_api_key.html" if page.route.credential.kind == "user_api_key" else "connect.html"
    return _page(template, page, status, error)


@blueprint.route("/connect/<connect_token:token>", methods=["GET", "POST"])
def connect_page(token: str) -> BaseResponse:
    browser = connect.browser_id()
    if request.method == "GET":
        return render_connect_page(connect.open_connect_page(token, browser))
    if not consent.csrf_is_valid(request.form.get("csrf_token")):
        raise AuthorizationPageError(
            400,
            "This page has expired",
            "The form could not be verified (it may be stale or opened in another browser). "
            "Start again from your MCP client.",
        )
    if request.form.get("decision") == "cancel":
        return redirect(connect.cancel_connection(token, browser))
    try:
        if connect.open_connect_page(token, browser).route.credential.kind == "user_api_key":
            return connect.submit_api_key(token, browser, request.form.get("api_key", ""))
        return redirect(connect.start_connection_hop(token, browser))
    except connect.ConnectRetry as retry:
        return render_connect_page(connect.open_connect_page(token, browser), retry.status, retry.message)


@blueprint.route(CONNECT_CALLBACK_PATH)
def connect_callback() -> BaseResponse:
    return connect.finish_connection_hop(request.args.to_dict(flat=True), connect.browser_id())
