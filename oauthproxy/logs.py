"""Logging: set-up, one line per request (text or JSON), and redaction that keeps secrets out of every line."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from flask import has_request_context, request

# Query and form parameters whose values are credentials or one-time secrets.
SECRET_PARAMETERS = (
    "code",
    "state",
    "code_verifier",
    "code_challenge",
    "access_token",
    "refresh_token",
    "id_token",
    "token",
    "client_secret",
    "csrf_token",
    "request",
)
_SECRET_VALUE = re.compile(r"(?<=[?&])(" + "|".join(SECRET_PARAMETERS) + r")=[^&\s\"]*")
#: The connect page's single-use token travels in its path (`/connect/<token>`, connect.py): as secret as a state.
_CONNECT_TOKEN = re.compile(r"(^|[\s\"])/connect/(?!callback(?![A-Za-z0-9_-]))[A-Za-z0-9_-]+")


def redact(text: str) -> str:
    """`text` with the value of every secret query parameter replaced, e.g. `/callback?code=…&state=…`, and the
    connect page's token (`/connect/…`)."""
    return _CONNECT_TOKEN.sub(r"\1/connect/[redacted]", _SECRET_VALUE.sub(r"\1=[redacted]", text))


class RedactSecrets(logging.Filter):
    """Rewrites a record's message through `redact`; for access loggers that print request lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, ()
        return True


#: `request_id` is set on every record by RequestIdFilter (`-` outside a request).
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(log_format: str = "text") -> None:
    """Root handler (text or JSON) with the request id on every line; secrets filtered from access loggers."""
    logging.basicConfig(level=logging.INFO, format=TEXT_FORMAT)
    root = logging.getLogger()
    for handler in root.handlers:
        if log_format == "json" and not isinstance(handler.formatter, JsonFormatter):
            handler.setFormatter(JsonFormatter())
        if not any(isinstance(f, RequestIdFilter) for f in handler.filters):
            handler.addFilter(RequestIdFilter())
    # Authlib logs whole token responses at DEBUG ("Issue token {...}"): never let them through.
    logging.getLogger("authlib").setLevel(logging.INFO)
    for name in ("werkzeug", "gunicorn.access"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())


# -- one line per request -----------------------------------------------------------------------------

ACCESS_LOGGER = "oauthproxy.access"
#: WSGI environ keys this module reads and writes; the user id is set by whichever view learns who is calling.
REQUEST_ID_KEY = "oauthproxy.request_id"
USER_ID_KEY = "oauthproxy.user_id"
CLIENT_ID_KEY = "oauthproxy.client_id"
ROUTE_KEY = "oauthproxy.route"
#: An incoming X-Request-Id is kept when it looks like an id (a front proxy's, e.g. nginx's $request_id), so
#: one id follows the request through every hop; anything else is replaced, so it cannot forge log lines.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
#: Health probes arrive every few seconds; their successes would drown the log.
QUIET_PATHS = frozenset({"/healthz", "/readyz"})

access_log = logging.getLogger(ACCESS_LOGGER)


def request_id_from(header: str | None) -> str:
    return header if header and _REQUEST_ID.fullmatch(header) else uuid.uuid4().hex


def set_request_user(user_id: str | None) -> None:
    """Record who the current request acts for, for its log line (a user id, never a token)."""
    if user_id and has_request_context():
        request.environ[USER_ID_KEY] = str(user_id)


def set_request_client(client_id: str | None) -> None:
    """Record the OAuth client the current request acts through (from its validated token), for its log line."""
    if client_id and has_request_context():
        request.environ[CLIENT_ID_KEY] = str(client_id)


class RequestIdFilter(logging.Filter):
    """Adds the current request's id to every record logged while it is served (`-` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request.environ.get(REQUEST_ID_KEY, "-") if has_request_context() else "-"
        return True


#: Extra fields of a request line, in order; a record without them is an ordinary log line.
ACCESS_FIELDS = ("request_id", "method", "path", "status", "duration_ms", "user_id", "client_id", "client")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the request fields when present."""

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in ACCESS_FIELDS:
            value = getattr(record, name, None)
            if value is not None and value != "-":
                document[name] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, ensure_ascii=False)


JsonFormatter.converter = time.gmtime


def log_request(environ: dict[str, Any], status: int, duration: float) -> None:
    """The request's line: id, method, path (never the query: codes and states travel there), status,
    duration, user id, OAuth client id and client address. Headers (tokens, cookies) and bodies are never logged."""
    path = environ.get("PATH_INFO", "") or "/"
    if path in QUIET_PATHS and status < 400:
        return
    fields = {
        "request_id": environ.get(REQUEST_ID_KEY, "-"),
        "method": environ.get("REQUEST_METHOD", "-"),
        "path": redact(path),
        "status": status,
        "duration_ms": round(duration * 1000, 1),
        "user_id": environ.get(USER_ID_KEY, "-"),
        # A client id may be a metadata document URL the client chose: quoted in JSON, made printable in text.
        "client_id": environ.get(CLIENT_ID_KEY, "-"),
        "client": environ.get("REMOTE_ADDR", "-"),
    }
    # The text line carries the request id through the format's [request_id]; JSON gets every field.
    access_log.info(
        "%s %s %s %.1fms user=%s client_id=%s client=%s",
        fields["method"],
        _printable(fields["path"]),
        status,
        fields["duration_ms"],
        fields["user_id"],
        _printable(fields["client_id"]).replace(" ", "%20"),
        fields["client"],
        extra=fields,
    )


def _printable(path: str) -> str:
    # PATH_INFO is already percent-decoded: keep control characters (a forged line break) out of text logs.
    return "".join(char if char.isprintable() else "?" for char in path)


class RequestLogger:
    """WSGI middleware: assigns the request id (answered as X-Request-Id and forwarded downstream) and logs one
    line when the response is finished, streams included, then calls `on_finish` (metrics)."""

    def __init__(self, app: Callable, on_finish: Callable[[dict[str, Any], int, float, float | None], None]):
        self.app, self.on_finish = app, on_finish

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        started = time.perf_counter()
        request_id = request_id_from(environ.get("HTTP_X_REQUEST_ID"))
        environ[REQUEST_ID_KEY] = request_id
        environ["HTTP_X_REQUEST_ID"] = request_id  # the proxy passes client headers on: the downstream sees it
        seen: dict[str, Any] = {}

        def observing_start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen["status"] = int(status[:3])
            seen["headers_after"] = time.perf_counter() - started
            headers.append(("X-Request-Id", request_id))
            return start_response(status, headers, exc_info)

        def finish() -> None:
            duration = time.perf_counter() - started
            status = seen.get("status", 500)
            try:
                self.on_finish(environ, status, duration, seen.get("headers_after"))
            finally:
                log_request(environ, status, duration)

        try:
            body = self.app(environ, observing_start_response)
        except BaseException:
            finish()
            raise
        return _FinishedBody(body, finish)


class _FinishedBody:
    """The application's body, with `finish` run once after the WSGI server closes it."""

    def __init__(self, body: Iterable[bytes], finish: Callable[[], None]):
        self._body, self._finish, self._done = body, finish, False

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._body)

    def close(self) -> None:
        if self._done:
            return
        self._done = True
        try:
            close = getattr(self._body, "close", None)
            if close is not None:
                close()
        finally:
            self._finish()
