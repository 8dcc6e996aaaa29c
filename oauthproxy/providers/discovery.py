"""Where a provider's endpoints come from: OpenID Connect Discovery / RFC 8414 metadata, fetched and checked."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import requests

from oauthproxy.providers.errors import ErrorKind, ProviderError, clip
from oauthproxy.urls import canonical_resource, is_loopback_host

# The logger name operators know from before the providers package: log lines keep naming it.
log = logging.getLogger("oauthproxy.upstream")

#: GET one metadata URL: (document, "") or (None, why not); network errors raise `ProviderError("transient")`.
MetadataFetch = Callable[[str], tuple[dict[str, Any] | None, str]]

#: Discovery keys handed to Authlib.  Authlib merges server metadata into the keyword arguments of
#: its requests session (`client_kwargs.update(metadata)`), so a document carrying e.g. `verify`,
#: `proxies` or `code_challenge_method` would reconfigure TLS checking or switch PKCE off.  Only
#: these RFC 8414 / OIDC Discovery names, none of which is a session argument, are passed on.
AUTHLIB_METADATA_KEYS = (
    "issuer",
    "authorization_endpoint",
    "token_endpoint",
    "userinfo_endpoint",
    "jwks_uri",
    "id_token_signing_alg_values_supported",
    "token_endpoint_auth_methods_supported",
    "scopes_supported",
    "code_challenge_methods_supported",
    "revocation_endpoint",
    "end_session_endpoint",
)


def is_secure_url(url: Any) -> bool:
    """https, or http on a loopback host (OAuth 2.1 §1.5: TLS everywhere except loopback)."""
    if not isinstance(url, str):
        return False
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    return parts.scheme == "https" or (parts.scheme == "http" and is_loopback_host(parts.hostname))


def discovery_candidates(url: str, max_depth: int = 6) -> list[tuple[str, bool]]:
    """Metadata URLs to try for a provider URL, best first, each with `exact`: True when the URL as
    given is taken as the issuer, False for a shorter path prefix (the URL was then probably a
    full authorization endpoint, so the document must name it as its `authorization_endpoint`).

    For an issuer `<origin><path>`:
      * `<origin><path>/.well-known/openid-configuration`      (OIDC Discovery 1.0 §4)
      * `<origin><path>/.well-known/oauth-authorization-server` (what some servers do for RFC 8414)
      * `<origin>/.well-known/oauth-authorization-server<path>` (RFC 8414 §3.1, path inserted)
      * `<origin>/.well-known/openid-configuration<path>`       (RFC 8414 §5, path inserted)
    """
    parts = urlsplit(url.strip())
    origin = urlunsplit((parts.scheme.lower(), parts.netloc.lower(), "", "", ""))
    segments = [segment for segment in parts.path.split("/") if segment]
    if ".well-known" in segments:
        # The operator pasted a metadata URL: its issuer is the part before /.well-known.
        segments = segments[: segments.index(".well-known")]
    segments = segments[:max_depth]
    out: list[tuple[str, bool]] = []
    for depth in range(len(segments), -1, -1):
        path = "".join("/" + segment for segment in segments[:depth])
        exact = depth == len(segments)
        urls = [
            f"{origin}{path}/.well-known/openid-configuration",
            f"{origin}{path}/.well-known/oauth-authorization-server",
        ]
        if path:
            urls += [
                f"{origin}/.well-known/oauth-authorization-server{path}",
                f"{origin}/.well-known/openid-configuration{path}",
            ]
        for candidate in urls:
            if all(candidate != seen for seen, _ in out):
                out.append((candidate, exact))
    return out


def choose_token_auth_method(metadata: Mapping[str, Any]) -> str:
    """`client_secret_post` when the provider lists it, else `client_secret_basic`.

    Post first because Authlib 1.9 puts the secret into the Basic header without the form-encoding RFC 6749
    §2.3.1 requires: a secret with `+` or `%` then fails at strict providers (seen with oidc-provider).
    RFC 8414 §2: an absent `token_endpoint_auth_methods_supported` means client_secret_basic."""
    supported = metadata.get("token_endpoint_auth_methods_supported")
    if isinstance(supported, list) and "client_secret_post" in supported:
        return "client_secret_post"
    return "client_secret_basic"


def fetch_metadata(url: str, *, timeout: float, ca_bundle: str | None) -> tuple[dict[str, Any] | None, str]:
    """GET one metadata URL: (document, "") or (None, reason).  Network errors raise transient."""
    try:
        with requests.Session() as session:
            if ca_bundle:
                session.verify, session.trust_env = ca_bundle, False
            response = session.get(url, headers={"Accept": "application/json"}, timeout=timeout)
    except requests.RequestException as exc:
        raise ProviderError(
            "transient",
            f"could not reach the identity provider at {url}: {clip(type(exc).__name__ + ': ' + str(exc))}",
        ) from exc
    if response.status_code != 200:
        return None, f"HTTP {response.status_code}"
    try:
        document = response.json()
    except ValueError:
        return None, "not JSON"
    if not isinstance(document, dict):
        return None, "not a JSON object"
    if not document.get("authorization_endpoint") or not document.get("token_endpoint"):
        return None, "no authorization_endpoint/token_endpoint"
    return document, ""


def _is_transient(reason: str) -> bool:
    return reason.startswith("HTTP 5") or reason == "HTTP 429"


def metadata_at(url: str, fetch: MetadataFetch) -> dict[str, Any]:
    """The document at the one well-known metadata URL of a known provider."""
    document, reason = fetch(url)
    if document is None:
        kind: ErrorKind = "transient" if _is_transient(reason) else "misconfigured"
        raise ProviderError(kind, f"could not load the identity provider's metadata from {url}: {reason}")
    return document


def discover(url: str, fetch: MetadataFetch) -> tuple[dict[str, Any], str]:
    """OIDC Discovery, then RFC 8414, at the URL as given and then at its shorter path prefixes
    down to the origin (for when the operator pasted the full authorize URL): the document and
    the metadata URL it came from."""
    tried: list[str] = []
    mismatched: list[str] = []
    transient: list[str] = []
    wanted = canonical_resource(url)
    for candidate, exact in discovery_candidates(url):
        document, reason = fetch(candidate)  # a network error raises transient at once
        if document is None:
            tried.append(f"{candidate} ({reason})")
            if _is_transient(reason):
                transient.append(candidate)
            continue
        if not exact and canonical_resource(str(document["authorization_endpoint"])) != wanted:
            # Another server's metadata (e.g. Okta's org server above a custom one): not ours.
            mismatched.append(f"{candidate} (authorization_endpoint {document['authorization_endpoint']})")
            continue
        issuer = document.get("issuer")
        base = candidate.split("/.well-known/")[0]
        if (
            exact
            and isinstance(issuer, str)
            and issuer.rstrip("/") != base.rstrip("/")
            and "/.well-known/" in candidate
        ):
            # OIDC Discovery §4.3 / RFC 8414 §3.3 want them equal; tolerate, tokens are checked
            # against the document's issuer anyway.
            log.warning("metadata at %s names issuer %s, not %s", candidate, issuer, base)
        return document, candidate
    message = (
        f"could not discover the identity provider from OAUTH_AUTHORIZE_URL={url!r}; tried "
        + ", ".join(tried + mismatched)
        + ". Set OAUTH_AUTHORIZE_URL to the provider's issuer URL "
        "(the one with /.well-known/openid-configuration), "
        "or set OAUTH_TOKEN_URL and OAUTH_USERINFO_URL to configure the endpoints explicitly."
    )
    if transient and not mismatched:
        raise ProviderError("transient", message)
    raise ProviderError("misconfigured", message)


def check_metadata(metadata: Mapping[str, Any], source: str) -> None:
    """Refuse metadata without the two endpoints of the code flow, or with an endpoint outside TLS."""
    for key in ("authorization_endpoint", "token_endpoint"):
        if not metadata.get(key):
            raise ProviderError("misconfigured", f"{source} names no {key}")
    for key in ("authorization_endpoint", "token_endpoint", "userinfo_endpoint", "jwks_uri"):
        value = metadata.get(key)
        if value is not None and not is_secure_url(value):
            raise ProviderError(
                "misconfigured",
                f"{source}: {key} {value!r} must be an https URL (plain http only on loopback)",
            )
    methods = metadata.get("code_challenge_methods_supported")
    if isinstance(methods, list) and "S256" not in methods:
        log.warning("%s does not list PKCE S256 in code_challenge_methods_supported; sending it anyway", source)
