"""compose.yaml run as users run it: nginx with TLS (deploy/nginx.conf) in front of two instances of the image built
from the Dockerfile, sharing PostgreSQL and Redis. A login hops between the instances; a tool call streams through.

podman-compose (pinned) renders compose.yaml with an override that only moves every service onto the host's
loopback (these machines allow nothing else: each service on 127.0.0.1 with its own port, instead of a compose
network with service names); the test then starts the rendered services itself, in compose's dependency order, with
podman. The official images compose.yaml names are replaced, through its own ${..._IMAGE} variables, by stand-ins
built from Debian 12's packages (tests/container_fixtures.py): no registry is reachable here.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import redis
import requests
import yaml

from tests.container_fixtures import (
    IMAGE,
    LIMITS,
    base_image,
    build_image,
    podman,
    remove_container,
    standin_image,
    streamed_tool_call,
)
from tests.deployment_fixtures import self_signed_certificate
from tests.flows import Browser, McpOAuthClient
from tests.provider_fixture import OidcProvider
from tests.proxy_fixtures import McpDownstream, launch_mcp_downstream
from tests.support.ports import free_port
from tests.support.settings import TEST_KEY

pytestmark = pytest.mark.container
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
ORDER = ["postgres", "redis", "proxy-1", "proxy-2", "nginx"]


@dataclass
class Stack:
    services: dict[str, dict]
    containers: dict[str, str]
    ports: dict[str, int]
    cert: str
    password: str
    volumes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.ports['https']}"

    def logs(self, service: str) -> str:
        done = podman("logs", self.containers[service], check=False)
        return done.stdout + done.stderr

    def json_logs(self, service: str) -> list[dict]:
        lines = []
        for line in self.logs(service).splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        return lines


def render(override: dict, variables: dict[str, str], folder: Path) -> dict:
    """compose.yaml merged with the override and interpolated, by podman-compose itself."""
    override_path = folder / "compose.loopback.yaml"
    override_path.write_text(yaml.safe_dump(override))
    done = subprocess.run(
        [str(BIN / "podman-compose"), "-f", str(ROOT / "compose.yaml"), "-f", str(override_path), "config"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **variables},
    )
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def run_service(name: str, service: dict, container: str, project: str) -> list[str]:
    """`podman run` for one rendered compose service, on the host's network; returns the volumes it created."""
    arguments = ["run", "--detach", "--name", container, "--network", "host", *LIMITS]
    for key, value in (service.get("environment") or {}).items():
        arguments += ["-e", f"{key}={value}"]
    for env_file in service.get("env_file") or []:
        path = env_file["path"] if isinstance(env_file, dict) else env_file
        arguments += ["--env-file", str((ROOT / path).resolve())]
    volumes = []
    for volume in service.get("volumes") or []:
        source, target, *mode = volume.split(":")
        if source.startswith((".", "/")):
            source = str((ROOT / source).resolve())
        else:
            source = f"{project}_{source}"
            volumes.append(source)
        arguments += ["-v", ":".join([source, target, *mode])]
    if "healthcheck" in service:
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", test
        arguments += ["--health-cmd", json.dumps(test[1:])]
    arguments.append(service["image"])
    arguments += service.get("command") or []
    podman(*arguments, timeout=120)
    return volumes


def wait_until(what: str, probe, timeout: float = 90) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if probe():
            return time.monotonic() - started
        time.sleep(0.25)
    raise AssertionError(f"{what} not ready within {timeout} s")


def healthy(container: str) -> bool:
    return podman("healthcheck", "run", container, check=False, timeout=60).returncode == 0


def answers(url: str, verify: str | bool = True) -> bool:
    try:
        return requests.get(url, timeout=3, verify=verify).status_code == 200
    except requests.RequestException:
        return False


@pytest.fixture(scope="module")
def downstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McpDownstream]:
    server = launch_mcp_downstream(tmp_path_factory.mktemp("compose-mcp"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(
    oidc_provider: OidcProvider, downstream: McpDownstream, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("compose")
    started = time.monotonic()
    images = {kind: standin_image(kind, folder) for kind in ("postgres", "redis", "nginx")}
    build_seconds = build_image(folder)
    ports = {name: free_port() for name in ("postgres", "redis", "proxy-1", "proxy-2", "https", "http")}
    public_url = f"https://127.0.0.1:{ports['https']}"
    password = secrets.token_urlsafe(16)
    certs = folder / "certs"
    certs.mkdir()
    cert, key = self_signed_certificate(certs)
    cert.rename(certs / "fullchain.pem")
    key.rename(certs / "privkey.pem")
    client_id = f"compose-{ports['https']}"
    oidc_provider.register_client(client_id, "compose-secret", [f"{public_url}/callback"])
    env_file = folder / "oauthproxy.env"  # the user's .env
    env_file.write_text(
        "\n".join(
            f"{key}={value}"
            for key, value in {
                "PUBLIC_URL": public_url,
                "OAUTH_CLIENT_ID": client_id,
                "OAUTH_CLIENT_SECRET": "compose-secret",
                "OAUTH_AUTHORIZE_URL": oidc_provider.issuer,
                "SCOPES_SUPPORTED": "openid,email,profile",
                "MCP_SERVER_URL": downstream.url,
                "ENCRYPTION_KEY": TEST_KEY,
                "WEB_CONCURRENCY": "2",
                "TOKEN_CACHE_TTL": "1",
            }.items()
        )
        + "\n"
    )
    variables = {
        "POSTGRES_PASSWORD": password,
        "OAUTHPROXY_IMAGE": IMAGE,
        "BASE_IMAGE": base_image(),
        "POSTGRES_IMAGE": images["postgres"],
        "REDIS_IMAGE": images["redis"],
        "NGINX_IMAGE": images["nginx"],
        "OAUTHPROXY_ENV_FILE": str(env_file),
        "TLS_CERT_DIR": str(certs),
    }
    database = f"postgresql://oauthproxy:{password}@127.0.0.1:{ports['postgres']}/oauthproxy"
    # Only addresses change: loopback and a port of its own for each service, instead of service names.
    override = {
        "services": {
            # PGPORT: the server's port and pg_isready's (compose.yaml's health check) alike.
            "postgres": {
                "command": ["postgres", "-c", "listen_addresses=127.0.0.1"],
                "environment": {"PGPORT": str(ports["postgres"])},
            },
            "redis": {
                "command": [
                    "redis-server",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(ports["redis"]),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ]
            },
            **{
                name: {
                    "environment": {
                        "DATABASE_DSN": database,
                        "HOST": "127.0.0.1",
                        "PORT": str(ports[name]),
                        "RATE_LIMIT_STORAGE_URI": f"redis://127.0.0.1:{ports['redis']}/0",
                    }
                }
                for name in ("proxy-1", "proxy-2")
            },
            "nginx": {
                "environment": {
                    "OAUTHPROXY_UPSTREAMS": f"127.0.0.1:{ports['proxy-1']} 127.0.0.1:{ports['proxy-2']}",
                    "NGINX_LISTEN_ADDRESS": "127.0.0.1",
                    "HTTPS_PORT": str(ports["https"]),
                    "HTTP_PORT": str(ports["http"]),
                }
            },
        }
    }
    services = render(override, variables, folder)["services"]
    assert sorted(services) == sorted(ORDER)
    assert services["proxy-1"]["build"]["context"] in (".", str(ROOT))
    project = f"oauthproxy-compose-{secrets.token_hex(3)}"
    containers = {name: f"{project}-{name}" for name in ORDER}
    result = Stack(
        services,
        containers,
        ports,
        str(certs / "fullchain.pem"),
        password,
        seconds={"images": time.monotonic() - started, "build": build_seconds},
    )
    try:
        began = time.monotonic()
        for name in ORDER:  # compose's order: depends_on, with its conditions
            for dependency, condition in (services[name].get("depends_on") or {}).items():
                if condition.get("condition") == "service_healthy":
                    wait_until(f"{dependency} healthy", lambda d=dependency: healthy(containers[d]))
            result.volumes += run_service(name, services[name], containers[name], project)
        for name in ("proxy-1", "proxy-2"):
            wait_until(name, lambda n=name: answers(f"http://127.0.0.1:{ports[n]}/readyz"))
        wait_until("nginx", lambda: answers(result.url + "/healthz", result.cert))
        result.seconds["start"] = time.monotonic() - began
        print(
            f"\ncompose: stand-in images {result.seconds['images']:.1f} s (of which the proxy image build "
            f"{build_seconds:.1f} s), start to ready {result.seconds['start']:.1f} s"
        )
        yield result
    finally:
        for name in reversed(ORDER):
            remove_container(containers[name])
        for volume in result.volumes:
            podman("volume", "rm", "--force", volume, check=False)


def test_the_stack_shares_postgresql_and_redis_and_migrated_once(stack: Stack) -> None:
    upgrades = [stack.logs(name).count("Running upgrade  -> ") for name in ("proxy-1", "proxy-2")]
    assert sorted(upgrades) == [0, 1], upgrades  # the other instance waited on the advisory lock
    with psycopg.connect(
        f"postgresql://oauthproxy:{stack.password}@127.0.0.1:{stack.ports['postgres']}/oauthproxy", connect_timeout=5
    ) as connection:
        assert connection.execute("select count(*) from alembic_version").fetchone() == (1,)
    assert redis.Redis(port=stack.ports["redis"], socket_timeout=5).ping()
    for name in ("postgres", "redis"):
        assert healthy(stack.containers[name]), f"compose.yaml's health check of {name} fails"


def test_a_login_through_nginx_hops_between_the_instances(stack: Stack) -> None:
    browser = Browser(stack.url)
    browser.session.verify, browser.session.trust_env = stack.cert, False
    body = {
        "client_name": "compose test",
        "redirect_uris": ["http://127.0.0.1:9/callback"],
        "token_endpoint_auth_method": "none",
    }
    registered = requests.post(stack.url + "/register", json=body, verify=stack.cert, timeout=10)
    assert registered.status_code == 201, registered.text
    client = McpOAuthClient(stack.url, registered.json()["client_id"])
    result = client.login(browser, resource=stack.url + "/mcp")
    tokens = requests.post(
        stack.url + "/token",
        verify=stack.cert,
        timeout=10,
        data={
            "grant_type": "authorization_code",
            "code": result["code"],
            "redirect_uri": client.redirect_uri,
            "code_verifier": client.verifier,
            "client_id": client.client_id,
        },
    )
    assert tokens.status_code == 200, tokens.text
    login_paths = {"/register", "/authorize", "/authorize/consent", "/callback", "/token"}
    served = {
        name: {line.get("path") for line in stack.json_logs(name)} & login_paths for name in ("proxy-1", "proxy-2")
    }
    assert all(served.values()), served  # each instance served part of this login: the state is shared
    assert served["proxy-1"] | served["proxy-2"] == login_paths
    # Forwarded for one trusted hop: the instances log the client's address, which nginx passed on.
    assert {
        line.get("client")
        for name in ("proxy-1", "proxy-2")
        for line in stack.json_logs(name)
        if line.get("path") == "/token"
    } == {"127.0.0.1"}


def test_a_streamed_tool_call_through_nginx_arrives_event_by_event(stack: Stack) -> None:
    browser = Browser(stack.url)
    browser.session.verify, browser.session.trust_env = stack.cert, False
    registered = requests.post(
        stack.url + "/register",
        verify=stack.cert,
        timeout=10,
        json={
            "client_name": "compose stream",
            "redirect_uris": ["http://127.0.0.1:9/callback"],
            "token_endpoint_auth_method": "none",
        },
    )
    client = McpOAuthClient(stack.url, registered.json()["client_id"])
    code = client.login(browser, resource=stack.url + "/mcp")["code"]
    token = requests.post(
        stack.url + "/token",
        verify=stack.cert,
        timeout=10,
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": client.redirect_uri,
            "code_verifier": client.verifier,
            "client_id": client.client_id,
        },
    ).json()["access_token"]
    arrivals: list[float] = []
    started = time.monotonic()
    progress, result = streamed_tool_call(
        stack.url + "/mcp",
        token,
        {"steps": 4, "pause": 0.5},
        lambda _count: arrivals.append(time.monotonic() - started),
        verify=stack.cert,
    )
    assert len(progress) == 4 and result["result"]["isError"] is False
    assert all(later - earlier > 0.3 for earlier, later in itertools.pairwise(arrivals)), arrivals
