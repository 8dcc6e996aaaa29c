"""WSGI entry point: `gunicorn wsgi:app` or `flask --app wsgi run`."""

import sys

from oauthproxy import create_app
from oauthproxy.cli import report_config_error
from oauthproxy.config import ConfigError

try:
    app = create_app()
except ConfigError as error:
    report_config_error(error)
    sys.exit(2)
