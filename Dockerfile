# oauthproxy: gunicorn with gevent workers, as a non-root user, migrations applied at start.
#   docker build -t oauthproxy .
#   docker run -p 8080:8080 -v oauthproxy-data:/app/instance --env-file .env -e PUBLIC_URL=https://mcp.example.com oauthproxy
# Inside the container it listens on 0.0.0.0:$PORT (8080); PUBLIC_URL is then required (README, Deployment).
# BASE_IMAGE: any Debian 12 image with Python 3.11 as /usr/local/bin/python; tests/test_container.py builds with a
# local stand-in made by scripts/container-base, since the machines the tests run on reach no container registry.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

# PYTHONMALLOC=malloc: a worker gives back the memory of event streams once they close (docs/scaling.md).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOST=0.0.0.0 \
    PORT=8080 \
    PYTHONMALLOC=malloc

WORKDIR /app

# Dependencies in their own layer, rebuilt only when the lock changes: requirements.txt pins the whole tree a
# deployment needs (PostgreSQL and Redis extras included) with hashes, so nothing drifts between two builds.
COPY requirements.txt ./
RUN pip install --require-hashes -r requirements.txt \
    && rm requirements.txt

# The application, installed as a package (not editable): templates and static files travel inside it.
COPY pyproject.toml README.md /tmp/oauthproxy-src/
COPY templates /tmp/oauthproxy-src/templates
COPY oauthproxy /tmp/oauthproxy-src/oauthproxy
RUN pip install --no-deps /tmp/oauthproxy-src \
    && rm -rf /tmp/oauthproxy-src \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin oauthproxy \
    && mkdir -p /app/instance \
    && chown oauthproxy /app/instance
COPY wsgi.py gunicorn.conf.py ./

# The default SQLite database lives here; mount a volume, or set DATABASE_DSN / DATABASE_URL to PostgreSQL.
VOLUME ["/app/instance"]
USER 10001
EXPOSE 8080

# Liveness only (the process answers); /readyz also checks the database, for load balancers.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=4)"]

# gunicorn.conf.py binds HOST:PORT, sizes workers from WEB_CONCURRENCY, and migrates before the workers start.
# SIGTERM (docker stop) lets open requests finish for up to GRACEFUL_TIMEOUT seconds.
# Other commands run the same image: docker run --rm --env-file .env oauthproxy oauthproxy check
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
