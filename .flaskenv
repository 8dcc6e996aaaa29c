# Read by `flask --app wsgi run` (after .env): serve on the address the proxy advertises (PUBLIC_URL's default
# is http://127.0.0.1:PORT), not Flask's own 127.0.0.1:5000, so clients get through discovery.
FLASK_RUN_HOST=${HOST:-127.0.0.1}
FLASK_RUN_PORT=${PORT:-8080}
