"""The audit trail: who signed in, consented, got, refreshed or lost tokens, connected, and called which tool."""

# record() only appends to a per-process buffer (microseconds, never raises); a background thread (a greenlet under
# gunicorn's gevent worker) flushes it about once a second, or sooner past FLUSH_EVENTS: JSON lines to AUDIT_LOG and
# one batched INSERT into `audit_events`. A failing destination is logged and counted, never raised: an audit outage
# must not take the proxy down. The rows are purged after AUDIT_RETENTION_DAYS (database.purge_expired).

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import re
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from typing import IO, Any

from flask import Flask, current_app, has_app_context, has_request_context, request

from oauthproxy import metrics
from oauthproxy.logs import CLIENT_ID_KEY, REQUEST_ID_KEY, USER_ID_KEY

log = logging.getLogger(__name__)

#: Seconds between flushes, and the buffer size that flushes at once.
FLUSH_INTERVAL = 1.0
FLUSH_EVENTS = 200
#: Events written and inserted at a time, with a yield to the worker's requests between slices (about 1 ms of work).
FLUSH_SLICE = 50
#: Empty flushes after which the flusher ends (the next event starts it again).
IDLE_FLUSHES = 60
#: The most events a process holds while its destinations fail; past it the oldest are dropped (and counted).
MAX_BUFFERED = 10_000
#: Column sizes (models.AuditEvent): longer values are cut, so PostgreSQL never refuses a row.
SIZES = {
    "event": 40,
    "user_id": 255,
    "user_email": 320,
    "client_id": 512,
    "route": 64,
    "request_id": 128,
    "outcome": 64,
    "reason": 200,
    "tool": 255,
}
#: Details are free-form but bounded: a tool name or a reason quoted from a client must not bloat a row.
MAX_DETAIL_CHARS = 2000
#: Environ key where the MCP endpoint notes a request's route and the tools it calls (note_tool_calls).
TOOL_CALLS_KEY = "oauthproxy.audit.tool_calls"
_TOOLS_CALL = b'"tools/call"'


#: A buffered event: the table's columns in this order (models.AuditEvent), `time` as seconds since the epoch and
#: `details` as JSON text (an object) or None; values are cut to their columns when flushed.
COLUMNS = (
    "time",
    "event",
    "user_id",
    "user_email",
    "client_id",
    "route",
    "request_id",
    "outcome",
    "reason",
    "tool",
    "duration_ms",
    "details",
)
Event = tuple[Any, ...]
_SIZED = tuple((index, SIZES[name]) for index, name in enumerate(COLUMNS) if name in SIZES)
_encode_json = json.JSONEncoder(ensure_ascii=False, default=str).encode


def _cut(value: Any, size: int) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else str(value)
    return text if len(text) <= size else text[:size]


def record(
    event: str,
    *,
    user: str | None = None,
    client: str | None = None,
    route: str | None = None,
    outcome: str | None = None,
    reason: str | None = None,
    tool: str | None = None,
    duration_ms: float | None = None,
    **details: Any,
) -> None:
    """Note one event; time and request id (and the request's user and client, when not given) are filled in.
    `email=` fills the user's email column; other keywords go to the event's details. Never raises: a failure is
    logged and counted (`oauthproxy_audit_failures_total{stage="record"}`)."""
    try:
        trail = current_app.extensions.get(EXTENSION_KEY) if has_app_context() else None
        if trail is not None:
            environ = request.environ if has_request_context() else {}
            trail.append(_event(event, environ, user, client, route, outcome, reason, tool, duration_ms, details))
    except Exception:
        metrics.AUDIT_FAILURES.labels("record").inc()
        log.exception("could not record audit event %s", event)


def _event(
    event: str,
    environ: dict[str, Any],
    user: str | None,
    client: str | None,
    route: str | None,
    outcome: str | None,
    reason: str | None,
    tool: str | None,
    duration_ms: float | None,
    details: dict[str, Any],
) -> Event:
    email = details.pop("email", None)
    resource = details.pop("resource", None)
    if route is None and isinstance(resource, str):
        route = _route_name(resource)
    return (
        time.time(),
        event,
        user or environ.get(USER_ID_KEY),
        email.lower() if isinstance(email, str) else None,
        client or environ.get(CLIENT_ID_KEY),
        route,
        environ.get(REQUEST_ID_KEY),
        outcome,
        reason,
        tool,
        float(duration_ms) if duration_ms is not None else None,
        _details(details),
    )


def _route_name(resource: str) -> str | None:
    from oauthproxy.allowlists import route_for_resource  # deferred: it imports the models

    found = route_for_resource(current_app.config["SETTINGS"], resource) if has_app_context() else None
    return found.name if found is not None else None


def record_for_grant(event: str, grant: Any, outcome: str, reason: str | None = None, **details: Any) -> None:
    """record() for an event about a grant: its user, email, client, route (from its resource) and id."""
    record(
        event,
        user=grant.user_id,
        email=grant.user_email,
        client=grant.client_id,
        resource=grant.resource,
        outcome=outcome,
        reason=reason,
        grant_id=grant.id,
        **details,
    )


def record_revocation(grant_id: int, reason: str) -> None:
    """authorization_server.revoke_grant: the grant's tokens are revoked (in the caller's transaction)."""
    try:
        from oauthproxy.models import Grant, db

        grant = db.session.get(Grant, grant_id)
    except Exception:
        grant = None  # the revocation itself goes on (or fails) without us; the event names the grant alone
    if grant is None:
        record("token_revoked", outcome="revoked", reason=reason, grant_id=grant_id)
    else:
        record_for_grant("token_revoked", grant, "revoked", reason)


def _details(details: dict[str, Any]) -> str | None:
    """JSON text of an object, or None: serialised now, so a value changed after the event cannot change it. Keys
    that name a column are left out: the JSON line splices these keys in beside the columns (_json_line)."""
    kept = {key: value for key, value in details.items() if value is not None and key not in COLUMNS}
    if not kept:
        return None
    text = _encode_json(kept)
    return text if len(text) <= MAX_DETAIL_CHARS else _encode_json({"truncated": text[:MAX_DETAIL_CHARS]})


# -- tool calls at the MCP endpoint --------------------------------------------------------------------------


def tool_names(environ: dict[str, Any], body: Any) -> list[str]:
    """The tools a request calls, when known cheaply: from a body already read whole (small bodies, and every body
    on routes with tool rules) that mentions `"tools/call"`, else from the 2026-07-28 `Mcp-Method`/`Mcp-Name`
    headers. The body wins: it is what a downstream on an earlier protocol reads, so headers that disagree with it
    (not checked on routes without tool rules) cannot hide a call or name another tool. A large streamed body is not
    read for this: its call is recorded only when its headers name the tool."""
    if not isinstance(body, bytes):
        method = environ.get("HTTP_MCP_METHOD")
        name = environ.get("HTTP_MCP_NAME")
        return [(name or "?")[: SIZES["tool"]]] if method == "tools/call" else []
    if _TOOLS_CALL not in body:
        return []  # the common case (not a tool call): one substring search of a small body
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return []
    messages = document if isinstance(document, list) else [document]
    names = []
    for message in messages[:100]:
        if isinstance(message, dict) and message.get("method") == "tools/call":
            params = message.get("params")
            name = params.get("name") if isinstance(params, dict) else None
            names.append(name[: SIZES["tool"]] if isinstance(name, str) else "?")
    return names


def note_tool_calls(environ: dict[str, Any], route: str, body: Any) -> None:
    """The proxy, before forwarding: remember which tools this request calls, recorded when its response ends."""
    try:
        trail = current_app.extensions.get(EXTENSION_KEY)
        names = tool_names(environ, body) if trail is not None else None
        if names:
            environ[TOOL_CALLS_KEY] = (trail, route, names)
    except Exception:
        metrics.AUDIT_FAILURES.labels("record").inc()
        log.exception("could not note the tool calls of a request")


def request_finished(environ: dict[str, Any], status: int, duration: float) -> None:
    """The request log's end-of-response hook: one `tool_call` event per tool the request called, with the HTTP
    status as outcome and the time until the response ended (a streamed answer: its last event).

    On every tool call's path, so the event is built here directly, without record()'s lookups."""
    noted = environ.get(TOOL_CALLS_KEY)
    if noted is None:
        return
    try:
        trail, route, names = noted
        now = time.time()
        user, client, request_id = environ.get(USER_ID_KEY), environ.get(CLIENT_ID_KEY), environ.get(REQUEST_ID_KEY)
        outcome = "ok" if status < 400 else f"http_{status}"
        details = f'{{"status": {int(status)}}}'
        for name in names:
            trail.append(
                (now, "tool_call", user, None, client, route, request_id, outcome, None, name, duration * 1000, details)
            )
    except Exception:
        metrics.AUDIT_FAILURES.labels("record").inc()
        log.exception("could not record a tool call")


# -- the buffer and its flusher ------------------------------------------------------------------------------

EXTENSION_KEY = "oauthproxy.audit"


class AuditTrail:
    """This process's buffer of events, and the thread (greenlet) that writes them out."""

    def __init__(self, app: Flask, destination: str, interval: float = FLUSH_INTERVAL, batch: int = FLUSH_EVENTS):
        # Weak: a trail (its flusher thread, the exit hook) must not keep an app that is done with, and its database
        # connection pool, alive. Tests and commands build many apps in one process.
        self._app = weakref.ref(app)
        self.destination, self.interval, self.batch = destination, interval, batch
        self._events: deque[Event] = deque()
        self._unstored: deque[Event] = deque()  # written as lines, not yet in the table (a failed INSERT)
        self._lock = threading.Lock()  # one flush at a time (the flusher, worker exit, a test)
        # Starting and ending the flusher has its own lock: a flush holds the one above through a database call
        # (up to DATABASE_TIMEOUT when the database hangs), and a request's append() must never wait for that.
        self._start_lock = threading.Lock()
        self._wake = threading.Event()
        self._pid: int | None = None
        self.flusher: threading.Thread | None = None
        self._failing = False
        self._insert: tuple[str, str, Any] | None = None  # (dialect name, its INSERT statement, its time binding)

    def append(self, event: Event) -> None:
        if len(self._events) >= MAX_BUFFERED:
            self._events.popleft()
            metrics.AUDIT_FAILURES.labels("dropped").inc()
        self._events.append(event)
        if self._pid != os.getpid():
            self._start()
        if len(self._events) >= self.batch:
            self._wake.set()

    def _start(self) -> None:
        with self._start_lock:
            if self._pid == os.getpid():
                return
            self._pid = os.getpid()
            self._wake = threading.Event()
            self.flusher = threading.Thread(target=self._run, name="audit-flush", daemon=True)
            self.flusher.start()

    def _run(self) -> None:
        idle = 0
        while idle < IDLE_FLUSHES:
            self._wake.wait(self.interval)
            self._wake.clear()
            idle = 0 if self.flush() or self._unstored else idle + 1
        # Idle a while: end, so that an app built and dropped (tests, commands) leaves no thread behind; the next
        # event starts another.
        with self._start_lock:
            self._pid = None
        if self._events:
            self._start()

    def flush(self) -> int:
        """Write out what is buffered, JSON lines then the table, FLUSH_SLICE events at a time with a yield between
        slices: a second's worth of tool calls in one go held the worker for about 15 ms, and the requests that
        arrived meanwhile waited it out (their p99 went from 2.7 to 5.2 ms at one connection). Returns how many
        events were taken."""
        taken_in_all = 0
        # What is buffered now, and no more: events keep arriving during the yields, and a flush that chased them
        # would go on in slices of one or two, each paying a commit.
        due = len(self._events)
        if not due and not self._unstored:
            return 0  # the idle flusher's round: no app context, no engine, no file opened
        insert = self._insert_statement()
        table_answers = insert is not None  # a table that failed once waits for the next flush (a try may wait)
        with self._line_writer() as write_lines:
            while True:
                with self._lock:
                    count = min(FLUSH_SLICE, due - taken_in_all, len(self._events))
                    taken = [_bounded(self._events.popleft()) for _ in range(count)]
                    if taken:
                        write_lines(taken)
                        self._unstored.extend(taken)
                    while len(self._unstored) > MAX_BUFFERED:
                        self._unstored.popleft()
                        metrics.AUDIT_FAILURES.labels("dropped").inc()
                    if insert is not None and self._unstored and table_answers:
                        table_answers = self._store(insert)
                taken_in_all += len(taken)
                if (taken_in_all >= due or not self._events) and not (self._unstored and table_answers):
                    return taken_in_all
                time.sleep(0)  # the worker's other greenlets (its requests) run between slices

    @contextmanager
    def _line_writer(self) -> Iterator[Callable[[list[Event]], None]]:
        """A function that writes events as JSON lines to the destination, opened once for the flush. A file is
        opened for each flush: one that logrotate moved away (its create mode) is left within a second."""
        file: IO[str] | None = None
        if self.destination == "stdout":
            file = sys.stdout
        elif self.destination == "stderr":
            file = sys.stderr
        elif self.destination != "off":
            try:
                file = open(self.destination, "a", encoding="utf-8")  # closed below
            except OSError as error:
                self._lines_failed(error)

        warned = False

        def write(events: list[Event]) -> None:
            nonlocal warned
            if file is None:
                return  # "off", or a file that would not open (counted once for the flush)
            try:
                file.write("".join([_json_line(event) for event in events]))
                file.flush()
            except Exception as error:
                # Each slice's failure is counted; one warning per flush, as before slicing (a full disk would
                # otherwise log once per slice).
                if warned:
                    metrics.AUDIT_FAILURES.labels("log").inc()
                else:
                    self._lines_failed(error)
                    warned = True

        try:
            yield write
        finally:
            if file is not None and file not in (sys.stdout, sys.stderr):
                with suppress(OSError):
                    file.close()

    def _lines_failed(self, error: Exception) -> None:
        metrics.AUDIT_FAILURES.labels("log").inc()
        log.warning("could not write audit events to %s: %s", self.destination, error)

    def _insert_statement(self) -> tuple[Any, str, Any] | None:
        """The engine, its driver-level INSERT and how it binds a time; None once the app is gone. The rows go to
        the driver's executemany as tuples, not through SQLAlchemy's per-row parameter processing (most of a row's
        cost). The engine is looked up at each flush, never kept: a trail outlives its app by up to a minute (its
        flusher), and must not keep the app's connection pool open meanwhile (PostgreSQL's max_connections)."""
        from oauthproxy.models import AuditEvent, db

        app = self._app()
        if app is None:
            self._unstored.clear()  # the app is gone, and with it its database: nothing to store the rows in
            return None
        with app.app_context():
            engine = db.engine
        dialect = engine.dialect
        if self._insert is None or self._insert[0] != dialect.name:
            marker = "?" if dialect.paramstyle == "qmark" else "%s"
            # Identifiers from our own constants; every value is a bound parameter.
            sql = f"INSERT INTO {AuditEvent.__tablename__} ({', '.join(COLUMNS)}) VALUES ({', '.join([marker] * len(COLUMNS))})"  # noqa: S608
            bind_time = AuditEvent.__table__.c.time.type.dialect_impl(dialect).bind_processor(dialect)
            self._insert = (dialect.name, sql, bind_time)
        return engine, self._insert[1], self._insert[2]

    def _store(self, insert: tuple[Any, str, Any]) -> bool:
        """Insert the oldest FLUSH_SLICE unstored events; False when the table refused them (they are kept)."""
        events = list(itertools.islice(self._unstored, FLUSH_SLICE))
        engine, sql, bind_time = insert
        try:
            rows = [_table_row(event, bind_time) for event in events]
            with engine.begin() as connection:
                connection.exec_driver_sql(sql, rows)
        except Exception as error:
            metrics.AUDIT_FAILURES.labels("database").inc()
            if not self._failing:
                log.warning(
                    "could not store %s audit event(s) (%s); kept in memory (at most %s) and tried again every "
                    "%.0f s; requests are not affected",
                    len(self._unstored),
                    _first_line(error),
                    MAX_BUFFERED,
                    self.interval,
                )
            self._failing = True
            return False
        for _ in events:
            self._unstored.popleft()
        if self._failing:
            log.info("audit events stored again")
            self._failing = False
        return True


def _bounded(event: Event) -> Event:
    """The event with its values cut to their columns (so PostgreSQL never refuses a row) and its time a datetime."""
    values = list(event)
    values[0] = datetime.fromtimestamp(event[0], UTC).replace(tzinfo=None)
    for index, size in _SIZED:
        value = values[index]
        if value is not None and (type(value) is not str or len(value) > size):
            values[index] = _cut(value, size)
    if values[10] is not None:
        values[10] = round(values[10], 1)
    return tuple(values)


def _table_row(event: Event, bind_time: Any) -> Event:
    return (bind_time(event[0]), *event[1:]) if bind_time is not None else event


def _first_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _json_line(event: Event) -> str:
    document = {name: value for name, value in zip(COLUMNS[1:11], event[1:11], strict=True) if value is not None}
    text = _encode_json({"time": event[0].isoformat(timespec="milliseconds") + "Z", **document})
    details = event[11]
    # The details are an object whose keys name no column (_details): spliced in, they are not parsed again.
    return (text[:-1] + ", " + details[1:] if details else text) + "\n"


def init_audit(app: Flask) -> AuditTrail | None:
    """This app's trail; none with AUDIT_ENABLED=false (then record() and the tool-call hooks do nothing)."""
    if not app.config["SETTINGS"].audit_enabled:
        return None
    trail = AuditTrail(app, app.config["SETTINGS"].audit_log)
    app.extensions[EXTENSION_KEY] = trail
    atexit.register(_flush_at_exit, weakref.ref(trail))
    return trail


def _flush_at_exit(trail: weakref.ref[AuditTrail]) -> None:
    alive = trail()
    if alive is not None:
        alive.flush()


def flush(app: Any) -> None:
    """Write out this process's buffered events (gunicorn's worker_exit; anything but our app is left alone)."""
    trail = getattr(app, "extensions", {}).get(EXTENSION_KEY) if isinstance(app, Flask) else None
    if trail is not None:
        trail.flush()


# -- reading the trail ---------------------------------------------------------------------------------------

#: The most rows one query returns.
MAX_LIMIT = 10_000
_RELATIVE = re.compile(r"(\d{1,9})([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class BadTime(ValueError):
    """A time filter that is neither ISO 8601 nor a relative duration such as `2h`."""


def parse_time(value: str, now: datetime | None = None) -> datetime:
    """`2026-11-30`, `2026-11-30T14:00`, `2026-11-30T14:00:00+01:00` (naive means UTC), or a duration back from now:
    `90s`, `15m`, `2h`, `7d`, `2w`. Returns naive UTC, as stored."""
    text = value.strip()
    now = now or datetime.now(UTC).replace(tzinfo=None)
    relative = _RELATIVE.fullmatch(text)
    if relative:
        seconds = int(relative.group(1)) * _UNITS[relative.group(2)]
        try:
            return now - timedelta(seconds=seconds)
        except OverflowError:
            raise BadTime(f"{value!r} reaches back before year 1") from None
    if len(text) > 40:
        raise BadTime(f"expected an ISO 8601 time (2026-11-30T14:00Z) or a duration (2h, 7d); got {text[:40]!r}...")
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadTime(f"expected an ISO 8601 time (2026-11-30T14:00Z) or a duration (2h, 7d); got {value!r}") from None
    if parsed.tzinfo is not None:
        try:
            parsed = parsed.astimezone(UTC).replace(tzinfo=None)
        except OverflowError:
            raise BadTime(f"{value!r} is out of range") from None
    return parsed


def query_events(
    user: str | None = None,
    client: str | None = None,
    route: str | None = None,
    tool: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    """Events matching every filter given, newest first, at most `limit` (1 to MAX_LIMIT). `user` is a user id or
    an email; `since`/`until` are datetimes (naive: UTC). Values are bound parameters, never SQL."""
    from sqlalchemy import or_, select

    from oauthproxy.models import AuditEvent, db

    limit = max(1, min(int(limit), MAX_LIMIT))
    query = select(AuditEvent)
    if user:
        query = query.where(or_(AuditEvent.user_id == user, AuditEvent.user_email == user.lower()))
    if client:
        query = query.where(AuditEvent.client_id == client)
    if route:
        query = query.where(AuditEvent.route == route)
    if tool:
        query = query.where(AuditEvent.tool == tool)
    if since is not None:
        query = query.where(AuditEvent.time >= _naive(since))
    if until is not None:
        query = query.where(AuditEvent.time <= _naive(until))
    query = query.order_by(AuditEvent.time.desc(), AuditEvent.id.desc()).limit(limit)
    return [row.as_dict() for row in db.session.scalars(query)]


def _naive(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(tzinfo=None) if moment.tzinfo is not None else moment


def purge_old_events(retention_days: int) -> int:
    """Delete events older than the retention; the caller commits."""
    from sqlalchemy import delete

    from oauthproxy.models import AuditEvent, db, rows_affected, utcnow

    cutoff = utcnow() - timedelta(days=retention_days)
    return rows_affected(db.session.execute(delete(AuditEvent).where(AuditEvent.time < cutoff)))
