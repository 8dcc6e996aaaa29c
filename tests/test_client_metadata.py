"""Tests for Client ID Metadata Document fetching: URL rules, HTTP behaviour, caching, SSRF guard and IP pinning."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from oauthproxy.client_metadata import (
    ClientMetadataError,
    ClientMetadataFetcher,
    _address_problem,
    is_metadata_document_client_id,
)
from tests.support.servers import serving

# --- a small document server on 127.0.0.1 ---------------------------------------------------------------------------


@dataclass
class Route:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    content_length: bool = True
    delay: float = 0.0
    drip: float | None = None  # seconds between single bytes


@dataclass
class ServerState:
    routes: dict[str, Route] = field(default_factory=dict)
    hits: Counter[str] = field(default_factory=Counter)
    host_headers: list[str | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    server: DocumentServer

    def do_GET(self) -> None:
        state = self.server.state
        with state.lock:
            state.hits[self.path] += 1
            state.host_headers.append(self.headers.get("Host"))
            route = state.routes.get(self.path, Route(status=404, body=b"not found"))
        try:
            time.sleep(route.delay)
            self.send_response_only(route.status)
            if "Date" not in route.headers:
                self.send_header("Date", self.date_time_string())
            for name, value in route.headers.items():
                self.send_header(name, value)
            if route.content_length:
                self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            if route.drip is None:
                self.wfile.write(route.body)
            else:
                for i in range(len(route.body)):
                    self.wfile.write(route.body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(route.drip)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            pass

    def log_message(self, format: str, *args: object) -> None:
        pass


class DocumentServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.state = ServerState()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # failed TLS handshakes in the negative TLS test are expected


@pytest.fixture(scope="module")
def _server() -> Iterator[DocumentServer]:
    with serving(DocumentServer()) as server:
        yield server


@pytest.fixture
def server(_server: DocumentServer) -> DocumentServer:
    _server.state = ServerState()
    return _server


def url(server: DocumentServer, path: str = "/client.json", host: str = "127.0.0.1") -> str:
    return f"http://{host}:{server.port}{path}"


def document(client_id: str, **changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "client_id": client_id,
        "client_name": "Example MCP Client",
        "redirect_uris": ["http://127.0.0.1:33418/callback", "https://app.example.com/callback"],
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code", "refresh_token"],
    }
    for key, value in changes.items():
        if value is ...:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def serve(
    server: DocumentServer, path: str, doc: object, headers: dict[str, str] | None = None, **route: object
) -> str:
    body = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    headers = {"Content-Type": "application/json", **(headers or {})}
    server.state.routes[path] = Route(body=body, headers=headers, **route)  # type: ignore[arg-type]
    return url(server, path)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fetcher(**kwargs: object) -> ClientMetadataFetcher:
    kwargs.setdefault("allow_private_networks", True)
    return ClientMetadataFetcher(**kwargs)  # type: ignore[arg-type]


def refused(f: ClientMetadataFetcher, client_id: str) -> ClientMetadataError:
    with pytest.raises(ClientMetadataError) as info:
        f.fetch(client_id)
    return info.value


# --- fetching and caching -------------------------------------------------------------------------------------------


def test_valid_document_is_returned_and_cached(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid))
    f = fetcher()
    first = f.fetch(cid)
    assert first == document(cid)
    first["client_name"] = "mutated by a caller"
    second = f.fetch(cid)
    assert second["client_name"] == "Example MCP Client"
    assert server.state.hits["/client.json"] == 1
    assert server.state.host_headers == [f"127.0.0.1:{server.port}"]


def test_query_string_is_part_of_the_client_id(server: DocumentServer) -> None:
    cid = url(server, "/clients?id=42")
    serve(server, "/clients?id=42", document(cid))
    assert fetcher().fetch(cid)["client_id"] == cid


def test_max_age_is_honoured(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid), {"Cache-Control": "public, max-age=120"})
    clock = FakeClock()
    f = fetcher(clock=clock)
    f.fetch(cid)
    clock.now += 119
    f.fetch(cid)
    assert server.state.hits["/client.json"] == 1
    clock.now += 2
    f.fetch(cid)
    assert server.state.hits["/client.json"] == 2


def test_short_max_age_is_raised_to_sixty_seconds(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid), {"Cache-Control": "max-age=0"})
    clock = FakeClock()
    f = fetcher(clock=clock)
    f.fetch(cid)
    clock.now += 59
    f.fetch(cid)
    assert server.state.hits["/client.json"] == 1
    clock.now += 2
    f.fetch(cid)
    assert server.state.hits["/client.json"] == 2


def test_long_max_age_is_capped_at_max_ttl(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid), {"Cache-Control": "max-age=31536000"})
    clock = FakeClock()
    f = fetcher(clock=clock, max_ttl=600)
    f.fetch(cid)
    clock.now += 599
    f.fetch(cid)
    assert server.state.hits["/client.json"] == 1
    clock.now += 2
    f.fetch(cid)
    assert server.state.hits["/client.json"] == 2


def test_age_header_is_subtracted_from_max_age(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid), {"Cache-Control": "max-age=300", "Age": "200"})
    clock = FakeClock()
    f = fetcher(clock=clock)
    f.fetch(cid)
    clock.now += 101
    f.fetch(cid)
    assert server.state.hits["/client.json"] == 2


def test_default_ttl_without_cache_headers(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid))
    clock = FakeClock()
    f = fetcher(clock=clock, default_ttl=300)
    f.fetch(cid)
    clock.now += 299
    f.fetch(cid)
    assert server.state.hits["/client.json"] == 1
    clock.now += 2
    f.fetch(cid)
    assert server.state.hits["/client.json"] == 2


def test_expires_is_the_fallback(server: DocumentServer) -> None:
    cid = url(server)
    date = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    expires = date + datetime.timedelta(seconds=120)
    headers = {"Date": format_datetime(date, usegmt=True), "Expires": format_datetime(expires, usegmt=True)}
    serve(server, "/client.json", document(cid), headers)
    clock = FakeClock()
    f = fetcher(clock=clock)
    f.fetch(cid)
    clock.now += 119
    f.fetch(cid)
    assert server.state.hits["/client.json"] == 1
    clock.now += 2
    f.fetch(cid)
    assert server.state.hits["/client.json"] == 2


@pytest.mark.parametrize(
    ("header", "cache_control"),
    [
        ("Cache-Control", "no-store"),
        ("Cache-Control", "no-cache"),
        ("Cache-Control", "max-age=600, no-store"),
        ("cache-control", "No-Store"),
    ],
)
def test_no_store_and_no_cache_are_not_cached(server: DocumentServer, header: str, cache_control: str) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid), {header: cache_control})
    f = fetcher()
    f.fetch(cid)
    f.fetch(cid)
    assert server.state.hits["/client.json"] == 2


def test_cache_is_bounded_lru(server: DocumentServer) -> None:
    ids = {}
    for name in ("a", "b", "c"):
        ids[name] = url(server, f"/{name}.json")
        serve(server, f"/{name}.json", document(ids[name]))
    f = fetcher(max_entries=2)
    f.fetch(ids["a"])
    f.fetch(ids["b"])
    f.fetch(ids["a"])  # a is now most recently used
    f.fetch(ids["c"])  # evicts b
    f.fetch(ids["a"])
    assert server.state.hits["/a.json"] == 1
    f.fetch(ids["b"])
    assert server.state.hits["/b.json"] == 2


def test_concurrent_fetches_are_safe(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid))
    f = fetcher()
    results: list[object] = []

    def worker() -> None:
        for _ in range(5):
            results.append(f.fetch(cid)["client_id"])

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [cid] * 40
    assert 1 <= server.state.hits["/client.json"] <= 8


def test_fetch_failures_are_cached_briefly(server: DocumentServer) -> None:
    cid = url(server)
    clock = FakeClock()
    f = fetcher(clock=clock)
    assert refused(f, cid).error == "invalid_client"  # 404: nothing served yet
    serve(server, "/client.json", document(cid))
    clock.now += 29
    assert "404" in refused(f, cid).description
    assert server.state.hits["/client.json"] == 1
    clock.now += 2
    assert f.fetch(cid)["client_id"] == cid
    assert server.state.hits["/client.json"] == 2


def test_invalid_documents_are_not_cached(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid, client_name=...))
    f = fetcher()
    assert refused(f, cid).error == "invalid_client_metadata"
    serve(server, "/client.json", document(cid))
    assert f.fetch(cid)["client_name"] == "Example MCP Client"


# --- document rules -------------------------------------------------------------------------------------------------


def test_wrong_client_id_is_refused(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", document(url(server, "/other.json")))
    err = refused(fetcher(), cid)
    assert err.error == "invalid_client_metadata"
    assert cid in err.description and "client_id" in err.description


def test_client_id_must_match_exactly(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid + "/"))
    assert refused(fetcher(), cid).error == "invalid_client_metadata"


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"redirect_uris": ...}, "redirect_uris"),
        ({"redirect_uris": []}, "redirect_uris"),
        ({"redirect_uris": "https://app.example.com/cb"}, "redirect_uris"),
        ({"redirect_uris": ["/relative/callback"]}, "not an absolute URI"),
        ({"redirect_uris": ["https://app.example.com/cb#frag"]}, "fragment"),
        ({"redirect_uris": [42]}, "not a non-empty string"),
        ({"client_name": ...}, "client_name"),
        ({"client_name": "  "}, "client_name"),
        ({"client_name": ["x"]}, "client_name"),
        ({"client_secret": "s3cret"}, "client_secret"),
        ({"client_secret_expires_at": 0}, "client_secret_expires_at"),
        ({"token_endpoint_auth_method": "private_key_jwt"}, "does not support"),
        ({"token_endpoint_auth_method": "client_secret_basic"}, "shared-secret"),
        ({"token_endpoint_auth_method": "tls_client_auth"}, "supports only none"),
        ({"token_endpoint_auth_method": ["none"]}, "must be a string"),
        ({"grant_types": 1}, "must be a list of strings"),
        ({"grant_types": "authorization_code"}, "must be a list of strings"),
        ({"response_types": [None]}, "must be a list of strings"),
        ({"scope": ["openid"]}, "must be a string"),
        ({"client_uri": {"x": 1}}, "must be a string"),
        ({"logo_uri": 7}, "must be a string"),
    ],
)
def test_invalid_documents_are_refused(server: DocumentServer, changes: dict[str, object], expected: str) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid, **changes))
    err = refused(fetcher(), cid)
    assert err.error == "invalid_client_metadata"
    assert expected in err.description and cid in err.description


def test_auth_method_may_be_omitted_and_custom_scheme_redirects_are_fine(server: DocumentServer) -> None:
    cid = url(server)
    serve(
        server,
        "/client.json",
        document(cid, token_endpoint_auth_method=..., redirect_uris=["com.example.app:/oauth/callback"]),
    )
    assert fetcher().fetch(cid)["redirect_uris"] == ["com.example.app:/oauth/callback"]


def test_body_larger_than_limit_is_refused(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid, padding="x" * 6000))
    err = refused(fetcher(), cid)
    assert err.error == "invalid_client" and "5120-byte limit" in err.description


def test_body_larger_than_limit_without_content_length_is_refused_while_streaming(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid, padding="x" * 3000), content_length=False)
    err = refused(fetcher(max_bytes=2048), cid)
    assert err.error == "invalid_client" and "2048-byte limit" in err.description


def test_document_just_under_the_limit_without_content_length_is_accepted(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid, padding="x" * 4000), content_length=False)
    assert fetcher().fetch(cid)["client_id"] == cid


def test_non_json_is_refused(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", b"<html>hello</html>", {"Content-Type": "text/html"})
    err = refused(fetcher(), cid)
    assert err.error == "invalid_client" and "not valid JSON" in err.description


def test_deeply_nested_json_is_refused_cleanly(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", b"[" * 5000)
    assert "not valid JSON" in refused(fetcher(), cid).description


def test_json_that_is_not_an_object_is_refused(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", [document(cid)])
    err = refused(fetcher(), cid)
    assert err.error == "invalid_client" and "not a JSON object" in err.description


def test_not_found_is_refused(server: DocumentServer) -> None:
    cid = url(server, "/missing.json")
    err = refused(fetcher(), cid)
    assert err.error == "invalid_client" and "HTTP 404" in err.description and cid in err.description


def test_redirect_is_not_followed(server: DocumentServer) -> None:
    cid = url(server)
    target = url(server, "/real.json")
    serve(server, "/real.json", document(cid))
    server.state.routes["/client.json"] = Route(status=302, headers={"Location": target})
    err = refused(fetcher(), cid)
    assert err.error == "invalid_client" and "redirect" in err.description and "302" in err.description
    assert server.state.hits["/real.json"] == 0


def test_slow_server_times_out(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid), delay=2.0)
    started = time.monotonic()
    err = refused(fetcher(timeout=0.5), cid)
    assert time.monotonic() - started < 1.5
    assert err.error == "invalid_client" and "0.5 s" in err.description


def test_dripping_server_hits_the_overall_deadline(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid), drip=0.05)
    started = time.monotonic()
    err = refused(fetcher(timeout=0.5), cid)
    assert time.monotonic() - started < 2.0
    assert err.error == "invalid_client" and "longer than" in err.description


def test_request_headers_ask_for_json(server: DocumentServer) -> None:
    seen: dict[str, str] = {}

    class Recorder(Handler):
        def do_GET(self) -> None:
            seen.update(self.headers.items())
            super().do_GET()

    cid = url(server)
    serve(server, "/client.json", document(cid))
    server.RequestHandlerClass = Recorder
    try:
        fetcher().fetch(cid)
    finally:
        server.RequestHandlerClass = Handler
    assert seen["Accept"] == "application/json"


# --- client id URL rules --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("client_id", "expected"),
    [
        ("https://app.example.com/oauth/client-metadata.json", True),
        ("https://app.example.com/client", True),
        ("https://app.example.com:8443/c?v=2", True),
        ("https://[2001:db8::1]/client.json", True),
        ("https://app.example.com", False),
        ("https://app.example.com/", False),
        ("https://app.example.com/?x=1", False),
        ("http://app.example.com/client.json", False),
        ("http://localhost:8000/client.json", False),
        ("https://app.example.com/client.json#frag", False),
        ("https://app.example.com/client.json#", False),
        ("https://user@app.example.com/client.json", False),
        ("https://user:pw@app.example.com/client.json", False),
        ("https://app.example.com/a/../client.json", False),
        ("https://app.example.com/a/./client.json", False),
        ("https://app.example.com/a/%2E%2E/client.json", False),
        ("https://app.example.com/..", False),
        ("https:///client.json", False),
        ("https://app.example.com:99999/client.json", False),
        ("https://app.example.com/client json", False),
        ("https://app.example.com\\@evil.example/x", False),
        ("https://äpp.example.com/client.json", False),
        ("ftp://app.example.com/client.json", False),
        ("my-client-4f7a9b", False),
        ("", False),
        ("https://app.example.com/" + "a" * 3000, False),
    ],
)
def test_is_metadata_document_client_id(client_id: str, expected: bool) -> None:
    assert is_metadata_document_client_id(client_id) is expected


@pytest.mark.parametrize(
    ("client_id", "expected"),
    [
        ("http://localhost:8000/client.json", True),
        ("http://127.0.0.1:8000/client.json", True),
        ("http://[::1]:8000/client.json", True),
        ("http://app.example.com/client.json", False),
        ("http://10.0.0.5/client.json", False),
        ("http://localhost:8000/", False),
        ("https://app.example.com/client.json", True),
    ],
)
def test_is_metadata_document_client_id_in_development(client_id: str, expected: bool) -> None:
    assert is_metadata_document_client_id(client_id, allow_private_networks=True) is expected


def test_fetch_refuses_a_non_url_client_id_with_a_reason() -> None:
    err = refused(ClientMetadataFetcher(), "https://app.example.com/")
    assert err.error == "invalid_client" and "no path" in err.description


def test_http_loopback_is_refused_outside_development(server: DocumentServer) -> None:
    cid = url(server)
    serve(server, "/client.json", document(cid))
    err = refused(ClientMetadataFetcher(), cid)
    assert err.error == "invalid_client" and "https" in err.description
    assert server.state.hits["/client.json"] == 0


# --- SSRF guard (no network) ----------------------------------------------------------------------------------------

PUBLIC_CLIENT_ID = "https://metadata.example.com/client.json"


def fake_resolver(*addresses: str, calls: list[tuple[object, ...]] | None = None):
    def resolve(host: str, port: int, family: int = 0, type: int = 0, *rest: object) -> list[tuple[object, ...]]:
        if calls is not None:
            calls.append((host, port))
        result = []
        for address in addresses:
            fam = socket.AF_INET6 if ":" in address else socket.AF_INET
            sockaddr = (address, port, 0, 0) if fam == socket.AF_INET6 else (address, port)
            result.append((fam, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr))
        return result

    return resolve


@pytest.fixture
def no_connections(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    attempts: list[object] = []

    def connect(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise AssertionError(f"unexpected connection to {address}")

    monkeypatch.setattr(socket.socket, "connect", connect)
    return attempts


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("::1", "loopback"),
        ("fd00::1", "private"),
        ("fe80::1", "link-local"),
        ("::ffff:127.0.0.1", "IPv4-mapped form of 127.0.0.1"),
        ("::ffff:169.254.169.254", "IPv4-mapped form of 169.254.169.254"),
        ("2002:7f00:1::1", "6to4 form of 127.0.0.1"),
        ("64:ff9b::a00:1", "NAT64 form of 10.0.0.1"),
        ("100.64.1.1", "carrier-grade NAT"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.251", "multicast"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("192.0.2.10", "private"),
        ("198.18.0.1", "private"),
        ("2001:db8::1", "private"),
        ("2001::1", "Teredo"),
        ("fec0::1", "site-local"),
    ],
)
def test_private_addresses_are_refused_before_connecting(
    address: str, reason: str, no_connections: list[object], caplog: pytest.LogCaptureFixture
) -> None:
    f = ClientMetadataFetcher(resolver=fake_resolver(address))
    with caplog.at_level(logging.INFO, logger="oauthproxy.client_metadata"):
        err = refused(f, PUBLIC_CLIENT_ID)
    assert err.error == "invalid_client"
    assert "metadata.example.com" in err.description and "public addresses" in err.description
    # Not a DNS oracle: the requester learns neither the address nor its kind; the operator's log has both.
    assert address not in err.description and reason not in err.description
    assert f"resolves to {address}, " in caplog.text and reason in caplog.text
    assert no_connections == []


def test_any_private_address_among_several_is_refused(
    no_connections: list[object], caplog: pytest.LogCaptureFixture
) -> None:
    f = ClientMetadataFetcher(resolver=fake_resolver("93.184.215.14", "10.1.2.3"))
    with caplog.at_level(logging.INFO, logger="oauthproxy.client_metadata"):
        err = refused(f, PUBLIC_CLIENT_ID)
    assert "10.1.2.3" not in err.description and "10.1.2.3" in caplog.text
    assert no_connections == []


def test_ip_literal_host_is_checked_too(no_connections: list[object], caplog: pytest.LogCaptureFixture) -> None:
    f = ClientMetadataFetcher(resolver=fake_resolver("169.254.169.254"))
    with caplog.at_level(logging.INFO, logger="oauthproxy.client_metadata"):
        err = refused(f, "https://169.254.169.254/latest/meta-data")
    assert "may fetch from" in err.description and "link-local" not in err.description
    assert "link-local" in caplog.text
    assert no_connections == []


def test_unresolvable_and_private_hosts_read_alike(no_connections: list[object]) -> None:
    """Whether an internal name exists is not told either: both answers are the same sentence."""

    def resolve(*args: object) -> list[tuple[object, ...]]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    unresolvable = refused(ClientMetadataFetcher(resolver=resolve), PUBLIC_CLIENT_ID)
    private = refused(ClientMetadataFetcher(resolver=fake_resolver("10.0.0.7")), PUBLIC_CLIENT_ID)
    assert unresolvable.error == private.error == "invalid_client"
    assert unresolvable.description == private.description
    assert "does not resolve to an address this server may fetch from" in private.description


@pytest.mark.parametrize(
    "address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_pass_the_check(address: str) -> None:
    assert _address_problem(ipaddress.ip_address(address)) is None


def test_development_http_must_resolve_to_loopback(no_connections: list[object]) -> None:
    f = ClientMetadataFetcher(allow_private_networks=True, resolver=fake_resolver("10.0.0.7"))
    err = refused(f, "http://localhost:8000/client.json")
    assert "http is allowed only for loopback" in err.description and "10.0.0.7" not in err.description
    assert no_connections == []


# --- pinning: the connection goes to the vetted address, never to a second lookup -----------------------------------


@pytest.fixture
def no_system_dns(monkeypatch: pytest.MonkeyPatch) -> None:
    real = socket.getaddrinfo

    def only_numeric(host: object, *args: object, **kwargs: object) -> object:
        try:
            ipaddress.ip_address(str(host).split("%")[0])
        except ValueError:
            raise AssertionError(f"unexpected DNS lookup of {host!r}") from None
        return real(host, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket, "getaddrinfo", only_numeric)


def test_connection_is_pinned_to_the_resolved_address(server: DocumentServer, no_system_dns: None) -> None:
    cid = url(server, host="localhost")
    serve(server, "/client.json", document(cid))
    calls: list[tuple[object, ...]] = []
    f = fetcher(resolver=fake_resolver("127.0.0.1", calls=calls))
    assert f.fetch(cid)["client_id"] == cid
    assert calls == [("localhost", server.port)]
    assert server.state.host_headers == [f"localhost:{server.port}"]


def test_pinned_connection_falls_back_to_the_next_vetted_address(server: DocumentServer, no_system_dns: None) -> None:
    cid = url(server, host="localhost")
    serve(server, "/client.json", document(cid))
    # Nothing listens on ::1 at this port (the server is bound to 127.0.0.1 only), so the second address is used.
    f = fetcher(resolver=fake_resolver("::1", "127.0.0.1"))
    assert f.fetch(cid)["client_id"] == cid


def test_connection_refused_is_a_clear_error(no_system_dns: None) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound but not listening: connections are refused
        cid = f"http://localhost:{port}/client.json"
        err = refused(fetcher(resolver=fake_resolver("127.0.0.1")), cid)
    assert err.error == "invalid_client" and cid in err.description


# --- TLS: SNI and certificate checks use the hostname while the socket goes to the pinned IP -----------------------


def _self_signed(tmp_path: Path, dns_name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(dns_name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / f"{dns_name}.pem", tmp_path / f"{dns_name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.fixture
def tls_server(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[DocumentServer, Path]]:
    cert_path, key_path = _self_signed(tmp_path, request.param)
    server = DocumentServer()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with serving(server):
        yield server, cert_path


@pytest.mark.parametrize("tls_server", ["localhost"], indirect=True)
def test_https_is_verified_against_the_hostname_of_a_pinned_address(
    tls_server: tuple[DocumentServer, Path], no_system_dns: None
) -> None:
    server, ca = tls_server
    cid = f"https://localhost:{server.port}/client.json"
    serve(server, "/client.json", document(cid))
    f = ClientMetadataFetcher(allow_private_networks=True, resolver=fake_resolver("127.0.0.1"), ca_bundle=str(ca))
    assert f.fetch(cid)["client_id"] == cid
    assert server.state.host_headers == [f"localhost:{server.port}"]


@pytest.mark.parametrize("tls_server", ["other.example"], indirect=True)
def test_https_certificate_for_another_name_is_refused(
    tls_server: tuple[DocumentServer, Path], no_system_dns: None
) -> None:
    server, ca = tls_server
    cid = f"https://localhost:{server.port}/client.json"
    serve(server, "/client.json", document(cid))
    f = ClientMetadataFetcher(allow_private_networks=True, resolver=fake_resolver("127.0.0.1"), ca_bundle=str(ca))
    err = refused(f, cid)
    assert err.error == "invalid_client" and "certificate" in err.description
    assert server.state.hits["/client.json"] == 0


@pytest.mark.parametrize("tls_server", ["localhost"], indirect=True)
def test_https_with_untrusted_certificate_is_refused(
    tls_server: tuple[DocumentServer, Path], no_system_dns: None
) -> None:
    server, _ = tls_server
    cid = f"https://localhost:{server.port}/client.json"
    serve(server, "/client.json", document(cid))
    f = ClientMetadataFetcher(allow_private_networks=True, resolver=fake_resolver("127.0.0.1"))
    assert "certificate" in refused(f, cid).description
