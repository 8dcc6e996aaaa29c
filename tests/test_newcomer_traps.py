"""What tripped up a new user on a fresh clone (issue 15): each trap, as the user meets it."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import requests

from oauthproxy.config import ConfigError, load_settings
from tests.conftest import POSTGRES_DSN, ensure_database
from tests.support.ports import free_port
from tests.support.processes import wait_until_answers
from tests.support.settings import TEST_KEY

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()
HEX_KEY = "9f" * 32  # what `openssl rand -hex 32` prints


def settings_env(**overrides: str) -> dict[str, str]:
    return {
        "PATH": f"{BIN}:/usr/bin:/bin",
        "OAUTHPROXY_ENV_FILE": os.devnull,
        "OAUTH_CLIENT_ID": "c",
        "OAUTH_CLIENT_SECRET": "s",
        "OAUTH_AUTHORIZE_URL": "http://127.0.0.1:9",
        "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
        "ENCRYPTION_KEY": TEST_KEY,
        "WEB_CONCURRENCY": "1",
        **overrides,
    }


def gunicorn(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_flask_run_as_the_readme_says_serves_where_discovery_points(tmp_path: Path) -> None:
    assert "flask --app wsgi run" in README
    port = free_port()
    env = settings_env(PORT=str(port), DATABASE_DSN=f"sqlite:///{tmp_path / 'dev.db'}")
    process = subprocess.Popen(
        [str(BIN / "flask"), "--app", "wsgi", "run"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/healthz", process, status=None)
        metadata = requests.get(f"http://127.0.0.1:{port}/.well-known/oauth-authorization-server", timeout=10).json()
        assert metadata["issuer"] == f"http://127.0.0.1:{port}"  # the address Flask listens on
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_make_clean_never_deletes_the_instance_folder(tmp_path: Path) -> None:
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    database = tmp_path / "instance" / "oauthproxy.sqlite3"
    database.parent.mkdir()
    database.write_bytes(b"the production database")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    done = subprocess.run(
        [shutil.which("make") or "make", "clean"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / ".venv").exists()  # it does clean
    assert database.read_bytes() == b"the production database"


def test_the_tests_create_their_postgresql_database_when_it_is_missing() -> None:
    name = f"oauthproxy_missing_{secrets.token_hex(4)}"
    dsn = POSTGRES_DSN.rsplit("/", 1)[0] + "/" + name
    try:
        ensure_database(dsn)
        with psycopg.connect(dsn, connect_timeout=5) as connection:
            assert connection.execute("select current_database()").fetchone() == (name,)
        ensure_database(dsn)  # present: nothing to do
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    script = (ROOT / "scripts" / "ensure-services").read_text()
    assert "CREATE DATABASE" in script  # `make test` creates it before pytest starts, too


@pytest.mark.parametrize(
    "dsn, reason",
    [
        (f"postgresql://postgres@127.0.0.1:{free_port()}/oauthproxy", "Connection refused"),
        (POSTGRES_DSN.rsplit("/", 1)[0] + "/oauthproxy_absent_db", 'database "oauthproxy_absent_db" does not exist'),
    ],
    ids=["refused", "absent-database"],  # the port is picked anew by each process: xdist workers must agree on ids
)
def test_a_database_problem_at_start_up_is_one_line(dsn: str, reason: str) -> None:
    done = gunicorn(settings_env(PORT=str(free_port()), DATABASE_DSN=dsn))
    assert done.returncode == 3
    assert "Traceback" not in done.stderr and "database upgrade failed" not in done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "oauthproxy cannot start" in line]
    assert reason in line and "Check DATABASE_DSN" in line, line
    # gunicorn's own start line and the one problem: nothing else.
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 2, done.stderr


def test_a_settings_error_is_not_followed_by_a_database_upgrade_failure() -> None:
    done = gunicorn(settings_env(PORT=str(free_port()), ENCRYPTION_KEY=HEX_KEY, DATABASE_DSN="sqlite:///:memory:"))
    assert done.returncode == 2
    assert "oauthproxy cannot start; fix these settings" in done.stderr
    assert "database upgrade failed" not in done.stderr and "Traceback" not in done.stderr


def test_ctrl_c_stops_gunicorn_without_a_traceback_per_worker(tmp_path: Path) -> None:
    port = free_port()
    env = settings_env(PORT=str(port), WEB_CONCURRENCY="2", DATABASE_DSN=f"sqlite:///{tmp_path / 'ctrl-c.db'}")
    process = subprocess.Popen(
        [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    connections = []
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/healthz", process, status=None)
        # Kept-alive connections to both workers, as a browser and an MCP client leave them.
        for _ in range(4):
            connection = socket.create_connection(("127.0.0.1", port), timeout=5)
            connection.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert connection.recv(1024).startswith(b"HTTP/1.1 200")
            connections.append(connection)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        output, _ = process.communicate(timeout=30)
    finally:
        for connection in connections:
            connection.close()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert output.count("Worker exiting") == 2, output
    assert "Traceback" not in output and "SystemExit" not in output, output


def test_a_plain_path_is_an_sqlite_file_and_a_relative_one_lands_in_the_instance_folder(tmp_path: Path) -> None:
    base = {key: value for key, value in settings_env().items() if key != "PATH"}
    absolute = load_settings({**base, "DATABASE_DSN": str(tmp_path / "data" / "proxy.db")}, str(tmp_path / "i"))
    assert absolute.database_dsn == f"sqlite:///{tmp_path / 'data' / 'proxy.db'}"
    relative = load_settings({**base, "DATABASE_DSN": "proxy.db"}, str(tmp_path / "instance"))
    assert relative.database_dsn == f"sqlite:///{tmp_path / 'instance' / 'proxy.db'}"
    with pytest.raises(ConfigError) as refused:
        load_settings({**base, "DATABASE_DSN": "mysql://db/proxy"}, str(tmp_path))
    assert "a path to an SQLite file" in refused.value.problems[0]
    assert "relative" in README and "instance/" in README  # where relative SQLite paths land is documented


def test_a_plain_path_database_serves_the_proxy(tmp_path: Path) -> None:
    port = free_port()
    database = tmp_path / "proxy.db"
    env = settings_env(PORT=str(port), DATABASE_DSN=str(database))
    process = subprocess.Popen(
        [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_answers(f"http://127.0.0.1:{port}/healthz", process, status=None)
        assert requests.get(f"http://127.0.0.1:{port}/readyz", timeout=10).status_code == 200
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)
    assert database.stat().st_size > 0


def test_a_hex_key_is_recognised_and_the_message_says_how_to_make_a_base64_one() -> None:
    base = {key: value for key, value in settings_env().items() if key != "PATH"}
    for value, label in ((HEX_KEY, "ENCRYPTION_KEY"), (f"{TEST_KEY},{HEX_KEY.upper()}", "ENCRYPTION_KEY (key #2)")):
        with pytest.raises(ConfigError) as refused:
            load_settings({**base, "ENCRYPTION_KEY": value})
        (problem,) = refused.value.problems
        assert problem.startswith(f"{label} is 64 hex digits"), problem
        assert "oauthproxy gen-key" in problem and "openssl rand -base64 32" in problem
        assert HEX_KEY not in problem.lower()  # never the key itself


def _settings_read() -> set[str]:
    names = set()
    for path in (ROOT / "oauthproxy").glob("*.py"):
        text = path.read_text()
        names |= set(re.findall(r'env\.get\("([A-Z][A-Z0-9_]+)"', text))
        names |= set(re.findall(r'(?:read_[a-z]+|required)\(\s*(?:env,\s*)?"([A-Z][A-Z0-9_]+)"', text))
        names |= set(re.findall(r'os\.environ\.get\("([A-Z][A-Z0-9_]+)"', text))
    names |= set(re.findall(r'os\.environ\.get\("([A-Z][A-Z0-9_]+)"', (ROOT / "gunicorn.conf.py").read_text()))
    return names - {"AUTHLIB_INSECURE_TRANSPORT"}  # set by the proxy itself, not an operator's setting


def test_every_setting_and_make_target_is_documented() -> None:
    settings = _settings_read()
    assert {
        "GUNICORN_TIMEOUT",
        "LOG_LEVEL",
        "OAUTHPROXY_ENV_FILE",
        "KEEPALIVE",
        "CA_BUNDLE",
        "GITHUB_API_URL",
    } <= settings
    undocumented = sorted(name for name in settings if f"`{name}`" not in README)
    assert not undocumented, f"settings the README does not name: {undocumented}"
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.MULTILINE))
    helped = set(re.findall(r"^## ([a-z-]+):", makefile, re.MULTILINE))
    assert targets - {"demo-deps"} <= helped, targets - helped  # `make help` lists them
    for target in ("run", "test", "test-container", "install", "lint", "lock", "wheel", "clean", "bench"):
        assert f"make {target}" in README, target
    assert "PYTEST_ARGS" in README


@pytest.mark.parametrize(
    "command",
    [
        [sys.executable, "-m", "oauthproxy.cli", "db", "upgrade"],  # `oauthproxy db upgrade`
        [str(BIN / "flask"), "--app", "wsgi", "db", "upgrade"],
    ],
)  # the Procfile's
@pytest.mark.parametrize(
    "dsn, reason",
    [
        (f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/oauthproxy", "Connection refused"),
        (POSTGRES_DSN.rsplit("/", 1)[0] + "/oauthproxy_absent_db", 'database "oauthproxy_absent_db" does not exist'),
    ],
    ids=["refused", "absent-database"],  # the port is picked anew by each process: xdist workers must agree on ids
)
def test_db_upgrade_with_a_database_problem_says_it_in_one_line(command: list[str], dsn: str, reason: str) -> None:
    """`oauthproxy db upgrade`, and the Procfile's release step (`flask --app wsgi db upgrade`), as gunicorn's start."""
    done = subprocess.run(
        command, cwd=ROOT, env=settings_env(DATABASE_DSN=dsn), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("oauthproxy cannot upgrade the database: cannot use postgresql"), lines[0]
    assert reason in lines[0] and "Check DATABASE_DSN" in lines[0], lines[0]
    assert "hunter2" not in done.stderr + done.stdout
