"""A real MCP server that authorizes its callers itself: OAuth against its own provider, or per-user API keys.

The downstream of the proxy's per-user credentials (route `credential = "oauth"` or `"user_api_key"`).

OAuth: `python -m tests.mcp_protected_downstream PORT --issuer URL --client-id ID --client-secret SECRET
[--scopes mcp:tools] [--path /mcp]`. The `mcp` SDK's resource server: RFC 9728 metadata at
`/.well-known/oauth-protected-resource/mcp` naming `--issuer` as its authorization server, 401 with
`resource_metadata` without a valid token, 403 `insufficient_scope` without the scopes. Each token is checked by
introspection (RFC 7662) at the issuer, authenticated as the client `--client-id` (registered there for it), on
every request: a token revoked at the provider is refused at once. Only an active access token issued by `--issuer`
for this server's own URL (its audience, RFC 8707) passes.

API keys: `python -m tests.mcp_protected_downstream PORT --api-keys SPEC [--api-key-header X-API-Key]
[--api-key-scheme ""]`. SPEC is `alice=key-a,bob=key-b`, or a file of `user=key` lines or of a JSON object
{user: key}. A request without a known key in that header gets 401 (a JSON body, no `WWW-Authenticate`: the
server does no OAuth).

Either way it prints `READY <port>` when listening on 127.0.0.1. Tool `whoami`: who the credential says the caller
is (`subject`, `client_id`, `scopes`, `audience`; or `user` for a key). `GET /test/events` lists what happened
(tokens checked, keys refused, tools called; never a token or key); `POST /test/api-keys` {user, key} sets a user's
key (`key` null removes it), as a user revoking a key at the service would.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx2
import uvicorn
from mcp.server.auth.middleware.bearer_auth import AuthenticatedUser
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

EVENTS: list[dict[str, Any]] = []
#: user -> key, in API-key mode.
API_KEYS: dict[str, str] = {}
INTROSPECTION_TIMEOUT = 5.0


def record(kind: str, **details: object) -> None:
    EVENTS.append({"event": kind, "at": time.time(), **details})


class IntrospectionTokenVerifier:
    """The SDK's `TokenVerifier`, asking the authorization server about every token (RFC 7662)."""

    def __init__(self, issuer: str, introspection_endpoint: str, client_id: str, client_secret: str, resource: str):
        self.issuer = issuer
        self.introspection_endpoint = introspection_endpoint
        self.client_auth = (client_id, client_secret)
        self.resource = resource

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            async with httpx2.AsyncClient(timeout=INTROSPECTION_TIMEOUT, trust_env=False) as http:
                response = await http.post(
                    self.introspection_endpoint,
                    data={"token": token, "token_type_hint": "access_token"},
                    auth=self.client_auth,
                )
        except httpx2.HTTPError as error:
            record("introspection_failed", reason=type(error).__name__)
            return None
        if response.status_code != 200:
            record("introspection_failed", reason=f"status {response.status_code}")
            return None
        claims = response.json()
        refusal = self._refusal(claims)
        record(
            "token_checked",
            active=refusal is None,
            refusal=refusal,
            subject=claims.get("sub"),
            client_id=claims.get("client_id"),
        )
        if refusal is not None:
            return None
        return AccessToken(
            token=token,
            client_id=str(claims.get("client_id", "")),
            scopes=str(claims.get("scope", "")).split(),
            expires_at=claims.get("exp"),
            resource=self.resource,
            subject=claims.get("sub"),
            claims={"iss": claims["iss"], "aud": claims["aud"]},
        )

    def _refusal(self, claims: Mapping[str, Any]) -> str | None:
        """Why this introspection answer does not let the token in, or None."""
        if claims.get("active") is not True:
            return "inactive"
        # A refresh token is introspectable too, but is no access token (it carries no token_type).
        if str(claims.get("token_type", "")).lower() != "bearer":
            return "not an access token"
        if claims.get("iss") != self.issuer:
            return "another issuer"
        audience = claims.get("aud")
        audiences = audience if isinstance(audience, list) else [audience]
        # RFC 8707 / MCP authorization: a token for another resource (or for none) is not for this server.
        if self.resource not in audiences:
            return "another audience"
        return None


def introspection_endpoint_of(issuer: str) -> str:
    """The issuer's introspection endpoint, from its OpenID Connect discovery document."""
    response = httpx2.get(f"{issuer}/.well-known/openid-configuration", timeout=10, trust_env=False)
    response.raise_for_status()
    return str(response.json()["introspection_endpoint"])


def caller_of(ctx: Context) -> AccessToken | None:
    request = ctx.request_context.request
    user = request.scope.get("user") if request is not None else None
    return user.access_token if isinstance(user, AuthenticatedUser) else None


def build_oauth_server(arguments: argparse.Namespace) -> MCPServer:
    resource = f"http://127.0.0.1:{arguments.port}{arguments.path}"
    verifier = IntrospectionTokenVerifier(
        arguments.issuer,
        arguments.introspection_url or introspection_endpoint_of(arguments.issuer),
        arguments.client_id,
        arguments.client_secret,
        resource,
    )
    server = MCPServer(
        "protected-test-downstream",
        auth=AuthSettings(
            issuer_url=arguments.issuer,
            resource_server_url=resource,
            required_scopes=arguments.scopes,
            validate_token_resource=True,
        ),
        token_verifier=verifier,
    )

    @server.tool()
    async def whoami(ctx: Context) -> dict[str, Any]:
        """Who the access token says the caller is, as this server's own authorization server told it."""
        token = caller_of(ctx)
        if token is None:  # RequireAuthMiddleware lets no such request in
            raise RuntimeError("no access token")
        record("tool_called", tool="whoami", subject=token.subject)
        return {
            "subject": token.subject,
            "client_id": token.client_id,
            "scopes": token.scopes,
            "audience": (token.claims or {}).get("aud"),
            "issuer": (token.claims or {}).get("iss"),
        }

    return server


def read_api_keys(spec: str) -> dict[str, str]:
    """`alice=key-a,bob=key-b`, or a file of such lines (one a line) or of a JSON object."""
    path = Path(spec)
    if path.is_file():
        text = path.read_text()
        if text.lstrip().startswith("{"):
            return {str(user): str(key) for user, key in json.loads(text).items()}
        entries = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    else:
        entries = [entry.strip() for entry in spec.split(",") if entry.strip()]
    keys: dict[str, str] = {}
    for entry in entries:
        user, separator, key = entry.partition("=")
        if not separator or not user.strip() or not key.strip():
            raise SystemExit(f"--api-keys: expected user=key, got {entry!r}")
        keys[user.strip()] = key.strip()
    return keys


def user_of_key(presented: str | None) -> str | None:
    if not presented:
        return None
    return next((user for user, key in API_KEYS.items() if key == presented), None)


def presented_key(headers: Mapping[str, str], header: str, scheme: str) -> str | None:
    value = headers.get(header.lower())
    if value is None:
        return None
    if not scheme:
        return value.strip()
    given, _, key = value.strip().partition(" ")
    return key.strip() if given.lower() == scheme.lower() else None


class ApiKeyGate:
    """Lets through only requests carrying a known user's key; `/test/...` stays open for the tests."""

    def __init__(self, app: ASGIApp, header: str, scheme: str):
        self.app = app
        self.header = header
        self.scheme = scheme

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith("/test/"):
            await self.app(scope, receive, send)
            return
        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        key = presented_key(headers, self.header, self.scheme)
        user = user_of_key(key)
        if user is None:
            record("api_key_refused", reason="missing" if key is None else "unknown")
            response = JSONResponse(
                {"error": "invalid_api_key", "error_description": f"a valid API key is required in {self.header}"},
                status_code=401,
            )
            await response(scope, receive, send)
            return
        record("api_key_accepted", user=user)
        await self.app(scope, receive, send)


def api_key_scheme(arguments: argparse.Namespace) -> str:
    if arguments.api_key_scheme is not None:
        return str(arguments.api_key_scheme)
    return "Bearer" if arguments.api_key_header.lower() == "authorization" else ""


def build_api_key_server(arguments: argparse.Namespace) -> MCPServer:
    API_KEYS.update(read_api_keys(arguments.api_keys))
    server = MCPServer("api-key-test-downstream")
    header, scheme = arguments.api_key_header, api_key_scheme(arguments)

    @server.tool()
    async def whoami(ctx: Context) -> dict[str, Any]:
        """Whose API key this call carried."""
        key = presented_key({k.lower(): v for k, v in (ctx.headers or {}).items()}, header, scheme)
        user = user_of_key(key)
        record("tool_called", tool="whoami", user=user)
        return {"user": user}

    @server.custom_route("/test/api-keys", methods=["POST"])
    async def set_api_key(request: Request) -> JSONResponse:
        body = await request.json()
        user, key = body.get("user"), body.get("key")
        if not isinstance(user, str) or not (key is None or isinstance(key, str)):
            return JSONResponse({"error": "expected {user, key}"}, status_code=400)
        if key is None:
            API_KEYS.pop(user, None)
        else:
            API_KEYS[user] = key
        return JSONResponse({"users": sorted(API_KEYS)})

    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int)
    parser.add_argument("--path", default="/mcp")
    parser.add_argument("--issuer", help="OAuth mode: the authorization server's issuer URL")
    parser.add_argument("--introspection-url", help="default: from the issuer's discovery document")
    parser.add_argument("--client-id", help="this server's client at the issuer, for introspection")
    parser.add_argument("--client-secret")
    parser.add_argument("--scopes", default="mcp:tools", type=lambda value: [s for s in value.split(",") if s])
    parser.add_argument("--api-keys", help="API-key mode: user=key,... or a file of them")
    parser.add_argument("--api-key-header", default="X-API-Key")
    parser.add_argument("--api-key-scheme", default=None, help='default "Bearer" for Authorization, else none')
    arguments = parser.parse_args()
    if (arguments.issuer is None) == (arguments.api_keys is None):
        parser.error("give either --issuer (OAuth) or --api-keys")
    if arguments.issuer is not None and not (arguments.client_id and arguments.client_secret):
        parser.error("--issuer needs --client-id and --client-secret (the introspection client)")

    server = build_oauth_server(arguments) if arguments.issuer else build_api_key_server(arguments)

    @server.custom_route("/test/events", methods=["GET"])
    async def events(request: Request) -> JSONResponse:
        return JSONResponse(EVENTS)

    app: ASGIApp = server.streamable_http_app(streamable_http_path=arguments.path, host="127.0.0.1")
    if arguments.api_keys is not None:
        app = ApiKeyGate(app, arguments.api_key_header, api_key_scheme(arguments))
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
