"""Dockerfile, Procfile, app.json and the nginx example: checked without a Docker engine, the Procfile run for real."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import psycopg
import pytest
import requests

from oauthproxy import create_app
from tests.conftest import POSTGRES_DSN
from tests.provider_fixture import OidcProvider
from tests.support.ports import free_port
from tests.support.processes import wait_until_answers
from tests.support.settings import TEST_KEY

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETTINGS_SOURCES = "".join((ROOT / "oauthproxy" / name).read_text() for name in ("config.py", "routes.py"))


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) pairs, with line continuations joined and comments dropped."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = pending + stripped
        pending = ""
        keyword, _, arguments = text.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def dockerignored(path: str) -> bool:
    ignored = False
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!")
        if fnmatch(path, pattern) or fnmatch(path, pattern.removeprefix("**/")) or path.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def test_the_dockerfile_parses_and_matches_the_package() -> None:
    instructions = dockerfile()
    keywords = [keyword for keyword, _ in instructions]
    known = {"ARG", "FROM", "ENV", "WORKDIR", "COPY", "RUN", "VOLUME", "USER", "EXPOSE", "HEALTHCHECK", "CMD"}
    assert set(keywords) <= known, set(keywords) - known
    assert keywords[:2] == ["ARG", "FROM"] and keywords.count("FROM") == 1
    # The base image is a build argument (tests/test_container.py builds with a local stand-in); its default is
    # the official image of the oldest Python the package supports.
    name, _, base = instructions[0][1].partition("=")
    assert name == "BASE_IMAGE" and instructions[1][1] == "${BASE_IMAGE}"
    minimum = PYPROJECT["project"]["requires-python"].removeprefix(">=")
    assert re.fullmatch(rf"python:{re.escape(minimum)}-slim(-\w+)?", base), base

    env = {}
    for keyword, arguments in instructions:
        if keyword == "ENV":
            env.update(dict(pair.split("=", 1) for pair in shlex.split(arguments)))
    assert env["HOST"] == "0.0.0.0"  # reachable from outside the container; PUBLIC_URL is then required
    assert env["PYTHONMALLOC"] == "malloc"  # memory of closed streams goes back to the system (docs/scaling.md)
    assert ("EXPOSE", env["PORT"]) in instructions

    # Dependencies in their own layer: the lock alone, installed with its hashes, before the application is copied.
    copies = [
        (index, arguments.split()) for index, (keyword, arguments) in enumerate(instructions) if keyword == "COPY"
    ]
    first_source = next(index for index, parts in copies if "oauthproxy" in parts[0])
    deps_copy = next(index for index, parts in copies if parts[:-1] == ["requirements.txt"])
    deps_install = next(
        index
        for index, (keyword, arguments) in enumerate(instructions)
        if keyword == "RUN" and "pip install --require-hashes -r requirements.txt" in arguments
    )
    assert deps_copy < deps_install < first_source
    for _, parts in copies:
        for source in parts[:-1]:
            assert (ROOT / source).exists(), source
            assert not dockerignored(source), f"{source} is copied but .dockerignore drops it"
    for secret in (".env", ".venv", ".git", "instance", "node_modules"):
        assert dockerignored(secret), secret
    assert not dockerignored(".env.example")

    user = next(arguments for keyword, arguments in instructions if keyword == "USER")
    assert user not in ("root", "0") and keywords.index("USER") < keywords.index("CMD")
    assert f"--uid {user}" in next(
        arguments for keyword, arguments in instructions if keyword == "RUN" and "useradd" in arguments
    )

    cmd = json.loads(next(arguments for keyword, arguments in instructions if keyword == "CMD"))
    assert cmd == ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
    assert any(dependency.startswith("gunicorn[gevent]==") for dependency in PYPROJECT["project"]["dependencies"])
    assert "app = create_app()" in (ROOT / "wsgi.py").read_text()
    assert "oauthproxy" in PYPROJECT["project"]["scripts"]  # `docker run ... oauthproxy check`

    healthcheck = next(arguments for keyword, arguments in instructions if keyword == "HEALTHCHECK")
    probe = json.loads(healthcheck[healthcheck.index("CMD") + 3 :].strip())
    assert probe[:2] == ["python", "-c"]
    path = re.search(r"http://127\.0\.0\.1:%s(/\w+)", probe[2]).group(1)
    app = create_app(
        {
            "OAUTH_CLIENT_ID": "c",
            "OAUTH_CLIENT_SECRET": "s",
            "OAUTH_AUTHORIZE_URL": "http://127.0.0.1:9",
            "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
            "ENCRYPTION_KEY": TEST_KEY,
            "DATABASE_DSN": "sqlite:///:memory:",
        }
    )
    assert path == "/healthz" and path in {rule.rule for rule in app.url_map.iter_rules()}


def test_the_readme_says_how_the_image_is_tested_and_what_stands_in() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "docker build" in readme and "make test-container" in readme
    assert "stand-in" in readme and "BASE_IMAGE" in readme and "not run here" in readme


def test_app_json_describes_settings_the_proxy_reads() -> None:
    manifest = json.loads((ROOT / "app.json").read_text())
    for name, spec in manifest["env"].items():
        assert f'"{name}"' in SETTINGS_SOURCES, f"app.json sets {name}, which the proxy never reads"
        assert spec.get("description")
    for name in (
        "PUBLIC_URL",
        "OAUTH_CLIENT_ID",
        "OAUTH_CLIENT_SECRET",
        "OAUTH_AUTHORIZE_URL",
        "MCP_SERVER_URL",
        "ENCRYPTION_KEY",
    ):
        assert manifest["env"][name].get("required") is True, name
    # Heroku's secret generator makes 64 hex characters: fine for METRICS_TOKEN, never for ENCRYPTION_KEY.
    assert "generator" not in manifest["env"]["ENCRYPTION_KEY"]
    assert any(addon["plan"].startswith("heroku-postgresql") for addon in manifest["addons"])  # DATABASE_URL
    # The buildpack installs requirements.txt (the lock, with hashes; the app runs from the checkout).
    assert "--hash=sha256:" in (ROOT / "requirements.txt").read_text()


def test_the_nginx_example_streams_unbuffered_and_forwards_the_client() -> None:
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    location = re.search(r"location / \{(.*?)\n    \}", text, re.DOTALL).group(1)
    directives = {
        line.strip().rstrip(";") for line in location.splitlines() if line.strip() and not line.strip().startswith("#")
    }
    for wanted in (
        "proxy_buffering off",
        "proxy_request_buffering off",
        "proxy_http_version 1.1",
        "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for",
        "proxy_set_header X-Forwarded-Proto $scheme",
    ):
        assert wanted in directives, wanted
    read_timeout = next(d for d in directives if d.startswith("proxy_read_timeout")).split()[1]
    assert read_timeout in ("1h", "3600s", "3600") or read_timeout.endswith("h")


@pytest.fixture
def fresh_postgres_url() -> str:
    name = f"oauthproxy_paas_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    # Heroku names the scheme postgres://; the proxy must accept it from DATABASE_URL.
    yield "postgres://" + POSTGRES_DSN.split("://", 1)[1].rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _process_group(group: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == group:
                    found.append(int(entry))
            except ProcessLookupError:
                pass
    return found


def _proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def test_the_procfile_runs_as_a_platform_runs_it(
    oidc_provider: OidcProvider, fresh_postgres_url: str, tmp_path: Path
) -> None:
    processes = dict(line.split(": ", 1) for line in (ROOT / "Procfile").read_text().splitlines() if line.strip())
    assert set(processes) == {"web", "release"}
    assert processes["web"].startswith("HOST=${HOST:-0.0.0.0} ")  # a platform's router reaches every interface
    port = free_port()
    public_url = f"http://127.0.0.1:{port}"
    env = {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PORT": str(port),
        "HOST": "127.0.0.1",  # loopback here
        "DATABASE_URL": fresh_postgres_url,
        "PUBLIC_URL": public_url,
        "WEB_CONCURRENCY": "1",
        "OAUTH_CLIENT_ID": "paas",
        "OAUTH_CLIENT_SECRET": "paas-secret",
        "OAUTH_AUTHORIZE_URL": oidc_provider.issuer,
        "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
        "ENCRYPTION_KEY": TEST_KEY,
        "OAUTHPROXY_ENV_FILE": os.devnull,
    }
    # As a platform runs a process type: its line given to a shell (Heroku: bash -c).
    release = subprocess.run(
        ["bash", "-c", processes["release"]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert release.returncode == 0, release.stderr
    assert "Running upgrade  -> " in release.stderr
    log_path = tmp_path / "web.log"
    with log_path.open("wb") as log:
        web = subprocess.Popen(
            ["bash", "-c", processes["web"]],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        ready = wait_until_answers(public_url + "/readyz", web, status=None, logs=log_path.read_text, request_timeout=5)
        assert ready.status_code == 200, log_path.read_text()
        metadata = requests.get(public_url + "/.well-known/oauth-authorization-server", timeout=5).json()
        assert metadata["issuer"] == public_url
        assert "Running upgrade" not in log_path.read_text()  # the release phase migrated already
        # The workers run on malloc (memory of closed streams goes back to the system), and nothing says otherwise.
        workers = [pid for pid in _process_group(web.pid) if b"gunicorn" in _proc(pid, "cmdline")]
        assert len(workers) >= 2, workers  # the master and its worker
        assert all(b"\0PYTHONMALLOC=malloc\0" in b"\0" + _proc(pid, "environ") for pid in workers)
        assert "PYTHONMALLOC=malloc is not set" not in log_path.read_text()
    finally:
        os.killpg(web.pid, signal.SIGINT)  # the shell's group: gunicorn's master and workers
        web.wait(timeout=20)
