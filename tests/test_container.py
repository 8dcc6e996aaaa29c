"""The Dockerfile built as it is (on a stand-in base image) and run with podman: a whole login and a streamed tool
call through the container, as a non-root user, with its data volume, its health check and SIGTERM draining."""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.container_fixtures import IMAGE, LIMITS, build_image, inspect, podman, remove_container, streamed_tool_call
from tests.provider_fixture import OidcProvider
from tests.proxy_fixtures import McpDownstream, launch_mcp_downstream, log_in
from tests.support.ports import free_port
from tests.support.settings import TEST_KEY

pytestmark = pytest.mark.container


@dataclass
class Running:
    name: str
    volume: str
    url: str
    build_seconds: float
    start_seconds: float

    def logs(self) -> str:
        done = podman("logs", self.name, check=False)
        return done.stdout + done.stderr


@pytest.fixture(scope="module")
def downstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpDownstream]:
    server = launch_mcp_downstream(tmp_path_factory.mktemp("container-mcp"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def container(
    oidc_provider: OidcProvider, downstream: McpDownstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Running]:
    build_seconds = build_image(tmp_path_factory.mktemp("build"))
    suffix = secrets.token_hex(4)
    name, volume = f"oauthproxy-test-{suffix}", f"oauthproxy-test-data-{suffix}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    client_id = f"container-{port}"
    oidc_provider.register_client(client_id, "container-secret", [f"{url}/callback"])
    settings = {
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "PUBLIC_URL": url,
        "WEB_CONCURRENCY": "2",
        "OAUTH_CLIENT_ID": client_id,
        "OAUTH_CLIENT_SECRET": "container-secret",
        "OAUTH_AUTHORIZE_URL": oidc_provider.issuer,
        "MCP_SERVER_URL": downstream.url,
        "SCOPES_SUPPORTED": "openid,email,profile",
        "ENCRYPTION_KEY": TEST_KEY,
    }
    environment = [argument for key, value in settings.items() for argument in ("-e", f"{key}={value}")]
    started = time.monotonic()
    podman(
        "run",
        "--detach",
        "--name",
        name,
        "--network",
        "host",
        *LIMITS,
        "-v",
        f"{volume}:/app/instance",
        *environment,
        IMAGE,
    )
    running = Running(name, volume, url, build_seconds, 0.0)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert inspect("container", name)["State"]["Running"], running.logs()
            time.sleep(0.2)
        else:
            raise AssertionError(f"the container was not ready within 60 s:\n{running.logs()}")
        running.start_seconds = time.monotonic() - started
        print(f"\ncontainer: build {build_seconds:.1f} s, start to ready {running.start_seconds:.1f} s")
        yield running
    finally:
        remove_container(name)
        podman("volume", "rm", "--force", volume, check=False)


def test_the_image_runs_as_a_non_root_user_with_a_health_check(container: Running) -> None:
    assert podman("exec", container.name, "id", "-u").stdout.strip() == "10001"
    image = inspect("image", IMAGE)
    healthcheck = image["Healthcheck"]  # kept by --format docker (the OCI format has no HEALTHCHECK)
    assert healthcheck and "/healthz" in " ".join(healthcheck["Test"]), image
    # The image's own health check command, run in the container: podman reports it healthy.
    checked = podman("healthcheck", "run", container.name, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    # The package is installed (not the checkout): its templates travel inside it.
    found = podman(
        "exec",
        container.name,
        "python",
        "-c",
        "import oauthproxy, pathlib; print(sorted(p.name for p in "
        "(pathlib.Path(oauthproxy.__file__).parent / 'templates').iterdir()))",
    ).stdout
    assert (
        "consent.html" in found
        and "site-packages"
        in podman("exec", container.name, "python", "-c", "import oauthproxy; print(oauthproxy.__file__)").stdout
    )


def test_a_whole_login_through_the_container_keeps_its_data_in_the_volume(container: Running) -> None:
    login = log_in(container.url, container.url + "/mcp")
    assert login.access_token and login.refresh_token
    mountpoint = Path(inspect("volume", container.volume)["Mountpoint"])
    database = mountpoint / "oauthproxy.sqlite3"
    assert database.is_file() and database.stat().st_uid == 10001
    listed = podman("exec", container.name, "oauthproxy", "clients", "list").stdout
    assert login.client.client_id in listed  # the same database, through the image's own command


def test_sigterm_lets_a_streamed_tool_call_finish(container: Running) -> None:
    login = log_in(container.url, container.url + "/mcp")
    stopped: dict[str, object] = {}

    def stop_container() -> None:
        begun = time.monotonic()
        stopped["result"] = podman("stop", "--time", "30", container.name, timeout=60, check=False)
        stopped["seconds"] = time.monotonic() - begun

    def on_event(count: int) -> None:
        if count == 1:  # mid-stream: what `docker stop` does, SIGTERM to gunicorn (PID 1)
            threading.Thread(target=stop_container, daemon=True).start()

    progress, result = streamed_tool_call(
        container.url + "/mcp", login.access_token, {"steps": 6, "pause": 0.5}, on_event
    )
    assert len(progress) == 6 and result["result"]["isError"] is False  # every event arrived after SIGTERM
    deadline = time.monotonic() + 40
    while "seconds" not in stopped and time.monotonic() < deadline:
        time.sleep(0.1)
    state = inspect("container", container.name)["State"]
    assert not state["Running"] and state["ExitCode"] == 0, (state, container.logs())
    assert stopped["seconds"] < 30  # drained and exited, not killed at the deadline
    logs = container.logs()
    assert "Handling signal: term" in logs and "Traceback" not in logs, logs
