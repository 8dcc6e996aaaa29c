"""Path confinement: a request to a route reaches its downstream only below the route's prefix, in every spelling."""

from __future__ import annotations

import http.client
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oauthproxy.proxy.forwarding import PathRefused, confined_suffix, query_without_tokens
from tests.deployment_fixtures import Nginx, start_nginx
from tests.proxy_fixtures import EchoServer, GunicornProxy, log_in, write_routes

#: Ways out of route A (`/mcp/a`, downstream `/mcp-a`) to route B's downstream or elsewhere on the same host.
ESCAPES = [
    "/mcp/a/..%2f{target}",
    "/mcp/a%2f..%2f{target}",
    "/mcp/a/%2e%2e%2f{target}",
    "/mcp/a/x/..%2f..%2f{target}",
    "/mcp/a/x/..%2F..%2F..%2F{target}",
    "/mcp/a%2f%2e%2e%2f{target}",
    "/mcp/a/.%2e/{target}",
    "/mcp/a/%2E%2E%5C{target}",
    "/mcp/a/..%5c{target}",
    "/mcp/a/..\\{target}",
    "/mcp/a/%252e%252e/{target}",
    "/mcp/a/%252e%252e%252f{target}",
    "/mcp/a/..;/{target}",
    "/mcp/a/..;jsessionid=1/{target}",
    "/mcp/a/..%00/{target}",
    "/mcp/a/%2e%2e%00/{target}",
    "/mcp/a/../{target}",
    "/mcp/a/%2e%2e/{target}",
    "/%6dcp/a/..%2f{target}",
    "/mcp/%61/..%2f{target}",
    "/mcp/a/...%2f{target}",
    "/mcp/a//..%2f{target}",
    "/mcp/a/%2e%2e%2f%2e%2e%2f{target}",
    "/mcp/a%2f..%2f..%2f{target}",
]
TARGETS = ["mcp-b/secret", "admin"]


def nginx_site(https_port: int, http_port: int, cert: Path, key: Path) -> str:
    """Two MCP servers on one host, as paths; nginx decodes %2F and resolves dot segments before matching."""
    answer = '"$where: $uri user=$http_x_forwarded_user\\n"'
    return f"""
server {{
    listen 127.0.0.1:{http_port};
    listen 127.0.0.1:{https_port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    default_type text/plain;
    set $where outside;
    location = /metrics {{ return 403; }}
    location = /mcp-a {{ set $where a; return 200 {answer}; }}
    location /mcp-a/ {{ set $where a; return 200 {answer}; }}
    location = /mcp-b {{ set $where b; return 200 {answer}; }}
    location /mcp-b/ {{ set $where b; return 200 {answer}; }}
    location / {{ return 200 {answer}; }}
}}
"""


@pytest.fixture
def nginx_downstream(tmp_path: Path) -> Iterator[Nginx]:
    nginx = start_nginx(tmp_path / "nginx", [], site=nginx_site)
    yield nginx
    nginx.stop()


def raw_get(url: str, path: str, headers: dict[str, str]) -> tuple[int, str]:
    """GET with the path on the wire exactly as written (requests would normalise it)."""
    host, port = url.split("//", 1)[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        connection.close()


def test_nothing_escapes_a_route_through_a_normalising_downstream(
    start_gunicorn: Callable[..., GunicornProxy], nginx_downstream: Nginx, tmp_path: Path
) -> None:
    downstream = f"http://127.0.0.1:{nginx_downstream.http_port}"
    routes = write_routes(
        tmp_path / "routes.toml",
        [
            {"name": "a", "path": "/mcp/a", "url": downstream + "/mcp-a"},
            {"name": "b", "path": "/mcp/b", "url": downstream + "/mcp-b", "allowed_emails": ["nobody@example.com"]},
        ],
    )
    proxy = start_gunicorn(MCP_SERVER_URL="", MCP_ROUTES_FILE=routes)
    login = log_in(proxy.url, proxy.url + "/mcp/a")

    # What the route is for still works, in the spellings a client may legitimately use.
    for path, seen in [
        ("/mcp/a", "/mcp-a"),
        ("/mcp/a/", "/mcp-a/"),
        ("/mcp/a/tools/x%20y", "/mcp-a/tools/x y"),
        ("/mcp/a/x;v=1", "/mcp-a/x;v=1"),
        ("/%6dcp/a/x", "/mcp-a/x"),
        ("/mcp/a/x.y/..z", None),
    ]:
        status, body = raw_get(proxy.url, path, login.bearer)
        assert status == 200, (path, body)
        assert body.startswith(f"a: {seen or '/mcp-a/'}") and body.endswith(" user=alice\n"), (path, body)

    for template in ESCAPES:
        for target in TARGETS:
            path = template.format(target=target)
            status, body = raw_get(proxy.url, path, login.bearer)
            # Refused by the proxy, before the downstream; never route B's server, never outside route A's prefix.
            assert status == 400, (path, status, body)
            assert "invalid_request" in body, (path, body)
    access_log = (nginx_downstream.prefix / "access.log").read_text()
    assert "mcp-b" not in access_log and "admin" not in access_log, access_log


@pytest.mark.parametrize(
    "path",
    [t.format(target=target) for t in ESCAPES for target in TARGETS]
    + ["/mcp/ax", "/mcp/a..", "/mcp/a/x//y", "/mcp/a//..%2fx", "/mcp/a/%25%32%65%25%32%65"],
)
def test_the_path_rule_refuses_every_spelling(path: str) -> None:
    with pytest.raises(PathRefused):
        confined_suffix("/mcp/a", path)


@pytest.mark.parametrize(
    ("route", "path", "suffix"),
    [
        ("/mcp/a", "/mcp/a", ""),
        ("/mcp/a", "/mcp/a/", "/"),
        ("/mcp/a", "/mcp/a/x/y%20z", "/x/y%20z"),
        ("/mcp/a", "/%6Dcp/a/x", "/x"),
        ("/mcp/a", "/mcp/a/x;v=1", "/x;v=1"),
        ("/", "/", ""),
        ("/", "/x/y", "/x/y"),
        ("/mcp/a", "/mcp/a/x/", "/x/"),
    ],
)
def test_the_path_rule_keeps_what_is_below_the_route(route: str, path: str, suffix: str) -> None:
    assert confined_suffix(route, path) == suffix


TOKEN_SPELLINGS = [
    "access_token",
    "access%5Ftoken",
    "access%5ftoken",
    "%61ccess_token",
    "%61%63%63%65%73%73%5F%74%6F%6B%65%6E",
    "ACCESS_TOKEN",
    "Access_Token",
    "access%255Ftoken",
    "access_token%20",
    "access_token%00",
    "access_token%00x",
    "%09access_token%7F",
    "x=1;access_token",
]


def test_a_token_in_the_query_never_reaches_the_downstream_in_any_spelling(
    start_gunicorn: Callable[..., GunicornProxy], echo_downstream: EchoServer
) -> None:
    proxy = start_gunicorn(MCP_SERVER_URL=echo_downstream.url + "/mcp")
    login = log_in(proxy.url, proxy.url + "/mcp")
    for spelling in TOKEN_SPELLINGS:
        status, body = raw_get(proxy.url, f"/mcp/x?a=1&{spelling}=leaked-{spelling}&b=%2F2", login.bearer)
        assert status == 200, (spelling, body)
        target = echo_downstream.last().target
        assert target == "/mcp/x?a=1&b=%2F2", (spelling, target)  # the rest of the query passes as sent
        assert "leaked" not in target


@pytest.mark.parametrize("spelling", TOKEN_SPELLINGS)
def test_query_token_removal_compares_decoded_names(spelling: str) -> None:
    assert query_without_tokens(f"{spelling}=t&q=a%20b") == "q=a%20b"
    assert query_without_tokens(f"q=1&{spelling}") == "q=1"


def test_query_token_removal_keeps_everything_else_as_sent() -> None:
    assert (
        query_without_tokens("q=a+b&token=x&my_access_token=y&access_tokens=z")
        == "q=a+b&token=x&my_access_token=y&access_tokens=z"
    )


def test_no_answer_sends_the_client_to_the_host_it_named(
    start_gunicorn: Callable[..., GunicornProxy], echo_downstream: EchoServer
) -> None:
    proxy = start_gunicorn(MCP_SERVER_URL=echo_downstream.url + "/mcp")
    login = log_in(proxy.url, proxy.url + "/mcp")
    count = len(echo_downstream.seen)
    paths = [
        "/mcp//x",
        "/mcp//evil.example/x",
        "//mcp",
        "/mcp/x//",
        "/mcp///",
        "/.well-known//oauth-authorization-server",
        "//.well-known/oauth-protected-resource/mcp",
        "/static//x",
        "/authorize/",
        "/token//",
        "//",
    ]
    for path in paths:
        for headers in ({"Host": "evil.example"}, {**login.bearer, "Host": "evil.example"}):
            host, port = proxy.url.split("//", 1)[1].split(":")
            connection = http.client.HTTPConnection(host, int(port), timeout=10)
            connection.putrequest("GET", path, skip_host=True)
            for name, value in headers.items():
                connection.putheader(name, value)
            connection.endheaders()
            response = connection.getresponse()
            body = response.read().decode(errors="replace")
            connection.close()
            assert not 300 <= response.status < 400, (path, response.status, response.getheader("Location"))
            assert "evil.example" not in body + str(response.getheaders()), (path, body)
            assert response.status < 500, (path, response.status, body)
    # With a valid token, `//` below the route is the path rule's 400, and nothing reached the downstream.
    status, body = raw_get(proxy.url, "/mcp//x", login.bearer)
    assert status == 400 and "invalid_request" in body and "empty segments" in body, body
    assert len(echo_downstream.seen) == count


def downstream_reading(path: str) -> str:
    """The most generous reading of a path any downstream might make: decoded until stable, `\\` as `/`, path
    parameters dropped, empty segments merged, dot segments resolved (also `..` with trailing dots and spaces)."""
    for _round in range(8):
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    resolved: list[str] = []
    for segment in path.replace("\\", "/").split("/"):
        segment = segment.split(";", 1)[0]
        dots = segment.strip(" ")
        if not segment or dots == ".":
            continue
        if dots and not dots.strip("."):  # `..`, `...`: up one
            if resolved:
                resolved.pop()
            continue
        resolved.append(segment)
    return "/" + "/".join(resolved)


PATH_PARTS = [
    "a",
    "x",
    ".",
    "..",
    "...",
    "%2e",
    "%2E",
    "%2f",
    "%2F",
    "%5c",
    "\\",
    "%25",
    "2e",
    "2f",
    ";",
    ";p=1",
    "%00",
    "/",
    "//",
    "%252e",
    "%252f",
    "%25252e",
    " ",
    "mcp-b",
]


@settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "400")), deadline=None)
@given(st.lists(st.sampled_from(PATH_PARTS), max_size=10).map(lambda parts: "/mcp/a/" + "".join(parts)))
def test_no_accepted_path_leaves_the_route_in_any_reading(path: str) -> None:
    try:
        suffix = confined_suffix("/mcp/a", path)
    except PathRefused:
        return
    reading = downstream_reading("/mcp-a" + suffix)
    assert reading == "/mcp-a" or reading.startswith("/mcp-a/"), (path, suffix, reading)
