"""Helpers for the deployment tests: a real nginx from Debian, gunicorn instances, TLS, and the MCP SDK client."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.shared.auth import OAuthClientMetadata

from tests.flows import Browser, MemoryStorage, query_of
from tests.support.ports import free_port
from tests.support.processes import stop_process, wait_until_answers

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
NGINX_EXAMPLE = ROOT / "deploy" / "nginx.conf"
SDK_REDIRECT_URI = "http://127.0.0.1:9/sdk-callback"  # never contacted: the browser stops at this prefix


def nginx_binary() -> str:
    """Debian's nginx; `scripts/ensure-services` installs it. Missing, the test fails (it is never skipped)."""
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        raise AssertionError("nginx is not installed: run scripts/ensure-services (make test does)")
    return found


# -- TLS -------------------------------------------------------------------------------------------


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost, its own issuer: clients verify against this very file."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "oauthproxy test")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


# -- nginx -------------------------------------------------------------------------------------------


def render_example(upstreams: list[str], https_port: int, http_port: int, cert: Path, key: Path) -> str:
    """deploy/nginx.conf with only what differs on a test machine rewritten: listen addresses (loopback, free
    ports), the certificate paths, and the upstream servers. Every proxy directive is the example's own."""
    text = NGINX_EXAMPLE.read_text()
    replacements = [
        (r"^\s*server 127\.0\.0\.1:8080;\n", "".join(f"    server {upstream};\n" for upstream in upstreams)),
        (r"^\s*listen \[::\]:\d+[^;]*;\n", ""),
        (r"listen 80;", f"listen 127.0.0.1:{http_port};"),
        (r"listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
        (r"ssl_certificate\s+/etc/letsencrypt/\S+;", f"ssl_certificate {cert};"),
        (r"ssl_certificate_key\s+/etc/letsencrypt/\S+;", f"ssl_certificate_key {key};"),
    ]
    for pattern, replacement in replacements:
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert count >= 1, f"deploy/nginx.conf no longer has {pattern!r}; update the test's rewriting"
    return text


@dataclass
class Nginx:
    prefix: Path
    process: subprocess.Popen[bytes]
    https_port: int
    http_port: int
    cert: Path

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def logs(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in sorted(self.prefix.glob("*.log")))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # fast shutdown; SIGQUIT would wait for open streams
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_nginx(prefix: Path, upstreams: list[str], site: Callable[[int, int, Path, Path], str] | None = None) -> Nginx:
    """Run Debian's nginx in the foreground on loopback with the example configuration and its own folders.

    `site(https_port, http_port, cert, key)`, when given, is the server configuration instead of the example's."""
    prefix.mkdir(parents=True, exist_ok=True)
    cert, key = self_signed_certificate(prefix)
    https_port, http_port = free_port(), free_port()
    (prefix / "site.conf").write_text((site or partial(render_example, upstreams))(https_port, http_port, cert, key))
    temp = {name: prefix / name for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for folder in temp.values():
        folder.mkdir(exist_ok=True)
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers may then read the test's private folders
    (prefix / "nginx.conf").write_text(f"""{user}worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {temp["client_body"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {prefix}/site.conf;
}}
""")
    binary = nginx_binary()
    command = [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-e", str(prefix / "error.log")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, f"nginx -t refused the example:\n{checked.stderr}"
    process = subprocess.Popen(
        [*command, "-g", "daemon off;"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(prefix / "stderr.log").open("wb"),
    )
    nginx = Nginx(prefix, process, https_port, http_port, cert)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"nginx exited with {process.returncode}:\n{nginx.logs()}")
        try:
            # /metrics is answered by nginx itself (403): probing a proxied path now would mark the not yet
            # started instances as failed for fail_timeout (10 s).
            requests.get(nginx.url + "/metrics", verify=str(cert), timeout=2)
            return nginx
        except requests.ConnectionError:
            time.sleep(0.05)
    raise AssertionError(f"nginx did not answer:\n{nginx.logs()}")


# -- gunicorn instances --------------------------------------------------------------------------------


@dataclass
class Instance:
    """One proxy instance: `gunicorn -c gunicorn.conf.py wsgi:app` on a loopback port."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop_process(self.process, signal.SIGINT, grace=10)


def spawn_instance(log_dir: Path, env: dict[str, str], command: list[str] | None = None) -> Instance:
    port = int(env["PORT"])
    log_path = log_dir / f"instance-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command or [str(BIN / "gunicorn"), "-c", "gunicorn.conf.py", "wsgi:app"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return Instance(port, process, log_path, env)


def wait_ready(instance: Instance, timeout: float = 40.0) -> Instance:
    wait_until_answers(instance.url + "/readyz", instance.process, timeout, logs=instance.logs, request_timeout=5)
    return instance


# -- the MCP SDK client ------------------------------------------------------------------------------------


class BrowserLogin:
    """The SDK's redirect and callback handlers, driven by a separate cookie-keeping `Browser`: it approves the
    consent page and walks the real provider's automatic login."""

    def __init__(self, proxy_url: str, verify: str | bool = True, login_hint: str = "alice"):
        self.browser = Browser(proxy_url, login_hint=login_hint)
        self.browser.session.verify = verify
        self.browser.session.trust_env = False  # else REQUESTS_CA_BUNDLE, when set, overrides session.verify
        self.authorize_urls: list[str] = []
        self.result: dict[str, str] = {}

    async def redirect_handler(self, authorization_url: str) -> None:
        self.authorize_urls.append(authorization_url)
        final = await asyncio.to_thread(self.browser.authorize, authorization_url, SDK_REDIRECT_URI)
        self.result = query_of(final)

    async def callback_handler(self) -> AuthorizationCodeResult:
        assert "code" in self.result, f"the authorization ended without a code: {self.result}"
        return AuthorizationCodeResult(
            code=self.result["code"], state=self.result.get("state"), iss=self.result.get("iss")
        )


def sdk_oauth(
    proxy_url: str, resource_url: str, verify: str | bool = True
) -> tuple[OAuthClientProvider, BrowserLogin, MemoryStorage]:
    login = BrowserLogin(proxy_url, verify)
    storage = MemoryStorage()
    provider = OAuthClientProvider(
        resource_url,
        OAuthClientMetadata(
            client_name="oauthproxy deployment test",
            redirect_uris=[SDK_REDIRECT_URI],
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
        ),
        storage,
        redirect_handler=login.redirect_handler,
        callback_handler=login.callback_handler,
    )
    return provider, login, storage
