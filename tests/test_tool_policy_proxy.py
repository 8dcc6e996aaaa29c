"""Per-tool policy end to end: gunicorn, a real MCP server (event-stream and JSON answers) and the MCP SDK client.

Alice may use `progress` and `météo`, Bob (example.org) every tool; `wait` and `whoami` are hidden from Alice's
tools/list and refused when she calls them, before the downstream runs anything. Requests the proxy cannot check,
or whose Mcp-Method/Mcp-Name headers disagree with their body, are refused without reaching the downstream.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
import pytest
import requests
from mcp import Client, MCPError
from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientMetadata

from tests.flows import Browser, MemoryStorage, query_of
from tests.proxy_fixtures import EchoServer, GunicornProxy, Login, McpDownstream, launch_mcp_downstream, log_in
from tests.support.databases import SQLITE_ONLY
from tests.support.servers import serving

REDIRECT_URI = "http://127.0.0.1:9/sdk-callback"  # never contacted: the browser stops at this prefix
MCP_HEADERS = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
ALICE_TOOLS = {"progress", "météo"}
ALL_TOOLS = {"progress", "météo", "wait", "whoami"}

RULES = """
[[routes.tool_rules]]          # nobody here is in admins (alice is in eng, staff): no one
allow = ["wait"]
groups = ["admins"]

[[routes.tool_rules]]          # bob@example.org may use everything
allow = ["*"]
email_domains = ["example.org"]

[[routes.tool_rules]]
deny = ["wait", "who*"]

[[routes.tool_rules]]          # what no rule names is denied
allow = ["progress", "m?t?o"]
"""


@dataclass
class PolicySetup:
    proxy: GunicornProxy
    sse: McpDownstream  # answers POSTs with event streams
    json: McpDownstream  # answers POSTs with one JSON body
    echo: EchoServer  # records every request that reaches it


@pytest.fixture(scope="module")
def downstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[McpDownstream, McpDownstream, EchoServer]]:
    log_dir = tmp_path_factory.mktemp("policy-downstreams")
    sse = launch_mcp_downstream(log_dir, "--unicode-tool")
    json_answers = launch_mcp_downstream(log_dir, "--unicode-tool", "--json-response")
    try:
        with serving(EchoServer()) as echo:
            yield sse, json_answers, echo
    finally:
        sse.stop()
        json_answers.stop()


@pytest.fixture(scope="module")
def setup(
    start_gunicorn: Callable[..., GunicornProxy],
    downstreams: tuple[McpDownstream, McpDownstream, EchoServer],
    tmp_path_factory: pytest.TempPathFactory,
) -> PolicySetup:
    sse, json_answers, echo = downstreams
    routes = tmp_path_factory.mktemp("policy-routes") / "routes.toml"
    routes.write_text(
        "\n".join(
            [
                f'[[routes]]\nname = "sse"\npath = "/mcp/sse"\nurl = "{sse.url}"\n{RULES}',
                f'[[routes]]\nname = "json"\npath = "/mcp/json"\nurl = "{json_answers.url}"\n{RULES}',
                f'[[routes]]\nname = "echo"\npath = "/mcp/echo"\nurl = "{echo.url}/mcp"\n{RULES}',
                f'[[routes]]\nname = "open"\npath = "/mcp/open"\nurl = "{sse.url}"\n',
            ]
        )
    )
    proxy = start_gunicorn(MCP_SERVER_URL="", MCP_ROUTES_FILE=str(routes), WEB_CONCURRENCY="2")
    return PolicySetup(proxy, sse, json_answers, echo)


# -- the SDK client ----------------------------------------------------------------------------------


class BrowserAuthorization:
    def __init__(self, proxy_url: str, login_hint: str):
        self.browser = Browser(proxy_url, login_hint=login_hint)
        self.result: dict[str, str] = {}

    async def redirect_handler(self, authorization_url: str) -> None:
        final = await asyncio.to_thread(self.browser.authorize, authorization_url, REDIRECT_URI)
        self.result = query_of(final)

    async def callback_handler(self) -> AuthorizationCodeResult:
        return AuthorizationCodeResult(
            code=self.result["code"], state=self.result.get("state"), iss=self.result.get("iss")
        )


@dataclass
class Session:
    tools: set[str]
    results: dict[str, Any]  # tool name -> the CallToolResult, or the MCPError raised


def sdk_session(proxy_url: str, resource_url: str, user: str, mode: str, calls: dict[str, dict[str, Any]]) -> Session:
    """Sign in as `user` with the SDK client, list the tools, then call each of `calls` (name -> arguments)."""
    browser = BrowserAuthorization(proxy_url, user)
    provider = OAuthClientProvider(
        resource_url,
        OAuthClientMetadata(
            client_name=f"policy test {user}",
            redirect_uris=[REDIRECT_URI],
            grant_types=["authorization_code", "refresh_token"],
            response_types=["code"],
            token_endpoint_auth_method="none",
        ),
        MemoryStorage(),
        redirect_handler=browser.redirect_handler,
        callback_handler=browser.callback_handler,
    )

    async def scenario() -> Session:
        async with (
            httpx2.AsyncClient(auth=provider, timeout=30) as http,
            Client(streamable_http_client(resource_url, http_client=http), mode=mode) as client,
        ):
            tools = {tool.name for tool in (await client.list_tools()).tools}
            results: dict[str, Any] = {}
            for name, arguments in calls.items():
                try:
                    results[name] = await client.call_tool(name, arguments)
                except MCPError as error:
                    results[name] = error
            return Session(tools, results)

    return anyio.run(scenario)


@pytest.mark.parametrize("mode", ["auto", "legacy"])
@pytest.mark.parametrize("answers", ["sse", "json"])
def test_the_sdk_client_sees_and_runs_only_the_tools_its_user_may_use(
    setup: PolicySetup, answers: str, mode: str
) -> None:
    downstream = setup.sse if answers == "sse" else setup.json
    resource = f"{setup.proxy.url}/mcp/{answers}"
    label = secrets.token_hex(6)
    alice = sdk_session(
        setup.proxy.url,
        resource,
        "alice",
        mode,
        {
            "progress": {"steps": 2, "pause": 0.05},
            "météo": {"city": label},  # auto mode: Mcp-Name carries it base64-encoded, and it must match the body
            "wait": {"seconds": 0.1, "label": label},
            "whoami": {},
        },
    )
    assert alice.tools == ALICE_TOOLS  # wait and whoami are not offered at all
    assert alice.results["progress"].is_error is False
    assert alice.results["progress"].structured_content == {"result": "finished 2 steps"}
    assert alice.results["météo"].structured_content == {"result": f"sunny in {label}"}
    for name in ("wait", "whoami"):
        error = alice.results[name]
        # What the client shows: a JSON-RPC error (-32602, as for an unknown tool) that says why.
        assert isinstance(error, MCPError), error
        assert error.code == -32602
        assert error.message == f'Tool "{name}" is not allowed for your account on this MCP server; it was not run.'
    # Refused before the downstream: the tool never started.
    events = downstream.events()
    assert not [e for e in events if e["event"] == "wait_started" and e.get("label") == label]
    assert [e for e in events if e["event"] == "weather_started" and e.get("city") == label]

    bob = sdk_session(setup.proxy.url, resource, "bob", mode, {"wait": {"seconds": 0.05, "label": label + "-bob"}})
    assert bob.tools == ALL_TOOLS
    assert bob.results["wait"].is_error is False
    assert [e for e in downstream.events() if e["event"] == "wait_finished" and e.get("label") == label + "-bob"]


@SQLITE_ONLY
def test_a_route_without_tool_rules_passes_every_tool(setup: PolicySetup) -> None:
    alice = sdk_session(setup.proxy.url, setup.proxy.url + "/mcp/open", "alice", "auto", {"whoami": {}})
    assert alice.tools == ALL_TOOLS
    assert alice.results["whoami"].is_error is False


# -- raw requests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def alice(setup: PolicySetup) -> dict[str, Login]:
    """Alice's tokens per route (a login is per resource)."""
    return {name: log_in(setup.proxy.url, f"{setup.proxy.url}/mcp/{name}") for name in ("echo", "sse", "json")}


def call(name: str, request_id: Any = 1, **params: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "method": "tools/call", "params": {"name": name, **params}}


def post(setup: PolicySetup, login: Login, route: str, body: bytes | str | Any, **headers: str) -> requests.Response:
    data = body if isinstance(body, bytes | str | Iterator) else json.dumps(body)
    return requests.post(
        f"{setup.proxy.url}/mcp/{route}", data=data, headers={**MCP_HEADERS, **login.bearer, **headers}, timeout=30
    )


def refused_before_the_downstream(
    setup: PolicySetup, login: Login, body: bytes | str | Any, **headers: str
) -> requests.Response:
    """POST `body` to the echo route and check that the proxy answered it itself."""
    seen = len(setup.echo.seen)
    response = post(setup, login, "echo", body, **headers)
    assert response.headers["Content-Type"].startswith("application/json"), response.text
    assert len(setup.echo.seen) == seen, "the request reached the downstream"
    return response


def jsonrpc_error(response: requests.Response) -> dict[str, Any]:
    body = response.json()
    assert body["jsonrpc"] == "2.0" and set(body) == {"jsonrpc", "id", "error"}, body
    return body["error"]


@SQLITE_ONLY
def test_an_allowed_call_and_other_methods_pass_through(setup: PolicySetup, alice: dict[str, Login]) -> None:
    seen = len(setup.echo.seen)
    response = post(
        setup, alice["echo"], "echo", call("progress"), **{"Mcp-Method": "tools/call", "Mcp-Name": "progress"}
    )
    assert response.status_code == 200, response.text
    assert json.loads(response.json()["body"]) == call("progress")  # forwarded as sent
    assert response.json()["method"] == "POST"
    for body in ({"jsonrpc": "2.0", "id": 2, "method": "ping"}, {"jsonrpc": "2.0", "id": 3, "result": {}}):
        assert post(setup, alice["echo"], "echo", body).status_code == 200
    deleted = requests.delete(f"{setup.proxy.url}/mcp/echo", headers=alice["echo"].bearer, timeout=10)
    assert deleted.status_code == 200
    assert len(setup.echo.seen) == seen + 4


@SQLITE_ONLY
def test_a_denied_call_is_answered_with_the_request_id(setup: PolicySetup, alice: dict[str, Login]) -> None:
    for request_id in (7, "req-7", None):
        response = refused_before_the_downstream(setup, alice["echo"], call("wait", request_id))
        assert response.status_code == 200
        assert response.json() == {
            "jsonrpc": "2.0",
            "id": request_id,
            "error": {
                "code": -32602,
                "message": 'Tool "wait" is not allowed for your account on this MCP server; it was not run.',
            },
        }
        assert response.headers["Cache-Control"] == "no-store"
    # A notification calling a denied tool has no id to answer: an HTTP error status (2026-07-28 transport).
    notification = {"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "wait"}}
    response = refused_before_the_downstream(setup, alice["echo"], notification)
    assert response.status_code == 403 and jsonrpc_error(response)["code"] == -32602
    # Names compare exactly: neither case nor a glob character opens a denied tool, and no rule names these.
    for name in ("WAIT", "Progress", "progress ", "prog*", "who", ""):
        response = refused_before_the_downstream(setup, alice["echo"], call(name))
        assert jsonrpc_error(response)["code"] == -32602, name
    metrics = requests.get(f"{setup.proxy.url}/metrics", timeout=10).text
    counted = [line for line in metrics.splitlines() if line.startswith("oauthproxy_tool_policy_refusals_total{")]
    assert any('reason="tool_denied"' in line and 'route="echo"' in line for line in counted), counted


@SQLITE_ONLY
def test_a_batch_with_a_denied_call_is_refused_whole(setup: PolicySetup, alice: dict[str, Login]) -> None:
    batch = [
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        call("wait", 2),
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        call("progress", 3),
    ]
    response = refused_before_the_downstream(setup, alice["echo"], batch)
    assert response.status_code == 200
    answers = response.json()
    assert [answer["id"] for answer in answers] == [1, 2, 3]  # every request answered, the notification not
    assert answers[1]["error"]["code"] == -32602
    assert answers[0]["error"]["code"] == answers[2]["error"]["code"] == -32600
    assert 'also calls the tool "wait"' in answers[0]["error"]["message"]
    # A batch of allowed messages goes through.
    seen = len(setup.echo.seen)
    allowed = [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, call("progress", 2)]
    assert post(setup, alice["echo"], "echo", allowed).status_code == 200
    assert len(setup.echo.seen) == seen + 1


BAD_BODIES = [
    (b"", 400, -32700, "empty"),
    (b"   \r\n", 400, -32700, "empty"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "wait"}', 400, -32700, "not valid JSON"),
    (b"{'method': 'tools/call'}", 400, -32700, "not valid JSON"),
    (b'{"jsonrpc": "2.0", "id": NaN, "method": "ping"}', 400, -32700, "not valid JSON"),
    (b"\xef\xbb\xbf" + json.dumps(call("wait")).encode(), 400, -32700, "not valid JSON"),  # a byte-order mark
    (json.dumps(call("wait")).encode("utf-16"), 400, -32700, "not UTF-8"),
    (b'{"id": 1, "method": "tools/call", "params": {"name": "caf\xe9"}}', 400, -32700, "not UTF-8"),
    (b"[" * 100_000 + b"]" * 100_000, 400, -32700, "nested too deeply"),
    (b"[]", 400, -32600, "batch is empty"),
    (b'"tools/call"', 400, -32600, "must be a JSON object"),
    (b"[1, 2]", 400, -32600, "must be a JSON object"),
    (b'{"jsonrpc": "2.0", "id": {"a": 1}, "method": "ping"}', 400, -32600, "id must be"),
    (b'{"jsonrpc": "2.0", "id": true, "method": "ping"}', 400, -32600, "id must be"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": 5}', 400, -32600, "method must be a string"),
    # Parsers differ on which copy of a key wins; the downstream must not read another message than we did.
    (
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/list", "method": "tools/call", "params": {"name": "wait"}}',
        400,
        -32600,
        'repeats the key "method"',
    ),
    (
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "progress", "name": "wait"}}',
        400,
        -32600,
        'repeats the key "name"',
    ),
    (json.dumps(call(5)).encode(), 400, -32602, "params.name"),
    (json.dumps(call(["wait"])).encode(), 400, -32602, "params.name"),
    (json.dumps(call(None)).encode(), 400, -32602, "params.name"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call"}', 400, -32602, "params.name"),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": ["wait"]}', 400, -32602, "params.name"),
    (json.dumps([call("progress"), call({"n": "wait"}, 2)]).encode(), 400, -32602, "params.name"),
]


@SQLITE_ONLY
@pytest.mark.parametrize(("body", "status", "code", "message"), BAD_BODIES)
def test_bodies_the_proxy_cannot_check_are_refused(
    setup: PolicySetup, alice: dict[str, Login], body: bytes, status: int, code: int, message: str
) -> None:
    response = refused_before_the_downstream(setup, alice["echo"], body)
    assert response.status_code == status, response.text
    error = jsonrpc_error(response)
    assert error["code"] == code and message in error["message"], error


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("headers", "message"),
    [
        # Express's body-parser decodes by charset through iconv-lite: in UTF-7 this is tools/call of "wait", which
        # the proxy (reading UTF-8) would take for a method it does not gate.
        ({"Content-Type": "application/json; charset=utf-7"}, 'charset "utf-7" is not UTF-8'),
        ({"Content-Type": 'application/json; charset="UTF-7"'}, "is not UTF-8"),
        ({"Content-Type": "application/json; charset=utf-16"}, "is not UTF-8"),
        ({"Content-Type": "application/json; charset=latin1"}, "is not UTF-8"),
        ({"Content-Type": "application/json", "Content-Encoding": "gzip"}, 'encoded ("gzip")'),
        ({"Content-Type": "application/json", "Content-Encoding": "x-anything"}, "send it uncompressed"),
    ],
)
def test_bodies_in_another_charset_or_encoding_are_refused(
    setup: PolicySetup, alice: dict[str, Login], headers: dict[str, str], message: str
) -> None:
    body = b'{"jsonrpc":"2.0","id":1,"method":"tools+AC8-call","params":{"name":"wait","arguments":{}}}'
    response = refused_before_the_downstream(setup, alice["echo"], body, **headers)
    assert response.status_code == 415, response.text
    assert message in jsonrpc_error(response)["message"]


@SQLITE_ONLY
def test_utf8_spelled_any_way_passes(setup: PolicySetup, alice: dict[str, Login]) -> None:
    for content_type in ("application/json; charset=utf-8", "application/json; charset=UTF8", "application/json"):
        seen = len(setup.echo.seen)
        response = post(setup, alice["echo"], "echo", call("progress"), **{"Content-Type": content_type})
        assert response.status_code == 200, (content_type, response.text)
        assert len(setup.echo.seen) == seen + 1


MISMATCHES = [
    # (headers, body): each disagrees, so neither a router reading headers nor a server reading the body is fooled.
    ({"Mcp-Method": "tools/list"}, call("wait")),
    ({"Mcp-Method": "tools/list", "Mcp-Name": "wait"}, call("wait")),
    ({"Mcp-Method": "tools/call", "Mcp-Name": "progress"}, call("wait")),
    ({"Mcp-Method": "tools/call", "Mcp-Name": "wait"}, call("progress")),
    ({"Mcp-Method": "tools/call"}, call("progress")),  # 2026-07-28 requires Mcp-Name with tools/call
    ({"Mcp-Name": "wait"}, call("progress")),
    ({"Mcp-Name": "progress"}, {"jsonrpc": "2.0", "id": 1, "method": "ping"}),
    ({"Mcp-Method": "Tools/Call", "Mcp-Name": "progress"}, call("progress")),  # values compare case-sensitively
    ({"Mcp-Method": "tools/call", "Mcp-Name": "Progress"}, call("progress")),
    ({"Mcp-Method": "tools%2Fcall", "Mcp-Name": "progress"}, call("progress")),  # never percent-decoded
    ({"Mcp-Method": "tools/call", "Mcp-Name": "pro%67ress"}, call("progress")),
    ({"Mcp-Method": "tools/call", "Mcp-Name": "pro%67ress"}, call("pro%67ress")),  # matches, but no rule allows it
    ({"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?d2FpdA==?="}, call("progress")),  # base64 of "wait"
    ({"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?cHJvZ3Jlc3M=?="}, call("wait")),  # base64 of "progress"
    ({"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?cHJvZ3Jlc3N=?="}, call("progress")),  # non-canonical
    ({"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?cHJvZ3Jlc3M?="}, call("progress")),  # padding missing
    ({"Mcp-Method": "tools/call", "Mcp-Name": "=?BASE64?cHJvZ3Jlc3M=?="}, call("progress")),  # sentinel is lowercase
    ({"Mcp-Method": "tools/call", "Mcp-Name": "=?base64?/w==?="}, call("\ufffd")),  # base64 of a non-UTF-8 byte
    ({"Mcp-Method": "tools/list"}, [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"}]),  # a batch
]


@SQLITE_ONLY
@pytest.mark.parametrize(("headers", "body"), MISMATCHES)
def test_headers_that_disagree_with_the_body_are_refused(
    setup: PolicySetup, alice: dict[str, Login], headers: dict[str, str], body: Any
) -> None:
    response = refused_before_the_downstream(setup, alice["echo"], body, **headers)
    if body == call("pro%67ress"):
        assert response.status_code == 200 and jsonrpc_error(response)["code"] == -32602
        return
    assert response.status_code == 400, response.text
    error = jsonrpc_error(response)
    assert error["code"] == -32020 and error["message"].startswith("Header mismatch: "), error


def raw_request(setup: PolicySetup, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    host, port = setup.proxy.url.split("//", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall(head + body)
        connection.shutdown(socket.SHUT_WR)
        response = b""
        while data := connection.recv(65536):
            response += data
    status = int(response.split(b" ", 2)[1])
    return status, response


@SQLITE_ONLY
def test_header_values_outside_ascii_and_repeated_headers_are_refused(
    setup: PolicySetup, alice: dict[str, Login]
) -> None:
    body = json.dumps(call("m\u00e9t\u00e9o")).encode()
    token = alice["echo"].access_token.encode()
    for extra in (
        "Mcp-Name: météo\r\n".encode(),  # raw UTF-8 in a header: must travel base64-encoded
        "Mcp-Name: m\xe9t\xe9o\r\n".encode("latin-1"),  # the same name in Latin-1 bytes
        b"Mcp-Name: progress\r\nMcp-Name: m\xc3\xa9t\xc3\xa9o\r\n",
        b"Mcp-Method: tools/call\r\nMcp-Method: tools/list\r\n",
    ):
        head = (
            b"POST /mcp/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + token + b"\r\n"
            b"Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n" + extra + b"\r\n"
        )
        seen = len(setup.echo.seen)
        status, response = raw_request(setup, head, body)
        assert status == 400, response
        assert b'"code":-32020' in response.replace(b" ", b""), response
        assert len(setup.echo.seen) == seen


@SQLITE_ONLY
def test_bodies_over_the_inspection_limit_are_refused(setup: PolicySetup, alice: dict[str, Login]) -> None:
    padding = "x" * (1024 * 1024)
    large = json.dumps(call("progress", arguments={"padding": padding})).encode()
    response = refused_before_the_downstream(setup, alice["echo"], large)
    assert response.status_code == 413 and response.json()["error"] == "request_too_large"
    assert "reads each JSON-RPC message before forwarding it" in response.json()["error_description"]

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(large), 65536):
            yield large[start : start + 65536]

    response = refused_before_the_downstream(setup, alice["echo"], chunks())
    assert response.status_code == 413
    # Just under the limit, chunked, goes through whole, with a Content-Length.
    fits = json.dumps(call("progress", arguments={"padding": "x" * 1000_000})).encode()
    seen = len(setup.echo.seen)
    response = post(setup, alice["echo"], "echo", iter([fits[:70000], fits[70000:]]))
    assert response.status_code == 200, response.text
    assert len(setup.echo.seen) == seen + 1 and setup.echo.seen[-1].body == fits
    assert setup.echo.seen[-1].header("Content-Length") == str(len(fits))


@SQLITE_ONLY
def test_answers_are_filtered_as_json_and_as_events(setup: PolicySetup, alice: dict[str, Login]) -> None:
    """tools/list by hand: a 2026-07-28 request answered with one JSON body, and a 2025-11-25 session's answered
    with an event stream."""
    meta = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    body = {"jsonrpc": "2.0", "id": "list-1", "method": "tools/list", "params": {"_meta": meta}}
    answered = post(
        setup, alice["json"], "json", body, **{"Mcp-Method": "tools/list", "MCP-Protocol-Version": "2026-07-28"}
    )
    assert answered.status_code == 200, answered.text
    assert answered.headers["Content-Type"].startswith("application/json")
    assert int(answered.headers["Content-Length"]) == len(answered.content)
    assert {tool["name"] for tool in answered.json()["result"]["tools"]} == ALICE_TOOLS

    initialize = {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "raw", "version": "1"}},
    }
    opened = post(setup, alice["sse"], "sse", initialize)
    assert opened.status_code == 200, opened.text
    session = {"Mcp-Session-Id": opened.headers["Mcp-Session-Id"], "MCP-Protocol-Version": "2025-11-25"}
    initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
    assert post(setup, alice["sse"], "sse", initialized, **session).status_code == 202
    streamed = post(setup, alice["sse"], "sse", {"jsonrpc": "2.0", "id": "list-2", "method": "tools/list"}, **session)
    assert streamed.status_code == 200, streamed.text
    assert streamed.headers["Content-Type"].startswith("text/event-stream")
    data = [line[5:].strip() for line in streamed.content.decode().splitlines() if line.startswith("data:")]
    (answer,) = [json.loads(item) for item in data if item and json.loads(item).get("id") == "list-2"]
    assert {tool["name"] for tool in answer["result"]["tools"]} == ALICE_TOOLS


@SQLITE_ONLY
def test_event_streams_still_stream_event_by_event(setup: PolicySetup, alice: dict[str, Login]) -> None:
    """A GET stream on a route with tool rules: every event passes unchanged, each as soon as it is sent."""
    started = time.monotonic()
    arrivals = []
    with requests.get(
        f"{setup.proxy.url}/mcp/echo/sse?events=4&pause=0.4",
        headers={**alice["echo"].bearer, "Accept": "text/event-stream"},
        stream=True,
        timeout=30,
    ) as response:
        assert response.status_code == 200
        text = b""
        for chunk in response.iter_content(chunk_size=None):
            text += chunk
            if b"data: event" in chunk:
                arrivals.append(time.monotonic() - started)
    assert text == b": stream open\n\n" + b"".join(f"id: {n}\ndata: event {n}\n\n".encode() for n in range(4))
    assert len(arrivals) == 4 and all(later - earlier > 0.25 for earlier, later in itertools.pairwise(arrivals)), (
        arrivals
    )
