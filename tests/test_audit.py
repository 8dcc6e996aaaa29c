"""The audit trail: the buffer and its destinations, query filters, retention, bad input, and end to end through gunicorn."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import anyio
import httpx2
import pytest
import requests
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from prometheus_client import REGISTRY
from sqlalchemy import create_engine, insert, text

from oauthproxy.audit import EXTENSION_KEY, AuditTrail, BadTime, parse_time, query_events, record, tool_names
from oauthproxy.config import ConfigError, load_settings
from oauthproxy.database import purge_expired
from oauthproxy.models import AuditEvent, db, utcnow
from tests.conftest import RunningProxy
from tests.proxy_fixtures import EchoServer, GunicornProxy, McpDownstream, log_in
from tests.support.databases import SQLITE_ONLY
from tests.support.settings import TEST_KEY
from tests.test_proxy_mcp_client import sdk_auth

ROOT = Path(__file__).resolve().parent.parent


def _trail(proxy: RunningProxy) -> AuditTrail:
    return proxy.app.extensions[EXTENSION_KEY]


def _failures(stage: str) -> float:
    return REGISTRY.get_sample_value("oauthproxy_audit_failures_total", {"stage": stage}) or 0.0


def _rename(dsn: str, old: str, new: str) -> None:
    engine = create_engine(dsn)
    with engine.begin() as connection:
        connection.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))
    engine.dispose()


# -- recording, the buffer, the destinations -----------------------------------------------------------------


def test_events_reach_the_file_and_the_table_with_request_id_and_filters_select_them(
    start_proxy: Callable[..., RunningProxy], tmp_path: Path
) -> None:
    audit_log = tmp_path / "audit.jsonl"
    proxy = start_proxy(AUDIT_LOG=str(audit_log))
    marker = os.urandom(4).hex()  # the table is shared by the session's tests: each looks at its own users
    with proxy.app.test_request_context("/x", headers={"X-Request-Id": "req-1"}):
        from flask import request

        request.environ["oauthproxy.request_id"] = f"req-{marker}"
        record("sign_in", user=f"u1-{marker}", email=f"U1-{marker}@Example.com", client="c1", outcome="succeeded")
        record("tool_call", user=f"u1-{marker}", client="c1", route="mcp", tool="whoami", duration_ms=12.345)
        record("tool_call", user=f"u2-{marker}", client="c2", route="other", tool="echo", outcome="http_502")
        record("token_revoked", user=f"u2-{marker}", client="c2", reason="revoked_by_operator", grant_id=7)
    assert _trail(proxy).flush() == 4

    lines = [json.loads(line) for line in audit_log.read_text().splitlines() if marker in line]
    assert [line["event"] for line in lines] == ["sign_in", "tool_call", "tool_call", "token_revoked"]
    assert all(line["request_id"] == f"req-{marker}" and line["time"].endswith("Z") for line in lines)
    assert lines[1]["tool"] == "whoami" and lines[1]["duration_ms"] == 12.3 and lines[1]["route"] == "mcp"
    assert lines[3]["reason"] == "revoked_by_operator" and lines[3]["grant_id"] == 7

    with proxy.app.app_context():
        mine = query_events(user=f"u1-{marker}")
        assert [row["event"] for row in mine] == ["tool_call", "sign_in"]  # newest first
        assert mine[1]["user_email"] == f"u1-{marker}@example.com"
        assert [row["event"] for row in query_events(user=f"U1-{marker}@example.com")] == ["sign_in"]  # by email
        assert [row["tool"] for row in query_events(user=f"u2-{marker}", tool="echo")] == ["echo"]
        assert query_events(user=f"u2-{marker}", route="other")[0]["outcome"] == "http_502"
        assert query_events(user=f"u2-{marker}", client="c1") == []
        assert query_events(user=f"u2-{marker}")[0]["details"] == {"grant_id": 7}
        assert len(query_events(user=f"u1-{marker}", limit=1)) == 1
        later = utcnow() + timedelta(minutes=1)
        assert query_events(user=f"u1-{marker}", since=later) == []
        assert len(query_events(user=f"u1-{marker}", until=later, since=later - timedelta(hours=1))) == 2
        # Filters are bound parameters: SQL in a value matches nothing and changes nothing.
        assert query_events(user=f"u1-{marker}' OR '1'='1") == []
        assert query_events(tool="x'; DROP TABLE audit_events; --") == []
        assert len(query_events(user=f"u1-{marker}")) == 2


def test_values_are_cut_to_the_columns_and_a_broken_detail_never_raises(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    proxy = start_proxy(AUDIT_LOG="off")
    marker = os.urandom(4).hex()
    with proxy.app.app_context():
        record(
            "tool_call", user=f"long-{marker}", client="c" * 5000, tool="t" * 5000, reason="r" * 5000, huge="x" * 10**5
        )
        record("sign_in", user=f"long-{marker}", odd=object())  # not JSON: written as its str()
    assert _trail(proxy).flush() == 2
    with proxy.app.app_context():
        rows = query_events(user=f"long-{marker}")
    assert len(rows) == 2  # PostgreSQL would refuse a value over its column's size: none is
    assert len(rows[1]["client_id"]) == 512 and len(rows[1]["tool"]) == 255 and len(rows[1]["reason"]) == 200
    assert "truncated" in rows[1]["details"]


def test_outside_an_application_record_does_nothing_and_never_raises() -> None:
    record("sign_in", user="nobody")  # no app context: dropped silently


def test_a_database_outage_keeps_events_in_memory_and_stores_them_when_it_ends(
    start_proxy: Callable[..., RunningProxy], database_dsn: str, tmp_path: Path
) -> None:
    audit_log = tmp_path / "audit.jsonl"
    proxy = start_proxy(AUDIT_LOG=str(audit_log))
    marker = os.urandom(4).hex()
    trail = _trail(proxy)
    trail.flush()
    before = _failures("database")
    _rename(database_dsn, "audit_events", f"audit_away_{marker}")
    try:
        with proxy.app.app_context():
            record("sign_in", user=f"out-{marker}", outcome="succeeded")
        trail.flush()  # no exception
        assert _failures("database") > before
        assert f"out-{marker}" in audit_log.read_text()  # the JSON lines do not wait for the database
        # A whole login (consent, sign-in, tokens: each recorded) succeeds while the table is gone.
        login = log_in(proxy.url, proxy.url + "/mcp")
        assert login.access_token
    finally:
        _rename(database_dsn, f"audit_away_{marker}", "audit_events")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        trail.flush()  # the kept events are stored now
        with proxy.app.app_context():
            stored = query_events(client=login.client.client_id)
        if {"consent", "sign_in", "token_issued"} <= {row["event"] for row in stored}:
            break
        time.sleep(0.1)
    assert {"consent", "sign_in", "token_issued"} <= {row["event"] for row in stored}
    with proxy.app.app_context():
        assert [row["event"] for row in query_events(user=f"out-{marker}")] == ["sign_in"]


def test_an_unwritable_log_file_is_counted_and_the_table_still_gets_the_event(
    start_proxy: Callable[..., RunningProxy], tmp_path: Path
) -> None:
    audit_log = tmp_path / "audit.jsonl"
    proxy = start_proxy(AUDIT_LOG=str(audit_log))
    marker = os.urandom(4).hex()
    audit_log.mkdir()  # now a folder: open() fails
    before = _failures("log")
    with proxy.app.app_context():
        record("sign_in", user=f"nolog-{marker}")
    _trail(proxy).flush()
    assert _failures("log") == before + 1
    with proxy.app.app_context():
        assert len(query_events(user=f"nolog-{marker}")) == 1


def test_the_flusher_writes_within_about_a_second_without_being_asked(
    start_proxy: Callable[..., RunningProxy], tmp_path: Path
) -> None:
    audit_log = tmp_path / "audit.jsonl"
    proxy = start_proxy(AUDIT_LOG=str(audit_log))
    with proxy.app.app_context():
        record("consent", user="flusher", outcome="approved")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not (audit_log.exists() and "flusher" in audit_log.read_text()):
        time.sleep(0.1)
    assert "flusher" in audit_log.read_text()


def test_retention_purge_deletes_old_events_only(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(AUDIT_LOG="off", AUDIT_RETENTION_DAYS="30")
    marker = os.urandom(4).hex()
    with proxy.app.app_context():
        now = utcnow()
        db.session.execute(
            insert(AuditEvent),
            [
                {"time": now - timedelta(days=31), "event": "sign_in", "user_id": f"old-{marker}"},
                {"time": now - timedelta(days=29), "event": "sign_in", "user_id": f"old-{marker}"},
            ],
        )
        db.session.commit()
        report = purge_expired()
        assert report.audit_events >= 1
        rows = query_events(user=f"old-{marker}")
    assert len(rows) == 1 and rows[0]["time"] > (now - timedelta(days=30)).isoformat()


# -- which tool a request calls --------------------------------------------------------------------------------


def test_tool_names_from_headers_and_small_bodies() -> None:
    call = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "whoami"}}).encode()
    assert tool_names({}, call) == ["whoami"]
    assert tool_names({"HTTP_MCP_METHOD": "tools/call", "HTTP_MCP_NAME": "echo"}, None) == ["echo"]
    # A body read whole wins over headers that disagree with it: they cannot hide a call or rename the tool.
    assert tool_names({"HTTP_MCP_METHOD": "tools/list"}, call) == ["whoami"]
    assert tool_names({"HTTP_MCP_METHOD": "tools/call", "HTTP_MCP_NAME": "harmless"}, call) == ["whoami"]
    assert tool_names({"HTTP_MCP_METHOD": "tools/call", "HTTP_MCP_NAME": "echo"}, b'{"method": "ping"}') == []
    batch = json.dumps([json.loads(call), {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {}}]).encode()
    assert tool_names({}, batch) == ["whoami", "?"]
    assert tool_names({}, b'{"method": "tools/list"}') == []
    assert tool_names({}, b'{"method": "tools/call", broken') == []
    assert tool_names({}, b"[" * 100_000 + b'"tools/call"') == []  # nested too deep: no name, no exception
    assert tool_names({}, None) == []  # a large body streams through unread


# -- bad input: the command's filters and the settings ---------------------------------------------------------


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--since", "yesterday"], "expected an ISO 8601 time"),
        (["--since", "2026-13-45"], "expected an ISO 8601 time"),
        (["--until", "99999999999999999999d"], "expected an ISO 8601 time"),
        (["--since", "999999999d"], "before year 1"),
        (["--since", "1" * 5000], "expected an ISO 8601 time"),
        (["--limit", "0"], "0 is not in the range"),
        (["--limit", "99999999999999999999999"], "not in the range"),
        (["--limit", "ten"], "is not a valid integer"),
        (["--format", "xml"], "'xml' is not one of"),
        (["--bogus"], "No such option '--bogus'"),
        (["--user", "u" * 600], "at most 512 printable characters"),
        (["--tool", "a\nb"], "at most 512 printable characters"),
        (["--since", "2026-11-30", "--until", "2026-11-01"], "--since is after --until"),
    ],
)
def test_bad_command_filters_are_refused_with_a_reason(
    start_proxy: Callable[..., RunningProxy], arguments: list[str], message: str
) -> None:
    proxy = start_proxy(AUDIT_LOG="off")
    result = proxy.app.test_cli_runner().invoke(args=["audit", *arguments])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


@SQLITE_ONLY
def test_sql_in_a_filter_is_only_a_value(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(AUDIT_LOG="off")
    runner = proxy.app.test_cli_runner()
    for value in ("' OR 1=1 --", "x'); DROP TABLE audit_events; --", "%", "_"):
        result = runner.invoke(args=["audit", "--user", value, "--tool", value, "--format", "json"])
        assert result.exit_code == 0 and result.output == "", result.output
    assert runner.invoke(args=["audit", "--since", "2h", "--limit", "10000"]).exit_code == 0  # table still there


def test_time_forms() -> None:
    from datetime import datetime

    now = datetime(2026, 11, 30, 12, 0)
    assert parse_time("2h", now) == datetime(2026, 11, 30, 10, 0)
    assert parse_time("1w", now) == datetime(2026, 11, 23, 12, 0)
    assert parse_time("2026-11-30T14:00:00+01:00") == datetime(2026, 11, 30, 13, 0)
    assert parse_time("2026-11-30T14:00Z") == datetime(2026, 11, 30, 14, 0)
    assert parse_time("2026-11-30") == datetime(2026, 11, 30)
    for bad in ("", "2h ago", "-2h", "0x10d", "NaN", "2026-11-30T25:00"):
        with pytest.raises(BadTime):
            parse_time(bad, now)


def _settings_env(**overrides: str) -> dict[str, str]:
    return {
        "OAUTH_CLIENT_ID": "x",
        "OAUTH_CLIENT_SECRET": "y",
        "OAUTH_AUTHORIZE_URL": "https://accounts.google.com",
        "MCP_SERVER_URL": "http://127.0.0.1:9000/mcp",
        "ENCRYPTION_KEY": TEST_KEY,
        **overrides,
    }


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"AUDIT_RETENTION_DAYS": "0"}, "AUDIT_RETENTION_DAYS must be between 1 and 3650; got 0"),
        ({"AUDIT_RETENTION_DAYS": "1e12"}, "AUDIT_RETENTION_DAYS must be between 1 and 3650"),
        ({"AUDIT_RETENTION_DAYS": "ninety"}, "AUDIT_RETENTION_DAYS must be a number of days"),
        ({"AUDIT_LOG": "/nonexistent-folder/audit.jsonl"}, "AUDIT_LOG's folder /nonexistent-folder does not exist"),
        ({"AUDIT_LOG": "/tmp"}, "AUDIT_LOG names a folder (/tmp)"),
        ({"AUDIT_LOG": "/tmp/a\x1bb"}, "AUDIT_LOG must be stdout, stderr, off or the path"),
    ],
)
def test_bad_settings_are_reported(overrides: dict[str, str], problem: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(_settings_env(**overrides), instance_path=str(tmp_path))
    assert any(problem in found for found in raised.value.problems), raised.value.problems


def test_settings_defaults_and_forms(tmp_path: Path) -> None:
    settings = load_settings(_settings_env(), instance_path=str(tmp_path))
    assert (settings.audit_log, settings.audit_retention_days) == ("stdout", 90)
    assert load_settings(_settings_env(AUDIT_LOG="OFF"), instance_path=str(tmp_path)).audit_log == "off"
    relative = load_settings(_settings_env(AUDIT_LOG="audit.jsonl"), instance_path=str(tmp_path)).audit_log
    assert relative == os.path.abspath("audit.jsonl")


# -- end to end: gunicorn, the real provider, the real MCP server and the MCP SDK client -------------------------


def test_login_tool_calls_refresh_and_revoke_are_audited_end_to_end(
    start_gunicorn: Callable[..., GunicornProxy], mcp_downstream: McpDownstream, tmp_path: Path, database_dsn: str
) -> None:
    audit_log = tmp_path / "audit.jsonl"
    proxy = start_gunicorn(MCP_SERVER_URL=mcp_downstream.url, AUDIT_LOG=str(audit_log), LOG_FORMAT="json")
    resource_url = proxy.url + "/mcp"
    clients = []
    for mode in ("legacy", "auto"):  # legacy: the name from the body; auto (2026-07-28): from Mcp-Method/Mcp-Name
        provider, _, storage = sdk_auth(proxy, resource_url)

        async def scenario(mode: str = mode, provider=provider) -> None:
            async with (
                httpx2.AsyncClient(auth=provider, timeout=30) as http,
                Client(streamable_http_client(resource_url, http_client=http), mode=mode) as client,
            ):
                assert (await client.call_tool("whoami", {})).is_error is False

        anyio.run(scenario)
        assert storage.tokens is not None and storage.client_info is not None
        clients.append((storage.client_info.client_id, storage.tokens.refresh_token))

    # Identical registrations from one address share a client id; the second sign-in replaced the first grant.
    client_id, refresh_token = clients[1]
    assert clients[0][0] == client_id
    refreshed = requests.post(
        proxy.url + "/token",
        data={"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": client_id},
        timeout=10,
    )
    assert refreshed.status_code == 200, refreshed.text
    revoked = requests.post(
        proxy.url + "/revoke", data={"token": refreshed.json()["refresh_token"], "client_id": client_id}, timeout=10
    )
    assert revoked.status_code == 200

    def lines() -> list[dict]:
        return [json.loads(line) for line in audit_log.read_text().splitlines()] if audit_log.exists() else []

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len([e for e in lines() if e["event"] == "token_revoked"]) < 2:
        time.sleep(0.2)
    events = lines()
    by_kind: dict[str, list[dict]] = {}
    for event in events:
        by_kind.setdefault(event["event"], []).append(event)
    assert {"consent", "sign_in", "token_issued", "tool_call", "token_refreshed", "token_revoked"} <= set(by_kind)
    for event in events:
        assert event["request_id"], event
        # Consent is given before the provider says who signs in: it names the client, not yet the user.
        assert event.get("user_id") == ("alice" if event["event"] != "consent" else None), event
    sign_ins = by_kind["sign_in"]
    assert [(e["outcome"], e["client_id"]) for e in sign_ins] == [("succeeded", client_id)] * 2
    assert any(e["reason"] == "replaced_by_new_sign_in" for e in by_kind["token_revoked"])
    assert all(e["route"] == "mcp" for e in sign_ins + by_kind["tool_call"])
    tools = [e for e in by_kind["tool_call"] if e["tool"] == "whoami"]
    assert [e["client_id"] for e in tools] == [client_id, client_id]
    assert all(e["outcome"] == "ok" and e["duration_ms"] > 0 for e in tools)
    assert by_kind["token_refreshed"][0]["client_id"] == client_id
    assert {e["client_id"] for e in by_kind["token_revoked"]} == {client_id}
    assert len(by_kind["token_revoked"]) == 2  # the replaced grant, then the one revoked at /revoke

    # The request ids are the request log's: the log line of the tool call has the same id, and the client id.
    access = [json.loads(line) for line in proxy.logs().splitlines() if line.startswith("{")]
    request_lines = {line["request_id"]: line for line in access if line.get("logger") == "oauthproxy.access"}
    for tool in tools:
        assert request_lines[tool["request_id"]]["client_id"] == tool["client_id"]
        assert request_lines[tool["request_id"]]["path"] == "/mcp"

    # The same events in the table, through the command.
    env = {**proxy.env}
    deadline = time.monotonic() + 10
    while True:
        result = subprocess.run(
            [sys.executable, "-m", "oauthproxy.cli", "audit", "--user", "alice", "--since", "10m", "--format", "json", "--limit",
             "10000"],
            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        stored = [json.loads(line) for line in result.stdout.splitlines()]
        mine = [row for row in stored if row["request_id"] in {e["request_id"] for e in events}]
        if len(mine) >= len(events) - len(by_kind["consent"]) or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert {row["event"] for row in mine} == set(by_kind) - {"consent"}  # consent names no user yet
    assert sorted(row["request_id"] for row in mine) == sorted(e["request_id"] for e in events if e.get("user_id"))
    table = subprocess.run(
        [sys.executable, "-m", "oauthproxy.cli", "audit", "--tool", "whoami", "--client", client_id],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert table.returncode == 0 and "tool_call" in table.stdout and "tool=whoami" in table.stdout, table.stdout
    assert "2 event(s)" in table.stdout


@SQLITE_ONLY
def test_an_idle_flusher_ends_and_the_next_event_starts_another(
    start_proxy: Callable[..., RunningProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    from oauthproxy import audit

    monkeypatch.setattr(audit, "IDLE_FLUSHES", 3)
    proxy = start_proxy(AUDIT_LOG="off")
    trail = AuditTrail(proxy.app, "off", interval=0.05)
    marker = os.urandom(4).hex()
    flushers = []
    for round_number in range(2):
        with proxy.app.app_context():
            trail.append(audit._event("sign_in", {}, f"idle-{marker}", None, None, None, None, None, None, {}))
        assert trail.flusher is not None and trail.flusher.is_alive()
        flushers.append(trail.flusher)
        trail.flusher.join(5)
        assert not trail.flusher.is_alive() and trail._pid is None
        with proxy.app.app_context():
            assert len(query_events(user=f"idle-{marker}")) == round_number + 1
    assert flushers[0] is not flushers[1]


def test_tool_calls_allowed_and_denied_by_tool_rules_are_recorded(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, tmp_path: Path
) -> None:
    routes = tmp_path / "routes.toml"
    routes.write_text(
        f'[[routes]]\nname = "ruled"\npath = "/mcp"\nurl = "{echo_downstream.url}/mcp"\n\n'
        '[[routes.tool_rules]]\ndeny = ["echo"]\n\n[[routes.tool_rules]]\nallow = ["*"]\n'
    )
    proxy = start_proxy(AUDIT_LOG="off", MCP_SERVER_URL="", MCP_ROUTES_FILE=str(routes))
    login = log_in(proxy.url, proxy.url + "/mcp")
    marker = os.urandom(4).hex()
    for name in ("echo", f"search-{marker}"):
        body = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": name, "arguments": {}}}
        answer = requests.post(proxy.url + "/mcp", json=body, headers=login.bearer, timeout=10)
        assert answer.status_code == 200, answer.text
    deadline = (
        time.monotonic() + 5
    )  # a call is recorded when the server closes its response, just after the client read it
    while True:
        _trail(proxy).flush()
        with proxy.app.app_context():
            allowed = query_events(tool=f"search-{marker}")
        if allowed or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    with proxy.app.app_context():
        denied = [row for row in query_events(tool="echo", route="ruled", limit=10) if row["outcome"] == "denied"]
    assert len(allowed) == 1 and allowed[0]["outcome"] == "ok" and allowed[0]["client_id"] == login.client.client_id
    assert allowed[0]["user_id"] == "alice" and allowed[0]["route"] == "ruled" and allowed[0]["request_id"]
    assert denied and denied[0]["reason"] == "tool_rules" and denied[0]["client_id"] == login.client.client_id


def test_downstream_connections_made_refused_and_removed_are_recorded(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer
) -> None:
    from oauthproxy.components import components
    from oauthproxy.downstream_connections import connection_refused, disconnect, store_connection

    proxy = start_proxy(
        AUDIT_LOG="off", MCP_SERVER_URL=echo_downstream.url + "/mcp", DOWNSTREAM_CREDENTIAL="user_api_key"
    )
    user = f"conn-{os.urandom(4).hex()}"
    with proxy.app.test_request_context("/account"):
        route = components(proxy.app).routes["mcp"]
        store_connection(route, user, api_key="k-1")
        connection_refused(route, user, "the downstream refused the credential")
        assert disconnect(route, user)
    _trail(proxy).flush()
    with proxy.app.app_context():
        rows = list(reversed(query_events(user=user)))
    assert [(row["event"], row["outcome"], row["route"]) for row in rows] == [
        ("connection_made", "succeeded", "mcp"),
        ("connection_refused", "refused", "mcp"),
        ("connection_removed", "succeeded", "mcp"),
    ]
    assert (
        rows[0]["details"] == {"kind": "user_api_key"} and rows[1]["reason"] == "the downstream refused the credential"
    )
    assert "k-1" not in json.dumps(rows)  # the credential itself is never recorded
