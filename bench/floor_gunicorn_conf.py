"""gunicorn settings of the floor app: the product's serving settings (gevent, connections, keep-alive), no database."""

from __future__ import annotations

import os
import resource

_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))  # two descriptors per open stream

bind = f"127.0.0.1:{os.environ['PORT']}"
worker_class = "gevent"
workers = int(os.environ.get("WEB_CONCURRENCY") or 1)
worker_connections = 10_000
keepalive = 75
timeout = 60
control_socket_disable = True
accesslog = None
errorlog = "-"
loglevel = "warning"
