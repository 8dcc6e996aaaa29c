"""Signed identity assertions: a downstream verifies them with the proxy's JWKS over HTTP; reuse, rotation, config."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import httpx2
import jwt
import pytest
import requests
from flask import Flask
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from sqlalchemy import select, update

from oauthproxy import create_app
from oauthproxy.components import components
from oauthproxy.config import ConfigError, load_settings
from oauthproxy.crypto import generate_key
from oauthproxy.downstream_credentials import Caller
from oauthproxy.identity_assertions import ASSERTION_TYPE, assertion_claims
from oauthproxy.models import SigningKey, db
from oauthproxy.routes import Route
from oauthproxy.signing_keys import KeyTiming, SigningKeys, SigningUnavailable, rotate_signing_key
from tests.conftest import RunningProxy
from tests.interop_fixtures import SdkClient
from tests.proxy_fixtures import EchoServer, GunicornProxy, McpDownstream, log_in, write_routes
from tests.support.databases import SQLITE_ONLY
from tests.support.processes import ROOT
from tests.support.settings import TEST_KEY

FORGED = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJtYWxsb3J5In0."  # an unsigned JWT claiming to be mallory
JSONRPC = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}


def verify(token: str, proxy_url: str, audience: str, **options: Any) -> dict[str, Any]:
    """What the README tells a downstream to do: the key from the proxy's JWKS (fetched over HTTP), then signature,
    audience, issuer and lifetime checked by PyJWT."""
    keys = jwt.PyJWKClient(proxy_url + "/.well-known/jwks.json", cache_jwk_set=False, cache_keys=False)
    return jwt.decode(
        token,
        keys.get_signing_key_from_jwt(token).key,
        algorithms=["ES256", "EdDSA"],
        audience=audience,
        issuer=proxy_url,
        leeway=5,
        options={"require": ["iss", "sub", "aud", "exp", "iat", "nbf", "jti"], **options},
    )


def kid_of(token: str) -> str:
    return jwt.get_unverified_header(token)["kid"]


def jwks_kids(proxy_url: str) -> list[str]:
    response = requests.get(proxy_url + "/.well-known/jwks.json", timeout=10)
    assert response.status_code == 200, response.text
    return [key["kid"] for key in response.json()["keys"]]


def forget_signing_keys(app: Flask) -> None:
    """Start from an empty key table: the first use must create the first key."""
    with app.app_context():
        db.session.execute(SigningKey.__table__.delete())
        db.session.commit()


def active_kids(app: Flask) -> list[str]:
    with app.app_context():
        return list(db.session.scalars(select(SigningKey.kid).where(SigningKey.state == "active")))


# -- end to end: the real MCP server behind gunicorn, verified over HTTP ---------------------------------------------


@pytest.fixture
def routes_proxy(
    start_gunicorn: Callable[..., GunicornProxy], mcp_downstream: McpDownstream, tmp_path: Path
) -> GunicornProxy:
    routes = write_routes(
        tmp_path / "routes.toml",
        [
            {"name": "signed", "path": "/mcp/signed", "url": mcp_downstream.url, "identity_assertion": True},
            {
                "name": "custom",
                "path": "/mcp/custom",
                "url": mcp_downstream.url,
                "identity_assertion": True,
                "identity_assertion_header": "X-Identity-Assertion",
                "identity_headers": False,
            },
            {"name": "plain", "path": "/mcp/plain", "url": mcp_downstream.url},
        ],
    )
    return start_gunicorn(workers=2, MCP_SERVER_URL="", MCP_ROUTES_FILE=routes)


def whoami(proxy: GunicornProxy, path: str, login_hint: str = "alice") -> tuple[dict[str, str], str]:
    """Connect with the MCP SDK client (a real login) sending forged assertion headers, call `whoami` twice; the
    headers the real MCP server saw on the second call, and the client id the proxy gave the SDK client."""
    sdk = SdkClient(proxy.url, proxy.url + path, login_hint=login_hint)
    forged = {"X-Forwarded-Identity": FORGED, "X-Identity-Assertion": FORGED}

    async def scenario() -> dict[str, str]:
        async with (
            httpx2.AsyncClient(auth=sdk.new_provider(), timeout=30, headers=forged) as http,
            Client(streamable_http_client(sdk.resource_url, http_client=http)) as client,
        ):
            await sdk.whoami(client)
            return await sdk.whoami(client)

    seen = anyio.run(scenario)
    assert sdk.storage.client_info is not None
    return seen, sdk.storage.client_info.client_id


def test_the_real_mcp_server_receives_an_assertion_it_verifies_with_the_jwks(routes_proxy: GunicornProxy) -> None:
    proxy = routes_proxy
    seen, client_id = whoami(proxy, "/mcp/signed")
    token = seen["x-forwarded-identity"]
    assert token != FORGED  # the client's copy never reaches the downstream
    claims = verify(token, proxy.url, proxy.url + "/mcp/signed")
    assert claims["iss"] == proxy.url
    assert claims["aud"] == proxy.url + "/mcp/signed"
    assert claims["sub"] == "alice" == seen["x-forwarded-user"]
    assert claims["email"] == "alice@example.com" and claims["email_verified"] is True
    assert claims["name"] == "Alice Liddell"
    assert claims["client_id"] == client_id
    assert claims["exp"] - claims["iat"] == 300 and claims["nbf"] == claims["iat"]
    assert abs(claims["iat"] - time.time()) < 60
    assert "groups" not in claims  # the login provider gives none here
    header = jwt.get_unverified_header(token)
    # RFC 8725 §3.11: typed, so that nothing checking this issuer's access tokens can take it for one.
    assert header["alg"] == "ES256" and header["typ"] == ASSERTION_TYPE == "oauthproxy-identity+jwt"

    # Another audience: an assertion for /mcp/signed is refused where /mcp/custom is expected, and the reverse.
    with pytest.raises(jwt.InvalidAudienceError):
        verify(token, proxy.url, proxy.url + "/mcp/custom")

    # A route naming its own header, without the plain identity headers; the forged copy of it is dropped.
    custom, _ = whoami(proxy, "/mcp/custom")
    assert "x-forwarded-user" not in custom and "x-forwarded-identity" not in custom
    assert custom["x-identity-assertion"] != FORGED
    assert verify(custom["x-identity-assertion"], proxy.url, proxy.url + "/mcp/custom")["sub"] == "alice"

    # A route without the assertion sends none, and passes no forged one either.
    plain, _ = whoami(proxy, "/mcp/plain")
    assert "x-forwarded-identity" not in plain and plain["x-forwarded-user"] == "alice"
    # (A header no route of this downstream's uses is the client's own, passed as any other.)
    assert plain["x-identity-assertion"] == FORGED

    # The JWKS: public keys only, cached briefly; the issuer's metadata points at it.
    response = requests.get(proxy.url + "/.well-known/jwks.json", timeout=10)
    assert response.headers["Cache-Control"] == "public, max-age=30"
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    for key in response.json()["keys"]:
        assert key["use"] == "sig" and key["alg"] == "ES256" and "d" not in key
    metadata = requests.get(proxy.url + "/.well-known/oauth-authorization-server", timeout=10).json()
    assert metadata["jwks_uri"] == proxy.url + "/.well-known/jwks.json"


def test_only_a_verified_email_is_asserted(routes_proxy: GunicornProxy) -> None:
    seen, _ = whoami(routes_proxy, "/mcp/signed", login_hint="dave")  # dave never verified his address
    claims = verify(seen["x-forwarded-identity"], routes_proxy.url, routes_proxy.url + "/mcp/signed")
    assert claims["sub"] == "dave" and claims["name"] == "Dave Unverified"
    assert "email" not in claims and "email_verified" not in claims


# -- reuse: signing does not run per request -------------------------------------------------------------------------


@pytest.fixture
def echo_routes(tmp_path: Path, echo_downstream: EchoServer) -> str:
    return write_routes(
        tmp_path / "routes.toml",
        [
            {"name": "a", "path": "/mcp/a", "url": echo_downstream.url + "/mcp", "identity_assertion": True},
            {
                "name": "b",
                "path": "/mcp/b",
                "url": echo_downstream.url + "/mcp",
                "identity_assertion": True,
                "identity_assertion_header": "X-Identity-Assertion",
            },
            {"name": "c", "path": "/mcp/c", "url": echo_downstream.url + "/mcp"},
        ],
    )


def post(url: str, token: str, **headers: str) -> requests.Response:
    response = requests.post(url, json=JSONRPC, headers={"Authorization": f"Bearer {token}", **headers}, timeout=10)
    assert response.status_code == 200, response.text
    return response


def test_one_signature_per_grant_and_route_whatever_the_requests(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, echo_routes: str
) -> None:
    proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=echo_routes)
    forget_signing_keys(proxy.app)
    assertions = components(proxy.app).identity_assertions
    keys = components(proxy.app).signing_keys
    first = log_in(proxy.url, proxy.url + "/mcp/a")
    seen = []
    for _ in range(30):
        post(proxy.url + "/mcp/a", first.access_token, **{"X-Forwarded-Identity": FORGED})
        seen.append(echo_downstream.last().header("X-Forwarded-Identity"))  # exactly one copy arrived
    assert len(set(seen)) == 1 and FORGED not in seen
    assert assertions.signatures == 1
    assert keys.reloads == 1  # the key set is read once (its first key created), not per request
    assert active_kids(proxy.app) == [kid_of(seen[0])]

    # The same user through another client: another grant, another assertion (its client_id differs).
    second = log_in(proxy.url, proxy.url + "/mcp/a")
    for _ in range(5):
        post(proxy.url + "/mcp/a", second.access_token)
    other = echo_downstream.last().header("X-Forwarded-Identity")
    assert other is not None and other != seen[0] and assertions.signatures == 2
    assert verify(other, proxy.url, proxy.url + "/mcp/a")["client_id"] == second.client.client_id
    assert verify(seen[0], proxy.url, proxy.url + "/mcp/a")["client_id"] == first.client.client_id

    # Another route: its own audience and header; a forged copy of that header is dropped there too.
    third = log_in(proxy.url, proxy.url + "/mcp/b")
    for _ in range(5):
        post(proxy.url + "/mcp/b", third.access_token, **{"X-Identity-Assertion": FORGED})
    arrived = echo_downstream.last()
    assert arrived.header("X-Identity-Assertion") not in (None, FORGED)
    assert arrived.header("X-Forwarded-Identity") is None
    assert assertions.signatures == 3

    # A route without the assertion: nothing signed, nothing forged passes.
    fourth = log_in(proxy.url, proxy.url + "/mcp/c")
    post(proxy.url + "/mcp/c", fourth.access_token, **{"X-Forwarded-Identity": FORGED})
    assert echo_downstream.last().header("X-Forwarded-Identity") is None
    assert assertions.signatures == 3


def test_an_assertion_is_signed_again_once_most_of_its_lifetime_has_passed(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, echo_routes: str
) -> None:
    proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=echo_routes, IDENTITY_ASSERTION_TTL="10")
    login = log_in(proxy.url, proxy.url + "/mcp/a")
    before_signing = time.monotonic()
    post(proxy.url + "/mcp/a", login.access_token)
    after_signing = time.monotonic()
    first = echo_downstream.last().header("X-Forwarded-Identity")
    assert first is not None
    claims = verify(first, proxy.url, proxy.url + "/mcp/a")
    assert claims["exp"] - claims["iat"] == 10
    answered: list[tuple[float, str | None]] = []
    while time.monotonic() - before_signing < 7.5:  # reused for 80% of its 10 s
        post(proxy.url + "/mcp/a", login.access_token)
        answered.append((time.monotonic(), echo_downstream.last().header("X-Forwarded-Identity")))
        time.sleep(0.5)
    assert answered and all(token == first for at, token in answered if at < before_signing + 8)
    time.sleep(max(0.0, after_signing + 8.3 - time.monotonic()))
    post(proxy.url + "/mcp/a", login.access_token)
    renewed = echo_downstream.last().header("X-Forwarded-Identity")
    assert renewed is not None and renewed != first
    assert verify(renewed, proxy.url, proxy.url + "/mcp/a")["iat"] >= claims["iat"] + 8
    assert components(proxy.app).identity_assertions.signatures == 2


# -- keys: the first one, race-safe; rotation with the CLI; publication before use -----------------------------------


def test_workers_racing_for_the_first_key_create_exactly_one(
    start_proxy: Callable[..., RunningProxy], echo_routes: str
) -> None:
    proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=echo_routes)
    forget_signing_keys(proxy.app)
    workers = [SigningKeys(proxy.app, "ES256", KeyTiming(300, 30), create_on_first_use=True) for _ in range(6)]
    start = threading.Barrier(len(workers))
    kids: list[str] = []

    def first_use(keys: SigningKeys) -> None:
        start.wait()
        kids.append(keys.signing_key().kid)

    threads = [threading.Thread(target=first_use, args=(keys,)) for keys in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(kids) == len(workers) and len(set(kids)) == 1
    assert active_kids(proxy.app) == kids[:1]
    with proxy.app.app_context():
        assert db.session.scalar(select(db.func.count()).select_from(SigningKey)) == 1


def test_a_rotated_in_key_is_published_for_a_reload_interval_before_it_signs(
    start_proxy: Callable[..., RunningProxy], echo_routes: str
) -> None:
    proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=echo_routes)
    forget_signing_keys(proxy.app)
    timing = KeyTiming(300, 2)  # published for twice 2 s before it signs
    before = SigningKeys(proxy.app, "ES256", timing, create_on_first_use=True).signing_key()
    before_rotation = time.monotonic()
    rotation = rotate_signing_key(proxy.app, "ES256")
    assert rotation.retired_kids == (before.kid,)
    rotated_at = time.monotonic()
    worker = SigningKeys(proxy.app, "ES256", timing, create_on_first_use=True)  # reads after the rotation
    assert worker.jwks()["keys"][0]["kid"] == rotation.new_kid  # published at once, newest first
    assert [key["kid"] for key in worker.jwks()["keys"]] == [rotation.new_kid, before.kid]
    assert worker.signing_key().kid == before.kid
    while time.monotonic() - before_rotation < 3.5:
        assert worker.signing_key().kid == before.kid
        time.sleep(0.2)
    time.sleep(max(0.0, rotated_at + 4.2 - time.monotonic()))
    assert worker.signing_key().kid == rotation.new_kid


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The `oauthproxy` command, as an operator runs it beside the running proxy (this checkout's code)."""
    return subprocess.run(
        [sys.executable, "-m", "oauthproxy.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def move_retirement_back(database_dsn: str, app: Flask, kid: str, seconds: int) -> None:
    """Age a retiring key on the database's clock instead of waiting out its assertions' lifetime."""
    with app.app_context():
        retired_at = db.session.scalar(select(SigningKey.retired_at).where(SigningKey.kid == kid))
        assert retired_at is not None
        db.session.execute(
            update(SigningKey).where(SigningKey.kid == kid).values(retired_at=retired_at - timedelta(seconds=seconds))
        )
        db.session.commit()


def test_rotation_with_the_cli_through_gunicorn(
    start_gunicorn: Callable[..., GunicornProxy], echo_downstream: EchoServer, tmp_path: Path, database_dsn: str
) -> None:
    routes = write_routes(
        tmp_path / "routes.toml",
        [{"name": "a", "path": "/mcp/a", "url": echo_downstream.url + "/mcp", "identity_assertion": True}],
    )
    proxy = start_gunicorn(
        MCP_SERVER_URL="", MCP_ROUTES_FILE=routes, IDENTITY_KEYS_RELOAD_INTERVAL="2", IDENTITY_ASSERTION_TTL="60"
    )
    app = create_app(proxy.env)
    forget_signing_keys(app)
    try:
        login = log_in(proxy.url, proxy.url + "/mcp/a")
        audience = proxy.url + "/mcp/a"
        post(proxy.url + "/mcp/a", login.access_token)
        old = echo_downstream.last().header("X-Forwarded-Identity")
        assert old is not None
        old_kid = kid_of(old)
        assert old_kid in jwks_kids(proxy.url)

        started = time.monotonic()
        rotated = run_cli(proxy.env, "identity-keys", "rotate")
        returned = time.monotonic()  # the new key was made between `started` and now
        assert rotated.returncode == 0, rotated.stderr
        (new_kid,) = active_kids(app)
        assert new_kid != old_kid
        assert f"new signing key {new_kid} (ES256) is published now" in rotated.stdout
        assert f"key {old_kid} is retiring" in rotated.stdout
        # Every worker publishes it within a reload interval (2 s), before anything it signs.
        while new_kid not in jwks_kids(proxy.url):
            assert time.monotonic() - returned < 2 + 5, "the new key was not published"
            time.sleep(0.1)
        assert jwks_kids(proxy.url) == [new_kid, old_kid]

        # New assertions carry the new kid once it has been published for two reload intervals (4 s), not before.
        while True:
            post(proxy.url + "/mcp/a", login.access_token)
            current = echo_downstream.last().header("X-Forwarded-Identity")
            assert current is not None
            if kid_of(current) == new_kid:
                break
            assert current == old and time.monotonic() - returned < 4 + 10, "the new key was not picked up"
            time.sleep(0.2)
        assert time.monotonic() - started >= 3.8
        assert verify(current, proxy.url, audience)["sub"] == "alice"
        # The old assertion still verifies: its key stays published until every assertion it signed has expired.
        assert verify(old, proxy.url, audience)["sub"] == "alice"
        listed = run_cli(proxy.env, "identity-keys", "list")
        assert listed.returncode == 0, listed.stderr
        lines = {line.split()[0]: line for line in listed.stdout.splitlines()[1:-1]}
        assert " active " in lines[new_kid] and " retiring " in lines[old_kid]

        # Once the old key's last assertion has expired (moved on the database's clock), it leaves the JWKS.
        move_retirement_back(database_dsn, app, old_kid, 2 * 2 + 60 + 60)  # publication delay, lifetime, skew
        deadline = time.monotonic() + 10
        while old_kid in jwks_kids(proxy.url):
            assert time.monotonic() < deadline, "the retired key stayed published"
            time.sleep(0.3)
        assert jwks_kids(proxy.url) == [new_kid]
        with pytest.raises(jwt.PyJWKClientError):
            verify(old, proxy.url, audience)
        assert " removed " in run_cli(proxy.env, "identity-keys", "list").stdout
        with app.app_context():
            assert db.session.scalar(select(SigningKey.private_jwk).where(SigningKey.kid == old_kid)) is None
    finally:
        with app.app_context():
            db.engine.dispose()


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated")  # joserfc's, as this downstream verifies
def test_an_eddsa_key_verifies_with_pyjwt_and_joserfc(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, echo_routes: str
) -> None:
    proxy = start_proxy(
        MCP_SERVER_URL="",
        MCP_ROUTES_FILE=echo_routes,
        IDENTITY_ASSERTION_ALGORITHM="eddsa",
        IDENTITY_KEYS_RELOAD_INTERVAL="1",
    )
    forget_signing_keys(proxy.app)  # the setting chooses the algorithm of the keys made from now on
    login = log_in(proxy.url, proxy.url + "/mcp/a")
    post(proxy.url + "/mcp/a", login.access_token)
    token = echo_downstream.last().header("X-Forwarded-Identity")
    assert token is not None and jwt.get_unverified_header(token)["alg"] == "EdDSA"
    assert jwt.get_unverified_header(token)["typ"] == ASSERTION_TYPE
    assert verify(token, proxy.url, proxy.url + "/mcp/a")["sub"] == "alice"
    # joserfc, the other library the README names.
    keys = KeySet.import_key_set(requests.get(proxy.url + "/.well-known/jwks.json", timeout=10).json())
    decoded = jose_jwt.decode(token, keys, algorithms=["EdDSA"])
    jose_jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": proxy.url}, aud={"essential": True, "value": proxy.url + "/mcp/a"}
    ).validate(decoded.claims)

    # Rotating back to ES256 from the CLI: both keys published, each with its own algorithm.
    rotated = proxy.app.test_cli_runner().invoke(args=["identity-keys", "rotate", "--algorithm", "es256"])
    assert rotated.exit_code == 0, rotated.output
    time.sleep(1.1)  # this worker re-reads the key set after IDENTITY_KEYS_RELOAD_INTERVAL
    published = requests.get(proxy.url + "/.well-known/jwks.json", timeout=10).json()["keys"]
    assert [(key["alg"], key["kty"]) for key in published] == [("ES256", "EC"), ("EdDSA", "OKP")]


# -- failures: a key that cannot be read, the encryption key rotated -------------------------------------------------


def test_an_unreadable_signing_key_answers_503_until_rotated(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, echo_routes: str
) -> None:
    proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=echo_routes)
    forget_signing_keys(proxy.app)
    login = log_in(proxy.url, proxy.url + "/mcp/a")
    with proxy.app.app_context():
        SigningKeys(proxy.app, "ES256", KeyTiming(300, 30), create_on_first_use=True).signing_key()
        # Another row's sealed key moved into this one (or tampered with): it opens as neither.
        key = db.session.scalars(select(SigningKey)).one()
        key.private_jwk = components(proxy.app).secret_box.encrypt("{}", "signing-key:another:private_jwk")
        db.session.commit()
    seen_before = len(echo_downstream.seen)
    response = requests.post(proxy.url + "/mcp/a", json=JSONRPC, headers=login.bearer, timeout=10)
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "temporarily_unavailable"
    assert "signing key cannot be read" in response.json()["error_description"]
    assert response.headers["Retry-After"] == "60"
    assert len(echo_downstream.seen) == seen_before  # nothing went downstream without its assertion
    # Routes without the assertion are not affected.
    plain = log_in(proxy.url, proxy.url + "/mcp/c")
    post(proxy.url + "/mcp/c", plain.access_token)

    rotated = proxy.app.test_cli_runner().invoke(args=["identity-keys", "rotate"])
    assert rotated.exit_code == 0, rotated.output
    # This process re-reads the keys after IDENTITY_KEYS_RELOAD_INTERVAL (30 s); a fresh worker at once.
    restarted = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=echo_routes)
    again = log_in(restarted.url, restarted.url + "/mcp/a")
    post(restarted.url + "/mcp/a", again.access_token)
    token = echo_downstream.last().header("X-Forwarded-Identity")
    assert token is not None and verify(token, restarted.url, restarted.url + "/mcp/a")["sub"] == "alice"


def test_rotate_key_re_encrypts_the_signing_keys(start_proxy: Callable[..., RunningProxy], echo_routes: str) -> None:
    proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=echo_routes)
    forget_signing_keys(proxy.app)
    kid = SigningKeys(proxy.app, "ES256", KeyTiming(300, 30), create_on_first_use=True).signing_key().kid
    new_key = generate_key()
    env = {**_env_of(proxy), "ENCRYPTION_KEY": f"{new_key},{TEST_KEY}"}
    both = create_app(env)
    try:
        result = both.test_cli_runner().invoke(args=["rotate-key"])
        assert result.exit_code == 0, result.output
        only_new = create_app({**env, "ENCRYPTION_KEY": new_key})
        try:
            assert SigningKeys(only_new, "ES256", KeyTiming(300, 30), True).signing_key().kid == kid
        finally:
            with only_new.app_context():
                db.engine.dispose()
    finally:
        # Everything back under the tests' key: later tests on this database read what earlier ones left.
        back = create_app({**env, "ENCRYPTION_KEY": f"{TEST_KEY},{new_key}"})
        assert back.test_cli_runner().invoke(args=["rotate-key"]).exit_code == 0
        for app in (both, back):
            with app.app_context():
                db.engine.dispose()


def test_a_lost_database_keeps_the_keys_read_before_for_a_bounded_time(
    start_proxy: Callable[..., RunningProxy], echo_routes: str
) -> None:
    proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=echo_routes)
    keys = SigningKeys(proxy.app, "ES256", KeyTiming(300, 2), create_on_first_use=True)
    kid = keys.signing_key().kid
    read_at = time.monotonic()
    broken = create_app({**_env_of(proxy), "DATABASE_DSN": "postgresql://nobody@127.0.0.1:9/nothing"})
    keys.app = broken  # every reading from now on fails at once (connection refused)
    time.sleep(max(0.0, read_at + 2.1 - time.monotonic()))  # due for a reading, which fails
    assert keys.signing_key().kid == kid  # read before, still fresh enough (4 s): signing goes on
    assert keys.jwks()["keys"][0]["kid"] == kid
    assert keys.reloads >= 2
    time.sleep(max(0.0, read_at + keys.usable_for + 0.3 - time.monotonic()))
    with pytest.raises(SigningUnavailable, match="unavailable"):
        keys.signing_key()


def _env_of(proxy: RunningProxy) -> dict[str, str]:
    from tests.support.settings import base_env

    port = int(proxy.url.rsplit(":", 1)[1])
    return {**base_env(port, proxy.provider, proxy.app.config["SETTINGS"].database_dsn, f"proxy-{port}")}


# -- claims ----------------------------------------------------------------------------------------------------------


ROUTE = Route(name="r", path="/mcp/r", downstream_url="http://127.0.0.1:9/mcp", resource="https://p.example/mcp/r")


def test_claims_carry_groups_when_there_are_some_and_an_email_only_when_verified() -> None:
    claims = assertion_claims(
        "https://p.example",
        ROUTE,
        "client-1",
        Caller("u1", "u@example.com", "U", groups=frozenset({"b", "a"})),
        100,
        300,
        "j",
    )
    assert claims == {
        "iss": "https://p.example",
        "sub": "u1",
        "aud": "https://p.example/mcp/r",
        "iat": 100,
        "nbf": 100,
        "exp": 400,
        "jti": "j",
        "client_id": "client-1",
        "email": "u@example.com",
        "email_verified": True,
        "name": "U",
        "groups": ["a", "b"],
    }
    bare = assertion_claims("https://p.example", ROUTE, "c", Caller("u2", None, None), 100, 300, "j")
    assert set(bare) == {"iss", "sub", "aud", "iat", "nbf", "exp", "jti", "client_id"}
    # No groups (none read, or the user is in none): no claim, as for an absent email.
    assert "groups" not in assertion_claims("https://p.example", ROUTE, "c", Caller("u", None, None), 1, 1, "j")


# -- configuration problems, reported clearly ------------------------------------------------------------------------

BASE = {
    "OAUTH_CLIENT_ID": "id",
    "OAUTH_CLIENT_SECRET": "secret",
    "OAUTH_AUTHORIZE_URL": "https://accounts.google.com",
    "MCP_SERVER_URL": "http://localhost:9000/mcp",
    "ENCRYPTION_KEY": TEST_KEY,
}


def problems_for(env: dict[str, str]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    return caught.value.problems


def route_problems(tmp_path: Path, **route: Any) -> list[str]:
    path = write_routes(tmp_path / "routes.toml", [{"path": "/mcp/x", "url": "http://127.0.0.1:9/mcp", **route}])
    return problems_for({**BASE, "MCP_SERVER_URL": "", "MCP_ROUTES_FILE": path, "TICKETS_KEY": "k"})


WHERE = "MCP_ROUTES_FILE [[routes]] #1"


def test_defaults_and_the_single_route_variables() -> None:
    settings = load_settings(BASE)
    assert settings.routes[0].identity_assertion_header is None
    assert (settings.proxy.identity_assertion_ttl, settings.proxy.identity_assertion_algorithm) == (300, "ES256")
    assert settings.proxy.identity_keys_reload_interval == 30
    on = load_settings({**BASE, "DOWNSTREAM_IDENTITY_ASSERTION": "yes"})
    assert on.routes[0].identity_assertion_header == "X-Forwarded-Identity"
    named = load_settings(
        {**BASE, "DOWNSTREAM_IDENTITY_ASSERTION": "1", "DOWNSTREAM_IDENTITY_ASSERTION_HEADER": "X-Caller-Jwt"}
    )
    assert named.routes[0].identity_assertion_header == "X-Caller-Jwt"
    assert load_settings({**BASE, "IDENTITY_ASSERTION_ALGORITHM": "EDDSA"}).proxy.identity_assertion_algorithm == (
        "EdDSA"
    )


@pytest.mark.parametrize(
    ("route", "problem"),
    [
        (
            {"identity_assertion": "maybe"},
            f"{WHERE}: identity_assertion must be true or false (also accepted: 1/0, yes/no, on/off); got 'maybe'",
        ),
        (
            {"identity_assertion_header": "X-Identity"},
            f"{WHERE}: identity_assertion_header is set but identity_assertion is not true; set identity_assertion = "
            "true to send the signed identity assertion",
        ),
        *[
            (
                {"identity_assertion": True, "identity_assertion_header": bad},
                f"{WHERE}: identity_assertion_header must be a header name of at most 64 letters, digits and "
                f"hyphens, such as X-Forwarded-Identity; got {bad!r}",
            )
            for bad in (
                "X_Identity",
                "X Identity",
                "X-Identity\r\nX-Evil: 1",
                "",
                "-X",
                "X--Y",
                "X-Idé",
                "X-" + "a" * 63,
                7,
                ["X-A"],
            )
        ],
        *[
            (
                {"identity_assertion": True, "identity_assertion_header": taken},
                f"{WHERE}: identity_assertion_header {taken} is set, removed or passed through by the proxy itself; "
                "choose another header, such as X-Forwarded-Identity",
            )
            for taken in (
                "X-Forwarded-User",
                "x-forwarded-email",
                "X-Forwarded-Access-Token",
                "Authorization",
                "Cookie",
                "Host",
                "Mcp-Session-Id",
                "Mcp-Param-Region",
                "Last-Event-ID",
                "Connection",
                "X-Request-Id",
                "X-Forwarded-For",
            )
        ],
        (
            {
                "identity_assertion": True,
                "identity_assertion_header": "X-Api-Key",
                "credential": "static",
                "credential_header": "x-api-key",
                "credential_env": "TICKETS_KEY",
            },
            f"{WHERE}: identity_assertion_header X-Api-Key already carries the route's credential; choose another "
            "header",
        ),
    ],
)
def test_route_problems_are_reported_clearly(tmp_path: Path, route: dict[str, Any], problem: str) -> None:
    assert route_problems(tmp_path, **route) == [problem]


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("IDENTITY_ASSERTION_TTL", "5", "IDENTITY_ASSERTION_TTL must be between 10 and 3600; got 5"),
        ("IDENTITY_ASSERTION_TTL", "5m", "IDENTITY_ASSERTION_TTL must be a number of seconds; got '5m'"),
        ("IDENTITY_ASSERTION_TTL", "7200", "IDENTITY_ASSERTION_TTL must be between 10 and 3600; got 7200"),
        ("IDENTITY_KEYS_RELOAD_INTERVAL", "0", "IDENTITY_KEYS_RELOAD_INTERVAL must be between 1 and 300; got 0"),
        ("IDENTITY_ASSERTION_CACHE_SIZE", "-1", "IDENTITY_ASSERTION_CACHE_SIZE must be between 1 and 10000000; got -1"),
        (
            "IDENTITY_ASSERTION_ALGORITHM",
            "RS256",
            "IDENTITY_ASSERTION_ALGORITHM must be ES256 (ECDSA P-256, the default) or EdDSA (Ed25519); got 'RS256'",
        ),
        (
            "IDENTITY_ASSERTION_ALGORITHM",
            "none",
            "IDENTITY_ASSERTION_ALGORITHM must be ES256 (ECDSA P-256, the default) or EdDSA (Ed25519); got 'none'",
        ),
        (
            "DOWNSTREAM_IDENTITY_ASSERTION",
            "sometimes",
            "MCP_SERVER_URL: identity_assertion must be true or false (also accepted: 1/0, yes/no, on/off); "
            "got 'sometimes'",
        ),
        (
            "DOWNSTREAM_IDENTITY_ASSERTION_HEADER",
            "X-Caller",
            "MCP_SERVER_URL: identity_assertion_header is set but identity_assertion is not true; set "
            "identity_assertion = true to send the signed identity assertion",
        ),
    ],
)
def test_setting_problems_are_reported_clearly(name: str, value: str, problem: str) -> None:
    assert problems_for({**BASE, name: value}) == [problem]


def test_the_commands_are_listed() -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "oauthproxy.cli", "identity-keys", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "OAUTHPROXY_ENV_FILE": "/dev/null"},
    )
    assert listed.returncode == 0, listed.stderr
    assert "  list " in listed.stdout and "  rotate " in listed.stdout


@SQLITE_ONLY
def test_the_cli_refuses_an_unknown_algorithm(start_proxy: Callable[..., RunningProxy], echo_routes: str) -> None:
    proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=echo_routes)
    result = proxy.app.test_cli_runner().invoke(args=["identity-keys", "rotate", "--algorithm", "HS256"])
    assert result.exit_code == 2
    assert "Invalid value for '--algorithm': 'HS256' is not one of 'es256', 'eddsa'" in result.output


@SQLITE_ONLY
def test_the_jwks_endpoint_takes_only_get(start_proxy: Callable[..., RunningProxy], echo_routes: str) -> None:
    proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=echo_routes)
    assert requests.post(proxy.url + "/.well-known/jwks.json", data=b"x" * 100, timeout=10).status_code == 405
    answered = requests.get(proxy.url + "/.well-known/jwks.json?kid=../../x&alg=none", timeout=10)
    assert answered.status_code == 200 and all("d" not in key for key in answered.json()["keys"])


@SQLITE_ONLY
def test_without_an_asserting_route_no_key_is_made_and_none_advertised(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    proxy = start_proxy()
    forget_signing_keys(proxy.app)
    assert requests.get(proxy.url + "/.well-known/jwks.json", timeout=10).json() == {"keys": []}
    assert "jwks_uri" not in requests.get(proxy.url + "/.well-known/oauth-authorization-server", timeout=10).json()
    assert active_kids(proxy.app) == []


# -- the README's verification examples, run as written ----------------------------------------------------------------


def readme_examples() -> list[str]:
    """The Python blocks of the README's "Verifying it in the downstream" paragraph."""
    text = (ROOT / "README.md").read_text()
    start = text.index("**Verifying it in the downstream**")
    section = text[start : text.index("\n## ", start)]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


@SQLITE_ONLY
def test_the_readme_examples_verify_an_assertion_and_refuse_a_forged_one(
    start_proxy: Callable[..., RunningProxy], echo_downstream: EchoServer, echo_routes: str
) -> None:
    proxy = start_proxy(MCP_SERVER_URL="", MCP_ROUTES_FILE=echo_routes)
    login = log_in(proxy.url, proxy.url + "/mcp/a")
    post(proxy.url + "/mcp/a", login.access_token)
    token = echo_downstream.last().header("X-Forwarded-Identity")
    assert token is not None
    with proxy.app.app_context():
        untyped = (
            components()
            .signing_keys.signing_key()
            .sign(jwt.decode(token, options={"verify_signature": False}), typ="JWT")
        )
    examples = readme_examples()
    assert len(examples) == 2  # PyJWT, joserfc
    for example in examples:

        def caller_for(route_path: str, example: str = example) -> Callable[[dict[str, str]], dict[str, Any]]:
            namespace: dict[str, Any] = {}
            exec(example.replace("https://mcp.example.com", proxy.url).replace("/mcp/tickets", route_path), namespace)
            return namespace["caller"]

        claims = caller_for("/mcp/a")({"X-Forwarded-Identity": token})
        assert claims["sub"] == "alice" and claims["aud"] == proxy.url + "/mcp/a"
        with pytest.raises(Exception) as refused:
            caller_for("/mcp/a")({"X-Forwarded-Identity": FORGED})
        assert type(refused.value).__module__.split(".")[0] in ("jwt", "joserfc"), refused.value
        # Another route's downstream refuses it: not its audience.
        with pytest.raises(Exception, match=r"(?i)aud"):
            caller_for("/mcp/b")({"X-Forwarded-Identity": token})
        # The same claims signed by the same key but typed as a plain JWT (as an access token of this issuer might
        # be) are refused: the examples check `typ`.
        with pytest.raises(Exception, match="not an oauthproxy identity assertion") as refused:
            caller_for("/mcp/a")({"X-Forwarded-Identity": untyped})
        assert type(refused.value).__module__.split(".")[0] in ("jwt", "joserfc"), refused.value
