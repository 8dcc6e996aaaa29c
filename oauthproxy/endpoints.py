"""HTTP endpoints of the authorization server: metadata, registration, authorize, consent, callback, token, revoke."""

from __future__ import annotations

import base64

from flask import Blueprint, Response, jsonify, redirect, render_template, request
from werkzeug.exceptions import RequestEntityTooLarge, TooManyRequests
from werkzeug.wrappers import Response as BaseResponse

from oauthproxy import audit, consent
from oauthproxy.components import components
from oauthproxy.database import purge_if_due
from oauthproxy.errors import json_error, safe_description
from oauthproxy.login import (
    SINGLE_VALUED,
    AuthorizationPageError,
    AuthorizationRedirectError,
    begin_provider_login,
    complete_provider_login,
    error_redirect_url,
    validate_authorization_request,
)
from oauthproxy.urls import is_loopback_url, private_use_scheme, redirect_target

blueprint = Blueprint("authorization", __name__, static_folder="static", static_url_path="/static")

# Browser-based clients (MCP Inspector) call these from a page (MCP authorization, AS-16). No credentials
# are involved, so a wildcard origin is safe here.
CORS_HEADERS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, MCP-Protocol-Version",
    "Access-Control-Max-Age": "86400",
}
CORS_PATHS = ("/.well-known/", "/register", "/token", "/revoke")

# Every body these endpoints take is a small form or JSON document (a registration is about 1 KB, a token request
# a few hundred bytes, the consent form under 10 KB): 32 KiB fits every real client, and a larger body is refused
# with 413 before it is read. The MCP routes stream their bodies and are not limited here.
MAX_BODY_BYTES = 32 * 1024
# multipart/form-data only (Werkzeug); no client sends it here, but it must not cost more than a form.
MAX_FORM_PARTS = 50


def _server():
    return components().authorization_server


@blueprint.before_request
def limit_request_body() -> None:
    request.max_content_length = MAX_BODY_BYTES
    if request.content_length is None and request.method == "POST":
        # A chunked body has no length to refuse up front, and Werkzeug stops reading it at the cap without an
        # error: the rest would be silently cut off. Read it now (cached for the view), then one byte more,
        # which raises RequestEntityTooLarge when the body went on past the cap.
        request.get_data(cache=True)
        request.stream.read(1)


@blueprint.after_app_request
def add_cors_headers(response: Response) -> Response:
    if request.path.startswith(CORS_PATHS):
        response.headers.update(CORS_HEADERS)
    return response


@blueprint.route("/.well-known/oauth-authorization-server")
@blueprint.route("/.well-known/openid-configuration")
def authorization_server_metadata() -> Response:
    response = jsonify(_server().metadata())
    response.headers["Cache-Control"] = "public, max-age=3600"
    return response


@blueprint.route("/register", methods=["POST", "OPTIONS"])
def register() -> Response:
    if request.method == "OPTIONS":
        return Response(status=204)
    try:
        body = request.get_json(silent=True)
    except RecursionError:  # absurdly nested JSON
        body = None
    if not request.is_json or not isinstance(body, dict):
        return json_error(
            400, "invalid_client_metadata", "send the client metadata as a JSON object (Content-Type: application/json)"
        )
    return _server().create_endpoint_response("client_registration")


@blueprint.route("/authorize", methods=["GET"])
def authorize() -> BaseResponse:
    repeated = [key for key in SINGLE_VALUED if len(request.args.getlist(key)) > 1]
    validated = validate_authorization_request(request.args.to_dict(flat=True), repeated)
    if consent.has_consented(request, validated.client.client_id, validated.resource, validated.scope):
        return begin_provider_login(validated)
    return render_consent(validated)


# Plain words for the scopes people meet most; anything else is shown as its code.
SCOPE_DESCRIPTIONS = {
    "openid": "Confirm who you are",
    "email": "Your email address",
    "profile": "Your name and profile",
    "read:user": "Your GitHub profile",
    "user:email": "Your GitHub email addresses",
}


def render_consent(validated) -> Response:
    response = Response(
        render_template(
            "consent.html",
            client=validated.client,
            scopes=validated.scope.split(),
            scope_descriptions=SCOPE_DESCRIPTIONS,
            provider_name=components().login_provider.display_name,
            resource=validated.resource,
            redirect_uri=validated.redirect_uri,
            signed_request=consent.sign_authorization_request(validated.params),
            csrf_token=consent.csrf_token(),
        )
    )
    response.headers.update(consent.CONSENT_PAGE_HEADERS)
    return response


@blueprint.route("/authorize/consent", methods=["POST"])
def submit_consent() -> BaseResponse:
    if not consent.csrf_is_valid(request.form.get("csrf_token")):
        raise AuthorizationPageError(
            400,
            "This page has expired",
            "The consent form could not be verified (it may be stale or opened in "
            "another browser). Start again from your MCP client.",
        )
    params = consent.load_authorization_request(request.form.get("request", ""))
    if params is None:
        raise AuthorizationPageError(
            400,
            "This page has expired",
            "The consent form is more than 10 minutes old. Start again from your MCP client.",
        )
    validated = validate_authorization_request(params)
    audit.record(
        "consent",
        client=validated.client.client_id,
        resource=validated.resource,
        outcome="approved" if request.form.get("decision") == "approve" else "denied",
        scope=validated.scope,
    )
    if request.form.get("decision") != "approve":
        return redirect(
            error_redirect_url(validated.redirect_uri, "access_denied", "the user denied the request", validated.state)
        )
    response = begin_provider_login(validated)
    consent.remember_consent(request, response, validated.client.client_id, validated.resource, validated.scope)
    return response


@blueprint.route("/callback")
def callback() -> BaseResponse:
    return complete_provider_login(request.args.to_dict(flat=True))


@blueprint.route("/token", methods=["POST", "OPTIONS"])
def token() -> Response:
    if request.method == "OPTIONS":
        return Response(status=204)
    problem = malformed_token_request()
    if problem is not None:
        return problem
    response = _server().create_token_response()
    purge_if_due()
    return response


@blueprint.route("/revoke", methods=["POST", "OPTIONS"])
def revoke() -> Response:
    if request.method == "OPTIONS":
        return Response(status=204)
    return malformed_token_request() or _server().create_endpoint_response("revocation")


SINGLE_VALUED_TOKEN_PARAMS = (
    "grant_type",
    "code",
    "redirect_uri",
    "code_verifier",
    "refresh_token",
    "client_id",
    "client_secret",
    "scope",
    "token",
    "token_type_hint",
)


def malformed_token_request() -> Response | None:
    """What Authlib would not refuse cleanly: repeated parameters (RFC 6749 §3.2) and unreadable Basic credentials."""
    for name in SINGLE_VALUED_TOKEN_PARAMS:
        if len(request.form.getlist(name)) > 1:
            return json_error(400, "invalid_request", f"the parameter {name} was sent more than once")
    scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "basic":
        try:
            if not credentials.strip():
                raise ValueError("no credentials")  # `Basic` alone: Authlib's parser would raise on it
            base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
        except ValueError:  # also binascii.Error and UnicodeDecodeError
            response = json_error(
                401, "invalid_client", "the Basic credentials are missing or not base64 of UTF-8 text"
            )
            response.headers["WWW-Authenticate"] = 'Basic error="invalid_client"'
            return response
    return None


def prefers_json() -> bool:
    """The request ranks JSON above HTML (mcp-remote probes /authorize so to spot a stale registration)."""
    # Ties (e.g. `*/*`) go to HTML: a browser must always get the page.
    return request.accept_mimetypes.best_match(["text/html", "application/json"]) == "application/json"


@blueprint.app_errorhandler(AuthorizationPageError)
def authorization_page_error(error: AuthorizationPageError) -> Response:
    if request.path == "/authorize" and prefers_json():
        # RFC 6749 §5.2 shape; 400 because no client authentication was attempted (401 is for that case).
        return json_error(error.status, error.error, safe_description(error.message))
    response = Response(
        render_template("error.html", title=error.title, message=error.message, continue_url=error.continue_url),
        status=error.status,
    )
    response.headers.update(consent.CONSENT_PAGE_HEADERS)
    return response


@blueprint.app_errorhandler(AuthorizationRedirectError)
def authorization_redirect_error(error: AuthorizationRedirectError) -> BaseResponse:
    return redirect(error_redirect_url(error.redirect_uri, error.error, error.description, error.state))


@blueprint.app_errorhandler(RequestEntityTooLarge)
def request_too_large(error: RequestEntityTooLarge) -> Response:
    limit = request.max_content_length
    description = (
        f"the request body is larger than the {limit}-byte limit of this endpoint, or has more than "
        f"{MAX_FORM_PARTS} form fields"
        if limit
        else "the request body is too large"
    )
    return json_error(413, "invalid_request", description)


@blueprint.app_errorhandler(TooManyRequests)
def too_many_requests(error: TooManyRequests) -> Response:
    retry_after = error.get_response().headers.get("Retry-After") if hasattr(error, "get_response") else None
    return json_error(
        429,
        "too_many_requests",
        "Too many requests from this address; retry after the Retry-After delay.",
        {"Retry-After": retry_after or "60"},
    )


# The consent page says where a redirect URI sends the user, by the URL rules in urls.py.
blueprint.add_app_template_filter(redirect_target, "redirect_target")
blueprint.add_app_template_filter(private_use_scheme, "private_use_scheme")
blueprint.add_app_template_filter(is_loopback_url, "is_loopback_redirect")
