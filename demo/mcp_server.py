"""A small demo MCP server (the `mcp` SDK, streamable HTTP) for `make run`: it trusts the identity the proxy forwards.

Run: `python demo/mcp_server.py --port 9000` (serves http://127.0.0.1:9000/mcp). It has no login of its own: put it
behind oauthproxy and never expose it directly.
"""

from __future__ import annotations

import argparse

import anyio
import uvicorn
from mcp.server.mcpserver import Context, MCPServer

server = MCPServer("oauthproxy-demo", instructions="A demo server behind oauthproxy: try whoami and countdown.")


def _header(ctx: Context, name: str) -> str | None:
    headers = {key.lower(): value for key, value in (ctx.headers or {}).items()}
    return headers.get(name.lower())


@server.tool()
async def whoami(ctx: Context) -> dict[str, str | None]:
    """Who is calling: the user oauthproxy signed in and forwarded (X-Forwarded-User, -Email, -Name)."""
    return {
        "user": _header(ctx, "X-Forwarded-User"),
        "email": _header(ctx, "X-Forwarded-Email"),
        "name": _header(ctx, "X-Forwarded-Name"),
    }


@server.tool()
async def countdown(ctx: Context, seconds: int = 5) -> str:
    """Count down from `seconds` (at most 60), one progress notification per second, streamed as it happens."""
    seconds = max(1, min(int(seconds), 60))
    for done in range(1, seconds + 1):
        await anyio.sleep(1)
        await ctx.report_progress(done, seconds, f"{seconds - done} s to go")
    return "liftoff"


@server.tool()
async def echo(text: str) -> str:
    """Return `text` unchanged."""
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--path", default="/mcp")
    arguments = parser.parse_args()
    app = server.streamable_http_app(streamable_http_path=arguments.path, host="127.0.0.1")
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
