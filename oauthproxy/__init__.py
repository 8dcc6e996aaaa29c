"""oauthproxy: an OAuth 2.1 authorization server and streaming reverse proxy for MCP servers (application factory)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from flask import Flask

from oauthproxy.config import Settings, load_settings

MIGRATIONS_DIRECTORY = str(Path(__file__).parent / "migrations")
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def instance_folder() -> Path:
    """Where the default SQLite database lives: `instance/` in the checkout when run from one, else `instance/` in
    the working directory (the image's /app), not Flask's `<venv>/var/oauthproxy-instance` for installed packages."""
    if (PROJECT_ROOT / "pyproject.toml").is_file():
        return PROJECT_ROOT / "instance"
    return Path.cwd() / "instance"


def create_app(env: Mapping[str, str] | None = None) -> Flask:
    """Build the application from `env` (default: the process environment plus `.env`).

    Raises `oauthproxy.config.ConfigError` listing every invalid setting; `wsgi.py` and the CLI print it and exit.
    """
    if env is None:
        from dotenv import load_dotenv

        load_dotenv(os.environ.get("OAUTHPROXY_ENV_FILE", ".env"))
    # Templates and static files are inside the package (oauthproxy/templates links to the top-level templates/ and
    # is copied into the wheel), so an installed package serves them from wherever it runs.
    app = Flask(__name__, instance_path=str(instance_folder()), instance_relative_config=True)
    settings = load_settings(env, instance_path=app.instance_path)
    if settings.database_dsn.startswith("sqlite:"):
        Path(app.instance_path).mkdir(parents=True, exist_ok=True)
    configure_app(app, settings)
    return app


def configure_app(app: Flask, settings: Settings) -> None:
    from flask_migrate import Migrate

    from oauthproxy import account_views, admin_views, connect_endpoints, endpoints
    from oauthproxy.audit import init_audit
    from oauthproxy.authorization_server import AuthorizationServer
    from oauthproxy.client_metadata import ClientMetadataFetcher
    from oauthproxy.components import attach_components
    from oauthproxy.crypto import SecretBox
    from oauthproxy.database_faults import engine_options, init_database_faults
    from oauthproxy.downstream_discovery import init_downstream_discovery
    from oauthproxy.identity_assertions import init_identity_assertions
    from oauthproxy.logs import configure_logging
    from oauthproxy.models import db
    from oauthproxy.operations import init_operations
    from oauthproxy.providers import build_connection_provider, build_login_provider
    from oauthproxy.rate_limits import init_rate_limits
    from oauthproxy.resource_server import init_resource_server
    from oauthproxy.revocation_feed import init_revocation_feed
    from oauthproxy.session_cookies import SessionCookies

    # Werkzeug answers `//` in a path (merge_slashes) and a missing trailing slash (strict_slashes) with a 308 to a URL
    # built from the request's Host: an open redirect to any host a client names. Every URL we send comes from
    # PUBLIC_URL; a path that does not match as sent is a 404, or the MCP route's own 400. Rules already added (Flask's
    # static one) were bound with the old settings.
    app.url_map.merge_slashes = app.url_map.strict_slashes = False
    for rule in app.url_map.iter_rules():
        rule.merge_slashes = rule.strict_slashes = False
    if settings.is_loopback:
        # Authlib refuses http:// URLs unless this is set; allowed only when PUBLIC_URL is loopback.
        os.environ["AUTHLIB_INSECURE_TRANSPORT"] = "1"
    app.config.update(
        SETTINGS=settings,
        SECRET_KEY=settings.secret_key,
        SQLALCHEMY_DATABASE_URI=settings.database_dsn,
        SQLALCHEMY_ENGINE_OPTIONS=engine_options(settings.database_dsn, settings.database_timeout),
        OAUTH_SCOPES_SUPPORTED=settings.scopes_supported,
        SESSION_COOKIE_NAME="__Host-oauthproxy-session" if settings.secure_cookies else "oauthproxy-session",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        # Form parsing bounds (Werkzeug); each endpoint's body cap is set per request (endpoints.MAX_BODY_BYTES),
        # not MAX_CONTENT_LENGTH, which would also cap the MCP bodies that stream through.
        MAX_FORM_MEMORY_SIZE=endpoints.MAX_BODY_BYTES,
        MAX_FORM_PARTS=endpoints.MAX_FORM_PARTS,
    )
    app.session_interface = SessionCookies()
    configure_logging(settings.log_format)

    db.init_app(app)
    init_database_faults(app, settings.database_timeout)
    Migrate(app, db, directory=MIGRATIONS_DIRECTORY)
    services = attach_components(app)
    services.secret_box = SecretBox(settings.encryption_keys)
    services.client_metadata_fetcher = ClientMetadataFetcher(
        allow_private_networks=settings.allow_private_client_metadata_urls,
        private_use_redirect_schemes=settings.private_use_redirect_schemes,
        timeout=settings.client_metadata_fetch_timeout,
        max_bytes=settings.client_metadata_max_bytes,
        max_entries=settings.client_metadata_cache_size,
        default_ttl=settings.client_metadata_cache_ttl,
        min_ttl=settings.client_metadata_min_cache_ttl,
        max_ttl=settings.client_metadata_max_cache_ttl,
        failure_ttl=settings.client_metadata_failure_ttl,
        ca_bundle=settings.ca_bundle,
    )
    login_provider = build_login_provider(settings)
    login_provider.init_app(app)
    services.login_provider = login_provider
    # One provider per route with `oauth = {...}`; `oauth = "discover"` routes find theirs on first use.
    services.connection_providers = {}
    for route in settings.routes:
        if route.oauth is not None and not route.oauth.discover:
            provider = build_connection_provider(
                route.name, route.oauth, ca_bundle=settings.ca_bundle, timeout=settings.provider_http_timeout
            )
            provider.init_app(app)
            services.connection_providers[route.name] = provider
    if not settings.scopes_supported:
        app.config["OAUTH_SCOPES_SUPPORTED"] = login_provider.default_scopes
    AuthorizationServer(app, settings)
    app.register_blueprint(endpoints.blueprint)
    app.register_blueprint(account_views.blueprint)
    app.register_blueprint(admin_views.blueprint)
    app.register_blueprint(connect_endpoints.blueprint)
    init_downstream_discovery(app)
    init_resource_server(app, settings)
    init_identity_assertions(app)
    init_revocation_feed(app)
    init_audit(app)
    services.rate_limiter = init_rate_limits(app, settings)
    init_operations(app, settings)

    from oauthproxy import cli

    cli.register_commands(app)
