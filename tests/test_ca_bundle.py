"""CA_BUNDLE: outbound TLS to a private PKI, for the provider, client metadata documents and downstream servers.

Each service here has a certificate that no public bundle trusts (its own CA, made by the test); the proxy reaches
it with CA_BUNDLE naming that CA, and refuses it, in plain words, without.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from oauthproxy import create_app
from oauthproxy.client_metadata import ClientMetadataError
from oauthproxy.components import components
from oauthproxy.config import ConfigError
from oauthproxy.providers import ProviderError
from tests.conftest import RunningProxy
from tests.deployment_fixtures import self_signed_certificate
from tests.proxy_fixtures import McpDownstream, log_in
from tests.support.ports import free_port
from tests.support.servers import serving
from tests.support.settings import TEST_KEY

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "ca-bundle-test", "version": "1"},
    },
}


class PrivateTlsSite(ThreadingHTTPServer):
    """An https site on 127.0.0.1 with a certificate of the test's own CA: a discovery document and a client
    metadata document, both naming this site's own URL."""

    def __init__(self, cert: Path, key: Path) -> None:
        super().__init__(("127.0.0.1", 0), SiteHandler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server_address[1]}"


class SiteHandler(BaseHTTPRequestHandler):
    server: PrivateTlsSite

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        url = self.server.url
        documents = {
            "/.well-known/openid-configuration": {
                "issuer": url,
                "authorization_endpoint": url + "/authorize",
                "token_endpoint": url + "/token",
                "userinfo_endpoint": url + "/userinfo",
                "jwks_uri": url + "/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
            },
            "/client.json": {
                "client_id": url + "/client.json",
                "client_name": "Private PKI client",
                "redirect_uris": ["http://127.0.0.1:9/callback"],
                "token_endpoint_auth_method": "none",
            },
        }
        body = json.dumps(documents.get(self.path, {})).encode()
        self.send_response(200 if self.path in documents else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("private-ca"))


@pytest.fixture(scope="module")
def private_site(private_ca: tuple[Path, Path]) -> Iterator[PrivateTlsSite]:
    with serving(PrivateTlsSite(*private_ca)) as site:
        yield site


class TlsForwarder:
    """TLS on 127.0.0.1 with the test CA's certificate, forwarded byte for byte to a plain TCP port: the MCP
    downstream as a server of a private PKI would run it (its Host header keeps the port the SDK checks)."""

    def __init__(self, cert: Path, key: Path, target_port: int) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.5)
        self.port = self.listener.getsockname()[1]
        self.running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self.running:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            client.settimeout(30)
            secure = self.context.wrap_socket(client, server_side=True)
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
        except OSError:  # the refused handshake of the test without CA_BUNDLE
            client.close()
            return
        threading.Thread(target=self._pipe, args=(upstream, secure), daemon=True).start()
        self._pipe(secure, upstream)

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, target):
                try:
                    end.close()
                except OSError:
                    pass

    def stop(self) -> None:
        self.running = False
        self.listener.close()


@pytest.fixture(scope="module")
def private_downstream(mcp_downstream: McpDownstream, private_ca: tuple[Path, Path]) -> Iterator[str]:
    forwarder = TlsForwarder(*private_ca, mcp_downstream.port)
    yield f"https://127.0.0.1:{forwarder.port}/mcp"
    forwarder.stop()


def app_env(private_site: PrivateTlsSite, **overrides: str) -> dict[str, str]:
    port = free_port()
    return {
        "PUBLIC_URL": f"http://127.0.0.1:{port}",
        "OAUTH_CLIENT_ID": "private-pki",
        "OAUTH_CLIENT_SECRET": "s",
        "OAUTH_AUTHORIZE_URL": private_site.url,
        "MCP_SERVER_URL": "http://127.0.0.1:9/mcp",
        "DATABASE_DSN": "sqlite:///:memory:",
        "ENCRYPTION_KEY": TEST_KEY,
        "CLIENT_METADATA_ALLOW_PRIVATE_NETWORKS": "true",
        **overrides,
    }


def test_the_provider_and_client_metadata_documents_are_trusted_through_ca_bundle(
    private_site: PrivateTlsSite, private_ca: tuple[Path, Path]
) -> None:
    trusted = create_app(app_env(private_site, CA_BUNDLE=str(private_ca[0])))
    assert components(trusted).login_provider.load_metadata()["issuer"] == private_site.url
    document = components(trusted).client_metadata_fetcher.fetch(private_site.url + "/client.json")
    assert document["client_name"] == "Private PKI client"

    untrusted = create_app(app_env(private_site))
    with pytest.raises(ProviderError) as refused:
        components(untrusted).login_provider.load_metadata()
    assert (
        "CERTIFICATE_VERIFY_FAILED" in refused.value.description
        or "certificate verify failed" in refused.value.description.lower()
    )
    with pytest.raises(ClientMetadataError) as refused_document:
        components(untrusted).client_metadata_fetcher.fetch(private_site.url + "/client.json")
    assert "TLS connection failed" in refused_document.value.description


def test_a_downstream_with_a_private_certificate_is_reached_through_ca_bundle(
    start_proxy: Callable[..., RunningProxy], private_downstream: str, private_ca: tuple[Path, Path]
) -> None:
    for ca_bundle, expected in ((str(private_ca[0]), 200), (None, 502)):
        overrides = {"MCP_SERVER_URL": private_downstream}
        if ca_bundle:
            overrides["CA_BUNDLE"] = ca_bundle
        proxy = start_proxy(**overrides)
        login = log_in(proxy.url, proxy.url + "/mcp")
        answer = requests.post(
            proxy.url + "/mcp",
            json=INITIALIZE,
            timeout=15,
            headers={
                **login.bearer,
                "Accept": "application/json, text/event-stream",
                "Content-Type": "application/json",
            },
        )
        assert answer.status_code == expected, (ca_bundle, answer.status_code, answer.text)


def test_a_ca_bundle_that_is_not_a_pem_file_is_refused_at_start(tmp_path: Path, private_site: PrivateTlsSite) -> None:
    not_pem = tmp_path / "bundle.pem"
    not_pem.write_text("not a certificate")
    for value, message in ((str(tmp_path / "missing.pem"), "is not a file"), (str(not_pem), "no readable PEM")):
        with pytest.raises(ConfigError) as refused:
            create_app(app_env(private_site, CA_BUNDLE=value))
        assert any(problem.startswith("CA_BUNDLE") and message in problem for problem in refused.value.problems)
