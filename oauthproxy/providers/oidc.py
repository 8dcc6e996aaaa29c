"""A generic OpenID Connect provider, found by discovery; the user from its validated ID token, completed by userinfo."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import requests
from joserfc.errors import InvalidClaimError, JoseError, MissingClaimError

from oauthproxy.groups import GroupsUnreadable
from oauthproxy.providers import discovery
from oauthproxy.providers.base import OFFLINE_ACCESS, OAuthProvider, ProviderSettings
from oauthproxy.providers.errors import ProviderError, classify_exception, clip
from oauthproxy.providers.identity import ProviderIdentity, subject_claim, text_claim, verified_email

# The logger name operators know from before the providers package: log lines keep naming it.
log = logging.getLogger("oauthproxy.upstream")

OIDC_SCOPES = ("openid", "email", "profile")


class OpenIDConnectProvider(OAuthProvider):
    """A generic OpenID Connect provider found by discovery from `OAUTH_AUTHORIZE_URL`.

    The user is taken from the validated ID token (signature against the provider's JWKS, `iss`,
    `aud`, `exp`, `nonce`), completed from userinfo for a missing email or name.  If discovery
    finds only RFC 8414 metadata without a `jwks_uri`, it works as plain OAuth 2.0 with userinfo."""

    name = "oidc"
    default_scopes = OIDC_SCOPES
    #: Ask for a refresh token with `prompt=consent` when requesting offline_access (OIDC Core §11:
    #: otherwise the OP MUST ignore offline_access; oidc-provider does).
    prompt_consent_for_offline_access = True

    def __init__(
        self,
        settings: ProviderSettings,
        *,
        url: str | None = None,
        timeout: float,
        token_endpoint_auth_method: str | None = None,
    ):
        super().__init__(settings, timeout=timeout, token_endpoint_auth_method=token_endpoint_auth_method)
        self.url = url or settings.oauth_authorize_url

    # -- discovery --------------------------------------------------------------------------------

    def _discover(self) -> dict[str, Any]:
        document, self.metadata_url = discovery.discover(self.url, self._fetch_metadata)
        return document

    def _check_metadata(self, metadata: Mapping[str, Any]) -> None:
        super()._check_metadata(metadata)
        if metadata.get("jwks_uri") and not metadata.get("issuer"):
            raise ProviderError("misconfigured", f"{self.metadata_url} has a jwks_uri but no issuer")

    # -- scopes -----------------------------------------------------------------------------------

    def identity_scopes(self) -> list[str]:
        metadata = self.load_metadata()
        supported = metadata.get("scopes_supported")
        if not metadata.get("jwks_uri") and isinstance(supported, list):
            # A plain RFC 8414 server: ask only for the identity scopes it lists (openid would be
            # refused as invalid_scope by some).
            return [scope for scope in self.default_scopes if scope in supported]
        return list(self.default_scopes) + self._groups_scope(supported)

    def _groups_scope(self, supported: Any) -> list[str]:
        # Okta (and any provider that lists it) sends the groups claim only for the `groups` scope; others send it
        # by their own configuration (Keycloak's mapper, Entra ID's groupMembershipClaims), or UPSTREAM_SCOPES asks.
        wanted = self.reads_groups and isinstance(supported, list) and "groups" in supported
        return ["groups"] if wanted else []

    def _use_offline_access(self) -> bool:
        supported = self.load_metadata().get("scopes_supported")
        return isinstance(supported, list) and OFFLINE_ACCESS in supported

    def _authorize_params(self, scopes: list[str]) -> dict[str, str]:
        if OFFLINE_ACCESS in scopes and self.prompt_consent_for_offline_access:
            return {"prompt": "consent"}
        return {}

    # -- identity ---------------------------------------------------------------------------------

    def _issuer_option(self, metadata: Mapping[str, Any]) -> dict[str, Any]:
        return {"essential": True, "values": [metadata["issuer"]]}

    def _id_token_claims(self, token: Mapping[str, Any], nonce: str | None) -> dict[str, Any]:
        """Validate the ID token (OIDC Core §3.1.3.7) and return its claims."""
        client = self._app()
        metadata = self.load_metadata()
        claims_options = {
            "iss": self._issuer_option(metadata),
            # Authlib checks `aud` only when told to: it must contain our client id (and `azp`,
            # when present, must be us).
            "aud": {"essential": True, "value": self.client_id},
            "sub": {"essential": True},
        }
        try:
            claims = client.parse_id_token(dict(token), nonce=nonce, claims_options=claims_options)
        except (InvalidClaimError, MissingClaimError) as exc:
            if exc.claim in ("iss", "aud", "azp"):
                raise ProviderError(
                    "misconfigured",
                    f"the ID token's {exc.claim} claim does not match this proxy's configuration (issuer "
                    f"{metadata.get('issuer')}, client id {self.client_id}): {exc}",
                ) from exc
            raise ProviderError("invalid_grant", f"the ID token is not acceptable: {exc}") from exc
        except JoseError as exc:  # expired, bad signature, unknown key, malformed
            raise ProviderError("invalid_grant", f"the ID token is not acceptable: {exc}") from exc
        except RuntimeError as exc:  # Authlib: 'Missing "jwks_uri" in metadata'
            raise ProviderError("misconfigured", f"cannot verify the ID token: {exc}") from exc
        except requests.RequestException as exc:  # fetching the JWKS
            raise classify_exception(
                exc, "fetching the provider's signing keys", str(metadata.get("jwks_uri"))
            ) from exc
        except ValueError as exc:  # undecodable token parts
            raise ProviderError("invalid_grant", f"the ID token is malformed: {clip(str(exc))}") from exc
        return dict(claims or {})

    #: The claims that can vouch for `email`; a present one that is not `true` is a verdict: unverified.
    email_verified_keys: tuple[str, ...] = ("email_verified",)

    def _email_from(self, claims: Mapping[str, Any]) -> str | None:
        return verified_email(claims, *self.email_verified_keys)

    def _identity(self, token: Mapping[str, Any], secrets: Mapping[str, Any]) -> ProviderIdentity:
        metadata = self.load_metadata()
        claims: dict[str, Any] = {}
        if token.get("id_token") and metadata.get("jwks_uri"):
            nonce = secrets.get("nonce")
            claims = self._id_token_claims(token, nonce if isinstance(nonce, str) else None)
        elif secrets.get("nonce") and metadata.get("jwks_uri"):
            # We asked for openid and got no ID token (OIDC Core §3.1.3.3 requires one): the access
            # token came straight from the token endpoint over TLS, so userinfo can still say who it is.
            log.warning("the identity provider returned no id_token for an openid request; using userinfo")

        if not claims:
            return self._identity_from_userinfo(self._userinfo(token))

        subject = subject_claim(claims.get("sub"))
        if subject is None:
            raise ProviderError("invalid_grant", "the ID token has no sub claim")
        email = self._email_from(claims)
        # An address the ID token itself says is unverified stays refused: userinfo must not launder it.
        need_email = email is None and all(claims.get(key) is None for key in self.email_verified_keys)
        name = text_claim(claims.get("name"))
        groups: frozenset[str] = frozenset()
        problem: str | None = None
        need_groups = False
        if self.reads_groups:
            try:
                stated = self._groups_in(claims)
            except GroupsUnreadable as error:
                problem = str(error)
            else:
                # Not in the ID token: oidc-provider and others keep a scope's claims for userinfo.
                need_groups = stated is None
                groups = stated or frozenset()
        if (need_email or name is None or need_groups) and self._userinfo_url():
            info = self._optional_userinfo(token)
            # OIDC Core §5.3.2: userinfo's sub MUST match the ID token's, or its values are unusable.
            if info and subject_claim(info.get("sub")) == subject:
                if need_email:
                    email = self._email_from(info)
                name = name or text_claim(info.get("name"))
                if need_groups:
                    groups, problem = self._identity_groups(lambda: self._groups_in(info))
                    need_groups = False
            elif info:
                log.warning("userinfo sub does not match the ID token sub; ignoring userinfo")
            if need_groups:
                problem = "the groups are not in the ID token, and userinfo could not be read for them"
        if name is None:
            name = text_claim(claims.get("preferred_username")) or text_claim(claims.get("nickname"))
        return ProviderIdentity(id=subject, email=email, name=name, groups=groups, groups_problem=problem)

    def current_groups(self, token: Mapping[str, Any], subject: str) -> frozenset[str]:
        """The user's groups now: from the ID token a refresh returned (OIDC Core §12.2, validated, its `sub` the
        sign-in's), else from userinfo with the new access token."""
        metadata = self.load_metadata()
        if token.get("id_token") and metadata.get("jwks_uri"):
            # No nonce: a refreshed ID token answers no authorization request (OIDC Core §12.2).
            claims = self._id_token_claims(token, None)
            if subject_claim(claims.get("sub")) != subject:
                raise ProviderError("invalid_grant", "the refreshed ID token names another user than the sign-in's")
            groups = self._groups_in(claims)
            if groups is not None:
                return groups
        if not self._userinfo_url():
            return frozenset()
        return super().current_groups(token, subject)

    def _optional_userinfo(self, token: Mapping[str, Any]) -> dict[str, Any] | None:
        """Userinfo only to complete the ID token: a 4xx (e.g. Microsoft's Graph userinfo with an
        access token for another resource) is not fatal; a transient failure is, so the user is not
        wrongly refused by an email allowlist because of a network blip."""
        try:
            info = self._userinfo(token)
        except ProviderError as exc:
            if exc.kind == "transient":
                raise
            log.warning("userinfo unavailable, using the ID token alone: %s", exc.description)
            return None
        return dict(info) if isinstance(info, Mapping) else None
