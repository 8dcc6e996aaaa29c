"""A real upstream OpenID Connect / OAuth 2.0 provider for the tests.

pytest plugin: runs ``node tests/provider/provider.mjs`` (panva's ``oidc-provider``)
on a free loopback port. Load it with ``pytest_plugins = ["tests.provider_fixture"]``
in ``tests/conftest.py`` (or ``-p tests.provider_fixture``).

Fixtures:

* ``start_oidc_provider`` (session): factory
  ``start(access_token_ttl=3600, id_token_claims=False, registration=False,
  resource_indicators=False)`` returning a started :class:`OidcProvider`; each
  one is stopped at session end.
* ``oidc_provider`` (session): one provider with the default access token TTL.
* ``provider_failure_reset`` (function): clears the failure mode and the
  statistics of ``oidc_provider`` before and after the test.

The Node dependencies are installed with ``npm ci --prefix tests/provider``.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import pytest
import requests

from tests.support.ports import free_port
from tests.support.processes import stop_process, stop_processes

PROVIDER_DIR = Path(__file__).resolve().parent / "provider"
PROVIDER_SCRIPT = PROVIDER_DIR / "provider.mjs"
STARTUP_TIMEOUT = 30.0

FAILURE_MODES = (None, "refresh_invalid_grant", "refresh_server_error", "code_server_error", "token_delay")

#: The provider's users (``login_hint`` values). ``deny`` and ``error`` are
#: special hints that end the authorization with an error instead.
USERS: dict[str, dict[str, Any]] = {
    "alice": {"id": 1001, "email": "alice@example.com", "name": "Alice Liddell", "email_verified": True},
    "bob": {"id": 1002, "email": "bob@example.org", "name": "Bob Builder", "email_verified": True},
    "carol": {"id": 1003, "email": "carol@outsider.test", "name": "Carol Outsider", "email_verified": True},
    "dave": {"id": 1004, "email": "dave@example.com", "name": "Dave Unverified", "email_verified": False},
    "erin": {"id": 1005, "email": "erin@example.com", "name": "Erin Unconfirmed"},  # no email_verified claim
}


class OidcProviderError(RuntimeError):
    """The provider could not be started or refused a test-control request."""


@dataclass
class OidcProvider:
    """A running provider. ``issuer`` is ``http://127.0.0.1:<port>``."""

    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    session: requests.Session = field(default_factory=requests.Session, repr=False)

    def __post_init__(self) -> None:
        self.session.trust_env = False

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def discovery_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    def url(self, path: str) -> str:
        return f"{self.issuer}{path}"

    def discovery(self) -> dict[str, Any]:
        return self._json("GET", "/.well-known/openid-configuration")

    def register_client(
        self,
        client_id: str,
        client_secret: str | None,
        redirect_uris: list[str],
        token_endpoint_auth_method: str = "client_secret_basic",
        **metadata: Any,
    ) -> dict[str, Any]:
        """Register (or replace) a client; returns its metadata as the provider sees it.

        Defaults: grant_types authorization_code + refresh_token, response_types
        code. Any other client metadata (``grant_types``, ``scope``,
        ``application_type``, ...) may be passed as keyword arguments, and
        ``default_resource`` (a provider started with ``resource_indicators``):
        the resource server this client's tokens are for when it names none.
        """
        body: dict[str, Any] = {
            "client_id": client_id,
            "redirect_uris": list(redirect_uris),
            "token_endpoint_auth_method": token_endpoint_auth_method,
            **metadata,
        }
        if client_secret is not None:
            body["client_secret"] = client_secret
        return self._json("POST", "/test/clients", json=body, expected=201)

    def add_user(self, login: str, email: str | None, name: str | None, email_verified: bool = True) -> None:
        """Add (or replace) a user whose ``login_hint`` and OIDC ``sub`` are ``login``, with these claims as sent."""
        self._json(
            "POST",
            "/test/users",
            json={"login": login, "email": email, "name": name, "emailVerified": email_verified},
            expected=201,
        )

    def stats(self) -> dict[str, int]:
        """Token endpoint hits: token_requests, refresh_requests, authorization_code_requests."""
        return self._json("GET", "/test/stats")

    def reset_stats(self) -> None:
        """Zero both :meth:`stats` and :meth:`endpoint_stats`."""
        self._json("POST", "/test/stats/reset")

    def endpoint_stats(self) -> dict[str, int]:
        """Hits of the other endpoints: registration_requests, introspection_requests, revocation_requests."""
        return self._json("GET", "/test/endpoint-stats")

    def revoke_grants(self, account_id: str, client_id: str | None = None) -> int:
        """Revoke every token issued to ``account_id`` (for ``client_id`` only, when given), as a user removing an
        app's access at the provider would; returns how many grants that ended."""
        body: dict[str, str] = {"account_id": account_id}
        if client_id is not None:
            body["client_id"] = client_id
        return int(self._json("POST", "/test/revoke-grants", json=body)["revoked_grants"])

    def set_failure(self, mode: str | None, delay_ms: int = 0) -> None:
        """Inject token endpoint failures until called again with ``None``.

        * ``refresh_invalid_grant``: refresh requests get 400 ``invalid_grant``
          (the refresh token is left untouched).
        * ``refresh_server_error``: refresh requests get 503 ``server_error``.
        * ``code_server_error``: authorization code requests get a bare 500.
        * ``token_delay``: every token request waits ``delay_ms`` before it is
          handled (it is counted in :meth:`stats` on arrival).
        """
        if mode not in FAILURE_MODES:
            raise ValueError(f"unknown failure mode {mode!r}; expected one of {FAILURE_MODES}")
        self._json("POST", "/test/failure", json={"mode": mode, "delay_ms": delay_ms})

    def logs(self) -> str:
        """Everything node printed so far (stdout and stderr)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        self.session.close()
        stop_process(self.process)

    def _json(self, method: str, path: str, *, expected: int = 200, **kwargs: Any) -> Any:
        response = self.session.request(method, self.url(path), timeout=10, **kwargs)
        if response.status_code != expected:
            raise OidcProviderError(f"{method} {path} answered {response.status_code}: {response.text[:500]}")
        return response.json()


def pkce_pair() -> tuple[str, str]:
    """A fresh ``(code_verifier, code_challenge)`` pair for PKCE S256."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    challenge = base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")
    return verifier, challenge


def follow_redirects_until(session: requests.Session, url: str, stop_prefix: str, max_hops: int = 20) -> str:
    """GET ``url`` and follow redirects hop by hop (keeping cookies in ``session``)
    until a ``Location`` starts with ``stop_prefix``; return that location.

    Used to walk an authorization request through the provider's automatic
    login/consent. Raises ``AssertionError`` on a non-redirect answer or after
    ``max_hops`` (a consent loop).
    """
    for _hop in range(max_hops):
        response = session.get(url, allow_redirects=False, timeout=10)
        if response.status_code not in (301, 302, 303, 307, 308):
            raise AssertionError(f"GET {url} answered {response.status_code}, not a redirect: {response.text[:500]}")
        location = urljoin(url, response.headers["Location"])
        if location.startswith(stop_prefix):
            return location
        url = location
    raise AssertionError(f"no redirect to {stop_prefix} after {max_hops} hops (last: {url})")


def _startup_failure(message: str, log_path: Path) -> OidcProviderError:
    try:
        output = log_path.read_text(errors="replace").strip()
    except OSError:
        output = ""
    hint = ""
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir() or "ERR_MODULE_NOT_FOUND" in output:
        hint = "\nThe Node dependencies look missing: run `npm ci --prefix tests/provider`."
    return OidcProviderError(f"{message}{hint}\n--- node output ---\n{output or '(none)'}")


def launch_oidc_provider(
    log_path: Path,
    access_token_ttl: int = 3600,
    id_token_claims: bool = False,
    registration: bool = False,
    resource_indicators: bool = False,
    resource_scopes: str = "mcp:tools",
) -> OidcProvider:
    """Start provider.mjs and wait until it answers discovery. Caller must ``stop()`` it.

    ``id_token_claims``: also put email/name claims in ID tokens (by default, as
    oidc-provider does, an ID token issued with an access token carries only
    ``sub`` and the protocol claims; the profile claims come from ``/me``).
    ``registration``: open dynamic client registration (RFC 7591).
    ``resource_indicators``: the authorization server of loopback resource
    servers (RFC 8707): a ``resource`` gets an opaque access token with that
    audience and the ``resource_scopes`` asked for, checked by introspection.
    """
    node = shutil.which("node")
    if node is None:
        raise OidcProviderError("`node` is not on PATH; the test provider needs Node.js 20+.")
    if not (PROVIDER_DIR / "node_modules" / "oidc-provider").is_dir():
        raise OidcProviderError(
            f"{PROVIDER_DIR / 'node_modules' / 'oidc-provider'} is missing: run `npm ci --prefix tests/provider`."
        )

    last_error: OidcProviderError | None = None
    for _attempt in range(3):  # the free port may be taken between probe and bind
        port = free_port()
        env = {
            **os.environ,
            "PORT": str(port),
            "ACCESS_TOKEN_TTL": str(access_token_ttl),
            "ID_TOKEN_CLAIMS": "1" if id_token_claims else "0",
            "REGISTRATION": "1" if registration else "0",
            "RESOURCE_INDICATORS": "1" if resource_indicators else "0",
            "RESOURCE_SCOPES": resource_scopes,
        }
        env.pop("NODE_OPTIONS", None)
        log_file = log_path.open("wb")
        try:
            process = subprocess.Popen(
                [node, str(PROVIDER_SCRIPT)],
                cwd=PROVIDER_DIR,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        finally:
            log_file.close()
        provider = OidcProvider(port=port, process=process, log_path=log_path)
        try:
            _wait_until_ready(provider)
        except OidcProviderError as exc:
            provider.stop()
            last_error = exc
            if "EADDRINUSE" in provider.logs():
                continue
            raise
        return provider
    assert last_error is not None
    raise last_error


def _wait_until_ready(provider: OidcProvider) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    ready_line = f"READY {provider.port}"
    while time.monotonic() < deadline:
        if provider.process.poll() is not None:
            raise _startup_failure(
                f"node {PROVIDER_SCRIPT} exited with code {provider.process.returncode} during startup.",
                provider.log_path,
            )
        if ready_line in provider.logs():
            try:
                document = provider.discovery()
            except (requests.RequestException, OidcProviderError, ValueError):
                pass
            else:
                if document.get("issuer") == provider.issuer:
                    return
        time.sleep(0.05)
    raise _startup_failure(
        f"node {PROVIDER_SCRIPT} did not serve {provider.discovery_url} within {STARTUP_TIMEOUT:.0f} s.",
        provider.log_path,
    )


@pytest.fixture(scope="session")
def start_oidc_provider(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., OidcProvider]]:
    """Factory: ``start_oidc_provider(access_token_ttl=3600, id_token_claims=False, **options) -> OidcProvider``
    (``options``: those of :func:`launch_oidc_provider`).

    Every provider it starts is its own process with its own users' sessions,
    clients and tokens; all are stopped at the end of the test session.
    """
    started: list[OidcProvider] = []
    log_dir = tmp_path_factory.mktemp("oidc-provider")

    def start(access_token_ttl: int = 3600, id_token_claims: bool = False, **options: Any) -> OidcProvider:
        log_path = log_dir / f"provider-{len(started)}.log"
        provider = launch_oidc_provider(
            log_path, access_token_ttl=access_token_ttl, id_token_claims=id_token_claims, **options
        )
        started.append(provider)
        return provider

    try:
        yield start
    finally:
        for provider in started:
            provider.session.close()
        stop_processes(provider.process for provider in started)


@pytest.fixture(scope="session")
def oidc_provider(start_oidc_provider: Callable[..., OidcProvider]) -> OidcProvider:
    """The shared provider (access tokens live 3600 s)."""
    return start_oidc_provider()


@pytest.fixture
def provider_failure_reset(oidc_provider: OidcProvider) -> Iterator[OidcProvider]:
    """``oidc_provider`` with no failure mode and zeroed stats, restored afterwards too."""
    oidc_provider.set_failure(None)
    oidc_provider.reset_stats()
    try:
        yield oidc_provider
    finally:
        oidc_provider.set_failure(None)
        oidc_provider.reset_stats()
