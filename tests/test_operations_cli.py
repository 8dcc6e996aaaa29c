"""The operator's commands: `check` (in plain words, what is wrong), `clients list/delete`, `grants list/revoke`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from urllib.parse import urlsplit

import pytest
from flask import Flask

from oauthproxy import create_app
from oauthproxy.models import db
from oauthproxy.self_check import Finding, run_check
from tests.conftest import RunningProxy
from tests.flows import McpOAuthClient
from tests.proxy_fixtures import McpDownstream
from tests.support.databases import SQLITE_ONLY
from tests.support.ports import free_port
from tests.support.settings import base_env

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture
def checked(
    start_proxy: Callable[..., RunningProxy], mcp_downstream: McpDownstream
) -> Iterator[tuple[RunningProxy, Callable[..., list[Finding]]]]:
    """A running proxy in front of a real MCP server, and `check(**overrides)`: the findings of `oauthproxy check`
    run with the proxy's own settings changed by `overrides`, as an operator's mistake would change them."""
    proxy = start_proxy(MCP_SERVER_URL=mcp_downstream.url)
    port = urlsplit(proxy.url).port
    env = {
        **base_env(port, proxy.provider, proxy.app.config["SETTINGS"].database_dsn, f"proxy-{port}"),
        "MCP_SERVER_URL": mcp_downstream.url,
    }
    apps: list[Flask] = []

    def check(**overrides: str) -> list[Finding]:
        app = create_app({**env, **overrides})
        apps.append(app)
        return run_check(app, timeout=5)

    yield proxy, check
    for app in apps:
        with app.app_context():
            db.engine.dispose()


def failures(findings: list[Finding]) -> dict[str, str]:
    return {finding.subject: finding.message for finding in findings if finding.level == "fail"}


@SQLITE_ONLY
def test_check_passes_a_working_setup_and_prints_the_callback_to_register(checked) -> None:
    proxy, check = checked
    findings = check()
    assert failures(findings) == {}
    subjects = {finding.subject: finding for finding in findings}
    assert {
        "configuration",
        "database",
        "identity provider",
        "callback URL",
        "downstream mcp",
        "discovery /mcp",
    } <= set(subjects)
    info = [f.message for f in findings if f.level == "info" and f.subject == "callback URL"]
    assert info == [
        f"register exactly {proxy.url}/callback as a redirect URI of the client "
        f"proxy-{urlsplit(proxy.url).port} at the identity provider"
    ]
    assert "answers MCP (server proxy-test-downstream" in subjects["downstream mcp"].message


@SQLITE_ONLY
def test_check_catches_a_wrong_public_url(checked) -> None:
    proxy, check = checked
    port = urlsplit(proxy.url).port
    # The proxy answers at localhost too, but it advertises 127.0.0.1: clients would refuse the mismatch.
    wrong_host = failures(check(PUBLIC_URL=f"http://localhost:{port}"))
    assert "runs with another PUBLIC_URL (http://127.0.0.1:" in wrong_host["discovery /mcp"]
    assert "give every instance the same PUBLIC_URL" in wrong_host["discovery /mcp"]
    # Nothing listens there at all.
    nowhere = failures(check(PUBLIC_URL=f"http://127.0.0.1:{free_port()}"))
    assert "nothing answers at http://127.0.0.1:" in nowhere["discovery /mcp"]
    assert "connection refused" in nowhere["discovery /mcp"]
    assert "PUBLIC_URL must be the address clients use" in nowhere["discovery /mcp"]


@SQLITE_ONLY
def test_check_catches_a_callback_url_the_provider_does_not_know(checked) -> None:
    proxy, check = checked
    port = urlsplit(proxy.url).port
    # The operator registered another URL at the provider than the one this proxy sends.
    proxy.provider.register_client(
        f"proxy-{port}", f"upstream-secret-proxy-{port}", ["https://mcp.example.com/callback"]
    )
    problems = failures(check())
    assert problems["callback URL"] == (
        f"the provider refused our redirect URI {proxy.url}/callback: register exactly this URL for the client "
        f"proxy-{port} at the provider, or, if it is registered already, PUBLIC_URL is wrong (the callback "
        "derives from it)"
    )


@SQLITE_ONLY
def test_check_catches_an_unreachable_downstream_and_a_wrong_path(checked, mcp_downstream: McpDownstream) -> None:
    _proxy, check = checked
    down_port = free_port()
    unreachable = failures(check(MCP_SERVER_URL=f"http://127.0.0.1:{down_port}/mcp"))
    assert unreachable["downstream mcp"].startswith(
        f"cannot connect to http://127.0.0.1:{down_port}/mcp (connection refused): start the MCP server, or fix "
        "MCP_SERVER_URL"
    )
    wrong_path = failures(check(MCP_SERVER_URL=f"http://127.0.0.1:{mcp_downstream.port}/api"))
    assert "answered 404: the server runs, but its MCP endpoint has another path" in wrong_path["downstream api"]


@SQLITE_ONLY
def test_check_catches_an_unreachable_provider_and_exits_non_zero(checked) -> None:
    proxy, _check = checked
    port = urlsplit(proxy.url).port
    env = {
        **base_env(port, proxy.provider, proxy.app.config["SETTINGS"].database_dsn, f"proxy-{port}"),
        "OAUTH_AUTHORIZE_URL": f"http://127.0.0.1:{free_port()}",
    }
    app = create_app(env)
    try:
        result = app.test_cli_runner().invoke(args=["check", "--timeout", "3", "--skip-public-url"])
    finally:
        with app.app_context():
            db.engine.dispose()
    assert result.exit_code == 1
    assert "FAIL  identity provider: could not reach the identity provider at http://127.0.0.1:" in result.output
    assert "problem(s) found" in result.output
    assert "discovery /mcp" not in result.output  # skipped on request


def test_the_command_line_tool_lists_every_documented_command() -> None:
    output = subprocess.run(
        [sys.executable, "-m", "oauthproxy.cli", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "OAUTHPROXY_ENV_FILE": "/dev/null"},
    )
    for command in ("gen-key", "check", "db", "clients", "grants", "purge", "rotate-key", "audit"):
        assert f"  {command} " in output.stdout, (command, output.stdout, output.stderr)


def test_clients_and_grants_can_be_listed_and_revoked(start_proxy: Callable[..., RunningProxy]) -> None:
    proxy = start_proxy(REPLACE_PREVIOUS_GRANTS="false")  # two live grants of alice through one client
    runner = proxy.app.test_cli_runner()
    alice_client = proxy.register_client(client_name="Alice's editor")
    bob_client = proxy.register_client(client_name="Bob's agent")
    alice = [alice_client.exchange(alice_client.login(proxy.browser("alice"))["code"]).json() for _ in range(2)]
    bob = bob_client.exchange(bob_client.login(proxy.browser("bob"))["code"]).json()

    listed = runner.invoke(args=["clients", "list"])
    assert listed.exit_code == 0
    assert alice_client.client_id in listed.output and "Alice's editor" in listed.output
    assert bob_client.client_id in listed.output
    grants = runner.invoke(args=["grants", "list", "--user", "alice"]).output
    assert grants.count(alice_client.client_id) == 2 and "bob" not in grants

    # The database is shared with other tests: this client's grants only (user and client filters combine).
    revoked = runner.invoke(
        args=["grants", "revoke", "--user", "alice@example.com", "--client", alice_client.client_id]
    )
    assert revoked.exit_code == 0 and revoked.output.startswith("revoked 2 grant(s)")
    assert all(alice_client.refresh(pair["refresh_token"]).json()["error"] == "invalid_grant" for pair in alice)
    assert bob_client.refresh(bob["refresh_token"]).status_code == 200
    assert (
        "revoked_by_operator"
        in runner.invoke(args=["grants", "list", "--all", "--client", alice_client.client_id]).output
    )

    nothing = runner.invoke(args=["grants", "revoke", "--client", alice_client.client_id])
    assert nothing.exit_code == 1 and "no live grant matches" in nothing.output
    assert runner.invoke(args=["grants", "revoke"]).exit_code == 2  # say whose

    deleted = runner.invoke(args=["clients", "delete", bob_client.client_id])
    assert deleted.exit_code == 0 and "revoked 1 grant(s)" in deleted.output
    assert bob_client.refresh(bob["refresh_token"]).status_code in (400, 401)
    page = proxy.browser("bob").session.get(McpOAuthClient(proxy.url, bob_client.client_id).authorize_url(), timeout=10)
    assert page.status_code == 400 and "is not registered here" in page.text
    assert runner.invoke(args=["clients", "delete", bob_client.client_id]).exit_code == 1


def test_a_command_prints_its_answer_alone_on_stdout_and_the_events_it_causes_on_stderr(
    start_proxy: Callable[..., RunningProxy], database_dsn: str
) -> None:
    """With AUDIT_LOG at its default (stdout), a script that reads a command's output gets the answer only."""
    proxy = start_proxy()
    client = proxy.register_client(client_name="Scripted revoke")
    client.exchange(client.login(proxy.browser("bob"))["code"])
    port = urlsplit(proxy.url).port or 0
    env = {**base_env(port, proxy.provider, database_dsn, f"proxy-{port}"), "OAUTHPROXY_ENV_FILE": "/dev/null"}
    result = subprocess.run(
        [sys.executable, "-m", "oauthproxy.cli", "grants", "revoke", "--client", client.client_id],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("revoked 1 grant(s): ") and "{" not in result.stdout, result.stdout
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    revoked = [event for event in events if event.get("event") == "token_revoked"]
    assert revoked and revoked[0]["client_id"] == client.client_id and revoked[0]["reason"] == "revoked_by_operator"


@SQLITE_ONLY
def test_check_covers_each_routes_own_authorization_server(checked, tmp_path, mcp_downstream: McpDownstream) -> None:
    """A route with credential "oauth" gets the login provider's checks against its own provider: metadata, the
    redirect URI to register (the connect callback), and whether the provider accepts it."""
    from tests.proxy_fixtures import write_routes

    proxy, check = checked
    provider = proxy.provider
    oauth = {"authorize_url": provider.issuer, "client_id": "tickets-connector", "client_secret_env": "TICKETS_SECRET"}
    routes = write_routes(
        tmp_path / "routes.toml",
        [{"path": "/mcp", "url": mcp_downstream.url, "name": "tickets", "credential": "oauth", "oauth": oauth}],
    )
    env = {"MCP_ROUTES_FILE": routes, "MCP_SERVER_URL": "", "TICKETS_SECRET": "tickets-secret"}
    provider.register_client("tickets-connector", "tickets-secret", [f"{proxy.url}/connect/callback"])
    findings = check(**env)
    assert failures(findings) == {}
    messages = {finding.subject: finding.message for finding in findings}
    assert messages["route tickets authorization server"].startswith(f"oidc metadata from {provider.issuer}")
    assert (
        messages["route tickets callback URL"]
        == "the provider accepted the callback URL (it sent the browser back to it)"
    )
    info = [f.message for f in findings if f.level == "info" and f.subject == "route tickets callback URL"]
    assert info == [
        f"register exactly {proxy.url}/connect/callback as a redirect URI of the client tickets-connector "
        "at the route tickets authorization server"
    ]

    # The operator registered the login callback there instead of the connect callback.
    provider.register_client("tickets-connector", "tickets-secret", [f"{proxy.url}/callback"])
    problems = failures(check(**env))
    assert problems["route tickets callback URL"].startswith(
        f"the provider refused our redirect URI {proxy.url}/connect/callback: register exactly this URL for the "
        "client tickets-connector"
    )
    # And a provider that is not there at all.
    gone = {**oauth, "authorize_url": f"http://127.0.0.1:{free_port()}"}
    gone_routes = write_routes(
        tmp_path / "gone.toml",
        [{"path": "/mcp", "url": mcp_downstream.url, "name": "tickets", "credential": "oauth", "oauth": gone}],
    )
    unreachable = failures(check(**{**env, "MCP_ROUTES_FILE": gone_routes}))
    assert (
        "check the network, proxies and the route's oauth authorize_url (tickets)"
        in unreachable["route tickets authorization server"]
    )


@SQLITE_ONLY
def test_check_says_where_groups_come_from_and_warns_when_the_provider_lists_no_such_claim(checked) -> None:
    """groups.py fails closed: a claim the provider never sends refuses every sign-in that needs groups."""
    _, check = checked
    assert not [f for f in check() if f.subject == "groups"]  # nothing decides by groups: nothing to say
    listed = {f.subject: f for f in check(ALLOWED_GROUPS="eng")}
    assert listed["groups"].level == "ok"
    assert listed["groups"].message == "used by ALLOWED_GROUPS: read from the groups claim (GROUPS_CLAIM)"
    unlisted = {f.subject: f for f in check(ALLOWED_GROUPS="eng", GROUPS_CLAIM="realm_access.roles")}
    assert unlisted["groups"].level == "warn"
    assert "does not list the realm_access claim (GROUPS_CLAIM=realm_access.roles)" in unlisted["groups"].message


@SQLITE_ONLY
def test_check_reports_each_routes_tool_rules(checked, tmp_path, mcp_downstream: McpDownstream) -> None:
    _, check = checked
    routes = tmp_path / "routes.toml"
    routes.write_text(
        f'[[routes]]\nname = "tools"\npath = "/mcp"\nurl = "{mcp_downstream.url}"\n\n'
        '[[routes.tool_rules]]\ndeny = ["delete_*"]\n\n[[routes.tool_rules]]\nallow = ["*"]\ngroups = ["staff"]\n'
    )
    findings = {f.subject: f for f in check(MCP_SERVER_URL="", MCP_ROUTES_FILE=str(routes))}
    assert findings["tool rules tools"].level == "info"
    assert findings["tool rules tools"].message.startswith("2 rule(s), 1 allowing; the first rule")
    # A rule for a group makes groups matter: the check says where they come from.
    assert findings["groups"].message.startswith("used by route tools: read from the groups claim")
