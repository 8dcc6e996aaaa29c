"""The processes a benchmark run starts on 127.0.0.1: nginx (downstream and reference proxy), the floor app, the
proxy under its own gunicorn.conf.py, the event-stream downstream; and what we read of them from /proc.

The test suite's pieces are reused as they are: the real OpenID provider (`tests.provider_fixture`), a real login
(`tests.proxy_fixtures.log_in`), the real MCP server (`tests.proxy_fixtures.launch_mcp_downstream`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.provider_fixture import OidcProvider
from tests.proxy_fixtures import Login, log_in
from tests.support.ports import free_port
from tests.support.settings import base_env

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BENCH = Path(__file__).resolve().parent
#: The allocator the proxy runs with as deployed (Dockerfile, Procfile); the floor gets the same, so that the CPU
#: figures compare the code, not the allocators.
MALLOC = "malloc"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
#: The fixed JSON-RPC result the fast downstream returns to every request (a `tools/list` answer).
FIXED_RESULT = (
    '{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"echo","description":"Echo a message",'
    '"inputSchema":{"type":"object","properties":{"message":{"type":"string"}}}}]}}'
)


@dataclass
class Service:
    """One started process (and its children: gunicorn workers, nginx workers)."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def pids(self) -> list[int]:
        """This process and all its descendants."""
        return [self.process.pid, *descendants(self.process.pid)]

    def workers(self) -> list[int]:
        return descendants(self.process.pid)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT if "gunicorn" in self.name else signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        children = parents.get(queue.pop(), [])
        found.extend(children)
        queue.extend(children)
    return found


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of these processes so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def _wait_until(check: Callable[[], bool], service: Service, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.process.poll() is not None:
            raise RuntimeError(f"{service.name} exited with {service.process.returncode}:\n{service.logs()[-3000:]}")
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{service.name} did not start within {timeout:.0f} s:\n{service.logs()[-3000:]}")


def _popen(
    command: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


# -- nginx ------------------------------------------------------------------------------------------------


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        raise RuntimeError("nginx is not installed: bench/run installs it from Debian")
    return found


def start_nginx(name: str, prefix: Path, servers: str) -> Service:
    """Debian's nginx in the foreground with one worker and its own folders; `servers` is the http block's body."""
    prefix.mkdir(parents=True, exist_ok=True)
    temp = {folder: prefix / folder for folder in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for folder in temp.values():
        folder.mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers may then read the run's private folders
    (prefix / "nginx.conf").write_text(f"""{user}worker_processes 1;
worker_rlimit_nofile 30000;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    keepalive_timeout 75s;
    keepalive_requests 10000000;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
{servers}
}}
""")
    command = [nginx_binary(), "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    if checked.returncode != 0:
        raise RuntimeError(f"nginx -t refused {prefix / 'nginx.conf'}:\n{checked.stderr}")
    process = _popen([*command, "-g", "daemon off;"], prefix / "stderr.log")
    return Service(name, "", process, prefix / "error.log")


def start_fast_downstream(prefix: Path) -> Service:
    """nginx answering every request with the same JSON-RPC result: far faster than anything in Python."""
    port = free_port()
    body = FIXED_RESULT.replace("'", "\\'")
    service = start_nginx(
        "nginx downstream",
        prefix,
        f"""    server {{
        listen 127.0.0.1:{port};
        location / {{
            default_type application/json;
            return 200 '{body}';
        }}
    }}""",
    )
    service.url = f"http://127.0.0.1:{port}"
    _wait_until(lambda: requests.post(service.url + "/mcp", data="{}", timeout=2).status_code == 200, service)
    return service


def start_reference_proxy(prefix: Path, upstreams: dict[str, str]) -> Service:
    """A plain nginx `proxy_pass` in front of each named downstream (`{"json": url, "sse": url}`), unbuffered,
    with kept-alive upstream connections: the native reference. `extra` maps each name to its front URL."""
    blocks, fronts = [], {}
    for name, upstream in upstreams.items():
        port = free_port()
        fronts[name] = f"http://127.0.0.1:{port}"
        blocks.append(f"""    upstream {name} {{
        server {upstream.removeprefix("http://")};
        keepalive 256;
        keepalive_requests 10000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://{name};
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 1h;
        }}
    }}""")
    service = start_nginx("nginx proxy", prefix, "\n".join(blocks))
    service.extra = fronts
    service.url = next(iter(fronts.values()))
    _wait_until(lambda: requests.get(service.url + "/", timeout=2).status_code < 500, service)
    return service


# -- Python servers ---------------------------------------------------------------------------------------


def start_sse_downstream(log_dir: Path) -> Service:
    port = free_port()
    log_path = log_dir / f"sse-downstream-{port}.log"
    service = Service(
        "sse downstream",
        f"http://127.0.0.1:{port}",
        _popen([sys.executable, "-m", "bench.sse_server", str(port)], log_path),
        log_path,
    )
    _wait_until(lambda: f"READY {port}" in service.logs(), service)
    return service


def start_floor(log_dir: Path, downstream_url: str, workers: int) -> Service:
    port = free_port()
    log_path = log_dir / f"floor-{port}.log"
    env = {
        **os.environ,
        "PORT": str(port),
        "WEB_CONCURRENCY": str(workers),
        "FLOOR_DOWNSTREAM_URL": downstream_url,
        "PYTHONMALLOC": MALLOC,
    }
    command = [str(BIN / "gunicorn"), "-c", str(BENCH / "floor_gunicorn_conf.py"), "bench.floor_app:app"]
    service = Service("floor gunicorn", f"http://127.0.0.1:{port}", _popen(command, log_path, env), log_path)
    _wait_until(
        lambda: (
            len(service.workers()) >= workers
            and requests.get(service.url + "/nothing-here", timeout=2).status_code == 404
        ),
        service,
    )
    return service


def start_mcp_server(log_dir: Path, app: str, workers: int) -> Service:
    """bench/mcp_server.py (`app`: stateless or stateful) on 127.0.0.1 with `workers` uvicorn processes."""
    port = free_port()
    log_path = log_dir / f"mcp-server-{app}-{port}.log"
    command = [sys.executable, "-m", "bench.mcp_server", str(port), "--app", app, "--workers", str(workers)]
    service = Service(f"mcp server ({app})", f"http://127.0.0.1:{port}", _popen(command, log_path), log_path)
    _wait_until(lambda: f"READY {port}" in service.logs() and len(service.workers()) >= workers, service)
    return service


@dataclass
class ProxyInstance:
    service: Service
    login: Login
    env: dict[str, str]

    @property
    def url(self) -> str:
        return self.service.url

    @property
    def token(self) -> str:
        return self.login.access_token


def start_proxy(
    log_dir: Path, provider: OidcProvider, downstream_url: str, workers: int, database_dsn: str, **overrides: str
) -> ProxyInstance:
    """The product as deployed: `gunicorn -c gunicorn.conf.py wsgi:app` (migrations first), then a real login
    through the real provider, whose access token the load generators send."""
    port = free_port()
    env = {
        **os.environ,
        **base_env(port, provider, database_dsn, f"bench-{port}"),
        "HOST": "127.0.0.1",
        "WEB_CONCURRENCY": str(workers),
        "PYTHONMALLOC": MALLOC,
        "OAUTHPROXY_ENV_FILE": os.devnull,
        "MCP_SERVER_URL": downstream_url,
        **overrides,
    }
    provider.register_client(env["OAUTH_CLIENT_ID"], env["OAUTH_CLIENT_SECRET"], [f"{env['PUBLIC_URL']}/callback"])
    log_path = log_dir / f"proxy-{port}.log"
    service = Service(
        "proxy gunicorn",
        env["PUBLIC_URL"],
        _popen([str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"], log_path, env),
        log_path,
    )
    _wait_until(
        lambda: (
            len(service.workers()) >= workers
            and requests.get(service.url + "/.well-known/oauth-authorization-server", timeout=2).status_code == 200
        ),
        service,
        60,
    )
    login = log_in(service.url, service.url + "/mcp")
    return ProxyInstance(service, login, env)
