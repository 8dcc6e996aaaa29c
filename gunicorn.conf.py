"""gunicorn settings: gevent workers sized for many long-lived MCP event streams; migrations once, before workers."""

from __future__ import annotations

import os
import resource
import sys
import traceback

# Each open MCP stream holds a client socket and a downstream socket; lift the soft descriptor limit to the hard one.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _hard == resource.RLIM_INFINITY or _soft < _hard:
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))
    except (ValueError, OSError):
        pass

from dotenv import load_dotenv  # noqa: E402

from oauthproxy.config import ConfigError, load_server_settings  # noqa: E402 (after the descriptor limit)

# The same file the app reads (create_app), read here too: HOST, PORT, WEB_CONCURRENCY... set in it must decide where
# gunicorn listens, or the app advertises a port nobody listens on. The environment wins over the file, as there.
load_dotenv(os.environ.get("OAUTHPROXY_ENV_FILE", ".env"))

try:
    _server = load_server_settings()
except ConfigError as _error:
    from oauthproxy.cli import report_config_error

    report_config_error(_error)
    sys.exit(2)  # SETTINGS_PROBLEM, as for the application's settings below

bind = f"{_server.host}:{_server.port}"
# One gevent worker serves thousands of connections cooperatively; add workers for CPU, not for concurrency.
# gevent's worker plus read deadlines and a cap on connections still waiting for a request (oauthproxy/worker.py):
# REQUEST_HEAD_TIMEOUT (10 s), REQUEST_BODY_TIMEOUT (30 s between reads), MAX_WAITING_CONNECTIONS (half of
# WORKER_CONNECTIONS), so half-sent requests cannot hold the worker.
worker_class = "oauthproxy.worker.BoundedGeventWorker"
workers = _server.workers
# Idle SSE streams (legacy GET streams can stay open for hours) each hold a connection slot.
worker_connections = _server.worker_connections
# With gevent, `timeout` is only the worker heartbeat (the event loop must run); it does not limit a request.
timeout = _server.heartbeat_timeout
graceful_timeout = _server.graceful_timeout
# Longer than typical load balancer idle timeouts (60 s), so the balancer closes first, never mid-request.
keepalive = _server.keepalive
# Request heads (issue 9): request lines up to gunicorn's maximum, 8190 bytes (an /authorize URL with a URL client
# id, redirect_uri, resource and state can pass the 4094-byte default); at most 100 header fields of 8190 bytes.
# Over a limit gunicorn answers 400 and closes. Bodies are capped per endpoint in the app (endpoints.MAX_BODY_BYTES).
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
# gunicorn 27 opens a control socket under ~/.gunicorn by default; containers and tests need none.
control_socket_disable = True
accesslog = _server.access_log
errorlog = "-"
loglevel = _server.log_level

# /metrics adds up every worker's numbers through files in one folder. prometheus_client picks that mode when it is
# first imported, so the folder is named here, before any worker imports the app: one fresh folder per master.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    import tempfile

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="oauthproxy-metrics-")

# Rate limits: without RATE_LIMIT_STORAGE_URI (Redis shares counters between instances), this master's workers share
# one budget through a counters file in a fresh folder (oauthproxy.rate_limits.SqliteCounterStorage), so a limit
# means the same whatever WEB_CONCURRENCY is.
if not os.environ.get("RATE_LIMIT_STORAGE_URI"):
    import tempfile

    _counters = os.path.join(tempfile.mkdtemp(prefix="oauthproxy-ratelimits-"), "counters.sqlite3")
    os.environ["RATE_LIMIT_STORAGE_URI"] = "sqlite:///" + _counters  # an absolute path: sqlite:////tmp/...


def _reset_metrics_folder() -> None:
    """A folder the operator named may hold an earlier run's files, whose counts would be added in."""
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):
        if name.endswith(".db"):
            os.unlink(os.path.join(folder, name))


def child_exit(server, worker) -> None:
    """A dead worker's live gauges (open streams) leave the totals: prometheus_client's mark_process_dead, done
    by hand so the master never imports it (it imports ssl before the workers monkey-patch)."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if folder and os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith("gauge_live") and name.endswith(f"_{worker.pid}.db"):
                os.unlink(os.path.join(folder, name))


# Exit codes of the migration child: the problem is already reported in plain words, the master adds nothing.
SETTINGS_PROBLEM, DATABASE_PROBLEM = 2, 3


def _upgrade_database() -> int:
    from sqlalchemy.exc import DBAPIError

    from oauthproxy import create_app
    from oauthproxy.cli import report_config_error
    from oauthproxy.config import ConfigError
    from oauthproxy.database import upgrade_database
    from oauthproxy.models import db
    from oauthproxy.self_check import database_problem

    try:
        app = create_app()
    except ConfigError as error:
        report_config_error(error)
        return SETTINGS_PROBLEM
    try:
        upgrade_database(app)
    except DBAPIError as error:  # unreachable, refused, unknown database, wrong password: one line, no traceback
        print(
            f"oauthproxy cannot start: {database_problem(app.config['SETTINGS'].database_dsn, error)}", file=sys.stderr
        )
        return DATABASE_PROBLEM
    finally:
        with app.app_context():
            db.engine.dispose()
    return 0


def when_ready(server) -> None:
    """Once started (a start that fails says only why): a word on the allocator when it is Python's own."""
    if os.environ.get("PYTHONMALLOC") != "malloc":
        # Only the environment of the interpreter's start can choose the allocator. Python's own keeps the memory of
        # many streams that have closed (in 1 MiB arenas that a few survivors pin); malloc's goes back to the system.
        server.log.info(
            "PYTHONMALLOC=malloc is not set: workers keep much of the memory of event streams after they close "
            "(the Dockerfile and Procfile set it; docs/scaling.md)"
        )


def on_starting(server) -> None:
    """Apply database migrations once, before any worker starts (upgrade_database also locks across instances).

    In a forked child of the master: importing the app in the master itself would import ssl and urllib3
    before the gevent workers monkey-patch them (gevent warns, and HTTPS calls may misbehave), and would
    leave database connections for the workers to inherit.
    """
    _reset_metrics_folder()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _upgrade_database()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code in (SETTINGS_PROBLEM, DATABASE_PROBLEM):
        sys.exit(code)
    if code != 0:
        server.log.error("database upgrade failed (exit code %s); not starting", code)
        sys.exit(code if code > 0 else 1)


def worker_exit(server, worker) -> None:
    """Write out the worker's buffered audit events (audit.py) before it goes."""
    from oauthproxy.audit import flush

    flush(worker.wsgi)


def post_worker_init(worker) -> None:
    """Take what the worker allocated while loading the app (modules, settings, SQLAlchemy and Authlib objects: most
    of its heap) out of the cyclic garbage collector's sight. Otherwise each full collection walks all of it again,
    a pause of several milliseconds that every request in flight waits out: the proxy's p99 (docs/benchmarks.md).
    Then set up the worker's shutdown (_graceful_exit), and start its revocation listener."""
    import gc
    import signal

    gc.freeze()
    # Ctrl-C signals the whole process group; the master already answers it with one SIGQUIT per worker. A worker
    # that also acted on its own SIGINT got a second quit while exiting, and gevent printed a SystemExit traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _graceful_exit(worker)
    # After the fork: each worker listens for revocations made by the others (a thread, a greenlet here).
    from oauthproxy.revocation_feed import listen

    listen(worker.wsgi)


#: Open streams are ended this long before GRACEFUL_TIMEOUT, when the master kills workers that are still running.
STREAM_END_MARGIN = 1.5


def _graceful_exit(worker) -> None:
    """On SIGTERM the gevent worker stops accepting at once, lets requests in flight finish, and ends the streams
    still open shortly before GRACEFUL_TIMEOUT, so their clients see a clear end rather than a killed connection.

    gunicorn's gevent worker notices SIGTERM only at its next once-a-second check, and accepts new connections
    until then; at GRACEFUL_TIMEOUT the master kills it, cutting whatever still streams.
    """
    import signal

    from gunicorn.workers import ggevent

    if not isinstance(worker, ggevent.GeventWorker):
        return
    import gevent

    servers: list = []

    class _Server(ggevent.StreamServer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            servers.append(self)

    ggevent.StreamServer = _Server  # the worker builds its servers after this hook, in run()

    def shut_down() -> None:
        for server in servers:
            server.close()  # stop accepting; the kernel refuses new connections once every process has closed it
        gevent.sleep(max(worker.cfg.graceful_timeout - STREAM_END_MARGIN, 0))
        from oauthproxy.proxy.streaming import end_open_streams

        ended = end_open_streams()
        if ended:
            worker.log.info("ended %s open stream(s) before the graceful timeout", ended)

    def handle_exit(sig, frame) -> None:
        worker.alive = False
        gevent.spawn(shut_down)  # out of the signal handler, as gunicorn does for SIGQUIT

    worker.handle_exit = handle_exit
    signal.signal(signal.SIGTERM, handle_exit)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn sets it: requests in flight are not disturbed
