"""A real MCP server (the `mcp` SDK, streamable HTTP under uvicorn) that the proxy tests put behind the proxy.

Run: `python -m tests.mcp_downstream PORT [--path /mcp]`. Prints `READY <port>` when listening on 127.0.0.1.
Tools: `progress` (reports progress several times with pauses), `whoami` (the request headers it received),
`wait` (runs until cancelled), and with `--unicode-tool` also `météo`, a name the 2026-07-28 transport carries
base64-encoded in `Mcp-Name`. `GET /test/events` lists what the tools recorded (started, cancelled, finished).
`--json-response`: answer POSTs with one JSON body rather than an event stream.
"""

from __future__ import annotations

import argparse
import time

import anyio
import uvicorn
from mcp.server.mcpserver import Context, MCPServer
from starlette.requests import Request
from starlette.responses import JSONResponse

server = MCPServer("proxy-test-downstream")
EVENTS: list[dict] = []


def record(kind: str, **details: object) -> None:
    EVENTS.append({"event": kind, "at": time.time(), **details})


@server.tool()
async def progress(ctx: Context, steps: int = 5, pause: float = 0.4) -> str:
    """Report progress `steps` times, `pause` seconds apart, then answer."""
    record("progress_started", steps=steps)
    for step in range(1, steps + 1):
        await anyio.sleep(pause)
        await ctx.report_progress(step, steps, f"step {step} of {steps}")
        record("progress_sent", step=step)
    record("progress_finished")
    return f"finished {steps} steps"


@server.tool()
async def whoami(ctx: Context) -> dict[str, str]:
    """The HTTP request headers this tool call arrived with, as the downstream sees them."""
    return dict((ctx.headers or {}).items())


@server.tool()
async def wait(ctx: Context, seconds: float = 30.0, label: str = "wait") -> str:
    """Run for `seconds` unless cancelled; records whether it was cancelled."""
    record("wait_started", label=label)
    try:
        await anyio.sleep(seconds)
    except anyio.get_cancelled_exc_class():
        record("wait_cancelled", label=label)
        raise
    record("wait_finished", label=label)
    return "waited"


async def weather(city: str = "Paris") -> str:
    """A tool whose name is not ASCII."""
    record("weather_started", city=city)
    return f"sunny in {city}"


@server.custom_route("/test/events", methods=["GET"])
async def events(request: Request) -> JSONResponse:
    return JSONResponse(EVENTS)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--path", default="/mcp")
    parser.add_argument("--stateless", action="store_true")
    parser.add_argument("--json-response", action="store_true")
    parser.add_argument("--unicode-tool", action="store_true")
    arguments = parser.parse_args()
    if arguments.unicode_tool:
        server.add_tool(weather, name="météo")
    app = server.streamable_http_app(
        streamable_http_path=arguments.path,
        stateless_http=arguments.stateless,
        json_response=arguments.json_response,
        host="127.0.0.1",
    )
    config = uvicorn.Config(app, host="127.0.0.1", port=arguments.port, log_level="warning", lifespan="on")
    uvicorn_server = uvicorn.Server(config)

    original_startup = uvicorn_server.startup

    async def startup(sockets=None) -> None:
        await original_startup(sockets)
        print(f"READY {arguments.port}", flush=True)

    uvicorn_server.startup = startup  # type: ignore[method-assign]
    uvicorn_server.run()


if __name__ == "__main__":
    main()
