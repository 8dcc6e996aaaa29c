"""The README's run command (`make run` → scripts/run): the demo on loopback, reached by the MCP Python SDK client."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx2
import pytest
import requests
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.deployment_fixtures import ROOT, sdk_oauth
from tests.provider_fixture import OidcProvider
from tests.support.ports import free_port
from tests.support.settings import TEST_KEY

RUN = ROOT / "scripts" / "run"


@dataclass
class Launched:
    process: subprocess.Popen[bytes]
    output: Path
    ports: dict[str, int]

    def text(self) -> str:
        return self.output.read_text(errors="replace")

    def wait_for(self, marker: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if marker in text:
                return text
            if self.process.poll() is not None:
                raise AssertionError(f"scripts/run exited with {self.process.returncode}:\n{text}")
            time.sleep(0.1)
        raise AssertionError(f"no {marker!r} from scripts/run within {timeout} s:\n{self.text()}")

    def interrupt(self) -> int:
        """Ctrl-C, as a terminal sends it: SIGINT to the launcher."""
        self.process.send_signal(signal.SIGINT)
        return self.process.wait(timeout=20)


def launch(tmp_path: Path, extra_env: dict[str, str]) -> Launched:
    ports = {"PORT": free_port(), "DEMO_PROVIDER_PORT": free_port(), "DEMO_MCP_PORT": free_port()}
    env = {key: value for key, value in os.environ.items() if not key.startswith("OAUTH_")}
    env.update({name: str(port) for name, port in ports.items()})
    env.update({"DEMO_STATE_DIR": str(tmp_path / "demo"), "OAUTHPROXY_ENV_FILE": os.devnull, **extra_env})
    output = tmp_path / "run.log"
    with output.open("wb") as log:
        # The launcher in its own session, as a shell's foreground job is: SIGINT reaches it alone here.
        process = subprocess.Popen(
            [sys.executable, str(RUN)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Launched(process, output, ports)


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Launched]:
    launched = launch(tmp_path, {})
    try:
        yield launched
    finally:
        if launched.process.poll() is None:
            launched.process.kill()
            launched.process.wait(timeout=10)


def test_the_demo_serves_an_mcp_client_from_nothing_and_ctrl_c_stops_everything(demo: Launched) -> None:
    banner = demo.wait_for("Ctrl-C stops everything")
    mcp_url = re.search(r"MCP URL\s+(\S+)", banner).group(1)
    proxy_url = mcp_url.rsplit("/", 1)[0]
    assert mcp_url == f"http://127.0.0.1:{demo.ports['PORT']}/mcp"
    for how in (".vscode/mcp.json", '"type": "http"', "npx @modelcontextprotocol/inspector", "claude mcp add"):
        assert how in banner

    provider, login, storage = sdk_oauth(proxy_url, mcp_url)
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(time.monotonic())

    async def scenario() -> tuple[list[str], object, object]:
        async with (
            httpx2.AsyncClient(auth=provider, timeout=30) as http,
            Client(streamable_http_client(mcp_url, http_client=http)) as client,
        ):
            tools = sorted(tool.name for tool in (await client.list_tools()).tools)
            who = await client.call_tool("whoami", {})
            countdown = await client.call_tool("countdown", {"seconds": 2}, progress_callback=on_progress)
            return tools, who, countdown

    tools, who, countdown = anyio.run(scenario)
    assert tools == ["countdown", "echo", "whoami"]
    # The SDK discovered, registered, passed the consent page and the demo provider's login, all by itself.
    assert len(login.authorize_urls) == 1 and storage.tokens is not None
    assert who.structured_content == {"user": "alice", "email": "alice@example.com", "name": "Alice Liddell"}
    assert countdown.structured_content == {"result": "liftoff"}
    assert len(progress) == 2 and progress[1] - progress[0] > 0.7  # streamed as counted, not at the end
    assert requests.get(proxy_url + "/readyz", timeout=5).json()["status"] == "ok"

    started = time.monotonic()
    assert demo.interrupt() == 0
    assert time.monotonic() - started < 15
    assert "stopping the demo" in demo.text()
    assert not any(listening(port) for port in demo.ports.values()), demo.ports


def test_with_a_provider_configured_the_run_command_runs_the_proxy_for_real(
    tmp_path: Path, oidc_provider: OidcProvider
) -> None:
    port = free_port()
    env_file = tmp_path / ".env"
    # What an operator writes into .env (see .env.example), here naming the test provider.
    env_file.write_text(f"""OAUTH_CLIENT_ID=real-{port}
OAUTH_CLIENT_SECRET=real-secret
OAUTH_AUTHORIZE_URL={oidc_provider.issuer}
MCP_SERVER_URL=http://127.0.0.1:9/mcp
ENCRYPTION_KEY={TEST_KEY}
DATABASE_DSN=sqlite:///{tmp_path / "real.sqlite3"}
PORT={port}
""")
    launched = launch(tmp_path, {"OAUTHPROXY_ENV_FILE": str(env_file), "PORT": str(port)})
    try:
        launched.wait_for("Listening at")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                metadata = requests.get(f"http://127.0.0.1:{port}/.well-known/oauth-authorization-server", timeout=2)
                break
            except requests.RequestException:
                time.sleep(0.1)
        assert metadata.json()["issuer"] == f"http://127.0.0.1:{port}"
        assert "demo" not in launched.text()  # no demo provider, no demo MCP server: the settings in .env
        assert not listening(launched.ports["DEMO_PROVIDER_PORT"])
    finally:
        launched.process.send_signal(signal.SIGINT)  # gunicorn itself now (exec): its quick shutdown
        launched.process.wait(timeout=20)
