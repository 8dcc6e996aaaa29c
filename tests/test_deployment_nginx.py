"""deploy/nginx.conf in a real nginx, round-robin over two gunicorn instances sharing one PostgreSQL and one Redis."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import anyio
import httpx2
import psycopg
import pytest
import redis
import requests
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from requests.adapters import HTTPAdapter
from sqlalchemy import create_engine, select, update
from sqlalchemy.engine import Engine

from oauthproxy import create_app
from oauthproxy.config import normalise_database_dsn
from oauthproxy.crypto import hash_token
from oauthproxy.models import Grant, Token, db, utcnow
from oauthproxy.self_check import SelfCheck
from tests.conftest import POSTGRES_DSN
from tests.deployment_fixtures import ROOT, Instance, Nginx, sdk_oauth, spawn_instance, start_nginx, wait_ready
from tests.flows import Browser, McpOAuthClient
from tests.provider_fixture import OidcProvider
from tests.proxy_fixtures import McpDownstream, launch_mcp_downstream
from tests.support.ports import free_port
from tests.support.settings import base_env

REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
REGISTER_LIMIT = 6
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "fleet-test", "version": "1"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@dataclass
class Fleet:
    nginx: Nginx
    instances: list[Instance]
    downstream: McpDownstream
    database: Engine
    provider: OidcProvider

    @property
    def url(self) -> str:
        return self.nginx.url

    @property
    def cert(self) -> str:
        return str(self.nginx.cert)

    def browser(self) -> Browser:
        browser = Browser(self.url)
        browser.session.verify = self.cert
        browser.session.trust_env = False  # else REQUESTS_CA_BUNDLE, when set, overrides session.verify
        return browser

    def log_in(self) -> tuple[McpOAuthClient, dict]:
        """A whole login through nginx: registration, consent, provider, callback and token, instance by turns."""
        with requests.Session() as session:
            session.verify, session.trust_env = self.cert, False
            body = {
                "client_name": "fleet test",
                "redirect_uris": ["http://127.0.0.1:9/callback"],
                "token_endpoint_auth_method": "none",
            }
            registered = session.post(self.url + "/register", json=body, timeout=10)
        assert registered.status_code == 201, registered.text
        client = McpOAuthClient(self.url, registered.json()["client_id"])
        result = client.login(self.browser(), resource=self.url + "/mcp")
        tokens = self.token_request(
            client,
            {
                "grant_type": "authorization_code",
                "code": result["code"],
                "redirect_uri": client.redirect_uri,
                "code_verifier": client.verifier,
            },
        )
        assert tokens.status_code == 200, tokens.text
        return client, tokens.json()

    def token_request(self, client: McpOAuthClient, data: dict, base: str | None = None) -> requests.Response:
        verify = self.cert if base is None else True
        return requests.post(
            (base or self.url) + "/token", data={**data, "client_id": client.client_id}, verify=verify, timeout=10
        )

    def json_logs(self, instance: Instance) -> list[dict]:
        lines = []
        for line in instance.logs().splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        return lines


def mcp_call(url: str, token: str, verify: str | bool = True) -> requests.Response:
    return requests.post(
        url + "/mcp",
        json=INITIALIZE,
        headers={**MCP_HEADERS, "Authorization": f"Bearer {token}"},
        verify=verify,
        timeout=10,
    )


@pytest.fixture(scope="module")
def fleet(oidc_provider: OidcProvider, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    folder = tmp_path_factory.mktemp("fleet")
    name = f"oauthproxy_fleet_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    dsn = POSTGRES_DSN.rsplit("/", 1)[0] + "/" + name
    redis.Redis.from_url(REDIS_URL).flushdb()  # counters of an earlier run in the last minute must not count
    downstream = launch_mcp_downstream(folder)
    ports = [free_port(), free_port()]
    nginx = start_nginx(folder / "nginx", [f"127.0.0.1:{port}" for port in ports])
    client_id = f"fleet-{nginx.https_port}"
    instances: list[Instance] = []
    database = create_engine(normalise_database_dsn(dsn))
    try:
        for index, port in enumerate(ports):
            env = {
                **os.environ,
                **base_env(port, oidc_provider, dsn, client_id),
                "PUBLIC_URL": nginx.url,
                "HOST": "127.0.0.1",
                "WEB_CONCURRENCY": "2",
                "OAUTHPROXY_ENV_FILE": os.devnull,
                "MCP_SERVER_URL": downstream.url,
                "DOWNSTREAM_FORWARD_ACCESS_TOKEN": "true",  # the provider-token refresh race below
                "TRUSTED_PROXY_HOPS": "1",
                "LOG_FORMAT": "json",
                "TOKEN_CACHE_TTL": "1",
                "RATE_LIMIT_STORAGE_URI": REDIS_URL,
                "REGISTER_RATE_LIMIT": f"{REGISTER_LIMIT} per minute",
            }
            env.pop("PROMETHEUS_MULTIPROC_DIR", None)
            if index == 1:
                # The second instance gets a folder of the operator's, holding a previous run's counts.
                env["PROMETHEUS_MULTIPROC_DIR"] = str(folder / "metrics")
                stale_metrics(env["PROMETHEUS_MULTIPROC_DIR"])
            if index == 0:
                oidc_provider.register_client(client_id, env["OAUTH_CLIENT_SECRET"], [f"{nginx.url}/callback"])
            # Both start at once on the fresh database: each master runs the migrations first.
            instances.append(spawn_instance(folder, env))
        for instance in instances:
            wait_ready(instance)
        yield Fleet(nginx, instances, downstream, database, oidc_provider)
    finally:
        for instance in instances:
            instance.stop()
        nginx.stop()
        downstream.stop()
        database.dispose()
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def fleet_login(fleet: Fleet) -> tuple[McpOAuthClient, dict]:
    return fleet.log_in()


def test_two_instances_migrate_a_fresh_database_once(fleet: Fleet) -> None:
    upgrades = [instance.logs().count("Running upgrade  -> ") for instance in fleet.instances]
    assert sorted(upgrades) == [0, 1], upgrades  # the other waited on the advisory lock, then found it current


def test_a_login_spread_over_both_instances_works_and_either_honours_its_token(
    fleet: Fleet, fleet_login: tuple[McpOAuthClient, dict]
) -> None:
    _client, tokens = fleet_login
    # nginx took turns: each instance served part of the login, so the state between steps is shared.
    for instance in fleet.instances:
        paths = {line.get("path") for line in fleet.json_logs(instance)}
        assert paths & {"/register", "/authorize", "/authorize/consent", "/callback", "/token"}, paths
    for instance in fleet.instances:
        assert mcp_call(instance.url, tokens["access_token"]).status_code == 200
    assert mcp_call(fleet.url, tokens["access_token"], fleet.cert).status_code == 200


def test_a_revocation_on_one_instance_reaches_the_other(fleet: Fleet) -> None:
    client, tokens = fleet.log_in()
    first, second = fleet.instances
    assert mcp_call(second.url, tokens["access_token"]).status_code == 200  # cached by the second instance now
    revoked = requests.post(
        first.url + "/revoke", data={"token": tokens["refresh_token"], "client_id": client.client_id}, timeout=10
    )
    assert revoked.status_code == 200
    time.sleep(1.2)  # TOKEN_CACHE_TTL=1 here (default 30): the bound on how late a revocation bites
    assert mcp_call(second.url, tokens["access_token"]).status_code == 401


def test_a_client_refresh_racing_on_two_instances_logs_nobody_out(fleet: Fleet) -> None:
    client, tokens = fleet.log_in()
    barrier = threading.Barrier(2)
    answers: dict[int, requests.Response] = {}

    def refresh(index: int) -> None:
        barrier.wait()
        answers[index] = fleet.token_request(
            client,
            {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]},
            base=fleet.instances[index].url,
        )

    threads = [threading.Thread(target=refresh, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    # The loser of the race is inside REFRESH_GRACE_SECONDS: it gets a pair too, instead of a logout.
    assert [answers[index].status_code for index in range(2)] == [200, 200], [a.text for a in answers.values()]
    pairs = [answers[index].json() for index in range(2)]
    with fleet.database.connect() as connection:
        old = connection.execute(
            select(Token).where(Token.refresh_token_hash == hash_token(tokens["refresh_token"]))
        ).one()
        grant = connection.execute(select(Grant).where(Grant.id == old.grant_id)).one()
    assert old.rotated_at is not None and grant.revoked_at is None
    for index, pair in enumerate(pairs):
        other = fleet.instances[1 - index]
        assert mcp_call(other.url, pair["access_token"]).status_code == 200
        again = fleet.token_request(
            client, {"grant_type": "refresh_token", "refresh_token": pair["refresh_token"]}, base=other.url
        )
        assert again.status_code == 200, again.text


def test_an_upstream_refresh_racing_on_two_instances_happens_once(fleet: Fleet) -> None:
    _client, tokens = fleet.log_in()
    with fleet.database.begin() as connection:
        grant_id = connection.execute(
            select(Token.grant_id).where(Token.access_token_hash == hash_token(tokens["access_token"]))
        ).scalar_one()
        connection.execute(
            update(Grant).where(Grant.id == grant_id).values(upstream_expires_at=utcnow() - timedelta(seconds=5))
        )
    fleet.provider.reset_stats()
    barrier = threading.Barrier(6)
    statuses: list[int] = []

    def call(instance: Instance) -> None:
        barrier.wait()
        statuses.append(mcp_call(instance.url, tokens["access_token"]).status_code)

    threads = [
        threading.Thread(target=call, args=(instance,))
        for instance in itertools.islice(itertools.cycle(fleet.instances), 6)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert statuses == [200] * 6
    assert fleet.provider.stats()["refresh_requests"] == 1  # one instance refreshed; the others waited, then reused


class FromAddress(HTTPAdapter):
    """Connects from another loopback address, so these requests have a client address of their own."""

    def __init__(self, address: str):
        self.address = address
        super().__init__()

    def init_poolmanager(self, *args, **kwargs) -> None:
        kwargs["source_address"] = (self.address, 0)
        super().init_poolmanager(*args, **kwargs)


def test_rate_limits_are_shared_by_the_instances_and_keyed_on_the_trusted_address(fleet: Fleet) -> None:
    body = {
        "client_name": "rate test",
        "redirect_uris": ["http://127.0.0.1:9/callback"],
        "token_endpoint_auth_method": "none",
    }
    with requests.Session() as session:
        session.verify, session.trust_env = fleet.cert, False
        session.mount("https://", FromAddress("127.0.0.2"))
        # A made-up X-Forwarded-For on each request: nginx appends the real address, and only that is trusted.
        answers = [
            session.post(fleet.url + "/register", json=body, timeout=10, headers={"X-Forwarded-For": f"198.51.100.{n}"})
            for n in range(REGISTER_LIMIT + 1)
        ]
    assert [answer.status_code for answer in answers] == [201] * REGISTER_LIMIT + [429]
    assert int(answers[-1].headers["Retry-After"]) > 0
    # The limit held across both instances (with per-process counters each would have allowed REGISTER_LIMIT).
    deadline = time.monotonic() + 5
    while True:  # each line is written when its response is closed, a moment after the client has it
        served = [
            sum(
                1
                for line in fleet.json_logs(instance)
                if line.get("path") == "/register" and line.get("client") == "127.0.0.2"
            )
            for instance in fleet.instances
        ]
        if sum(served) == REGISTER_LIMIT + 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert all(count >= 3 for count in served), served
    # Another address has its own allowance.
    with requests.Session() as session:
        session.verify, session.trust_env = fleet.cert, False
        session.mount("https://", FromAddress("127.0.0.3"))
        assert session.post(fleet.url + "/register", json=body, timeout=10).status_code == 201


def test_a_streamed_tool_call_through_nginx_arrives_event_by_event(fleet: Fleet) -> None:
    resource_url = fleet.url + "/mcp"
    provider, login, storage = sdk_oauth(fleet.url, resource_url, verify=fleet.cert)
    progress: list[float] = []
    open_streams: list[float] = []
    context = ssl.create_default_context(cafile=fleet.cert)

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(time.monotonic())

    async def scrape_while_streaming() -> None:
        await anyio.sleep(1.0)
        open_streams.append(await anyio.to_thread.run_sync(total_open_streams, fleet))

    async def scenario() -> tuple[object, object, float, float]:
        async with (
            httpx2.AsyncClient(auth=provider, timeout=30, verify=context) as http,
            Client(streamable_http_client(resource_url, http_client=http)) as client,
        ):
            started = time.monotonic()
            async with anyio.create_task_group() as group:
                group.start_soon(scrape_while_streaming)
                result = await client.call_tool("progress", {"steps": 4, "pause": 0.5}, progress_callback=on_progress)
            finished = time.monotonic()
            headers = await client.call_tool("whoami", {})
            return result, headers, started, finished

    result, headers, started, finished = anyio.run(scenario)
    assert len(login.authorize_urls) == 1 and storage.tokens is not None
    assert result.is_error is False
    arrivals = [at - started for at in progress]
    assert len(arrivals) == 4 and arrivals[0] < 1.2, arrivals
    assert all(later - earlier > 0.3 for earlier, later in itertools.pairwise(arrivals)), arrivals
    assert finished - started - arrivals[0] > 1.2, arrivals
    assert open_streams and open_streams[0] >= 1  # the tool call's stream, counted while open
    seen = {key.lower(): value for key, value in headers.structured_content.items()}
    assert seen["x-forwarded-user"] == "alice"
    assert seen["x-forwarded-proto"] == "https"  # from PUBLIC_URL, not from a header
    assert seen["x-forwarded-for"] == "127.0.0.1"  # the address nginx saw (one trusted hop)
    # nginx's request id reached the MCP server, and names the tool call's line in an instance's log.
    deadline = time.monotonic() + 5
    while True:  # the line is written once the response is closed, which may be just after the client has it
        lines = [
            line
            for instance in fleet.instances
            for line in fleet.json_logs(instance)
            if line.get("request_id") == seen["x-request-id"]
        ]
        if lines or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert [(line["method"], line["path"], line["status"], line["user_id"]) for line in lines] == [
        ("POST", "/mcp", 200, "alice")
    ]


def total_open_streams(fleet: Fleet) -> float:
    total = 0.0
    for instance in fleet.instances:
        for line in requests.get(instance.url + "/metrics", timeout=5).text.splitlines():
            if line.startswith("oauthproxy_open_streams{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def stale_metrics(folder: str) -> None:
    """What a previous run leaves: 1,000 metadata requests counted in a file of the folder."""
    script = (
        "from oauthproxy import metrics; metrics.HTTP_REQUESTS.labels("
        "'/.well-known/oauth-authorization-server', 'GET', '200').inc(1000)"
    )
    Path(folder).mkdir()
    subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": folder},
        check=True,
        timeout=60,
    )
    assert list(Path(folder).glob("counter_*.db"))


@pytest.mark.parametrize("index", [0, 1])
def test_metrics_add_up_every_worker_of_an_instance(fleet: Fleet, index: int) -> None:
    """Instance 0: the folder gunicorn.conf.py makes itself. Instance 1: the operator's folder, emptied at start."""
    instance = fleet.instances[index]

    def served() -> float:
        text = requests.get(instance.url + "/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("oauthproxy_http_requests_total{")
            and 'route="/.well-known/oauth-authorization-server"' in line
            and 'status="200"' in line
        )

    before = served()
    with requests.Session() as session:  # new connections, so both workers take some
        for _ in range(20):
            session.get(
                instance.url + "/.well-known/oauth-authorization-server", timeout=5, headers={"Connection": "close"}
            )
    # A request is counted once its response has ended, just after the client has it: wait for the last count.
    deadline = time.monotonic() + 5
    while served() < before + 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    readings = {served() for _ in range(6)}  # whichever worker answers, it reports the sum
    assert readings == {before + 20}, (before, readings)
    assert before < 1000  # the stale file of a previous run was not added in
    if index == 1:
        # Both workers counted requests, each in its own file of the folder.
        workers = set(
            subprocess.run(
                ["ps", "-o", "pid=", "--ppid", str(instance.process.pid)], capture_output=True, text=True, timeout=10
            ).stdout.split()
        )
        writers = {
            path.stem.rsplit("_", 1)[1] for path in Path(instance.env["PROMETHEUS_MULTIPROC_DIR"]).glob("counter_*.db")
        }
        assert len(workers) == 2 and workers <= writers, (workers, writers)
    assert total_open_streams(fleet) == 0


def test_nginx_keeps_metrics_private_and_passes_health_checks(fleet: Fleet) -> None:
    assert requests.get(fleet.url + "/metrics", verify=fleet.cert, timeout=5).status_code == 403
    assert requests.get(fleet.url + "/healthz", verify=fleet.cert, timeout=5).text == "ok\n"
    ready = requests.get(fleet.url + "/readyz", verify=fleet.cert, timeout=5)
    assert ready.status_code == 200 and ready.json()["database"] == "ok"


def test_check_through_nginx_names_a_wrong_scheme_and_an_untrusted_certificate(fleet: Fleet) -> None:
    env = {key: value for key, value in fleet.instances[0].env.items() if key != "PROMETHEUS_MULTIPROC_DIR"}

    def chain(public_url: str, verify: str | bool = True) -> list[str]:
        app = create_app({**env, "PUBLIC_URL": public_url})
        try:
            check = SelfCheck(app, timeout=5)
            check.http.verify, check.http.trust_env = verify, False
            with app.app_context():
                return [
                    f"{finding.level} {finding.message}"
                    for finding in check.discovery_chain(app.config["SETTINGS"].routes[0])
                ]
        finally:
            with app.app_context():
                db.engine.dispose()

    # http:// where nginx redirects to https: clients would lose their POST.
    [plain] = chain(f"http://127.0.0.1:{fleet.nginx.http_port}")
    assert plain.startswith(f"fail http://127.0.0.1:{fleet.nginx.http_port}/mcp redirects to https://127.0.0.1/mcp")
    assert "set it to the address that answers directly" in plain
    # A certificate clients do not trust.
    [untrusted] = chain(fleet.url)
    assert untrusted.startswith(f"fail TLS failed at {fleet.url}/mcp (certificate verify failed)")
    # Right address, trusted certificate: the whole chain through nginx is consistent.
    [good] = chain(fleet.url, fleet.cert)
    assert good.startswith(f"ok a client reaching {fleet.url}/mcp gets 401")
