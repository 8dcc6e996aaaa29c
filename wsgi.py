"""WSGI entry point: `gunicorn wsgi:app` or `flask --app wsgi run`."""

import sys

from oauthproxy import create_app
from oauthproxy.cli import report_config_error
from oauthproxy.config import ConfigError
from oauthproxy.revocation_feed import listen_when_serving

try:
    app = create_app()
except ConfigError as error:
    report_config_error(error)
    sys.exit(2)
# The process that serves requests listens for revocations made elsewhere (started with its first token check;
# gunicorn.conf.py starts it in each worker at once).
listen_when_serving(app)
