"""A test-side OAuth client: registers, walks authorize → consent → upstream → callback hop by hop, calls /token."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass, field
from html import unescape
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import requests
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

CLIENT_REDIRECT = "http://127.0.0.1:9/callback"  # never contacted: the walker stops at this prefix


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def query_of(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


def with_query(url: str, **params: str) -> str:
    parts = urlsplit(url)
    query = parts.query + ("&" if parts.query else "") + urlencode(params)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


def hidden_inputs(html: str) -> dict[str, str]:
    return {
        unescape(name): unescape(value)
        for name, value in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', html)
    }


@dataclass
class Browser:
    """A cookie-keeping user agent that follows one redirect at a time, as a person's browser would."""

    proxy_url: str
    login_hint: str = "alice"
    session: requests.Session = field(default_factory=requests.Session)
    consent_pages_seen: int = 0
    last_page: requests.Response | None = None

    def authorize(self, authorize_url: str, stop_prefix: str, decision: str = "approve", max_hops: int = 25) -> str:
        """Follow from the authorize URL until a redirect to `stop_prefix`; return that URL.

        Raises AssertionError when a page (not a redirect) is reached that is not the consent page.
        """
        url = authorize_url
        for _ in range(max_hops):
            if url.startswith(stop_prefix):
                return url
            if not url.startswith(self.proxy_url) and "/auth" in urlsplit(url).path and "login_hint" not in url:
                url = with_query(url, login_hint=self.login_hint)
            response = self.session.get(url, allow_redirects=False, timeout=15)
            self.last_page = response
            if response.is_redirect:
                url = requests.compat.urljoin(url, response.headers["Location"])
                continue
            if response.status_code == 200 and 'action="/authorize/consent"' in response.text:
                self.consent_pages_seen += 1
                form = hidden_inputs(response.text)
                form["decision"] = decision
                response = self.session.post(
                    self.proxy_url + "/authorize/consent", data=form, allow_redirects=False, timeout=15
                )
                self.last_page = response
                if not response.is_redirect:
                    raise AssertionError(f"consent POST answered {response.status_code}: {response.text[:500]}")
                url = requests.compat.urljoin(url, response.headers["Location"])
                continue
            raise AssertionError(f"stopped at {url}: {response.status_code} {response.text[:800]}")
        raise AssertionError("too many redirects")


@dataclass
class McpOAuthClient:
    """An MCP-client-like OAuth client of the proxy."""

    proxy_url: str
    client_id: str
    client_secret: str | None = None
    auth_method: str = "none"
    redirect_uri: str = CLIENT_REDIRECT
    verifier: str = ""
    state: str = ""

    @classmethod
    def register(
        cls, proxy_url: str, auth_method: str | None = "none", redirect_uri: str = CLIENT_REDIRECT, **metadata
    ) -> McpOAuthClient:
        body = {
            "client_name": "Test MCP Client",
            "redirect_uris": [redirect_uri],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            **metadata,
        }
        if auth_method is not None:
            body["token_endpoint_auth_method"] = auth_method
        response = requests.post(proxy_url + "/register", json=body, timeout=10)
        assert response.status_code == 201, response.text
        data = response.json()
        return cls(
            proxy_url, data["client_id"], data.get("client_secret"), data["token_endpoint_auth_method"], redirect_uri
        )

    def authorize_url(self, **overrides: str) -> str:
        self.verifier, challenge = pkce_pair()
        self.state = secrets.token_urlsafe(16)
        params = {
            "response_type": "code",
            "client_id": self.client_id,
            "redirect_uri": self.redirect_uri,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": self.state,
        }
        params.update(overrides)
        return self.proxy_url + "/authorize?" + urlencode({k: v for k, v in params.items() if v is not None})

    def token_request(self, data: dict[str, str]) -> requests.Response:
        auth = None
        data = dict(data)
        if self.auth_method == "client_secret_basic":
            auth = (self.client_id, self.client_secret)
        else:
            data["client_id"] = self.client_id
            if self.auth_method == "client_secret_post":
                data["client_secret"] = self.client_secret
        return requests.post(self.proxy_url + "/token", data=data, auth=auth, timeout=10)

    def exchange(self, code: str, **extra: str) -> requests.Response:
        return self.token_request(
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self.redirect_uri,
                "code_verifier": self.verifier,
                **extra,
            }
        )

    def refresh(self, refresh_token: str, **extra: str) -> requests.Response:
        return self.token_request({"grant_type": "refresh_token", "refresh_token": refresh_token, **extra})

    def revoke(self, token: str) -> requests.Response:
        data = {"token": token}
        auth = None
        if self.auth_method == "client_secret_basic":
            auth = (self.client_id, self.client_secret)
        else:
            data["client_id"] = self.client_id
            if self.auth_method == "client_secret_post":
                data["client_secret"] = self.client_secret
        return requests.post(self.proxy_url + "/revoke", data=data, auth=auth, timeout=10)

    def login(self, browser: Browser, **overrides: str) -> dict[str, str]:
        """Authorize through `browser`; return the query of the redirect back to this client."""
        return query_of(browser.authorize(self.authorize_url(**overrides), self.redirect_uri))


class MemoryStorage:
    """The MCP SDK's TokenStorage protocol in memory: what a client keeps between connections."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None
        self.token_history: list[OAuthToken] = []

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens
        self.token_history.append(tokens)

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info
