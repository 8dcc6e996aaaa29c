"""A real MCP server (the `mcp` SDK under uvicorn) with the tools the MCP conformance suite's server mode calls.

The interop tests put it behind the proxy and run the suite's streaming scenarios through the proxy: progress,
logging, sampling and elicitation (server-to-client requests on the POST's SSE stream), several concurrent SSE
streams, and SSE polling (the server closes a stream mid-call and the client resumes with `Last-Event-ID`).
Tool names, arguments and behaviour follow each scenario's "Server Implementation Requirements".

Run: `python -m tests.interop.conformance_server PORT`. Prints `READY <port>` once listening on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import warnings
from itertools import count
from typing import Any

import anyio
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.streamable_http import EventCallback, EventMessage, EventStore
from mcp.types import EmptyResult, JSONRPCMessage, SamplingMessage, SetLevelRequestParams, TextContent

# The 2026-07-28 revision deprecates logging, sampling and form elicitation on this transport; the scenarios
# run at 2025-11-25, where they are current.
warnings.simplefilter("ignore")

server = MCPServer("oauthproxy-conformance-downstream")


class MemoryEventStore(EventStore):
    """Keeps every SSE event so a client that lost its stream can resume after `Last-Event-ID` (SEP-1699)."""

    def __init__(self) -> None:
        self._ids = count(1)
        self._events: list[tuple[str, str, JSONRPCMessage | None]] = []  # (event id, stream id, message)

    async def store_event(self, stream_id: str, message: JSONRPCMessage | None) -> str:
        event_id = str(next(self._ids))
        self._events.append((event_id, stream_id, message))
        return event_id

    async def replay_events_after(self, last_event_id: str, send_callback: EventCallback) -> str | None:
        position = next((i for i, (event_id, _, _) in enumerate(self._events) if event_id == last_event_id), None)
        if position is None:
            return None
        stream_id = self._events[position][1]
        for event_id, stream, message in self._events[position + 1 :]:
            if stream == stream_id and message is not None:
                await send_callback(EventMessage(message, event_id))
        return stream_id


async def set_logging_level(ctx: Any, params: SetLevelRequestParams) -> EmptyResult:
    """`logging/setLevel`: the logging scenario sets `debug` first; info messages pass at any level up to info."""
    return EmptyResult()


# MCPServer registers no logging/setLevel handler of its own; having one also declares the logging capability.
server._lowlevel_server.add_request_handler("logging/setLevel", SetLevelRequestParams, set_logging_level)


@server.tool()
async def test_tool_with_progress(ctx: Context) -> str:
    """Progress 0, 50, 100 of 100, about 50 ms apart."""
    for progress in (0, 50, 100):
        await ctx.report_progress(progress, 100, f"step {progress} of 100")
        if progress != 100:
            await anyio.sleep(0.05)
    return "Progress completed"


@server.tool()
async def test_tool_with_logging(ctx: Context) -> str:
    """Three info-level log notifications during the call, about 50 ms apart."""
    for number, message in enumerate(("Tool execution started", "Tool processing data", "Tool execution completed")):
        if number:
            await anyio.sleep(0.05)
        await ctx.info(message)
    return "Tool with logging executed successfully"


@server.tool()
async def test_sampling(prompt: str, ctx: Context) -> str:
    """Ask the client's LLM (sampling/createMessage): a server-to-client request on the call's own stream."""
    result = await ctx.session.create_message(
        messages=[SamplingMessage(role="user", content=TextContent(type="text", text=prompt))],
        max_tokens=100,
        related_request_id=ctx.request_id,
    )
    text = getattr(result.content, "text", None) or "No response"
    return f"LLM response: {text}"


async def _elicit(ctx: Context, message: str, schema: dict[str, Any]) -> str:
    result = await ctx.session.elicit_form(message, schema, related_request_id=ctx.request_id)
    return f"Elicitation completed: action={result.action}, content={json.dumps(result.content or {})}"


@server.tool()
async def test_elicitation(message: str, ctx: Context) -> str:
    """Ask the user for a username and an email (elicitation/create)."""
    return await _elicit(
        ctx,
        message,
        {
            "type": "object",
            "properties": {
                "username": {"type": "string", "description": "User's response"},
                "email": {"type": "string", "description": "User's email address"},
            },
            "required": ["username", "email"],
        },
    )


@server.tool()
async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
    """Elicitation whose schema carries a default for every primitive type (SEP-1034)."""
    return await _elicit(
        ctx,
        "Please review and update the form fields with defaults",
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "default": "John Doe"},
                "age": {"type": "integer", "default": 30},
                "score": {"type": "number", "default": 95.5},
                "status": {"type": "string", "enum": ["active", "inactive", "pending"], "default": "active"},
                "verified": {"type": "boolean", "default": True},
            },
        },
    )


@server.tool()
async def test_elicitation_sep1330_enums(ctx: Context) -> str:
    """Elicitation with the five enum shapes of SEP-1330."""
    return await _elicit(
        ctx,
        "Please select options from the enum fields",
        {
            "type": "object",
            "properties": {
                "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
                "titledSingle": {
                    "type": "string",
                    "oneOf": [
                        {"const": "value1", "title": "First Option"},
                        {"const": "value2", "title": "Second Option"},
                        {"const": "value3", "title": "Third Option"},
                    ],
                },
                "legacyEnum": {
                    "type": "string",
                    "enum": ["opt1", "opt2", "opt3"],
                    "enumNames": ["Option One", "Option Two", "Option Three"],
                },
                "untitledMulti": {
                    "type": "array",
                    "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
                },
                "titledMulti": {
                    "type": "array",
                    "items": {
                        "anyOf": [
                            {"const": "value1", "title": "First Choice"},
                            {"const": "value2", "title": "Second Choice"},
                            {"const": "value3", "title": "Third Choice"},
                        ]
                    },
                },
            },
        },
    )


@server.tool()
async def test_reconnection(ctx: Context) -> str:
    """Close this call's SSE stream mid-call; the answer is replayed when the client resumes (SEP-1699)."""
    await anyio.sleep(0.1)
    await ctx.close_sse_stream()
    await anyio.sleep(0.2)
    return "Reconnection test completed"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    arguments = parser.parse_args()
    app = server.streamable_http_app(
        streamable_http_path="/mcp", host="127.0.0.1", event_store=MemoryEventStore(), retry_interval=200
    )
    config = uvicorn.Config(app, host="127.0.0.1", port=arguments.port, log_level="warning", lifespan="on")
    uvicorn_server = uvicorn.Server(config)
    original_startup = uvicorn_server.startup

    async def startup(sockets: Any = None) -> None:
        await original_startup(sockets)
        print(f"READY {arguments.port}", flush=True)

    uvicorn_server.startup = startup  # type: ignore[method-assign]
    uvicorn_server.run()


if __name__ == "__main__":
    main()
