"""Prometheus metrics: every series the proxy exports, defined once, multiprocess-safe under gunicorn."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess
from prometheus_client import values as prometheus_values

T = TypeVar("T")
log = logging.getLogger(__name__)

# Request latencies are time to the response headers; the upper buckets cover slow upstream logins and tools.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STREAM_BUCKETS = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)

#: OAuth / proxy error codes worth a series of their own; anything else is counted as "other", so that a
#: client sending made-up error strings cannot grow the number of series.
KNOWN_ERRORS = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_target",
        "invalid_token",
        "insufficient_scope",
        "access_denied",
        "unauthorized",
        "invalid_client_metadata",
        "invalid_redirect_uri",
        "unsupported_token_type",
        "temporarily_unavailable",
        "server_error",
        "too_many_requests",
        "forbidden_origin",
        "downstream_unavailable",
        "downstream_timeout",
        "downstream_error",
    }
)

#: At most one warning per this many seconds while the metrics files cannot be opened or grown.
STORAGE_WARNING_INTERVAL = 60.0
_storage_warned_at: float | None = None


def _storage_failed(error: OSError) -> None:
    global _storage_warned_at
    now = time.monotonic()
    if _storage_warned_at is None or now - _storage_warned_at >= STORAGE_WARNING_INTERVAL:
        _storage_warned_at = now
        log.warning(
            "metrics: samples lost, the per-worker metrics files in PROMETHEUS_MULTIPROC_DIR cannot be opened or "
            "grown (%s); requests are served as usual",
            error,
        )


def _tolerant(stored: Any) -> Any:
    """prometheus_client's multiprocess value, whose failures lose a sample instead of failing the request.

    Under gunicorn each worker keeps its samples in files (one per metric type) that it opens when a series is first
    used and grows as series are added. A worker out of file descriptors (thousands of open streams) or a full disk
    made those calls raise inside the request, and the client lost its answer. Creation is retried at the next use.
    """

    class TolerantValue:
        _multiprocess = True
        __slots__ = ("_arguments", "_value")

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._arguments: tuple[tuple[Any, ...], dict[str, Any]] | None = (args, kwargs)
            self._value: Any = None
            self._stored()

        def _stored(self) -> Any:
            if self._value is None and self._arguments is not None:
                args, kwargs = self._arguments
                try:
                    self._value = stored(*args, **kwargs)
                except OSError as error:
                    _storage_failed(error)
                    return None
                self._arguments = None
            return self._value

        def _call(self, method: str, *args: Any) -> Any:
            """The stored value's method, or None when the value cannot be stored now (the failure is logged)."""
            value = self._stored()
            if value is None:
                return None
            try:
                return getattr(value, method)(*args)
            except OSError as error:
                _storage_failed(error)
                return None

        def inc(self, amount: float) -> None:
            self._call("inc", amount)

        def set(self, value: float, timestamp: float | None = None) -> None:
            self._call("set", value, timestamp)

        def set_exemplar(self, exemplar: Any) -> None:
            return

        def get(self) -> float:
            found = self._call("get")
            return 0.0 if found is None else found

        def get_exemplar(self) -> None:
            return None

    return TolerantValue


if getattr(prometheus_values.ValueClass, "_multiprocess", False) and not hasattr(
    prometheus_values.ValueClass, "_stored"
):
    prometheus_values.ValueClass = _tolerant(prometheus_values.ValueClass)

HTTP_REQUESTS = Counter(
    "oauthproxy_http_requests_total",
    "HTTP requests answered, by route template, method and status.",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "oauthproxy_http_request_duration_seconds",
    "Time from receiving a request to its response headers, by route template.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
)
HTTP_ERRORS = Counter(
    "oauthproxy_http_errors_total",
    "Error answers by route and the OAuth/proxy error code in their JSON body.",
    ["route", "error"],
)
TOOL_POLICY_REFUSALS = Counter(
    "oauthproxy_tool_policy_refusals_total",
    "Requests on routes with tool rules answered by the proxy, by reason: tool_denied (a call the rules deny), "
    "header_mismatch (Mcp-Method/Mcp-Name disagree with the body), invalid_message (a body the proxy cannot check).",
    ["route", "reason"],
)
OPEN_STREAMS = Gauge(
    "oauthproxy_open_streams",
    "Event streams (text/event-stream responses) open right now.",
    ["route"],
    multiprocess_mode="livesum",
)
STREAM_DURATION = Histogram(
    "oauthproxy_stream_duration_seconds", "How long event streams stayed open.", ["route"], buckets=STREAM_BUCKETS
)
TOKENS_ISSUED = Counter(
    "oauthproxy_tokens_issued_total",
    "Token pairs issued at /token, by grant type (authorization_code: new logins; refresh_token: refreshes).",
    ["grant_type"],
)
REFRESH_GRACE = Counter(
    "oauthproxy_refresh_grace_total",
    "Rotated refresh tokens honoured again inside REFRESH_GRACE_SECONDS (lost response or race).",
)
GRANTS_REVOKED = Counter(
    "oauthproxy_grants_revoked_total", "Grants (whole token families) revoked, by reason.", ["reason"]
)
AUDIT_FAILURES = Counter(
    "oauthproxy_audit_failures_total",
    "Audit events not recorded, written or stored: stage record, log (AUDIT_LOG), database, dropped (buffer full).",
    ["stage"],
)
REGISTRATIONS = Counter("oauthproxy_client_registrations_total", "Dynamic client registrations answered with 201.")
REVOCATION_FEED_CONNECTED = Gauge(
    "oauthproxy_revocation_feed_connected",
    "1 while this worker's revocation feed is connected: a grant revoked anywhere leaves its token cache within a "
    "second. 0 while it is down (or off): TOKEN_CACHE_TTL bounds it then. Per instance, the lowest of its workers.",
    multiprocess_mode="livemin",
)
REVOCATION_FEED_OUTAGES = Counter(
    "oauthproxy_revocation_feed_outages_total",
    "Times a worker's revocation feed was lost or could not connect (its token cache is flushed when it is back).",
)
REVOCATION_PUBLISH_FAILURES = Counter(
    "oauthproxy_revocation_publish_failures_total",
    "Revocations the Redis feed could not publish: other workers refuse those tokens within TOKEN_CACHE_TTL.",
)
PROVIDER_LATENCY = Histogram(
    "oauthproxy_upstream_request_duration_seconds",
    "Requests to the identity provider, by action.",
    ["action"],
    buckets=LATENCY_BUCKETS,
)
PROVIDER_ERRORS = Counter(
    "oauthproxy_upstream_errors_total",
    "Failed requests to the identity provider, by action and kind (transient, invalid_grant, misconfigured, ...).",
    ["action", "kind"],
)

IDENTITY_ASSERTIONS_SIGNED = Counter(
    "oauthproxy_identity_assertions_signed_total",
    "Identity assertions signed for the downstream, by route (each is reused for most of its lifetime).",
    ["route"],
)


def error_label(error: object) -> str:
    return error if isinstance(error, str) and error in KNOWN_ERRORS else "other"


def provider_action(description: str) -> str:
    """A short, fixed label for the provider call described in the providers package's words."""
    description = description.lower()
    if "refresh" in description:
        return "refresh"
    if "authorization code" in description:
        return "code_exchange"
    if "profile" in description or "email" in description or "user" in description:
        return "userinfo"
    if "metadata" in description or "discovery" in description:
        return "discovery"
    return "other"


def instrument_provider(provider: Any) -> None:
    """Time every request `provider` sends to the identity provider, and count its failures by kind.

    Wraps the provider object's two choke points (`_call` for token and profile requests, `_fetch_metadata`
    for discovery) on this instance only, so the providers package stays free of metrics code.
    """
    from oauthproxy.providers import ProviderError

    original_call = provider._call
    original_fetch = provider._fetch_metadata

    def timed(action: str, func: Callable[[], T]) -> T:
        started = time.perf_counter()
        try:
            return func()
        except ProviderError as error:
            PROVIDER_ERRORS.labels(action, error.kind).inc()
            raise
        finally:
            PROVIDER_LATENCY.labels(action).observe(time.perf_counter() - started)

    def call(description: str, url: str, func: Callable[[], T]) -> T:
        return timed(provider_action(description), lambda: original_call(description, url, func))

    def fetch_metadata(url: str) -> Any:
        return timed("discovery", lambda: original_fetch(url))

    provider._call = call
    provider._fetch_metadata = fetch_metadata


class StreamCounter:
    """Wraps a streamed response body: counts it as an open stream from the start of its iteration to close, then its
    duration.

    `close()` is forwarded, so the body's own clean-up (ending the downstream request) still runs.
    """

    def __init__(self, body: Iterable[bytes], route: str):
        self._body, self._route = body, route
        self._opened_at: float | None = None
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        self._opened_at = time.monotonic()
        OPEN_STREAMS.labels(self._route).inc()
        # The body's own iterator, not a generator around it: the WSGI server then iterates the body directly, and
        # an idle stream's parked greenlet keeps one interpreter frame less on its saved C stack (bench/analysis.md).
        return iter(self._body)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            if self._opened_at is not None:
                OPEN_STREAMS.labels(self._route).dec()
                STREAM_DURATION.labels(self._route).observe(time.monotonic() - self._opened_at)


def multiprocess_directory() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


def exposition() -> tuple[bytes, str]:
    """The metrics page: this process's registry, or every worker's when PROMETHEUS_MULTIPROC_DIR is set."""
    if multiprocess_directory():
        registry = CollectorRegistry()
        prometheus_multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
