"""Size caps on client metadata fields, one set for dynamic registration (RFC 7591) and metadata documents alike."""

from __future__ import annotations

import json
from collections.abc import Mapping

# Generous for every real client: Claude, VS Code, Cursor, MCP Inspector and the SDKs register one to three
# redirect URIs of under 100 characters, a name under 40 and no contacts. The caps bound what one registration
# (or one cached document) can make the server store and show on the consent page.
MAX_CLIENT_NAME_LENGTH = 200
MAX_URI_LENGTH = 2048  # the same bound as a URL client id (client_metadata.MAX_CLIENT_ID_LENGTH)
MAX_REDIRECT_URIS = 20
MAX_CONTACTS = 10
MAX_CONTACT_LENGTH = 320  # an email address is at most 254 characters (RFC 5321 section 4.5.3.1)
MAX_SCOPE_LENGTH = 1000
MAX_SHORT_STRING_LENGTH = 200  # software_id, software_version, token_endpoint_auth_method, ...
MAX_LIST_ITEMS = 10  # grant_types, response_types
MAX_JWKS_BYTES = 8 * 1024

URI_FIELDS = ("client_uri", "logo_uri", "tos_uri", "policy_uri", "jwks_uri")
SHORT_STRING_FIELDS = ("software_id", "software_version", "token_endpoint_auth_method", "application_type")
SHORT_LIST_FIELDS = ("grant_types", "response_types")


def _too_long(value: object, limit: int) -> bool:
    return isinstance(value, str) and len(value) > limit


def _list_problem(metadata: Mapping[str, object], name: str, max_items: int, max_length: int) -> str | None:
    values = metadata.get(name)
    if not isinstance(values, list):
        return None
    if len(values) > max_items:
        return f"{name} lists {len(values)} entries; at most {max_items} are accepted"
    if any(_too_long(value, max_length) for value in values):
        return f"an entry of {name} is longer than {max_length} characters"
    return None


def metadata_size_problem(metadata: Mapping[str, object]) -> str | None:
    """Which field of `metadata` is over its cap, in words a client developer can act on; None when all fit.

    Only sizes are judged here; a value of the wrong type is left to the type checks of the caller.
    """
    problem = _list_problem(metadata, "redirect_uris", MAX_REDIRECT_URIS, MAX_URI_LENGTH)
    if problem:
        return problem
    if _too_long(metadata.get("client_name"), MAX_CLIENT_NAME_LENGTH):
        return f"client_name is longer than {MAX_CLIENT_NAME_LENGTH} characters"
    for name in URI_FIELDS:
        if _too_long(metadata.get(name), MAX_URI_LENGTH):
            return f"{name} is longer than {MAX_URI_LENGTH} characters"
    if _too_long(metadata.get("scope"), MAX_SCOPE_LENGTH):
        return f"scope is longer than {MAX_SCOPE_LENGTH} characters"
    for name in SHORT_STRING_FIELDS:
        if _too_long(metadata.get(name), MAX_SHORT_STRING_LENGTH):
            return f"{name} is longer than {MAX_SHORT_STRING_LENGTH} characters"
    for name, max_items, max_length in (
        ("contacts", MAX_CONTACTS, MAX_CONTACT_LENGTH),
        *((name, MAX_LIST_ITEMS, MAX_SHORT_STRING_LENGTH) for name in SHORT_LIST_FIELDS),
    ):
        problem = _list_problem(metadata, name, max_items, max_length)
        if problem:
            return problem
    if "jwks" in metadata:
        try:
            size = len(json.dumps(metadata["jwks"]))
        except (TypeError, ValueError, RecursionError):
            return "jwks is not a JSON object"
        if size > MAX_JWKS_BYTES:
            return f"jwks is larger than {MAX_JWKS_BYTES} bytes"
    return None
