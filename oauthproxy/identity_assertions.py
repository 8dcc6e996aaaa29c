"""Signed identity assertions for the downstream: a short-lived JWT per grant and route, reused, and the JWKS."""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

from flask import Flask, Response, jsonify

from oauthproxy.components import components
from oauthproxy.downstream_credentials import Caller
from oauthproxy.errors import json_error
from oauthproxy.metrics import IDENTITY_ASSERTIONS_SIGNED
from oauthproxy.routes import Route
from oauthproxy.signing_keys import KeyTiming, SigningKeys, SigningUnavailable

JWKS_PATH = "/.well-known/jwks.json"
#: An assertion is reused until this fraction of its lifetime has passed: the rest covers the request's way to the
#: downstream and clocks a little apart.
REUSE_FRACTION = 0.8
#: The assertion's `typ` (RFC 8725 §3.11 explicit typing). Its `iss` is the authorization server, whose metadata
#: publishes the same keys as `jwks_uri`: with plain "JWT", an access-token checker that ignores `typ` could take an
#: assertion (sent to every downstream) for an access token of this server. A downstream checks this value.
ASSERTION_TYPE = "oauthproxy-identity+jwt"


def assertion_claims(
    issuer: str, route: Route, client_id: str, caller: Caller, issued_at: int, lifetime: int, jti: str
) -> dict[str, Any]:
    """The claims of one assertion. `email` only as the grant stores it: verified by the provider, else absent."""
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": caller.user_id,
        "aud": route.resource,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + lifetime,
        "jti": jti,
        "client_id": client_id,
    }
    if caller.email:
        claims["email"] = caller.email
        claims["email_verified"] = True  # the grant holds an address only when the provider vouched for it
    if caller.name:
        claims["name"] = caller.name
    groups = _groups(caller)
    if groups is not None:
        claims["groups"] = list(groups)
    return claims


def _groups(caller: Caller) -> tuple[str, ...] | None:
    """The caller's groups, sorted (a set has no order of its own: the same groups always make the same claim);
    None when there are none, or none are read (no configuration uses them): the claim is left out."""
    return tuple(sorted(caller.groups)) or None


@dataclass(frozen=True)
class _Issued:
    token: str
    kid: str
    #: What the claims were made of: a grant whose caller reads differently (groups changed) gets a new one.
    made_of: tuple[Any, ...]
    reuse_until: float  # monotonic


class IdentityAssertions:
    """Signs assertions and keeps each (grant, route)'s for reuse: a bounded LRU, its lock held only for dict work.

    A route with `identity_assertion = true` sends each request a JWT signed by the proxy (signing_keys.py) saying
    who calls: `iss` the proxy, `sub` the user, `aud` the route's resource URL, the verified email, the name, the
    groups when known, the MCP client's `client_id`, `iat`/`nbf`/`exp` and a `jti`. A downstream verifies it against
    `/.well-known/jwks.json` instead of trusting plain headers that anything on its network could send.

    An entry is reused while it is younger than `REUSE_FRACTION` of its lifetime, was signed by the key that signs
    now (after a rotation every worker switches within two reload intervals) and describes the same caller: signing
    runs once per grant and route every few minutes, not per request.
    """

    def __init__(self, keys: SigningKeys, issuer: str, lifetime: int, max_entries: int):
        self.keys, self.issuer, self.lifetime, self.max_entries = keys, issuer, lifetime, max_entries
        self._issued: OrderedDict[tuple[int, str], _Issued] = OrderedDict()
        self._lock = threading.Lock()
        #: Assertions this process signed (the tests count them; `oauthproxy_identity_assertions_signed_total`).
        self.signatures = 0

    def assertion(self, route: Route, grant_id: int, client_id: str, caller: Caller) -> str:
        """The assertion to send with this request; raises `SigningUnavailable` when none can be signed now."""
        made_of = (caller.user_id, caller.email, caller.name, _groups(caller), client_id)
        cache_key = (grant_id, route.name)
        now = time.monotonic()
        with self._lock:
            issued = self._issued.get(cache_key)
            if issued is not None and (issued.reuse_until <= now or issued.made_of != made_of):
                issued = None
        try:
            key = self.keys.signing_key()
        except SigningUnavailable:
            if issued is not None:
                return issued.token  # still valid, and signed by a key that is still published
            raise
        if issued is not None and issued.kid == key.kid:
            with self._lock:
                if cache_key in self._issued:
                    self._issued.move_to_end(cache_key)
            return issued.token
        # Signed outside the lock: two greenlets missing at once both sign (harmless), nobody waits on the other.
        issued_at = int(time.time())
        token = key.sign(
            assertion_claims(
                self.issuer, route, client_id, caller, issued_at, self.lifetime, secrets.token_urlsafe(16)
            ),
            typ=ASSERTION_TYPE,
        )
        self.signatures += 1
        IDENTITY_ASSERTIONS_SIGNED.labels(route.name).inc()
        with self._lock:
            self._issued[cache_key] = _Issued(token, key.kid, made_of, now + self.lifetime * REUSE_FRACTION)
            self._issued.move_to_end(cache_key)
            while len(self._issued) > self.max_entries:
                self._issued.popitem(last=False)
        return token

    def __len__(self) -> int:
        return len(self._issued)


def caller_with_assertion(route: Route, grant_id: int, client_id: str, caller: Caller) -> Caller:
    """`caller` carrying the route's assertion (downstream_credentials sends it); raises `SigningUnavailable`."""
    token = components().identity_assertions.assertion(route, grant_id, client_id, caller)
    return replace(caller, identity_assertion=token)


def signing_unavailable(error: SigningUnavailable) -> Response:
    """The MCP client's answer when no assertion can be signed: retry shortly, the request never left."""
    return json_error(503, "temporarily_unavailable", error.description, {"Retry-After": str(error.retry_after)})


def jwks() -> Response:
    """RFC 7517 §5: the public keys that verify assertions, cached by downstreams for at most a reload interval."""
    signing_keys: SigningKeys = components().signing_keys
    try:
        document = signing_keys.jwks()
    except SigningUnavailable as error:
        return signing_unavailable(error)
    response = jsonify(document)
    response.headers["Cache-Control"] = f"public, max-age={signing_keys.timing.reload_interval}"
    return response


def init_identity_assertions(app: Flask) -> None:
    """The signing keys and the assertion cache of this process, and the JWKS endpoint."""
    settings = app.config["SETTINGS"]
    proxy = settings.proxy
    timing = KeyTiming(proxy.identity_assertion_ttl, proxy.identity_keys_reload_interval)
    enabled = any(route.identity_assertion_header for route in settings.routes)
    keys = SigningKeys(app, proxy.identity_assertion_algorithm, timing, create_on_first_use=enabled)
    services = components(app)
    services.signing_keys = keys
    services.identity_assertions = IdentityAssertions(
        keys, settings.issuer, proxy.identity_assertion_ttl, proxy.identity_assertion_cache_size
    )
    app.add_url_rule(JWKS_PATH, "jwks", jwks, methods=["GET"])
