"""OAuth clients: the client model Authlib sees, redirect-URI rules, and RFC 7591 dynamic registration."""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field

from authlib.oauth2.rfc6749 import ClientMixin
from authlib.oauth2.rfc6749.util import scope_to_list
from authlib.oauth2.rfc7591 import ClientMetadataClaims, ClientRegistrationEndpoint, InvalidClientMetadataError
from flask import current_app
from flask import request as flask_request
from sqlalchemy import select

from oauthproxy.client_metadata import ClientMetadataError, is_metadata_document_client_id
from oauthproxy.components import components
from oauthproxy.config import Settings
from oauthproxy.crypto import DecryptionError, constant_time_equals
from oauthproxy.errors import InvalidRedirectURIError, safe_description
from oauthproxy.metadata_limits import metadata_size_problem
from oauthproxy.models import OAuthClient, db, utcnow
from oauthproxy.urls import MalformedURL, is_loopback_host, is_loopback_url, redirect_uri_problem, split_url

SUPPORTED_AUTH_METHODS = ("none", "client_secret_post", "client_secret_basic")
SUPPORTED_GRANT_TYPES = ("authorization_code", "refresh_token")


@dataclass
class Client(ClientMixin):
    """A client as Authlib sees it, whether registered (RFC 7591) or described by a metadata document."""

    client_id: str
    client_name: str
    redirect_uris: list[str]
    grant_types: list[str] = field(default_factory=lambda: list(SUPPORTED_GRANT_TYPES))
    response_types: list[str] = field(default_factory=lambda: ["code"])
    token_endpoint_auth_method: str = "none"
    scope: str = ""
    client_uri: str | None = None
    logo_uri: str | None = None
    client_secret: str | None = field(default=None, repr=False)
    from_metadata_document: bool = False

    @classmethod
    def from_metadata(
        cls, client_id: str, metadata: dict, *, client_secret: str | None = None, from_metadata_document: bool = False
    ) -> Client:
        return cls(
            client_id=client_id,
            client_name=str(metadata.get("client_name") or client_id),
            redirect_uris=list(metadata.get("redirect_uris") or []),
            grant_types=list(metadata.get("grant_types") or ["authorization_code", "refresh_token"]),
            response_types=list(metadata.get("response_types") or ["code"]),
            token_endpoint_auth_method=metadata.get("token_endpoint_auth_method") or "none",
            scope=metadata.get("scope") or "",
            client_uri=metadata.get("client_uri"),
            logo_uri=metadata.get("logo_uri"),
            client_secret=client_secret,
            from_metadata_document=from_metadata_document,
        )

    def get_client_id(self) -> str:
        return self.client_id

    def get_default_redirect_uri(self) -> str | None:
        # OAuth 2.1 §2.3.2: with several registered URIs the request must name one.
        return self.redirect_uris[0] if len(self.redirect_uris) == 1 else None

    def get_allowed_scope(self, scope: str | None) -> str:
        """The scope to grant. SCOPES_SUPPORTED bounds what may be asked (Authlib checks it before this).

        A registered `scope` does not narrow a later request: MCP clients register with the scope of their
        first challenge and, on 403 insufficient_scope, ask again for more (step-up, RS-4). The user's
        consent covers the widened scope (see consent.py).
        """
        if not scope:
            # No scope requested: the client's registered scope, else everything this server supports.
            return self.scope or " ".join(components().authorization_server.scopes_supported)
        return " ".join(dict.fromkeys(scope_to_list(scope)))

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return any(redirect_uri_matches(registered, redirect_uri) for registered in self.redirect_uris)

    def check_client_secret(self, client_secret: str) -> bool:
        return self.client_secret is not None and constant_time_equals(self.client_secret, client_secret)

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        return method == self.token_endpoint_auth_method

    def check_response_type(self, response_type: str) -> bool:
        return response_type in self.response_types

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.grant_types

    @property
    def only_loopback_redirects(self) -> bool:
        return all(is_loopback_url(uri) for uri in self.redirect_uris)


def redirect_uri_matches(registered: str, requested: str) -> bool:
    """Exact string match, except that a loopback redirect may use any port (RFC 8252 §7.3).

    VS Code registers http://127.0.0.1:33418/ and falls back to a random port when it is busy.
    """
    if registered == requested:
        return True
    if redirect_uri_problem(requested) is not None:
        return False  # another port, never another rule: e.g. no fragment, not even an empty one
    try:
        a, b = split_url(registered), split_url(requested)
    except MalformedURL:
        return False
    if a.scheme != "http" or b.scheme != "http" or not a.hostname or not is_loopback_host(a.hostname):
        return False
    return (a.hostname, a.path or "/", a.query) == (b.hostname, b.path or "/", b.query)


STRING_METADATA = (
    "client_name",
    "client_uri",
    "logo_uri",
    "scope",
    "tos_uri",
    "policy_uri",
    "jwks_uri",
    "software_id",
    "software_version",
    "token_endpoint_auth_method",
    "application_type",
)
LIST_METADATA = ("grant_types", "response_types", "contacts")


def check_registration_request(data: object, settings: Settings) -> None:
    """Types and redirect URIs first, so each problem gets the RFC 7591 §3.2.2 code that names it."""
    if not isinstance(data, dict):
        raise InvalidClientMetadataError("the registration request body must be a JSON object")
    uris = data.get("redirect_uris")
    if not isinstance(uris, list) or not uris:
        raise InvalidRedirectURIError("redirect_uris is required: a list of the URIs this client receives codes at")
    for uri in uris:
        if not isinstance(uri, str):
            raise InvalidRedirectURIError("every redirect URI must be a string")
        problem = redirect_uri_problem(uri, settings.private_use_redirect_schemes)
        if problem:
            raise InvalidRedirectURIError(safe_description(f"redirect URI {uri} {problem}"))
    for name in STRING_METADATA:
        if name in data and not isinstance(data[name], str):
            raise InvalidClientMetadataError(f"{name} must be a string")
    for name in LIST_METADATA:
        if name in data and not (isinstance(data[name], list) and all(isinstance(v, str) for v in data[name])):
            raise InvalidClientMetadataError(f"{name} must be a list of strings")
    # Authlib reads any other jwks (null, a list, an object without "keys") with a TypeError or KeyError: a 500.
    jwks = data.get("jwks", {"keys": []})
    if not (isinstance(jwks, dict) and isinstance(jwks.get("keys"), list)):
        raise InvalidClientMetadataError("jwks must be a JWK Set: an object with a keys array (RFC 7517 section 5)")


def check_registration_sizes(data: object) -> None:
    """RFC 7591 §3.2.2: a field over its cap (metadata_limits) is invalid_client_metadata, and nothing is stored."""
    problem = metadata_size_problem(data) if isinstance(data, dict) else None
    if problem:
        raise InvalidClientMetadataError(safe_description(problem))


def load_client(client_id: str) -> Client | None:
    """Authlib's `query_client`: registered clients from the database, URL client ids from their document."""
    settings: Settings = current_app.config["SETTINGS"]
    if not client_id or "\x00" in client_id:
        return None  # PostgreSQL text cannot hold NUL; no real client id has one
    if is_metadata_document_client_id(client_id, settings.allow_private_client_metadata_urls):
        try:
            document = components().client_metadata_fetcher.fetch(client_id)
        except ClientMetadataError as error:
            current_app.logger.info("client metadata document refused: %s", error.description)
            return None
        return Client.from_metadata(client_id, document, from_metadata_document=True)
    if len(client_id) > 64:
        return None
    row = db.session.get(OAuthClient, client_id)
    if row is None:
        return None
    secret = None
    if row.client_secret_encrypted:
        try:
            secret = components().secret_box.decrypt(row.client_secret_encrypted, f"client:{row.client_id}:secret")
        except DecryptionError as error:
            # Unusable until the operator restores the key: answered as an unknown client (it registers again).
            current_app.logger.error("client %s: its secret cannot be decrypted: %s", row.client_id, error)
            return None
    return Client.from_metadata(row.client_id, row.client_metadata, client_secret=secret)


def metadata_document_error(client_id: str) -> str | None:
    """A readable reason a URL client id was refused, for the error page; None when it is not a URL client."""
    settings: Settings = current_app.config["SETTINGS"]
    if not is_metadata_document_client_id(client_id, settings.allow_private_client_metadata_urls):
        return None
    try:
        components().client_metadata_fetcher.fetch(client_id)
    except ClientMetadataError as error:
        return error.description
    return None


class RegistrationClaims(ClientMetadataClaims):
    """Authlib's checks of registered metadata, less its redirect-URI rule: that one asks every redirect URI for a
    host, which refuses RFC 8252 §7.1's own private-use form (`com.example.app:/oauth2redirect`). Redirect URIs are
    decided by the one policy, `redirect_uri_problem`, before these checks run (check_registration_request)."""

    def validate_redirect_uris(self) -> None:
        pass


class ClientRegistration(ClientRegistrationEndpoint):
    """RFC 7591 dynamic client registration, open (MCP clients register anonymously) but bounded.

    Identical re-registrations from one address return the existing client instead of adding a row:
    MCP clients that lose their storage re-register on every start. Clients unused for
    `unused_client_ttl` are deleted by `purge`.
    """

    def __init__(self, server=None, claims_classes=None) -> None:
        super().__init__(server, claims_classes or [RegistrationClaims])

    def authenticate_token(self, request) -> bool:
        return True  # open registration, as MCP clients expect; abuse is bounded by rate limits and dedup

    def get_server_metadata(self) -> dict:
        return components().authorization_server.metadata()

    def extract_client_metadata(self, request) -> dict:
        data = request.payload.data
        settings: Settings = current_app.config["SETTINGS"]
        check_registration_sizes(data)
        check_registration_request(data, settings)
        # RFC 7591 defaults grant_types to authorization_code alone; MCP clients that omit it still
        # need refresh, or users would log in again every hour.
        data.setdefault("grant_types", list(SUPPORTED_GRANT_TYPES))
        data.pop("offline_access", None)
        if isinstance(data.get("scope"), str):
            data["scope"] = " ".join(s for s in data["scope"].split() if s != "offline_access")
        metadata = super().extract_client_metadata(request)
        method = metadata.get("token_endpoint_auth_method", "client_secret_basic")
        if method not in SUPPORTED_AUTH_METHODS:
            raise InvalidClientMetadataError(
                safe_description(
                    f"token_endpoint_auth_method {method} is not supported; "
                    f"use one of {', '.join(SUPPORTED_AUTH_METHODS)}"
                )
            )
        if not set(metadata.get("response_types") or ["code"]) <= {"code"}:
            raise InvalidClientMetadataError("only the response type code is supported")
        return metadata

    def generate_client_info(self, request) -> dict:
        info = super().generate_client_info(request)
        # Never a leading "-": operators paste client ids into commands (`oauthproxy clients delete ID`).
        while (client_id := secrets.token_urlsafe(24)).startswith("-"):
            pass
        info["client_id"] = client_id
        info["client_secret"] = secrets.token_urlsafe(32)
        return info

    def create_registration_response(self, request):
        client_metadata = self.extract_client_metadata(request)
        client_info = self.generate_client_info(request)
        self.save_client(client_info, client_metadata, request)
        body = {**client_metadata, **client_info}
        if client_metadata.get("token_endpoint_auth_method") == "none":
            body.pop("client_secret", None)
            body.pop("client_secret_expires_at", None)
        return 201, body, [("Content-Type", "application/json"), ("Cache-Control", "no-store")]

    def save_client(self, client_info: dict, client_metadata: dict, request) -> OAuthClient:
        """Store the client; for a repeated identical public registration, reuse the row and its id."""
        public = client_metadata.get("token_endpoint_auth_method") == "none"
        fingerprint = registration_fingerprint(client_metadata, flask_request.remote_addr or "")
        if public:
            existing = db.session.scalar(
                select(OAuthClient)
                .where(OAuthClient.metadata_fingerprint == fingerprint, OAuthClient.client_secret_encrypted.is_(None))
                .limit(1)
            )
            if existing is not None:
                # Reuse: the body of the 201 names the existing id, so the client ends up with one row.
                existing.last_used_at = utcnow()
                db.session.commit()
                client_info["client_id"] = existing.client_id
                client_info["client_id_issued_at"] = int(existing.created_at.timestamp())
                return existing
        row = OAuthClient(
            client_id=client_info["client_id"],
            client_metadata_json=json.dumps(client_metadata, sort_keys=True),
            metadata_fingerprint=fingerprint,
        )
        if not public:
            row.client_secret_encrypted = components().secret_box.encrypt(
                client_info["client_secret"], f"client:{row.client_id}:secret"
            )
        db.session.add(row)
        db.session.commit()
        return row


def registration_fingerprint(client_metadata: dict, remote_addr: str) -> str:
    canonical = json.dumps(client_metadata, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{remote_addr}\n{canonical}".encode()).hexdigest()
