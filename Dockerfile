# oauthproxy: gunicorn with gevent workers, as a non-root user, migrations applied at start.
#   docker build -t oauthproxy .
#   docker run -p 8080:8080 --env-file .env -e PUBLIC_URL=https://mcp.example.com oauthproxy
# Inside the container it listens on 0.0.0.0:$PORT (8080); PUBLIC_URL is then required (README, Deployment).
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8080

WORKDIR /app

# Dependencies in their own layer, rebuilt only when pyproject.toml changes: the pinned list is read from it.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The application. Editable, so the `oauthproxy` command and gunicorn both use /app (templates live beside it).
COPY README.md wsgi.py gunicorn.conf.py ./
COPY templates ./templates
COPY oauthproxy ./oauthproxy
RUN pip install --no-deps -e . \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin oauthproxy \
    && mkdir -p /app/instance \
    && chown oauthproxy /app/instance

# The default SQLite database lives here; mount a volume, or set DATABASE_DSN / DATABASE_URL to PostgreSQL.
VOLUME ["/app/instance"]
USER 10001
EXPOSE 8080

# Liveness only (the process answers); /readyz also checks the database, for load balancers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=4)"]

# gunicorn.conf.py binds HOST:PORT, sizes workers from WEB_CONCURRENCY, and migrates before the workers start.
# Other commands run the same image: docker run --rm --env-file .env oauthproxy oauthproxy check
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
