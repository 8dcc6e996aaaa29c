"""Property-based: whatever body and Mcp-Method/Mcp-Name headers a client sends to a route with tool rules, a request
the gate lets through calls no denied tool in any reading of it (a parser where the last copy of a repeated key wins,
one where the first does, the SDK's own header decoding), and anything else gets the proxy's own answer."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from mcp.shared.inbound import decode_header_value as sdk_decode_header_value

from oauthproxy.downstream_credentials import Caller
from oauthproxy.proxy.tool_gate import Refusal, ToolGate, inspect_request
from oauthproxy.proxy.transport import DownstreamError
from oauthproxy.routes import Route
from oauthproxy.tool_policy import parse_tool_rules, tool_allowed
from tests.fuzzing import FUZZ

PROBLEMS: list[str] = []
POLICY = parse_tool_rules([{"deny": ["wait", "who*"]}, {"allow": ["progress", "m?t?o"]}], "tool_rules", PROBLEMS)
assert POLICY is not None and not PROBLEMS
ROUTE = Route("r", "/mcp", "http://127.0.0.1:9/mcp", "https://proxy.example/mcp", tool_policy=POLICY)
ALICE = Caller("alice", "alice@example.com", "Alice")
LIMIT = 4096

NAMES = st.sampled_from(
    ["progress"] * 4
    + ["météo", "mXtXo", "wait", "Wait", "wa\x00it", "wait ", "meteo", "=?base64?d2FpdA==?=", "who", "whoami", ""]
) | st.text(max_size=6)
METHODS = st.sampled_from(
    ["tools/call"] * 6 + ["tools/list", "ping", "Tools/Call", "tools/call ", "prompts/get"]
) | st.text(max_size=6)
IDS = st.integers(-3, 3) | st.sampled_from(["a", "", None]) | st.sampled_from([True, 1.5, [1], {"a": 1}])
SCALARS = st.none() | st.booleans() | st.integers(-3, 3) | NAMES


def members(pairs: list[tuple[str, str]]) -> str:
    return "{" + ",".join(f"{json.dumps(key)}:{value}" for key, value in pairs) + "}"


@st.composite
def message(draw: st.DrawFn) -> tuple[str, str, Any]:
    """A JSON-RPC message as text (mostly well-formed, sometimes with a key repeated, a value of another type, a
    member missing), with the method and params.name it was built from."""
    method, name = draw(METHODS), draw(NAMES)
    params = [("name", json.dumps(name, ensure_ascii=draw(st.booleans())))]
    mutation = draw(st.integers(0, 19))  # most messages are well-formed; a few are not, in one way each
    if mutation == 0:
        params.append(("name", json.dumps(draw(NAMES))))
    elif mutation == 1:
        params = [("name", json.dumps(draw(SCALARS)))]
    elif mutation == 2:
        params = []
    else:
        params.append(("arguments", "{}"))
    pairs = [("jsonrpc", '"2.0"'), ("method", json.dumps(method)), ("params", members(draw(st.permutations(params))))]
    if draw(st.integers(0, 3)):
        pairs.append(("id", json.dumps(draw(IDS if mutation == 3 else st.integers(0, 3) | st.just("x")))))
    if mutation == 4:
        pairs.append(("method", json.dumps(draw(METHODS))))
    elif mutation == 5:
        pairs.append(("params", "[]"))
    return members(draw(st.permutations(pairs))), method, name


@st.composite
def request(draw: st.DrawFn) -> tuple[bytes, str | None, str | None]:
    """A body and the Mcp-Method and Mcp-Name headers sent with it: none, mirroring the body (plain, base64, or
    altered), or anything."""
    text, method, name = draw(message())
    kind = draw(st.sampled_from(["single"] * 6 + ["batch", "batch", "bytes", "utf-16"]))
    if kind == "batch":
        others = [draw(message())[0] for _ in range(draw(st.integers(0, 3)))]
        body = ("[" + ",".join([*others, text]) + "]").encode()
    elif kind == "bytes":
        body = draw(st.binary(max_size=40))
    else:
        body = text.encode("utf-16" if kind == "utf-16" else "utf-8")
    headers = draw(st.sampled_from(["none", "mirror", "mirror", "base64", "altered", "random"]))
    if headers == "none":
        return body, None, None
    if headers in ("mirror", "base64", "altered"):
        method_header: str | None = method if draw(st.integers(0, 5)) else None
        name_header: str | None = (
            "=?base64?" + base64.b64encode(name.encode()).decode() + "?=" if headers == "base64" else name
        )
        if headers == "altered":
            name_header = draw(st.sampled_from([name.upper(), name.swapcase(), name + " ", name.replace("a", "%61")]))
        if draw(st.integers(0, 5)) == 0:
            name_header = None
        return body, method_header, name_header
    return body, draw(st.none() | METHODS), draw(st.none() | HEADER_VALUES)


HEADER_VALUES = (
    NAMES.filter(lambda value: value.isascii() and value.isprintable())
    | NAMES.map(lambda value: "=?base64?" + base64.b64encode(value.encode()).decode() + "?=")
    | st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=8)
)


def readings(body: bytes) -> list[Any]:
    """The body as a last-wins parser (Python's default) and as a first-wins one read it."""
    text = body.decode("utf-8")
    return [
        json.loads(text),
        json.loads(text, object_pairs_hook=lambda pairs: dict(reversed(pairs))),
    ]


@FUZZ
@given(sent=request(), http_method=st.sampled_from(["POST", "POST", "POST", "PUT", "GET"]))
def test_nothing_the_gate_lets_through_calls_a_denied_tool(
    sent: tuple[bytes, str | None, str | None], http_method: str
) -> None:
    body, method_header, name_header = sent
    environ = {"REQUEST_METHOD": http_method, "CONTENT_LENGTH": str(len(body))}
    if method_header is not None:
        environ["HTTP_MCP_METHOD"] = method_header
    if name_header is not None:
        environ["HTTP_MCP_NAME"] = name_header
    try:
        result = inspect_request(ROUTE, environ, io.BytesIO(body), ALICE, LIMIT)
    except DownstreamError as error:
        assert error.status == 413 and len(body) > LIMIT
        return
    if isinstance(result, Refusal):
        assert result.status in (200, 400, 403)
        json.dumps(result.document)  # an answer the client can read
        return
    if result is None or result.body is None:  # a GET or PUT without a body: nothing to read
        assert body == b"" and http_method != "POST"
        return
    assert isinstance(result, ToolGate) and result.body == body  # forwarded exactly as read
    for document in readings(body):
        messages = document if isinstance(document, list) else [document]
        for message in messages:
            if isinstance(message, dict) and message.get("method") == "tools/call":
                name = message["params"]["name"]
                assert tool_allowed(POLICY, name, ALICE), (body, name)
    if method_header is not None or name_header is not None:
        message = readings(body)[0]
        assert isinstance(message, dict), body  # headers come with a single message only
        if method_header is not None:
            assert message.get("method") == method_header
        if message.get("method") == "tools/call":
            assert sdk_decode_header_value(name_header) == message["params"]["name"]
