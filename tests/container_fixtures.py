"""podman for the container tests: the project's Dockerfile built on a local stand-in base image, run on loopback.

These machines have no Docker engine and reach no container registry; Debian's podman works with three adjustments
(shared/reference/implementation-notes.md): the runc runtime, host networking (every service here binds 127.0.0.1),
and ulimits below the machine's own. The base image is scripts/container-base's Debian 12 stand-in for
python:3.11-slim-bookworm, cached between runs.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PODMAN = ["podman", "--runtime", "runc"]
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
IMAGE = "localhost/oauthproxy:test"
#: The host's CA bundle: a build behind a TLS-inspecting proxy trusts what the host trusts (pip reads /etc/pip.conf).
HOST_CA_FOLDER = Path("/etc/ssl/certs")


def podman(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    if shutil.which("podman") is None:
        raise AssertionError("podman is not installed: run scripts/install-container-deps (make test-container does)")
    done = subprocess.run([*PODMAN, *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


def base_image() -> str:
    done = subprocess.run([str(ROOT / "scripts" / "container-base")], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"scripts/container-base failed:\n{done.stderr}"
    return done.stdout.strip().splitlines()[-1]


def build_image(folder: Path, image: str = IMAGE) -> float:
    """`podman build` of the project's Dockerfile as it is, with BASE_IMAGE set to the stand-in; returns seconds."""
    command = [
        "build",
        "--network",
        "host",
        *LIMITS,
        "--format",
        "docker",  # docker format keeps HEALTHCHECK
        "--build-arg",
        f"BASE_IMAGE={base_image()}",
        "-t",
        image,
    ]
    if (HOST_CA_FOLDER / "ca-certificates.crt").is_file():
        pip_conf = folder / "pip.conf"
        pip_conf.write_text("[global]\ncert = /run/host-certs/ca-certificates.crt\n")
        command += ["-v", f"{HOST_CA_FOLDER}:/run/host-certs:ro", "-v", f"{pip_conf}:/etc/pip.conf:ro"]
    started = time.monotonic()
    podman(*command, str(ROOT), timeout=1200)
    return time.monotonic() - started


def inspect(kind: str, name: str) -> dict:
    return json.loads(podman(kind, "inspect", name).stdout)[0]


def remove_container(name: str) -> None:
    podman("rm", "--force", "--volumes", "--time", "5", name, check=False, timeout=60)  # and its anonymous volumes


# -- a streamed tool call, by hand: no SDK background tasks (its GET listener) to trip over a draining server ----

MCP_HEADERS = {
    "Accept": "application/json, text/event-stream",
    "Content-Type": "application/json",
    "MCP-Protocol-Version": "2025-06-18",
}


def streamed_tool_call(
    mcp_url: str, token: str, arguments: dict, on_event=None, verify: str | bool = True
) -> tuple[list[dict], dict]:
    """initialize, notifications/initialized, then tools/call `progress` with a progress token, read as SSE event
    by event. Returns (progress notifications, the final result); `on_event(count)` runs as each event arrives."""
    import requests

    with requests.Session() as session:
        session.verify, session.trust_env = verify, False
        session.headers.update({**MCP_HEADERS, "Authorization": f"Bearer {token}"})
        opened = session.post(
            mcp_url,
            timeout=30,
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "container-test", "version": "1"},
                },
            },
        )
        assert opened.status_code == 200, opened.text
        if opened.headers.get("Mcp-Session-Id"):
            session.headers["Mcp-Session-Id"] = opened.headers["Mcp-Session-Id"]
        notified = session.post(mcp_url, json={"jsonrpc": "2.0", "method": "notifications/initialized"}, timeout=30)
        assert notified.status_code in (200, 202), notified.text
        progress, result = [], None
        with session.post(
            mcp_url,
            stream=True,
            timeout=30,
            json={
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "progress", "arguments": arguments, "_meta": {"progressToken": "p1"}},
            },
        ) as call:
            assert call.status_code == 200 and call.headers["Content-Type"].startswith("text/event-stream"), call.text
            # SSE lines as they arrive (the SDK's server ends them with CRLF); one JSON-RPC message per data line.
            for line in call.iter_lines(chunk_size=None, decode_unicode=True):
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("method") == "notifications/progress":
                    progress.append(message["params"])
                    if on_event:
                        on_event(len(progress))
                elif message.get("id") == 2:
                    result = message
                    break
        assert result is not None, f"no result after {len(progress)} progress events"
        return progress, result


# -- stand-ins for the official images compose.yaml names, built from Debian 12's own packages --------------------

POSTGRES_ENTRYPOINT = r"""#!/bin/sh
# The official postgres image's interface, as compose.yaml uses it: POSTGRES_USER, POSTGRES_PASSWORD, POSTGRES_DB,
# PGDATA initialised on first start (password authentication), then `postgres ARGS` as the postgres user.
set -eu
if [ "${1:-}" = postgres ]; then
  mkdir -p "$PGDATA" /var/run/postgresql
  chown postgres:postgres "$PGDATA" /var/run/postgresql
  chmod 700 "$PGDATA"
  as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    printf '%s\n' "$POSTGRES_PASSWORD" > /tmp/pwfile && chown postgres /tmp/pwfile
    as_postgres initdb -D "$PGDATA" -U "$POSTGRES_USER" --pwfile=/tmp/pwfile --auth=scram-sha-256 >/dev/null
    rm /tmp/pwfile
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    as_postgres pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -k /tmp" -w start >/dev/null
    PGPASSWORD="$POSTGRES_PASSWORD" as_postgres psql -q -h /tmp -U "$POSTGRES_USER" -d postgres \
      -c "CREATE DATABASE \"$POSTGRES_DB\""
    as_postgres pg_ctl -D "$PGDATA" -w stop >/dev/null
  fi
  exec setpriv --reuid=postgres --regid=postgres --init-groups "$@"
fi
exec "$@"
"""

STANDINS = {
    "postgres": (
        "localhost/oauthproxy-standin/postgres:15-bookworm",
        """
RUN apt-get update -q && apt-get install -y -q --no-install-recommends postgresql-15 && rm -rf /var/lib/apt/lists/*
COPY entrypoint.sh /usr/local/bin/docker-entrypoint.sh
RUN chmod +x /usr/local/bin/docker-entrypoint.sh
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]
""",
    ),
    "redis": (
        "localhost/oauthproxy-standin/redis:7.0-bookworm",
        """
RUN apt-get update -q && apt-get install -y -q --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/*
CMD ["redis-server"]
""",
    ),
    "nginx": (
        "localhost/oauthproxy-standin/nginx:1.22-bookworm",
        """
RUN apt-get update -q && apt-get install -y -q --no-install-recommends nginx && rm -rf /var/lib/apt/lists/* \\
    && rm -f /etc/nginx/sites-enabled/default
CMD ["nginx", "-g", "daemon off;"]
""",
    ),
}


def standin_image(kind: str, folder: Path) -> str:
    """Debian 12's postgresql-15, redis-server or nginx on the stand-in base, tagged once (podman keeps it)."""
    image, steps = STANDINS[kind]
    if podman("image", "exists", image, check=False).returncode == 0:
        return image
    context = folder / f"standin-{kind}"
    context.mkdir(parents=True, exist_ok=True)
    (context / "entrypoint.sh").write_text(POSTGRES_ENTRYPOINT)
    (context / "Containerfile").write_text(f"FROM {base_image()}\n{steps}")
    podman("build", "--network", "host", *LIMITS, "--format", "docker", "-t", image, str(context), timeout=900)
    return image
