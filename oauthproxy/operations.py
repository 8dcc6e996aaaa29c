"""The operations surface: /healthz, /readyz, /metrics, request logging and metrics hooks, trusted forwarded headers."""

from __future__ import annotations

import base64
import binascii
import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from flask import Blueprint, Flask, Response, current_app, jsonify, request
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from werkzeug.middleware.proxy_fix import ProxyFix

from oauthproxy import audit, metrics
from oauthproxy.components import components, current_application
from oauthproxy.config import Settings
from oauthproxy.crypto import constant_time_equals
from oauthproxy.logs import ROUTE_KEY, RequestLogger
from oauthproxy.models import db
from oauthproxy.proxy.transport import gevent_hub_running

log = logging.getLogger(__name__)

blueprint = Blueprint("operations", __name__)

#: Paths of this blueprint; MCP routes must not use them.
OPERATIONS_PATHS = ("/healthz", "/readyz", "/metrics")
NO_STORE = {"Cache-Control": "no-store"}
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@blueprint.route("/healthz", methods=["GET", "HEAD"])
def healthz() -> Response:
    """Liveness: the process answers. Touches nothing else, so a database outage does not restart every worker."""
    return Response("ok\n", mimetype="text/plain", headers=NO_STORE)


@blueprint.route("/readyz", methods=["GET", "HEAD"])
def readyz() -> Response:
    """Readiness: the database answers, can be written, and its schema is the one this code expects.

    One short transaction per probe: it reads the alembic_version row and writes it back unchanged, which a full
    disk, a read-only file or mount, a PostgreSQL standby or a held SQLite lock refuses. Every wait in it is bounded
    (DATABASE_TIMEOUT), and under gevent the whole probe is bounded by READY_BOUND_SECONDS as well.
    """
    started = time.perf_counter()
    try:
        with _bounded(READY_BOUND_SECONDS):
            current, writable = _probe_database()
    except SQLAlchemyError as error:
        log.warning("readiness: the database is unreachable: %s", type(error).__name__)
        return _answer(503, status="unavailable", database="unreachable")
    except ProbeTimeout:
        log.warning("readiness: the database did not answer within %s s", READY_BOUND_SECONDS)
        return _answer(503, status="unavailable", database="unreachable")
    heads, known = _schema_revisions(current_application())
    if current == heads:
        state = "ok"
    elif current and not current & known:
        # A newer release migrated already (rolling upgrade): this code's tables are still there, so keep
        # serving until it is replaced rather than taking every old instance out of rotation at once.
        state = "newer schema than this code (rolling upgrade?)"
    else:
        return _answer(503, status="unavailable", database="schema out of date: run `oauthproxy db upgrade`")
    if not writable:
        return _answer(503, status="unavailable", database="not writable")
    return _answer(200, status="ok", database=state, duration_ms=round((time.perf_counter() - started) * 1000, 1))


#: /readyz answers within this many seconds whatever the database does (under gevent; else DATABASE_TIMEOUT bounds).
READY_BOUND_SECONDS = 3.0


class ProbeTimeout(Exception):
    """The readiness probe ran out of time."""


@contextmanager
def _bounded(seconds: float) -> Iterator[None]:
    if not gevent_hub_running():
        yield
        return
    import gevent

    with gevent.Timeout(seconds, ProbeTimeout):
        yield


def _probe_database() -> tuple[set[str], bool]:
    """(the schema revisions found, whether a write was accepted); raises SQLAlchemyError when unreachable."""
    with db.engine.connect() as connection:
        try:
            current = set(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())
        except SQLAlchemyError:
            connection.rollback()
            connection.execute(text("SELECT 1"))  # reachable, but never migrated
            return set(), True
        try:
            # Rewriting the row with its own value changes nothing, but the database must accept and commit a write.
            connection.execute(text("UPDATE alembic_version SET version_num = version_num"))
            connection.commit()
        except SQLAlchemyError as error:
            connection.rollback()
            log.warning("readiness: the database refuses writes: %s", str(getattr(error, "orig", error))[:200])
            return current, False
    return current, True


def _schema_revisions(app: Flask) -> tuple[set[str], set[str]]:
    """(head revisions, every revision) of the migration scripts shipped with this code; cached per app."""
    cached = components(app).schema_revisions
    if cached is None:
        from alembic.script import ScriptDirectory

        migrate = app.extensions["migrate"]
        script = ScriptDirectory.from_config(migrate.migrate.get_config(migrate.directory))
        cached = (set(script.get_heads()), {revision.revision for revision in script.walk_revisions()})
        components(app).schema_revisions = cached
    return cached


def _answer(code: int, **body: Any) -> Response:
    response = jsonify(body)
    response.status_code = code
    response.headers.update(NO_STORE)
    return response


def _metrics_authorized(token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return constant_time_equals(value, token)
    if scheme.lower() == "basic":
        try:
            _, _, password = base64.b64decode(value, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        return constant_time_equals(password, token)
    return False


@blueprint.route("/metrics", methods=["GET"])
def metrics_page() -> Response:
    settings: Settings = current_app.config["SETTINGS"]
    if settings.metrics_token and not _metrics_authorized(settings.metrics_token):
        return Response(
            "metrics need METRICS_TOKEN as a Bearer token or a Basic password\n",
            status=401,
            mimetype="text/plain",
            headers={"WWW-Authenticate": 'Bearer realm="metrics", Basic realm="metrics"', **NO_STORE},
        )
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type, headers=NO_STORE)


# -- per-request hooks ------------------------------------------------------------------------------


def _note_route() -> None:
    # The route template (`/mcp/<below:subpath>`), not the path: a bounded label set for the metrics.
    request.environ[ROUTE_KEY] = request.url_rule.rule if request.url_rule is not None else "unmatched"


def _observe_response(response: Response) -> Response:
    route = request.environ.get(ROUTE_KEY, "unmatched")
    status = response.status_code
    if status >= 400 and response.is_json and not response.is_streamed:
        body = response.get_json(silent=True)
        if isinstance(body, dict) and "error" in body:
            metrics.HTTP_ERRORS.labels(route, metrics.error_label(body["error"])).inc()
    elif status == 201 and request.endpoint == "authorization.register":
        metrics.REGISTRATIONS.inc()
    if response.is_streamed and response.mimetype == "text/event-stream":
        response.response = metrics.StreamCounter(cast(Iterable[bytes], response.response), route)
    return response


def _record_request(environ: dict[str, Any], status: int, duration: float, headers_after: float | None) -> None:
    route = environ.get(ROUTE_KEY, "unmatched")
    method = environ.get("REQUEST_METHOD", "-")
    method = method if method in METRIC_METHODS else "other"  # any token is a method: keep the label set bounded
    metrics.HTTP_REQUESTS.labels(route, method, str(status)).inc()
    audit.request_finished(environ, status, duration)
    metrics.HTTP_LATENCY.labels(route, method).observe(headers_after if headers_after is not None else duration)


def init_operations(app: Flask, settings: Settings) -> None:
    """Register the endpoints and hooks, instrument the provider client, and wrap the WSGI app (logs, ProxyFix)."""
    app.register_blueprint(blueprint)
    app.before_request(_note_route)
    app.after_request(_observe_response)
    metrics.instrument_provider(components(app).login_provider)
    wsgi_app: Any = RequestLogger(app.wsgi_app, _record_request)
    if settings.trusted_proxy_hops:
        # Outermost, so the request log, the rate limits and the downstream's X-Forwarded-For all see the client
        # address the trusted proxies reported. Host is never taken from a header: PUBLIC_URL says where we are.
        wsgi_app = ProxyFix(
            wsgi_app,
            x_for=settings.trusted_proxy_hops,
            x_proto=settings.trusted_proxy_hops,
            x_host=0,
            x_port=0,
            x_prefix=0,
        )
    app.wsgi_app = wsgi_app  # type: ignore[method-assign]  # Flask's documented way to add WSGI middleware
