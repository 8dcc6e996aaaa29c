"""Settings: every one read from the environment (with `.env`) and checked, all problems at once (`ConfigError`)."""

from __future__ import annotations

import base64
import binascii
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from oauthproxy.allowlists import email_address, email_is_listed, user_is_listed
from oauthproxy.config_values import (
    DAY,
    absolute_url,
    boolean_word,
    origin_url,
    read_bool,
    read_choice,
    read_int,
    read_list,
    read_seconds,
    read_text,
    read_url,
)
from oauthproxy.groups import MAX_GROUP_LENGTH, configuration_uses_groups, read_group_list
from oauthproxy.routes import ProxySettings, Route, load_proxy_settings, load_routes
from oauthproxy.urls import is_loopback_host, private_use_scheme_problem


class ConfigError(Exception):
    """Raised with every problem found, so an operator fixes them in one pass."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Settings:
    public_url: str
    oauth_client_id: str
    oauth_client_secret: str
    oauth_authorize_url: str
    mcp_server_url: str
    encryption_keys: tuple[bytes, ...]
    database_dsn: str
    #: Bound in seconds on every database wait: connecting, a statement, SQLite's write lock, a pooled connection.
    database_timeout: int = 5
    scopes_supported: tuple[str, ...] = ()
    oauth_token_url: str | None = None
    oauth_userinfo_url: str | None = None
    upstream_scopes: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8080
    access_token_ttl: int = 3600
    refresh_token_ttl: int = 30 * DAY
    authorization_code_ttl: int = 300
    refresh_grace_seconds: int = 10
    #: A registered client with no grant, unused this long, is deleted by the purge.
    unused_client_ttl: int = 30 * DAY
    #: How long a login may stay at the provider before its callback is refused.
    pending_login_ttl: int = 600
    #: How long the consent cookie remembers an approval.
    consent_ttl: int = 365 * DAY
    #: How long the consent page's signed authorization request stays valid.
    consent_page_ttl: int = 600
    #: Each call to the provider (discovery, token, user info, keys) waits at most this long.
    provider_http_timeout: float = 10.0
    allowed_emails: frozenset[str] = frozenset()
    allowed_email_domains: frozenset[str] = frozenset()
    #: ALLOWED_GROUPS: group names (groups.py), matched exactly; a user in any of them passes the global list.
    allowed_groups: frozenset[str] = frozenset()
    #: GROUPS_CLAIM: the claim of the ID token or userinfo that lists the user's groups (a name or dotted path).
    groups_claim: str = "groups"
    #: ADMIN_EMAILS: the verified emails (lower-cased) of the operators the admin page (`/admin`) lets in.
    admin_emails: frozenset[str] = frozenset()
    allow_private_client_metadata_urls: bool = False
    #: Client ID Metadata Documents: fetch bounds and how long documents (and failures to get one) are cached.
    client_metadata_fetch_timeout: float = 5.0
    client_metadata_max_bytes: int = 5 * 1024
    client_metadata_cache_size: int = 1024
    client_metadata_cache_ttl: int = 300
    client_metadata_min_cache_ttl: int = 60
    client_metadata_max_cache_ttl: int = DAY
    client_metadata_failure_ttl: int = 30
    #: Private-use redirect schemes (cursor://) allowed: None for any (the default), else only these.
    private_use_redirect_schemes: frozenset[str] | None = None
    register_rate_limit: str = "20 per minute"
    authorize_rate_limit: str = "60 per minute"
    token_rate_limit: str = "120 per minute"
    rate_limit_storage_uri: str = "memory://"
    secret_key: bytes = field(default=b"", repr=False)
    #: How many reverse proxies in front are trusted to set X-Forwarded-For/-Proto (0: none, the peer is the client).
    trusted_proxy_hops: int = 0
    log_format: str = "text"
    #: When set, /metrics wants it as a Bearer token or as the password of Basic credentials.
    metrics_token: str = field(default="", repr=False)
    routes: tuple[Route, ...] = ()
    proxy: ProxySettings = field(default_factory=ProxySettings)
    #: CA_BUNDLE: a PEM file of the certificate authorities trusted for outbound TLS (provider, client metadata
    #: documents, downstream MCP servers) instead of certifi's public ones; for a private PKI.
    ca_bundle: str | None = None
    #: GITHUB_API_URL: GitHub's REST API (https://api.github.com; GitHub Enterprise Server: https://HOST/api/v3).
    github_api_url: str | None = None
    #: How each worker learns of grants revoked elsewhere (revocation_feed.py): "notify" (PostgreSQL LISTEN/NOTIFY),
    #: "poll" (the revocations table, every 250 ms), "redis" (pub/sub) or "off" (TOKEN_CACHE_TTL alone).
    revocation_feed: str = "poll"
    #: Where the "redis" feed publishes and listens.
    revocation_redis_url: str | None = field(default=None, repr=False)
    #: REPLACE_PREVIOUS_GRANTS: a new sign-in of a user through a client, for a resource, revokes their earlier grants
    #: of that client and resource (grant_replacement.py), so one login is live per client and MCP server.
    replace_previous_grants: bool = True
    #: ACCOUNT_SESSION_TTL: how long a sign-in to the account page lasts (account.py).
    account_session_ttl: int = 3600
    #: AUDIT_ENABLED: false records no audit event at all (no lines, no rows).
    audit_enabled: bool = True
    #: AUDIT_LOG: where audit events go as JSON lines, "stdout", "stderr", "off" or a file path (audit.py).
    audit_log: str = "stdout"
    #: AUDIT_RETENTION_DAYS: how long the audit_events table keeps an event (the purge deletes older ones).
    audit_retention_days: int = 90

    @property
    def issuer(self) -> str:
        return self.public_url

    @property
    def callback_url(self) -> str:
        return self.public_url + "/callback"

    @property
    def mcp_path(self) -> str:
        if self.routes:
            return self.routes[0].path
        return urlsplit(self.mcp_server_url).path.rstrip("/") or "/"

    @property
    def mcp_resource(self) -> str:
        """The canonical URL clients use for the MCP endpoint (RFC 8707 resource, RFC 9728 `resource`)."""
        return self.public_url + (self.mcp_path if self.mcp_path != "/" else "")

    @property
    def is_loopback(self) -> bool:
        return is_loopback_host(urlsplit(self.public_url).hostname or "")

    @property
    def secure_cookies(self) -> bool:
        return self.public_url.startswith("https://")

    def user_is_allowed(self, email: str | None, groups: frozenset[str]) -> bool:
        return user_is_listed(email, groups, self.allowed_emails, self.allowed_email_domains, self.allowed_groups)

    @property
    def reads_groups(self) -> bool:
        """Whether the login provider reads the users' groups: only when something here decides by them."""
        return configuration_uses_groups(self)

    def user_is_admin(self, email: str | None) -> bool:
        """Whether this verified email is listed in ADMIN_EMAILS (an empty list makes no one an admin)."""
        return email_is_listed(email, self.admin_emails)


@dataclass(frozen=True)
class ServerSettings:
    """gunicorn's and its worker's settings (gunicorn.conf.py, oauthproxy/worker.py), read in gunicorn's master."""

    host: str = "127.0.0.1"
    port: int = 8080
    #: WEB_CONCURRENCY: worker processes; default one per core.
    workers: int = 1
    worker_connections: int = 10_000
    #: GUNICORN_TIMEOUT: with gevent only the worker heartbeat; it does not limit a request.
    heartbeat_timeout: int = 60
    graceful_timeout: int = 30
    keepalive: int = 75
    access_log: str | None = None
    log_level: str = "info"
    request_head_timeout: float = 10.0
    request_body_timeout: float = 30.0
    #: None: half of WORKER_CONNECTIONS.
    max_waiting_connections: int | None = None


def load_server_settings(env: Mapping[str, str] | None = None) -> ServerSettings:
    """Build `ServerSettings` from the environment; raise `ConfigError` listing every problem."""
    env = os.environ if env is None else env
    problems: list[str] = []
    settings = ServerSettings(
        host=read_text(env, "HOST", "127.0.0.1"),
        port=read_int(env, "PORT", 8080, problems, minimum=1, maximum=65535),
        workers=read_int(env, "WEB_CONCURRENCY", os.cpu_count() or 1, problems, minimum=1, maximum=1024),
        worker_connections=read_int(env, "WORKER_CONNECTIONS", 10_000, problems, minimum=1, maximum=1_000_000),
        heartbeat_timeout=read_int(env, "GUNICORN_TIMEOUT", 60, problems, minimum=0, maximum=DAY, unit="seconds"),
        graceful_timeout=read_int(env, "GRACEFUL_TIMEOUT", 30, problems, minimum=0, maximum=DAY, unit="seconds"),
        keepalive=read_int(env, "KEEPALIVE", 75, problems, minimum=0, maximum=DAY, unit="seconds"),
        access_log=read_text(env, "ACCESS_LOG") or None,
        # Not refused when unknown: gunicorn logs at info then, and platforms set LOG_LEVEL=warn for their own use.
        log_level=read_text(env, "LOG_LEVEL", "info").lower(),
        request_head_timeout=read_seconds(env, "REQUEST_HEAD_TIMEOUT", 10.0, problems, minimum=0.1, maximum=DAY),
        request_body_timeout=read_seconds(env, "REQUEST_BODY_TIMEOUT", 30.0, problems, minimum=0.1, maximum=DAY),
        max_waiting_connections=read_int(env, "MAX_WAITING_CONNECTIONS", 0, problems, minimum=1, maximum=1_000_000)
        or None,
    )
    if problems:
        raise ConfigError(problems)
    return settings


HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")


def decode_encryption_keys(value: str) -> tuple[bytes, ...]:
    """`ENCRYPTION_KEY` is one or more comma-separated base64 keys of 32 bytes; the first encrypts."""
    keys = []
    for position, item in enumerate(part.strip() for part in value.split(",")):
        label = "ENCRYPTION_KEY" if position == 0 else f"ENCRYPTION_KEY (key #{position + 1})"
        if HEX_KEY.fullmatch(item):
            # `openssl rand -hex 32`: 32 bytes, but in hex. Refused rather than guessed: one spelling of a key.
            raise ValueError(
                f"{label} is 64 hex digits (as `openssl rand -hex 32` prints); it must be base64 of 32 "
                "bytes: make one with `oauthproxy gen-key` or `openssl rand -base64 32`"
            )
        try:
            key = base64.b64decode(
                item + "=" * (-len(item) % 4), altchars=b"-_" if ("-" in item or "_" in item) else None, validate=True
            )
        except (binascii.Error, ValueError):
            raise ValueError(
                f"{label} must be base64 of 32 bytes; it is not valid base64; generate one with `oauthproxy gen-key`"
            ) from None
        if len(key) != 32:
            raise ValueError(
                f"{label} must be base64 of 32 bytes; got {len(key)} bytes; generate one with `oauthproxy gen-key`"
            )
        keys.append(key)
    return tuple(keys)


URL_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def database_dsn_from_path(value: str, instance_path: str | None) -> str:
    """`DATABASE_DSN=/srv/oauthproxy.db` (a plain path, as the system this replaces accepts) is an SQLite file; a
    relative path lands in the instance folder, as a relative `sqlite:///name.db` does with Flask-SQLAlchemy."""
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = Path(instance_path or "instance") / path
    return f"sqlite:///{path.resolve()}"


def _ca_bundle(value: str, problems: list[str]) -> str | None:
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_file():
        problems.append(f"CA_BUNDLE must be a PEM file of CA certificates; {value!r} is not a file")
        return None
    try:
        ssl.create_default_context(cafile=str(path))
    except (ssl.SSLError, OSError, ValueError) as error:
        problems.append(f"CA_BUNDLE {value!r} holds no readable PEM certificate: {error}")
        return None
    return str(path.resolve())


def normalise_database_dsn(dsn: str) -> str:
    """Accept `postgres://` (Heroku) and `postgresql://`, and pick psycopg 3, which cooperates with gevent."""
    for prefix in ("postgres://", "postgresql://"):
        if dsn.startswith(prefix):
            return "postgresql+psycopg://" + dsn[len(prefix) :]
    return dsn


def _private_use_schemes(env: Mapping[str, str], problems: list[str]) -> frozenset[str] | None:
    """ALLOW_CUSTOM_REDIRECT_SCHEMES: true (the default: any private-use scheme), false (none), or a list."""
    raw = read_text(env, "ALLOW_CUSTOM_REDIRECT_SCHEMES")
    allowed = boolean_word(raw) if raw else True
    if allowed is not None:
        return None if allowed else frozenset()
    schemes = frozenset(s.rstrip(":/") for s in read_list(env, "ALLOW_CUSTOM_REDIRECT_SCHEMES", problems))
    for scheme in sorted(schemes):
        problem = private_use_scheme_problem(scheme)
        if problem:
            problems.append(
                f"ALLOW_CUSTOM_REDIRECT_SCHEMES must be true, false or a list of private-use schemes "
                f"such as cursor,vscode; {problem}"
            )
    return frozenset(s.lower() for s in schemes)


REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _revocation_feed(
    env: Mapping[str, str], dsn: str, rate_limit_storage: str, problems: list[str]
) -> tuple[str, str | None]:
    """REVOCATION_FEED (auto, notify, poll, redis, off) and REVOCATION_REDIS_URL, resolved: auto is redis when
    REVOCATION_REDIS_URL is set, else notify on PostgreSQL, else poll."""
    feed = read_choice(env, "REVOCATION_FEED", "auto", ("auto", "notify", "poll", "redis", "off"), problems)
    redis_url = read_text(env, "REVOCATION_REDIS_URL") or None
    if redis_url and not redis_url.startswith(REDIS_SCHEMES):
        problems.append(
            f"REVOCATION_REDIS_URL must be a redis://, rediss:// or unix:// URL; got one starting {redis_url.split(':', 1)[0]!r}"
        )
    postgres = dsn.startswith("postgresql")
    if feed == "auto":
        feed = "redis" if redis_url else "notify" if postgres else "poll"
    if feed == "notify" and not postgres:
        problems.append(
            "REVOCATION_FEED=notify needs PostgreSQL (LISTEN/NOTIFY); with SQLite use poll (the default there)"
        )
    if feed == "redis" and not redis_url:
        if rate_limit_storage.startswith(REDIS_SCHEMES):
            redis_url = rate_limit_storage  # the Redis the rate limits already share
        else:
            problems.append("REVOCATION_FEED=redis needs REVOCATION_REDIS_URL, e.g. redis://127.0.0.1:6379")
    return feed, redis_url if feed == "redis" else None


def load_settings(env: Mapping[str, str] | None = None, instance_path: str | None = None) -> Settings:
    """Build `Settings` from the environment; raise `ConfigError` listing every problem."""
    env = os.environ if env is None else env
    problems: list[str] = []

    def required(name: str, hint: str) -> str:
        value = read_text(env, name)
        if not value:
            problems.append(f"{name} is required: {hint}")
        return value

    client_id = required("OAUTH_CLIENT_ID", "the client id you registered at your identity provider")
    client_secret = required("OAUTH_CLIENT_SECRET", "the client secret you registered at your identity provider")
    authorize_url = required(
        "OAUTH_AUTHORIZE_URL", "the provider's base URL (e.g. https://accounts.google.com) or its authorize URL"
    )
    if authorize_url:
        authorize_url = absolute_url("OAUTH_AUTHORIZE_URL", authorize_url, problems)
    if read_text(env, "MCP_ROUTES_FILE"):
        mcp_server_url = read_text(env, "MCP_SERVER_URL")  # load_routes refuses both at once
    else:
        mcp_server_url = required("MCP_SERVER_URL", "the downstream MCP server's URL, e.g. http://localhost:9000/mcp")
    if mcp_server_url:
        mcp_server_url = absolute_url("MCP_SERVER_URL", mcp_server_url, problems)

    port = read_int(env, "PORT", 8080, problems, minimum=1, maximum=65535)
    host = read_text(env, "HOST", "127.0.0.1")
    public_url = read_text(env, "PUBLIC_URL")
    if not public_url:
        if is_loopback_host(host):
            public_url = f"http://{'127.0.0.1' if host == '127.0.0.1' else 'localhost'}:{port}"
        else:
            problems.append(
                "PUBLIC_URL is required when HOST is not a loopback address: the external https URL clients use, e.g. https://mcp.example.com"
            )
    if public_url:
        public_url = origin_url("PUBLIC_URL", public_url, problems)

    encryption_keys: tuple[bytes, ...] = ()
    raw_key = required("ENCRYPTION_KEY", "base64 of 32 random bytes; generate one with `oauthproxy gen-key`")
    if raw_key:
        try:
            encryption_keys = decode_encryption_keys(raw_key)
        except ValueError as error:
            problems.append(str(error))

    dsn = read_text(env, "DATABASE_DSN") or read_text(env, "DATABASE_URL")
    if not dsn:
        folder = Path(instance_path or "instance")
        dsn = f"sqlite:///{(folder / 'oauthproxy.sqlite3').resolve()}"
    elif not URL_SCHEME.match(dsn):
        dsn = database_dsn_from_path(dsn, instance_path)
    elif not dsn.startswith(("sqlite:", "postgres://", "postgresql://", "postgresql+psycopg://")):
        problems.append(
            f"DATABASE_DSN must be a sqlite:/// URL, a path to an SQLite file or a postgresql:// URL; got a value starting {dsn.split(':', 1)[0]!r}"
        )

    token_url = read_url(env, "OAUTH_TOKEN_URL", problems)
    userinfo_url = read_url(env, "OAUTH_USERINFO_URL", problems)

    database_timeout = read_int(env, "DATABASE_TIMEOUT", 5, problems, minimum=2, maximum=60)
    access_ttl = read_int(env, "ACCESS_TOKEN_TTL", 3600, problems, minimum=60, maximum=30 * DAY)
    refresh_ttl = read_int(env, "REFRESH_TOKEN_TTL", 30 * DAY, problems, minimum=3600, maximum=365 * DAY)
    grace = read_int(env, "REFRESH_GRACE_SECONDS", 10, problems, minimum=0, maximum=60)
    # RFC 6749 §4.1.2: a code lives a few minutes, "a maximum authorization code lifetime of 10 minutes is RECOMMENDED".
    code_ttl = read_int(env, "AUTHORIZATION_CODE_TTL", 300, problems, minimum=30, maximum=600)
    unused_client_ttl = read_int(env, "UNUSED_CLIENT_TTL", 30 * DAY, problems, minimum=3600, maximum=365 * DAY)
    pending_login_ttl = read_int(env, "PENDING_LOGIN_TTL", 600, problems, minimum=60, maximum=3600)
    # Browsers keep a cookie at most 400 days (RFC 6265bis §5.5), whatever Max-Age asks for.
    consent_ttl = read_int(env, "CONSENT_TTL", 365 * DAY, problems, minimum=60, maximum=400 * DAY)
    consent_page_ttl = read_int(env, "CONSENT_PAGE_TTL", 600, problems, minimum=60, maximum=3600)
    provider_http_timeout = read_seconds(env, "PROVIDER_HTTP_TIMEOUT", 10.0, problems, minimum=1, maximum=120)
    replace_previous_grants = read_bool(env, "REPLACE_PREVIOUS_GRANTS", True, problems)
    account_session_ttl = read_int(env, "ACCOUNT_SESSION_TTL", 3600, problems, minimum=60, maximum=3600, unit="seconds")
    audit_enabled = read_bool(env, "AUDIT_ENABLED", True, problems)
    audit_log = _audit_log(read_text(env, "AUDIT_LOG", "stdout"), problems)
    audit_retention_days = read_int(env, "AUDIT_RETENTION_DAYS", 90, problems, minimum=1, maximum=3650, unit="days")

    secret_key_raw = read_text(env, "SECRET_KEY")
    if secret_key_raw and len(secret_key_raw) < 32:
        problems.append(f"SECRET_KEY must be at least 32 characters; got {len(secret_key_raw)}")

    allow_private_cimd = read_bool(env, "CLIENT_METADATA_ALLOW_PRIVATE_NETWORKS", False, problems)
    metadata_timeout = read_seconds(env, "CLIENT_METADATA_FETCH_TIMEOUT", 5.0, problems, minimum=0.5, maximum=30)
    metadata_max_bytes = read_int(
        env, "CLIENT_METADATA_MAX_BYTES", 5 * 1024, problems, minimum=1024, maximum=1024 * 1024, unit="bytes"
    )
    metadata_cache_size = read_int(env, "CLIENT_METADATA_CACHE_SIZE", 1024, problems, minimum=1, maximum=1_000_000)
    metadata_cache_ttl = read_int(env, "CLIENT_METADATA_CACHE_TTL", 300, problems, minimum=1, maximum=7 * DAY)
    metadata_min_ttl = read_int(env, "CLIENT_METADATA_MIN_CACHE_TTL", 60, problems, minimum=1, maximum=DAY)
    metadata_max_ttl = read_int(env, "CLIENT_METADATA_MAX_CACHE_TTL", DAY, problems, minimum=60, maximum=7 * DAY)
    if metadata_min_ttl > metadata_max_ttl:
        problems.append(
            f"CLIENT_METADATA_MIN_CACHE_TTL ({metadata_min_ttl}) must not exceed "
            f"CLIENT_METADATA_MAX_CACHE_TTL ({metadata_max_ttl})"
        )
    metadata_failure_ttl = read_int(env, "CLIENT_METADATA_FAILURE_TTL", 30, problems, minimum=1, maximum=3600)

    trusted_proxy_hops = read_int(env, "TRUSTED_PROXY_HOPS", 0, problems, minimum=0, maximum=10)
    log_format = read_choice(env, "LOG_FORMAT", "text", ("text", "json"), problems)
    metrics_token = read_text(env, "METRICS_TOKEN")
    if metrics_token and len(metrics_token) < 16:
        problems.append(
            f"METRICS_TOKEN must be at least 16 characters (e.g. `oauthproxy gen-key`); got {len(metrics_token)}"
        )
    private_use_schemes = _private_use_schemes(env, problems)

    rate_limit_storage = read_text(env, "RATE_LIMIT_STORAGE_URI", "memory://")
    if rate_limit_storage.startswith("sqlite:") and (
        not rate_limit_storage.startswith("sqlite:///") or rate_limit_storage.endswith("/")
    ):
        problems.append(
            "RATE_LIMIT_STORAGE_URI as sqlite names a file: sqlite:////absolute/path or "
            f"sqlite:///relative/path; got {rate_limit_storage!r}"
        )

    scopes_supported = read_list(env, "SCOPES_SUPPORTED", problems)
    upstream_scopes = read_list(env, "UPSTREAM_SCOPES", problems)
    allowed_emails = frozenset(e.lower() for e in read_list(env, "ALLOWED_EMAILS", problems))
    admin_emails = frozenset(e.lower() for e in read_list(env, "ADMIN_EMAILS", problems))
    # A domain or a name here would silently make no one an admin: whole addresses only.
    problems.extend(
        f"ADMIN_EMAILS must list email addresses; got {e!r}" for e in sorted(admin_emails) if email_address(e) is None
    )
    allowed_domains = frozenset(d.lower().lstrip("@") for d in read_list(env, "ALLOWED_EMAIL_DOMAINS", problems))
    allowed_groups = read_group_list(read_text(env, "ALLOWED_GROUPS"), "ALLOWED_GROUPS", problems)
    groups_claim = read_text(env, "GROUPS_CLAIM", "groups")
    if len(groups_claim) > MAX_GROUP_LENGTH or any(ch.isspace() or not ch.isprintable() for ch in groups_claim):
        problems.append(
            "GROUPS_CLAIM must be a claim name such as groups, or a dotted path such as realm_access.roles; "
            f"got {groups_claim!r}"
        )
    routes = load_routes(env, public_url, scopes_supported, problems) if public_url else ()
    proxy = load_proxy_settings(env, public_url, problems)
    ca_bundle = _ca_bundle(read_text(env, "CA_BUNDLE"), problems)
    github_api_url = read_text(env, "GITHUB_API_URL") or None
    if github_api_url:
        github_api_url = origin_url("GITHUB_API_URL", github_api_url, problems)

    dsn = normalise_database_dsn(dsn)
    revocation_feed, revocation_redis_url = _revocation_feed(env, dsn, rate_limit_storage, problems)

    if problems:
        raise ConfigError(problems)

    from oauthproxy.crypto import derive_key  # deferred: crypto imports nothing from here

    secret_key = (
        secret_key_raw.encode() if secret_key_raw else derive_key(encryption_keys[0], b"oauthproxy cookie signing")
    )
    return Settings(
        public_url=public_url,
        oauth_client_id=client_id,
        oauth_client_secret=client_secret,
        oauth_authorize_url=authorize_url,
        oauth_token_url=token_url,
        oauth_userinfo_url=userinfo_url,
        mcp_server_url=mcp_server_url,
        scopes_supported=scopes_supported,
        upstream_scopes=upstream_scopes,
        encryption_keys=encryption_keys,
        database_dsn=dsn,
        database_timeout=database_timeout,
        host=host,
        port=port,
        access_token_ttl=access_ttl,
        refresh_token_ttl=refresh_ttl,
        authorization_code_ttl=code_ttl,
        refresh_grace_seconds=grace,
        unused_client_ttl=unused_client_ttl,
        pending_login_ttl=pending_login_ttl,
        consent_ttl=consent_ttl,
        consent_page_ttl=consent_page_ttl,
        provider_http_timeout=provider_http_timeout,
        allowed_emails=allowed_emails,
        allowed_email_domains=allowed_domains,
        allowed_groups=allowed_groups,
        groups_claim=groups_claim,
        admin_emails=admin_emails,
        allow_private_client_metadata_urls=allow_private_cimd,
        client_metadata_fetch_timeout=metadata_timeout,
        client_metadata_max_bytes=metadata_max_bytes,
        client_metadata_cache_size=metadata_cache_size,
        client_metadata_cache_ttl=metadata_cache_ttl,
        client_metadata_min_cache_ttl=metadata_min_ttl,
        client_metadata_max_cache_ttl=metadata_max_ttl,
        client_metadata_failure_ttl=metadata_failure_ttl,
        private_use_redirect_schemes=private_use_schemes,
        register_rate_limit=read_text(env, "REGISTER_RATE_LIMIT", "20 per minute"),
        authorize_rate_limit=read_text(env, "AUTHORIZE_RATE_LIMIT", "60 per minute"),
        token_rate_limit=read_text(env, "TOKEN_RATE_LIMIT", "120 per minute"),
        rate_limit_storage_uri=rate_limit_storage,
        secret_key=secret_key,
        trusted_proxy_hops=trusted_proxy_hops,
        log_format=log_format,
        metrics_token=metrics_token,
        routes=routes,
        proxy=proxy,
        ca_bundle=ca_bundle,
        github_api_url=github_api_url,
        revocation_feed=revocation_feed,
        revocation_redis_url=revocation_redis_url,
        replace_previous_grants=replace_previous_grants,
        account_session_ttl=account_session_ttl,
        audit_enabled=audit_enabled,
        audit_log=audit_log,
        audit_retention_days=audit_retention_days,
    )


def _audit_log(value: str, problems: list[str]) -> str:
    """AUDIT_LOG: stdout, stderr, off, or a file the process can append to (its folder must exist)."""
    if value.lower() in ("stdout", "stderr", "off"):
        return value.lower()
    expected = "stdout, stderr, off or the path of a file to append JSON lines to"
    if not value.isprintable() or len(value) > 4096:
        problems.append(f"AUDIT_LOG must be {expected}; got a value with control characters or over 4096 characters")
        return "off"
    path = os.path.abspath(value)
    folder = os.path.dirname(path)
    if os.path.isdir(path):
        problems.append(
            f"AUDIT_LOG names a folder ({path}); name a file in it, e.g. {os.path.join(path, 'audit.jsonl')}"
        )
    elif not os.path.isdir(folder):
        problems.append(f"AUDIT_LOG's folder {folder} does not exist; create it or set AUDIT_LOG to {expected}")
    elif not os.access(path if os.path.exists(path) else folder, os.W_OK):
        problems.append(f"AUDIT_LOG: this process cannot write to {path}; fix its permissions or choose another file")
    else:
        return path
    return "off"
