"""Tool rules at the MCP endpoint: which tool a request calls (its headers and its body, which must agree), the answer
to a call the route's policy denies, and `tools/list` answers without the tools it denies (JSON and event streams)."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from werkzeug.http import parse_options_header

from oauthproxy import audit, metrics
from oauthproxy.downstream_credentials import Caller
from oauthproxy.proxy.request_body import whole_body
from oauthproxy.proxy.transport import DownstreamError
from oauthproxy.routes import Route
from oauthproxy.tool_policy import ToolPolicy, filter_tools_list, tool_allowed

log = logging.getLogger(__name__)

#: On a route with tool rules a request's body is read whole before anything is forwarded, up to this size (or
#: MCP_MAX_BODY_BYTES when smaller): enough for any JSON-RPC message but a tool call carrying a large file.
POLICY_BODY_LIMIT = 1024 * 1024
#: The largest `tools/list` answer (a JSON body, or one event of a stream) read whole to be filtered.
RESPONSE_LIMIT = 16 * 1024 * 1024

# JSON-RPC 2.0 §5.1 error codes, and MCP's HeaderMismatch (2026-07-28, Streamable HTTP, "Server Validation").
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
HEADER_MISMATCH = -32020

#: 2026-07-28 Streamable HTTP, "Standard Request Headers": the body field `Mcp-Name` mirrors, per method.
NAME_PARAMETERS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
#: "Value Encoding": a value that is not plain header-safe ASCII travels as `=?base64?<UTF-8, base64>?=`.
_SENTINEL_START, _SENTINEL_END = "=?base64?", "?="
#: RFC 9110 §5.5 field values as the transport allows them unencoded: visible ASCII, space and tab.
_HEADER_SAFE = re.compile(r"[\x20-\x7e\t]*")
#: Where one server-sent event ends: a blank line, after any of the three line endings SSE allows.
_EVENT_END = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")


@dataclass(frozen=True)
class Refusal:
    """The client's answer to a request that never reaches the downstream: a JSON-RPC error response (or, for a
    batch, an array of them), its HTTP status, and a short reason for the metrics."""

    status: int
    document: Any
    reason: str


@dataclass(frozen=True)
class ToolGate:
    """A request on a route with tool rules that may go on: its body as read (None: nothing read, a GET), and
    what its answer needs, the ids of its `tools/list` requests (None: any `tools/list` answer, on a GET stream
    that may replay one)."""

    policy: ToolPolicy
    caller: Caller
    body: bytes | None
    tools_list_ids: frozenset[Any] | None

    @property
    def filters_answer(self) -> bool:
        return self.tools_list_ids is None or bool(self.tools_list_ids)

    def tools_list_filter(self) -> ToolsListFilter:
        return ToolsListFilter(self.policy, self.caller, self.tools_list_ids)


class _Refused(Exception):
    def __init__(self, status: int, code: int, message: str, request_id: Any = None, reason: str = "invalid_message"):
        super().__init__(message)
        self.refusal = Refusal(status, _error(request_id, code, message), reason)


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _error(request_id: Any, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


def _shown(value: Any, limit: int = 80) -> str:
    """A client-sent value quoted in a message: JSON's spelling (control characters escaped), cut short."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 4] + '..."'


# -- the request ----------------------------------------------------------------------------------


def inspect_request(
    route: Route, environ: dict[str, Any], stream: IO[bytes], caller: Caller, limit: int
) -> ToolGate | Refusal | None:
    """What a request on a route with tool rules may do: go on (a ToolGate), be answered here (a Refusal), or pass
    untouched (None: a DELETE, say, neither calls nor lists tools). Raises DownstreamError 413 for a body over
    `limit` and 400 for broken chunked framing, as request_body does."""
    policy = route.tool_policy
    assert policy is not None
    method = environ.get("REQUEST_METHOD", "")
    has_body = (
        environ.get("CONTENT_LENGTH", "") not in ("", "0")
        or "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    )
    if method != "POST" and not has_body:
        # A 2025-11-25 GET stream carries no tool call, but resuming a POST's stream (Last-Event-ID) can replay the
        # answer to a tools/list: its answers are filtered by their shape.
        return ToolGate(policy, caller, None, None) if method == "GET" else None
    too_large = DownstreamError(
        413,
        "request_too_large",
        f"the request body is larger than {limit} bytes: on this route the proxy reads each JSON-RPC message "
        "before forwarding it, to apply the route's tool rules",
    )
    try:
        check_body_encoding(environ)
    except _Refused as refused:
        log.info("route %s: request refused before forwarding: %s", route.name, refused)
        metrics.TOOL_POLICY_REFUSALS.labels(route.name, refused.refusal.reason).inc()
        return refused.refusal
    body = whole_body(environ, stream, limit, too_large)
    try:
        messages, batch = parse_messages(body)
        check_headers(environ, messages, batch)
    except _Refused as refused:
        log.info("route %s: request refused before forwarding: %s", route.name, refused)
        metrics.TOOL_POLICY_REFUSALS.labels(route.name, refused.refusal.reason).inc()
        return refused.refusal
    denied = [
        message
        for message in messages
        if message.get("method") == "tools/call" and not tool_allowed(policy, message["params"]["name"], caller)
    ]
    if denied:
        for message in denied:
            log.info(
                "route %s: tool %s refused for user %s by the route's tool rules",
                route.name,
                _shown(message["params"]["name"]),
                caller.user_id,
            )
            audit.record(
                "tool_call", route=route.name, tool=message["params"]["name"], outcome="denied", reason="tool_rules"
            )
        metrics.TOOL_POLICY_REFUSALS.labels(route.name, "tool_denied").inc()
        return denial(messages, denied, batch)
    ids = frozenset(message.get("id") for message in messages if message.get("method") == "tools/list")
    return ToolGate(policy, caller, body, ids)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return document


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _valid_id(value: Any) -> bool:
    # JSON-RPC 2.0 §4: a string, a number or null (a boolean is none of them, though Python's bool is an int).
    return value is None or isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool))


#: The spellings of UTF-8 a `charset` parameter may carry (the WHATWG encoding labels of UTF-8).
UTF8_LABELS = frozenset({"utf-8", "utf8", "unicode-1-1-utf-8", "unicode11utf8", "unicode20utf8", "x-unicode20utf8"})


def check_body_encoding(environ: dict[str, Any]) -> None:
    """The proxy reads the body as UTF-8 JSON (RFC 8259 §8.1); a downstream must read the same bytes the same way.

    Some do not: Express's body-parser decodes by the request's `charset` through iconv-lite, UTF-7 included, so
    `{"method":"tools+AC8-call"}` is no tool call to the proxy and `tools/call` to such a server. A body in another
    charset, or with a Content-Encoding (which a server may undo before parsing), is refused before it is read."""
    _mimetype, options = parse_options_header(environ.get("CONTENT_TYPE", ""))
    charset = options.get("charset")
    if charset is not None and charset.strip().lower() not in UTF8_LABELS:
        raise _Refused(
            415,
            INVALID_REQUEST,
            f"The request body's charset {_shown(charset)} is not UTF-8: on this route JSON-RPC messages are read as "
            "UTF-8 (RFC 8259 §8.1); send Content-Type: application/json.",
            reason="unsupported_encoding",
        )
    encoding = environ.get("HTTP_CONTENT_ENCODING", "").strip().lower()
    if encoding not in ("", "identity"):
        raise _Refused(
            415,
            INVALID_REQUEST,
            f"The request body is encoded ({_shown(encoding)}): on this route the proxy reads each JSON-RPC message "
            "before forwarding it; send it uncompressed.",
            reason="unsupported_encoding",
        )


def parse_messages(body: bytes) -> tuple[list[dict[str, Any]], bool]:
    """The JSON-RPC messages of a request body, and whether it was a batch; refused (400) when the proxy could read
    it otherwise than the downstream would: not UTF-8, not JSON, a key repeated (parsers differ on which copy wins),
    or a tool call without a tool name it can check."""
    if not body.strip():
        raise _Refused(
            400, PARSE_ERROR, "The request body is empty: a POST to an MCP endpoint carries a JSON-RPC message."
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise _Refused(400, PARSE_ERROR, "The request body is not UTF-8 text (RFC 8259 §8.1).") from None
    try:
        document = json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except _DuplicateKey as duplicate:
        raise _Refused(
            400,
            INVALID_REQUEST,
            f"The JSON-RPC message repeats the key {_shown(duplicate.key)}; send each key once.",
        ) from None
    except RecursionError:
        raise _Refused(400, PARSE_ERROR, "The request body's JSON is nested too deeply.") from None
    except ValueError as error:
        raise _Refused(400, PARSE_ERROR, f"The request body is not valid JSON: {error}.") from None
    batch = isinstance(document, list)
    messages = document if batch else [document]
    if not messages:
        raise _Refused(400, INVALID_REQUEST, "The batch is empty: it must hold at least one JSON-RPC message.")
    for message in messages:
        if not isinstance(message, dict):
            raise _Refused(400, INVALID_REQUEST, "A JSON-RPC message must be a JSON object.")
        request_id = message.get("id")
        if not _valid_id(request_id):
            raise _Refused(400, INVALID_REQUEST, "A JSON-RPC id must be a string, a number or null.")
        if "method" not in message:
            continue  # a response (to a server's request, up to 2025-11-25) calls nothing
        if not isinstance(message["method"], str):
            raise _Refused(400, INVALID_REQUEST, "A JSON-RPC method must be a string.", request_id)
        if message["method"] == "tools/call":
            params = message.get("params")
            if not isinstance(params, dict) or not isinstance(params.get("name"), str):
                raise _Refused(
                    400,
                    INVALID_PARAMS,
                    "A tools/call request needs params.name, the tool's name as a string.",
                    request_id,
                )
    return messages, batch


def decode_header_value(value: str) -> str | None:
    """An `Mcp-Name` value as the body would spell it: as sent when plain header-safe ASCII, decoded from the
    `=?base64?...?=` sentinel otherwise; None for a value no conforming client sends (other characters, broken or
    non-canonical base64, base64 of something other than UTF-8), which therefore matches no body."""
    if _HEADER_SAFE.fullmatch(value) is None:
        return None
    if not (
        len(value) >= len(_SENTINEL_START) + len(_SENTINEL_END)
        and value.startswith(_SENTINEL_START)
        and value.endswith(_SENTINEL_END)
    ):
        return value
    # Whatever starts and ends like the sentinel is one (clients must encode a plain value of that shape).
    payload = value[len(_SENTINEL_START) : -len(_SENTINEL_END)]
    try:
        decoded = base64.b64decode(payload, validate=True)
    except binascii.Error:
        return None
    if base64.b64encode(decoded).decode("ascii") != payload:
        return None  # non-canonical (stray bits): two spellings of one name
    try:
        return decoded.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _mismatch(message: str, request_id: Any = None) -> _Refused:
    # 2026-07-28 Streamable HTTP, "Server Validation": 400 with HeaderMismatch (-32020).
    return _Refused(400, HEADER_MISMATCH, f"Header mismatch: {message}.", request_id, reason="header_mismatch")


def check_headers(environ: dict[str, Any], messages: list[dict[str, Any]], batch: bool) -> None:
    """Refuse a request whose `Mcp-Method`/`Mcp-Name` headers (2026-07-28) disagree with its body: a downstream of
    an earlier version reads only the body, a component in between may route on the headers, and neither may be
    used to slip a tool call past the other. Values compare exactly (case-sensitive, as the transport says; only
    `Mcp-Name`'s base64 form is decoded, never percent-encoding). Requests without either header (earlier
    versions) are checked on their body alone."""
    method_header = environ.get("HTTP_MCP_METHOD")
    name_header = environ.get("HTTP_MCP_NAME")
    if method_header is None and name_header is None:
        return
    if batch:
        raise _mismatch("Mcp-Method and Mcp-Name describe one message, and this body is a batch")
    message = messages[0]
    request_id = message.get("id")
    method = message.get("method")
    if method_header is not None:
        if _HEADER_SAFE.fullmatch(method_header) is None:
            raise _mismatch("the Mcp-Method header contains characters a header value may not carry", request_id)
        if method_header != method:
            raise _mismatch(
                f"the Mcp-Method header {_shown(method_header)} does not match the body's method {_shown(method)}",
                request_id,
            )
    name_key = NAME_PARAMETERS.get(method) if isinstance(method, str) else None
    params = message.get("params")
    body_name = params.get(name_key) if name_key is not None and isinstance(params, dict) else None
    if name_header is not None:
        decoded = decode_header_value(name_header)
        if decoded is None:
            raise _mismatch("the Mcp-Name header is neither plain ASCII nor a valid =?base64?...?= value", request_id)
        if name_key is None:
            raise _mismatch(
                f"the Mcp-Name header names a tool, prompt or resource, and the body's method {_shown(method)} "
                "takes none",
                request_id,
            )
        if decoded != body_name:
            raise _mismatch(
                f"the Mcp-Name header {_shown(decoded)} does not match the body's params.{name_key} "
                f"{_shown(body_name)}",
                request_id,
            )
    elif method == "tools/call":
        raise _mismatch("a tools/call request with Mcp-Method must name its tool in Mcp-Name too", request_id)


def denial(messages: list[dict[str, Any]], denied: list[dict[str, Any]], batch: bool) -> Refusal:
    """The answer to a request calling a tool the policy denies, which the downstream never sees.

    MCP 2025-11-25, server/tools "Error Handling": an unknown tool is a protocol error, a JSON-RPC error with code
    -32602, answered with HTTP 200 like any JSON-RPC response (clients of every version read it; the SDKs raise it
    with its message, and hosts show that message). To this caller the tool is unknown: tools/list does not show it.
    A batch (up to 2025-03-26) with a denied call is refused whole, every request in it answered with an error:
    answering per id would split the batch and merge the downstream's answer with ours, for a form that protocol
    versions since 2025-06-18 no longer have.
    """

    def refused(message: dict[str, Any]) -> dict[str, Any]:
        name = message["params"]["name"]
        return _error(
            message.get("id"),
            INVALID_PARAMS,
            f"Tool {_shown(name)} is not allowed for your account on this MCP server; it was not run.",
        )

    if not batch:
        (message,) = messages
        # A notification has no answer to carry the error (2026-07-28: refuse it with an HTTP error status).
        return Refusal(200 if "id" in message else 403, refused(message), "tool_denied")
    first = denied[0]["params"]["name"]
    denied_ids = {id(message) for message in denied}
    answers = [
        refused(message)
        if id(message) in denied_ids
        else _error(
            message["id"],
            INVALID_REQUEST,
            f"Not run: this batch also calls the tool {_shown(first)}, which is not allowed for your account; "
            "send the other requests without it.",
        )
        for message in messages
        if "id" in message and "method" in message
    ]
    if not answers:
        return Refusal(403, refused(denied[0]), "tool_denied")
    return Refusal(200, answers, "tool_denied")


# -- the answer -----------------------------------------------------------------------------------


class ToolsListFilter:
    """Removes the tools a caller may not use from `tools/list` answers: JSON-RPC responses whose id is one of the
    request's `tools/list` ids (or, with `ids` None, any response whose result carries a `tools` list)."""

    def __init__(self, policy: ToolPolicy, caller: Caller, ids: frozenset[Any] | None):
        self.policy, self.caller, self.ids = policy, caller, ids

    def message(self, document: Any) -> Any | None:
        """`document` (a JSON-RPC message, or a batch of them) with denied tools removed; None when unchanged."""
        if isinstance(document, list):
            filtered = [self.message(item) for item in document]
            if all(item is None for item in filtered):
                return None
            return [new if new is not None else old for new, old in zip(filtered, document, strict=True)]
        if not isinstance(document, dict) or "method" in document:
            return None
        if self.ids is not None:
            request_id = document.get("id")
            if not _valid_id(request_id) or request_id not in self.ids:
                return None
        result = document.get("result")
        if not isinstance(result, dict):
            return None
        tools = result.get("tools")
        if not isinstance(tools, list):
            return None
        kept = filter_tools_list(self.policy, tools, self.caller)
        if kept is tools:
            return None
        return {**document, "result": {**result, "tools": kept}}

    def json_body(self, data: bytes) -> bytes | None:
        """A JSON body with denied tools removed; None when there is nothing to change (or it is not JSON: then the
        client cannot read it either)."""
        if b"tools" not in data:
            return None
        try:
            document = json.loads(data)
        except (ValueError, RecursionError):
            return None
        filtered = self.message(document)
        if filtered is None:
            return None
        return json.dumps(filtered, ensure_ascii=False, separators=(",", ":")).encode()

    def event(self, event: bytes) -> bytes | None:
        """One server-sent event (its lines and the blank line ending it) with denied tools removed from its data;
        None when unchanged. Fields other than `data` keep their lines; the data becomes one line."""
        if b"tools" not in event:
            return None
        lines = _LINE_END.split(event)
        ending = _LINE_END.search(event)
        newline = ending.group(0) if ending else b"\n"
        data: list[bytes] = []
        kind = b"message"
        for line in lines:
            name, _, value = line.partition(b":")
            value = value[1:] if value.startswith(b" ") else value
            if name == b"data":
                data.append(value)
            elif name == b"event":
                kind = value
        if kind != b"message" or not data:
            return None
        filtered = self.json_body(b"\n".join(data))
        if filtered is None:
            return None
        kept: list[bytes] = []
        for line in lines:
            if line.partition(b":")[0] == b"data":
                if filtered is not None:
                    kept.append(b"data: " + filtered)
                    filtered = None
            elif line:
                kept.append(line)
        return newline.join(kept) + newline + newline

    def events(self, chunks: Iterable[bytes], on_oversized: Callable[[], Any] | None = None) -> Iterator[bytes]:
        """An event stream, event by event: each event leaves as soon as its blank line has arrived (filtered when
        it answers a `tools/list`); bytes between events are never held. An event growing past RESPONSE_LIMIT
        cannot be filtered: the stream is cut there (`on_oversized` cuts the client's connection)."""
        buffer = bytearray()
        for chunk in chunks:
            # A blank line is at most 4 bytes (CRLF CRLF): the search starts where one could have begun.
            scan = max(0, len(buffer) - 3)
            buffer += chunk
            start = 0
            while (end := _EVENT_END.search(buffer, scan)) is not None:
                event = bytes(buffer[start : end.end()])
                yield self.event(event) or event
                start = scan = end.end()
            if start:
                del buffer[:start]
            if len(buffer) > RESPONSE_LIMIT:
                log.warning(
                    "an event of over %d bytes on a route with tool rules cannot be filtered: stream cut",
                    RESPONSE_LIMIT,
                )
                if on_oversized is not None:
                    on_oversized()
                return
        if buffer:
            event = bytes(buffer)
            yield self.event(event) or event  # an unfinished last event: clients drop it, but never unfiltered


class FilteredEvents:
    """A streamed response body passed through `ToolsListFilter.events`; `close()` reaches the body underneath, so
    the downstream request still ends with the client's."""

    def __init__(self, body: Any, tools_filter: ToolsListFilter, on_oversized: Callable[[], Any] | None = None):
        self.body, self.tools_filter, self.on_oversized = body, tools_filter, on_oversized

    def __iter__(self) -> Iterator[bytes]:
        return self.tools_filter.events(self.body, self.on_oversized)

    def close(self) -> None:
        self.body.close()
