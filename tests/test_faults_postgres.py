"""PostgreSQL under faults, on a private cluster this module starts: stopped, frozen (SIGSTOP), read-only or with its
disk full, the database gets every endpoint a fast JSON 503 with Retry-After (never a hang or an HTML 500), and all
recovers by itself."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import requests

from oauthproxy.models import db
from tests.conftest import RunningProxy
from tests.fault_fixtures import PostgresCluster, fill_disk, small_filesystem, start_postgres_cluster
from tests.proxy_fixtures import EchoServer, GunicornProxy, Login, log_in
from tests.test_faults_sqlite import REGISTRATION, assert_unavailable

pytestmark = pytest.mark.parametrize("database_dsn", ["postgresql"], indirect=True)


@pytest.fixture(scope="module")
def private_postgres() -> Iterator[PostgresCluster]:
    # Not under pytest's temp folder: that is private to root, and the server runs as an unprivileged user.
    folder = Path(tempfile.mkdtemp(prefix="oauthproxy-faults-postgres-"))
    try:
        cluster = start_postgres_cluster(folder)
        yield cluster
        cluster.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def logins(proxy: RunningProxy, count: int) -> list[Login]:
    return [log_in(proxy.url, proxy.url + "/mcp") for _ in range(count)]


def read_only_setting(cluster: PostgresCluster) -> str:
    with psycopg.connect(cluster.dsn) as connection:
        row = connection.execute("SHOW default_transaction_read_only").fetchone()
        return row[0] if row else ""


def assert_every_endpoint_unavailable(proxy: RunningProxy, login: Login) -> None:
    """Registration, a token refresh, an MCP request whose token is not cached yet, and readiness."""
    assert_unavailable(requests.post(proxy.url + "/register", json=REGISTRATION, timeout=60))
    assert_unavailable(login.client.refresh(login.refresh_token))
    assert_unavailable(requests.post(proxy.url + "/mcp", headers=login.bearer, timeout=60))
    ready = requests.get(proxy.url + "/readyz", timeout=60)
    assert ready.status_code == 503, ready.text


def assert_recovered(proxy: RunningProxy | GunicornProxy, login: Login) -> None:
    deadline = time.monotonic() + 60
    while requests.get(proxy.url + "/readyz", timeout=60).status_code != 200:
        assert time.monotonic() < deadline, "not ready again within 60 s"
        time.sleep(0.5)
    assert requests.post(proxy.url + "/register", json=REGISTRATION, timeout=30).status_code == 201
    # The failed refresh spent nothing: the same refresh token still works, so nobody was logged out.
    refreshed = login.client.refresh(login.refresh_token)
    assert refreshed.status_code == 200, refreshed.text
    assert requests.post(proxy.url + "/mcp", headers=login.bearer, timeout=30).status_code == 200


def test_a_stopped_database_answers_503_then_recovers(
    start_proxy: Callable[..., RunningProxy], private_postgres: PostgresCluster, echo_downstream: EchoServer
) -> None:
    proxy = start_proxy(
        DATABASE_DSN=private_postgres.dsn, DATABASE_TIMEOUT="2", MCP_SERVER_URL=echo_downstream.url + "/mcp"
    )
    [login] = logins(proxy, 1)
    private_postgres.stop()
    try:
        assert_every_endpoint_unavailable(proxy, login)
    finally:
        private_postgres.start()
    assert_recovered(proxy, login)


def test_a_read_only_database_answers_503_and_is_not_ready(
    start_proxy: Callable[..., RunningProxy], private_postgres: PostgresCluster, echo_downstream: EchoServer
) -> None:
    """As on a standby, or a database an operator set read-only: reads work, writes are refused."""
    proxy = start_proxy(
        DATABASE_DSN=private_postgres.dsn, DATABASE_TIMEOUT="2", MCP_SERVER_URL=echo_downstream.url + "/mcp"
    )
    [login] = logins(proxy, 1)
    with psycopg.connect(private_postgres.dsn, autocommit=True) as admin:
        admin.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        admin.execute("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        while read_only_setting(private_postgres) != "on":
            assert time.monotonic() < deadline, "the server did not reload its configuration"
            time.sleep(0.1)
        time.sleep(0.5)  # every backend has taken the reload by then
        try:
            assert_unavailable(requests.post(proxy.url + "/register", json=REGISTRATION, timeout=60))
            assert_unavailable(login.client.refresh(login.refresh_token))
            ready = requests.get(proxy.url + "/readyz", timeout=60)
            assert ready.status_code == 503 and ready.json()["database"] == "not writable", ready.text
        finally:
            admin.execute("SET default_transaction_read_only = off")
            admin.execute("ALTER SYSTEM RESET default_transaction_read_only")
            admin.execute("SELECT pg_reload_conf()")
    assert_recovered(proxy, login)


def test_a_frozen_database_answers_503_within_its_bound(
    start_gunicorn: Callable[..., GunicornProxy], private_postgres: PostgresCluster, echo_downstream: EchoServer
) -> None:
    """SIGSTOP: the kernel still accepts connections and acknowledges packets, but nothing answers. Only a
    client-side bound ends the wait; without one a request waits for as long as the database is frozen (under
    gunicorn's gevent worker, as in production). /readyz has its own, shorter bound (3 s): sent together with the
    other requests, it answers first, while they still wait out DATABASE_TIMEOUT."""
    proxy = start_gunicorn(
        DATABASE_DSN=private_postgres.dsn, DATABASE_TIMEOUT="4", MCP_SERVER_URL=echo_downstream.url + "/mcp"
    )
    login = log_in(proxy.url, proxy.url + "/mcp")
    assert requests.get(proxy.url + "/readyz", timeout=30).status_code == 200
    answered: list[str] = []
    failures: list[BaseException] = []

    def expect_unavailable(name: str, call: Callable[[], requests.Response]) -> None:
        try:
            assert_unavailable(call())
            answered.append(name)
        except BaseException as error:  # reported below, from the test's thread
            failures.append(error)

    calls = {
        "register": lambda: requests.post(proxy.url + "/register", json=REGISTRATION, timeout=60),
        "refresh": lambda: login.client.refresh(login.refresh_token),
        "mcp": lambda: requests.post(
            proxy.url + "/mcp", headers=login.bearer, timeout=60
        ),  # its token is not cached yet
    }
    with private_postgres.frozen():
        threads = [threading.Thread(target=expect_unavailable, args=item) for item in calls.items()]
        for thread in threads:
            thread.start()
        ready = requests.get(proxy.url + "/readyz", timeout=60)
        answered.append("readyz")
        for thread in threads:
            thread.join(timeout=60)
    assert not failures, failures
    assert ready.status_code == 503 and ready.json()["database"] == "unreachable", ready.text
    assert answered[0] == "readyz" and sorted(answered[1:]) == sorted(calls)
    assert_recovered(proxy, login)


def table_rows(dsn: str, table: str) -> int:
    with psycopg.connect(dsn) as connection:
        row = connection.execute(f"SELECT count(*) FROM {table}").fetchone()
        return row[0] if row else 0


def test_a_full_disk_answers_503_and_recovers_when_space_is_freed(start_proxy: Callable[..., RunningProxy]) -> None:
    """A private cluster whose data directory is on a small tmpfs, filled up. PostgreSQL keeps writing into the free
    room of pages it has, so requests succeed until a table or index must grow; from then on the JSON 503, never a
    500, nothing half-written, and the server itself keeps running; once space is freed, the same proxy works."""
    with small_filesystem("64m") as folder:
        cluster = start_postgres_cluster(folder / "postgres")
        proxy = None
        try:
            proxy = start_proxy(DATABASE_DSN=cluster.dsn, DATABASE_TIMEOUT="2", TOKEN_RATE_LIMIT="10000 per minute")
            client = proxy.register_client()
            refresh_token = client.exchange(client.login(proxy.browser())["code"]).json()["refresh_token"]
            clients_before = table_rows(cluster.dsn, "oauth_clients")
            filler = fill_disk(folder)

            registered = 0
            for number in range(500):  # until a table must grow; distinct names, or the client row is reused
                registration = requests.post(
                    proxy.url + "/register", timeout=30, json={**REGISTRATION, "client_name": f"full disk {number}"}
                )
                if registration.status_code != 201:
                    assert_unavailable(registration)
                    break
                registered += 1
            else:
                pytest.fail("500 registrations fitted on a full disk")
            refused_token = None
            for _ in range(500):
                refreshed = client.refresh(refresh_token)
                if refreshed.status_code != 200:
                    assert_unavailable(refreshed)
                    refused_token = refresh_token
                    break
                refresh_token = refreshed.json()["refresh_token"]
            else:
                pytest.fail("500 refreshes fitted on a full disk")
            for _ in range(3):  # a client retrying while the disk is full: each retry is refused, none spends the token
                assert_unavailable(client.refresh(refused_token))
            assert table_rows(cluster.dsn, "oauth_clients") == clients_before + registered  # nothing half-written

            filler.unlink()
            assert requests.get(proxy.url + "/readyz", timeout=30).status_code == 200
            assert requests.post(proxy.url + "/register", json=REGISTRATION, timeout=30).status_code == 201
            # The refresh refused during the fault spent nothing: the user is still signed in.
            refreshed = client.refresh(refused_token)
            assert refreshed.status_code == 200, refreshed.text
        finally:
            if proxy is not None:
                with proxy.app.app_context():
                    db.engine.dispose()
            cluster.stop()
