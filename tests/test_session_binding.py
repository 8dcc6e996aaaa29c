"""MCP sessions are bound to the user who opened them (MCP RS-5): another user's token with that Mcp-Session-Id gets
the transport's 404 before the downstream sees anything, on every worker and instance sharing the database."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import anyio
import pytest
import requests
from flask import Flask
from sqlalchemy import event, select, text, update

from oauthproxy import create_app
from oauthproxy.components import components
from oauthproxy.database import purge_expired
from oauthproxy.mcp_sessions import SESSION_NOT_FOUND, session_key
from oauthproxy.models import McpSession, db, utcnow
from tests.conftest import RunningProxy
from tests.interop_fixtures import SdkClient
from tests.proxy_fixtures import EchoServer, GunicornProxy, McpDownstream, log_in
from tests.support.processes import wait_until_answers

INITIALIZE = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}
MCP_HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


def tool_call(name: str, arguments: dict, call_id: int = 1) -> dict:
    return {"jsonrpc": "2.0", "id": call_id, "method": "tools/call", "params": {"name": name, "arguments": arguments}}


def session_row(app: Flask, route: str, session_id: str) -> McpSession | None:
    with app.app_context():
        row = db.session.get(McpSession, session_key(route, session_id))
        if row is not None:
            db.session.expunge(row)
        return row


@pytest.fixture
def inspect_app() -> Iterator[Callable[[dict[str, str]], Flask]]:
    """An app on a gunicorn instance's settings and database, to look at rows from the test."""
    apps: list[Flask] = []

    def make(env: dict[str, str]) -> Flask:
        apps.append(create_app(env))
        return apps[-1]

    yield make
    for app in apps:
        with app.app_context():
            db.engine.dispose()


def test_a_session_replayed_by_another_user_is_refused_on_every_instance(
    start_gunicorn: Callable[..., GunicornProxy],
    mcp_downstream: McpDownstream,
    inspect_app: Callable[[dict[str, str]], Flask],
) -> None:
    first = start_gunicorn(workers=2, MCP_SERVER_URL=mcp_downstream.url)
    # A second instance on the same database and PUBLIC_URL, as behind a load balancer: its own caches are empty.
    second = start_gunicorn(MCP_SERVER_URL=mcp_downstream.url, PUBLIC_URL=first.url)
    second_url = f"http://127.0.0.1:{second.env['PORT']}"
    wait_until_answers(second_url + "/readyz")
    app = inspect_app(first.env)
    alice = SdkClient(first.url, first.url + "/mcp", login_hint="alice")
    bob = log_in(first.url, first.url + "/mcp", login_hint="bob")

    async def scenario() -> str:
        async with alice.connect(mode="legacy") as client:
            opened = await alice.whoami(client)
            session = opened["mcp-session-id"]
            assert opened["x-forwarded-user"] == "alice"
            assert session_row(app, "mcp", session).user_id == "alice"

            replay = {
                **bob.bearer,
                **MCP_HEADERS,
                "Mcp-Session-Id": session,
                "MCP-Protocol-Version": opened["mcp-protocol-version"],
            }
            for base in (first.url, second_url):
                for attempt in range(3):  # whichever worker answers; the first one may have the session cached
                    refused = await anyio.to_thread.run_sync(
                        lambda base=base, attempt=attempt: requests.post(
                            base + "/mcp",
                            headers=replay,
                            json=tool_call("wait", {"seconds": 0, "label": f"bob-{attempt}"}),
                            timeout=10,
                        )
                    )
                    assert refused.status_code == 404, refused.text
                    assert refused.json() == SESSION_NOT_FOUND
                stream = await anyio.to_thread.run_sync(
                    lambda base=base: requests.get(base + "/mcp", headers=replay, timeout=10)
                )
                assert stream.status_code == 404
                ended = await anyio.to_thread.run_sync(
                    lambda base=base: requests.delete(base + "/mcp", headers=replay, timeout=10)
                )
                assert ended.status_code == 404  # bob cannot end alice's session either

            # The rightful user goes on, here and on the other instance (which reads the binding from the database).
            again = await alice.whoami(client)
            assert again["mcp-session-id"] == session and again["x-forwarded-user"] == "alice"
            elsewhere = await anyio.to_thread.run_sync(
                lambda: requests.post(
                    second_url + "/mcp",
                    json=tool_call("whoami", {}, 9),
                    headers={**replay, "Authorization": f"Bearer {alice.storage.tokens.access_token}"},
                    timeout=10,
                )
            )
            assert elsewhere.status_code == 200, elsewhere.text
            assert "alice@example.com" in elsewhere.text
            return session

    session = anyio.run(scenario)
    assert not [event for event in mcp_downstream.events() if event.get("label", "").startswith("bob")]
    # The SDK client ended its session with DELETE on the way out: the binding is gone with it.
    assert session_row(app, "mcp", session) is None
    assert "Traceback" not in first.logs() + second.logs()


def test_sessions_end_on_delete_and_on_a_downstream_404(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp")
    alice = log_in(proxy.url, proxy.url + "/mcp")
    url = proxy.url + "/mcp"

    # Without a session id nothing changes; an id nobody was handed is unknown.
    assert requests.post(url, headers=alice.bearer, json={}, timeout=10).status_code == 200
    count = len(echo_downstream.seen)
    unknown = requests.post(url, headers={**alice.bearer, "Mcp-Session-Id": "made-up"}, json={}, timeout=10)
    assert unknown.status_code == 404 and unknown.json() == SESSION_NOT_FOUND
    assert len(echo_downstream.seen) == count

    for ending in ("DELETE", "404"):
        session = requests.post(url, headers=alice.bearer, json=INITIALIZE, timeout=10).headers["Mcp-Session-Id"]
        with_session = {**alice.bearer, "Mcp-Session-Id": session}
        assert requests.post(url, headers=with_session, json={}, timeout=10).status_code == 200
        assert echo_downstream.last().header("Mcp-Session-Id") == session  # passed untouched
        if ending == "DELETE":
            assert requests.delete(url, headers=with_session, timeout=10).status_code == 200
        else:
            assert requests.post(url + "/status/404", headers=with_session, timeout=10).status_code == 404
        assert session_row(proxy.app, "mcp", session) is None
        count = len(echo_downstream.seen)
        assert requests.post(url, headers=with_session, json={}, timeout=10).status_code == 404
        assert len(echo_downstream.seen) == count  # refused by the proxy


def test_idle_sessions_are_purged(start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer) -> None:
    first = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp", MCP_SESSION_IDLE_TIMEOUT="600")
    alice = log_in(first.url, first.url + "/mcp")
    session = requests.post(first.url + "/mcp", headers=alice.bearer, json=INITIALIZE, timeout=10).headers[
        "Mcp-Session-Id"
    ]
    with first.app.app_context():
        db.session.execute(
            update(McpSession)
            .where(McpSession.key_hash == session_key("mcp", session))
            .values(last_seen_at=utcnow() - timedelta(seconds=601))
        )
        db.session.commit()
        assert purge_expired().mcp_sessions >= 1
        assert db.session.scalar(select(McpSession).where(McpSession.key_hash == session_key("mcp", session))) is None
    second = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp", PUBLIC_URL=first.url)
    second_url = second.server.server_address
    refused = requests.post(
        f"http://{second_url[0]}:{second_url[1]}/mcp",
        headers={**alice.bearer, "Mcp-Session-Id": session},
        json={},
        timeout=10,
    )
    assert refused.status_code == 404


def test_a_known_session_costs_no_database_query(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    proxy = start_proxy(MCP_SERVER_URL=echo_downstream.url + "/mcp")
    alice = log_in(proxy.url, proxy.url + "/mcp")
    url = proxy.url + "/mcp"
    session = requests.post(url, headers=alice.bearer, json=INITIALIZE, timeout=10).headers["Mcp-Session-Id"]
    statements: list[str] = []
    with proxy.app.app_context():
        engine = db.engine

    def count(conn, cursor, statement, parameters, context, executemany) -> None:
        if (
            threading.current_thread().name != "audit-flush"
        ):  # the audit trail's batched writes are off the request path
            statements.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        for _ in range(5):
            assert (
                requests.post(url, headers={**alice.bearer, "Mcp-Session-Id": session}, json={}, timeout=10).status_code
                == 200
            )
            assert requests.post(url, headers=alice.bearer, json={}, timeout=10).status_code == 200
        assert statements == []
    finally:
        event.remove(engine, "before_cursor_execute", count)


def test_a_session_store_failure_is_a_json_503_not_a_500(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, tmp_path: Path
) -> None:
    proxy = start_proxy(
        MCP_SERVER_URL=echo_downstream.url + "/mcp", DATABASE_DSN=f"sqlite:///{tmp_path / 'own.sqlite3'}"
    )
    alice = log_in(proxy.url, proxy.url + "/mcp")
    url = proxy.url + "/mcp"
    with proxy.app.app_context():
        db.session.execute(text("DROP TABLE mcp_sessions"))  # the store fails, as a database that went away would
        db.session.commit()
    count = len(echo_downstream.seen)
    for body, headers in ((INITIALIZE, {}), ({}, {"Mcp-Session-Id": "downstream-unknown"})):
        response = requests.post(url, headers={**alice.bearer, **headers}, json=body, timeout=10)
        assert response.status_code == 503, response.text
        assert response.json()["error"] == "temporarily_unavailable" and response.headers["Retry-After"]
        assert "Mcp-Session-Id" not in response.headers  # a session that could not be bound is not handed out
    assert len(echo_downstream.seen) == count + 1  # the initialize went through; the unknown id did not
    # Requests without a session id never touch the store.
    assert requests.post(url, headers=alice.bearer, json={}, timeout=10).status_code == 200


def test_a_session_id_handed_out_twice_stays_with_its_first_owner(
    start_proxy: Callable[..., RunningProxy], caplog: pytest.LogCaptureFixture
) -> None:
    # A downstream that gives one id to two users (or answers the same id twice): the second record is refused by
    # the primary key, the first owner keeps the session, and the other user is refused when they use it.
    proxy = start_proxy()
    with proxy.app.app_context():
        bindings = components(proxy.app).mcp_sessions
        bindings.record("default", "shared-id", "alice")
        bindings.record("default", "shared-id", "alice")  # the same answer twice: nothing to report
        assert "already bound" not in caplog.text
        bindings.record("default", "shared-id", "bob")
        assert "already bound to another user" in caplog.text
        assert bindings.allows("default", "shared-id", "alice")
        assert not bindings.allows("default", "shared-id", "bob")
        assert (
            db.session.scalar(
                select(McpSession.user_id).where(McpSession.key_hash == session_key("default", "shared-id"))
            )
            == "alice"
        )
