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

bind = f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '8080')}"
# One gevent worker serves thousands of connections cooperatively; add workers for CPU, not for concurrency.
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY") or os.cpu_count() or 1)
# Idle SSE streams (legacy GET streams can stay open for hours) each hold a connection slot.
worker_connections = int(os.environ.get("WORKER_CONNECTIONS") or 10_000)
# With gevent, `timeout` is only the worker heartbeat (the event loop must run); it does not limit a request.
timeout = int(os.environ.get("GUNICORN_TIMEOUT") or 60)
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT") or 30)
# Longer than typical load balancer idle timeouts (60 s), so the balancer closes first, never mid-request.
keepalive = int(os.environ.get("KEEPALIVE") or 75)
# gunicorn 27 opens a control socket under ~/.gunicorn by default; containers and tests need none.
control_socket_disable = True
accesslog = os.environ.get("ACCESS_LOG") or None
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()

# /metrics adds up every worker's numbers through files in one folder. prometheus_client picks that mode when it is
# first imported, so the folder is named here, before any worker imports the app: one fresh folder per master.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    import tempfile

    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="oauthproxy-metrics-")


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


def _upgrade_database() -> int:
    from oauthproxy import create_app
    from oauthproxy.cli import report_config_error
    from oauthproxy.config import ConfigError
    from oauthproxy.database import upgrade_database
    from oauthproxy.models import db

    try:
        app = create_app()
    except ConfigError as error:
        report_config_error(error)
        return 2
    upgrade_database(app)
    with app.app_context():
        db.engine.dispose()
    return 0


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
    if code != 0:
        server.log.error("database upgrade failed (exit code %s); not starting", code)
        sys.exit(code if code > 0 else 1)


def post_worker_init(worker) -> None:
    """Take what the worker allocated while loading the app (modules, settings, SQLAlchemy and Authlib objects: most
    of its heap) out of the cyclic garbage collector's sight. Otherwise each full collection walks all of it again,
    a pause of several milliseconds that every request in flight waits out: the proxy's p99 (docs/benchmarks.md).
    Then set up the worker's shutdown (_graceful_exit)."""
    import gc

    gc.freeze()
    _graceful_exit(worker)


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
        from oauthproxy.proxy import end_open_streams

        ended = end_open_streams()
        if ended:
            worker.log.info("ended %s open stream(s) before the graceful timeout", ended)

    def handle_exit(sig, frame) -> None:
        worker.alive = False
        gevent.spawn(shut_down)  # out of the signal handler, as gunicorn does for SIGQUIT

    worker.handle_exit = handle_exit
    signal.signal(signal.SIGTERM, handle_exit)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn sets it: requests in flight are not disturbed
