"""GitHub and GitHub Enterprise Server: OAuth 2.0 without OpenID Connect, the user from the REST API."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from oauthproxy.allowlists import email_address
from oauthproxy.groups import MAX_GROUPS, GroupsUnreadable, group_names
from oauthproxy.providers.base import ProviderSettings
from oauthproxy.providers.errors import ProviderError, response_error
from oauthproxy.providers.identity import ProviderIdentity, subject_claim, text_claim
from oauthproxy.providers.oauth2 import OAuth2Provider

# The logger name operators know from before the providers package: log lines keep naming it.
log = logging.getLogger("oauthproxy.upstream")

GITHUB_HOSTS = frozenset({"github.com", "www.github.com"})
GITHUB_AUTHORIZE_URL = "https://github.com/login/oauth/authorize"
GITHUB_TOKEN_URL = "https://github.com/login/oauth/access_token"
GITHUB_API_URL = "https://api.github.com"
GITHUB_SCOPES = ("read:user", "user:email")
#: Lists the user's organisations and teams (`/user/orgs`, `/user/teams`): asked for only when groups are read.
GITHUB_GROUPS_SCOPE = "read:org"
#: GitHub's largest page (`per_page`); a list is read to MAX_GROUPS entries at most, then refused as too long.
GITHUB_PAGE_SIZE = 100
CLIENT_SECRET_POST = "client_secret_post"  # a token endpoint auth method name (RFC 7591 §2)


class GitHubProvider(OAuth2Provider):
    """GitHub OAuth apps and GitHub Apps: plain OAuth 2.0 (no OIDC for users), the user from the
    REST API.  The URLs are constructor arguments so tests can point it at a fake GitHub."""

    name = "github"
    brand = "GitHub"
    default_scopes = GITHUB_SCOPES

    def __init__(
        self,
        settings: ProviderSettings,
        *,
        api_base_url: str | None = None,
        authorize_url: str | None = None,
        token_url: str | None = None,
        timeout: float,
        token_endpoint_auth_method: str = CLIENT_SECRET_POST,
    ):
        # GitHub documents client_id/client_secret as form parameters (client_secret_post).
        super().__init__(
            settings,
            authorize_url=authorize_url or GITHUB_AUTHORIZE_URL,
            token_url=token_url or GITHUB_TOKEN_URL,
            userinfo_url=None,
            timeout=timeout,
            token_endpoint_auth_method=token_endpoint_auth_method,
        )
        base = api_base_url or GITHUB_API_URL
        # Trailing slash: Authlib joins relative paths with urljoin, which drops a last segment
        # without one (GitHub Enterprise's https://ghe.example.com/api/v3).
        self.api_base_url = base.rstrip("/") + "/"

    def _api_base_url(self) -> str | None:
        return self.api_base_url

    def identity_scopes(self) -> list[str]:
        return list(self.default_scopes) + ([GITHUB_GROUPS_SCOPE] if self.reads_groups else [])

    def _discover(self) -> dict[str, Any]:
        # GitHub's token endpoint answers form-encoded unless asked for JSON; Authlib sends
        # `Accept: application/json` on token requests, which is what GitHub needs.
        return {
            "authorization_endpoint": self.authorize_url,
            "token_endpoint": self.token_url,
            "userinfo_endpoint": self.api_base_url + "user",
        }

    def _identity(self, token: Mapping[str, Any], secrets: Mapping[str, Any]) -> ProviderIdentity:
        user = self._github("user", token)
        if not isinstance(user, Mapping):
            raise ProviderError("misconfigured", "GitHub's /user did not answer a JSON object")
        subject = subject_claim(user.get("id"))
        if subject is None:
            raise ProviderError("misconfigured", "GitHub's /user has no numeric id")
        email = github_email(user, self._github_emails(token))
        name = text_claim(user.get("name")) or text_claim(user.get("login"))
        groups, problem = self._identity_groups(lambda: self.current_groups(token, subject))
        return ProviderIdentity(id=subject, email=email, name=name, groups=groups, groups_problem=problem)

    def current_groups(self, token: Mapping[str, Any], subject: str) -> frozenset[str]:
        """`org:<login>` for each organisation of the user and `<org>/<team-slug>` for each team, lower-cased (GitHub
        compares logins and slugs without case): `/user/orgs` and `/user/teams` with the read:org scope. These list
        what the token may see: an organisation that restricts OAuth apps lists only once it approved this one."""
        names = []
        for org in self._github_pages("user/orgs", token):
            login = org.get("login") if isinstance(org, Mapping) else None
            if not isinstance(login, str) or not login:
                raise GroupsUnreadable("GitHub's /user/orgs has an entry without a login")
            names.append(f"org:{login.lower()}")
        for team in self._github_pages("user/teams", token):
            org = team.get("organization") if isinstance(team, Mapping) else None
            org_login = org.get("login") if isinstance(org, Mapping) else None
            slug = team.get("slug") if isinstance(team, Mapping) else None
            if not isinstance(org_login, str) or not org_login or not isinstance(slug, str) or not slug:
                raise GroupsUnreadable("GitHub's /user/teams has an entry without an organization login or a slug")
            names.append(f"{org_login.lower()}/{slug.lower()}")
        return group_names(names, "GitHub's organisations and teams")

    def _github_pages(self, path: str, token: Mapping[str, Any]) -> list[Any]:
        """Every entry of a paginated list (GitHub's `Link: <…>; rel="next"`), up to MAX_GROUPS entries."""
        url: str | None = f"{self.api_base_url}{path}?per_page={GITHUB_PAGE_SIZE}"
        entries: list[Any] = []
        pages = 0
        while url is not None:
            pages += 1
            if pages > MAX_GROUPS // GITHUB_PAGE_SIZE + 1:
                raise GroupsUnreadable(f"GitHub's /{path} goes on for more than {pages - 1} pages")
            try:
                response = self._github_response(path, token, url)
            except ProviderError as error:
                if error.kind == "transient":
                    raise
                # 403/404: the token lacks read:org (a grant from before groups were used), or GitHub refuses.
                raise GroupsUnreadable(f"GitHub's /{path} could not be read: {error.description}") from None
            try:
                page = response.json()
            except ValueError:
                raise GroupsUnreadable(f"GitHub's /{path} did not answer JSON") from None
            if not isinstance(page, list):
                raise GroupsUnreadable(f"GitHub's /{path} did not answer a list")
            entries.extend(page)
            if len(entries) > MAX_GROUPS:
                raise GroupsUnreadable(f"GitHub's /{path} lists more than {MAX_GROUPS} entries")
            following = response.links.get("next", {}).get("url")
            # The user's token goes only to GitHub's own API: a next link elsewhere is not followed.
            url = following if isinstance(following, str) and following.startswith(self.api_base_url) else None
            if following and url is None:
                raise GroupsUnreadable(f"GitHub's /{path} points its next page outside {self.api_base_url}")
            if not page:
                break
        return entries

    def _github(self, path: str, token: Mapping[str, Any]) -> Any:
        url = self.api_base_url + path
        response = self._github_response(path, token, url)
        try:
            return response.json()
        except ValueError:
            raise ProviderError("misconfigured", f"GitHub {url} did not answer JSON") from None

    def _github_response(self, path: str, token: Mapping[str, Any], url: str) -> Any:
        """GET one page of GitHub's REST API with the user's token; a status other than 200 is a `ProviderError`."""
        client = self._app()
        response = self._call(
            f"fetching GitHub {path}",
            url,
            lambda: client.get(
                url,
                token=dict(token),
                # GitHub's documented media type and API version for the REST API.
                headers={"Accept": "application/vnd.github+json", "X-GitHub-Api-Version": "2022-11-28"},
            ),
        )
        if response.status_code != 200:
            raise response_error(response, f"fetching GitHub /{path}", url)
        return response

    def _github_emails(self, token: Mapping[str, Any]) -> list[Any] | None:
        """`GET /user/emails` (needs the user:email scope), or None when the token may not read it."""
        try:
            emails = self._github("user/emails", token)
        except ProviderError as exc:
            if exc.kind == "transient":
                raise
            # 403/404: the token lacks user:email (e.g. a GitHub App without the email permission).
            log.warning("GitHub /user/emails unavailable: %s", exc.description)
            return None
        return emails if isinstance(emails, list) else None


def github_email(user: Mapping[str, Any], emails: list[Any] | None) -> str | None:
    """The email of a GitHub user, only as `/user/emails` (user:email scope) lists it with `verified: true`:
    the public profile email (`/user`'s `email`) when it is one of those, else the primary verified one.

    Without `/user/emails` there is no email: `/user` says nothing about verification."""
    if emails is None:
        return None
    verified = [
        address
        for entry in emails
        if isinstance(entry, Mapping)
        and entry.get("verified") is True
        and (address := email_address(entry.get("email"))) is not None
    ]
    public = email_address(user.get("email"))
    if public and public in verified:
        return public
    for entry in emails:
        if isinstance(entry, Mapping) and entry.get("primary") is True and entry.get("verified") is True:
            return email_address(entry.get("email"))
    return None
