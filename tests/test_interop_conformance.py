"""The MCP conformance suite (`@modelcontextprotocol/conformance`, a pinned 0.2.0 prerelease run by Node 22),
against the proxy under gunicorn.

* `authorization`: its authorization-server scenarios (metadata, then the authorization code grant). The suite
  prints an authorization URL and waits at its own loopback callback; a person's browser walks the URL through the
  consent page and the real OpenID provider, and delivers the redirect to the suite's listener.
* `server`: the streaming scenarios that a proxy must carry (progress, logging, sampling and elicitation requests
  from the server over the POST's SSE stream, several concurrent SSE streams, SSE polling with `Last-Event-ID`),
  against a real MCP server that implements the tools they call. The suite sends no token, so a small test-only
  forwarder on loopback adds one obtained by a real login.
"""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.flows import Browser, McpOAuthClient
from tests.interop.forwarder import TokenForwarder
from tests.interop_fixtures import CONFORMANCE_CLI, INTEROP_DIR, ON_INTEROP_DATABASE, StartGunicorn, node_env, walk
from tests.proxy_fixtures import GunicornProxy, log_in
from tests.support.ports import free_port
from tests.support.processes import ModuleServer

pytestmark = ON_INTEROP_DATABASE


@pytest.fixture(scope="module")
def conformance_proxy(start_gunicorn: StartGunicorn, conformance_downstream: ModuleServer) -> Iterator[GunicornProxy]:
    proxy = start_gunicorn(workers=2, MCP_SERVER_URL=conformance_downstream.url, ACCESS_LOG="-")
    yield proxy
    proxy.stop()


def checks_in(output_dir: Path) -> list[dict[str, Any]]:
    """Every check the suite recorded, from its `checks.json` files (one per scenario)."""
    checks = []
    for path in sorted(output_dir.rglob("checks.json")):
        for check in json.loads(path.read_text()):
            checks.append({**check, "scenario": path.parent.name})
    return checks


def failures(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [check for check in checks if check.get("status") in ("FAILURE", "WARNING")]


# -- authorization server ---------------------------------------------------------------------------


def test_conformance_authorization_server_scenarios(
    conformance_proxy: GunicornProxy, interop_node: Path, tmp_path: Path
) -> None:
    callback_port = free_port()
    redirect_uri = f"http://127.0.0.1:{callback_port}/callback"
    client = McpOAuthClient.register(
        conformance_proxy.url, redirect_uri=redirect_uri, client_name="MCP conformance suite"
    )
    output_dir = tmp_path / "results"
    command = [
        str(interop_node),
        str(CONFORMANCE_CLI),
        "authorization",
        "--url",
        conformance_proxy.url,
        "--client-id",
        client.client_id,
        "--port",
        str(callback_port),
        "--resource",
        conformance_proxy.url + "/mcp",
        "--output-dir",
        str(output_dir),
    ]
    process = subprocess.Popen(
        command,
        cwd=INTEROP_DIR,
        env=node_env(),
        text=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    watchdog = threading.Timer(90, process.kill)
    watchdog.start()
    output: list[str] = []
    browser = Browser(conformance_proxy.url)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            if line.startswith(conformance_proxy.url + "/authorize?"):
                # What a person does with the URL the suite prints: open it, approve, land on its callback.
                landing = walk(browser, line.strip(), redirect_uri)
                assert requests.get(landing, timeout=10).status_code == 200
        process.wait()
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
    text = "".join(output)
    assert process.returncode == 0, text[-5000:]
    assert browser.consent_pages_seen == 1

    checks = checks_in(output_dir)
    scenarios = {check["scenario"] for check in checks}
    assert any("authorization-server-metadata-endpoint" in name for name in scenarios), text[-3000:]
    assert any("authorization-code-grant" in name for name in scenarios), text[-3000:]
    assert not failures(checks), json.dumps(failures(checks), indent=1)
    assert {check["id"] for check in checks} >= {"authorization-server-metadata", "authorization-code-grant"}, checks
    assert all(check["status"] == "SUCCESS" for check in checks), checks


# -- server mode: streaming through the proxy ------------------------------------------------------

#: (scenario, protocol revision): the suite's server scenarios whose traffic a proxy must carry unchanged.
STREAMING_SCENARIOS = [
    ("tools-call-with-progress", "2025-11-25"),
    ("tools-call-with-progress", "2026-07-28"),
    ("tools-call-with-logging", "2025-11-25"),
    ("tools-call-sampling", "2025-11-25"),
    ("tools-call-elicitation", "2025-11-25"),
    ("elicitation-sep1034-defaults", "2025-11-25"),
    ("elicitation-sep1330-enums", "2025-11-25"),
    ("server-sse-multiple-streams", "2025-11-25"),
    ("server-sse-multiple-streams", "2026-07-28"),
    ("server-sse-polling", "2025-11-25"),
    ("server-session-lifecycle", "2025-11-25"),
]


#: Checks that must succeed, so that a scenario cannot pass by skipping what it is here for (e.g. the server
#: answering JSON where the scenario tests SSE).
REQUIRED_CHECKS = {
    "tools-call-with-progress": "tools-call-with-progress",
    "tools-call-with-logging": "tools-call-with-logging",
    "tools-call-sampling": "tools-call-sampling",
    "tools-call-elicitation": "tools-call-elicitation",
    "elicitation-sep1034-defaults": "elicitation-sep1034-enum-default",
    "elicitation-sep1330-enums": "elicitation-sep1330-titled-single",
    "server-sse-multiple-streams": "server-accepts-multiple-post-streams",
    "server-sse-polling": "server-sse-disconnect-resume",  # resumed with Last-Event-ID through the proxy
}


@pytest.fixture(scope="module")
def forwarder(conformance_proxy: GunicornProxy) -> Iterator[TokenForwarder]:
    """The suite's entry point: adds the token of a real login (consent, provider, code, token) to each request."""
    login = log_in(conformance_proxy.url, conformance_proxy.url + "/mcp")
    server = TokenForwarder(conformance_proxy.url, login.access_token).start()
    yield server
    server.stop()


@pytest.mark.parametrize(("scenario", "revision"), STREAMING_SCENARIOS)
def test_conformance_streaming_scenario_through_the_proxy(
    forwarder: TokenForwarder, interop_node: Path, tmp_path: Path, scenario: str, revision: str
) -> None:
    output_dir = tmp_path / "results"
    command = [
        str(interop_node),
        str(CONFORMANCE_CLI),
        "server",
        "--url",
        forwarder.url + "/mcp",
        "--scenario",
        scenario,
        "--spec-version",
        revision,
        "--timeout",
        "20000",
        "--output-dir",
        str(output_dir),
    ]
    before = len(forwarder.forwarded)
    result = subprocess.run(
        command, cwd=INTEROP_DIR, env=node_env(), text=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=60
    )
    output = result.stdout + result.stderr

    checks = checks_in(output_dir)
    assert checks, output[-3000:]
    assert not failures(checks), json.dumps(failures(checks), indent=1) + output[-2000:]
    assert result.returncode == 0, output[-3000:]
    succeeded = {check["id"] for check in checks if check["status"] == "SUCCESS"}
    if scenario in REQUIRED_CHECKS:
        assert REQUIRED_CHECKS[scenario] in succeeded, json.dumps(checks, indent=1)[-3000:]
    if (scenario, revision) == ("server-sse-multiple-streams", "2025-11-25"):
        # Three concurrent POSTs answered as three SSE streams, each delivering its first event.
        assert "server-sse-streams-functional" in succeeded, json.dumps(checks, indent=1)[-3000:]
    # It all went through the proxy, authenticated: no request was refused there.
    forwarded = forwarder.forwarded[before:]
    assert forwarded and all(request.status not in (401, 403) for request in forwarded), forwarded
