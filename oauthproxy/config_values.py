"""Setting values: one parser per kind (boolean, whole number, seconds, choice, list, URL), for every setting."""

# Each parser appends a problem saying what is expected instead of raising, and returns a usable value, so
# `config.load_settings` reports every problem at once.

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

from oauthproxy.urls import is_loopback_host

DAY = 24 * 3600
#: The spellings of a boolean, in the environment or a routes file (TOML's own true/false are taken as they are).
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
_BOOLEAN_HINT = "true or false (also accepted: 1/0, yes/no, on/off)"
_LIST_SEPARATORS = re.compile(r"[,\s]+")


def boolean_word(value: str) -> bool | None:
    """True or False for an accepted spelling, None for anything else."""
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    return None


def boolean_value(value: object, where: str, default: bool, problems: list[str]) -> bool:
    """A boolean from TOML (`true`) or text (`"yes"`); anything else is a problem naming the accepted spellings."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and (word := boolean_word(value)) is not None:
        return word
    problems.append(f"{where} must be {_BOOLEAN_HINT}; got {value!r}")
    return default


def read_bool(env: Mapping[str, str], name: str, default: bool, problems: list[str]) -> bool:
    raw = env.get(name, "").strip()
    return boolean_value(raw, name, default, problems) if raw else default


def _bounded(name: str, value: float, raw: str, minimum: float, maximum: float | None, problems: list[str]) -> bool:
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum:.15g} and {maximum:.15g}" if maximum is not None else f"at least {minimum:.15g}"
        problems.append(f"{name} must be {bound}; got {raw}")
        return False
    return True


def read_int(
    env: Mapping[str, str],
    name: str,
    default: int,
    problems: list[str],
    *,
    minimum: int = 0,
    maximum: int | None = None,
    unit: str = "",
) -> int:
    """A whole number within bounds; `unit` (seconds, bytes) names what it counts in the message."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        try:
            number = float(raw)  # "1e6" and "30.0" are whole numbers too
        except ValueError:
            problems.append(f"{name} must be a {'number of ' + unit if unit else 'whole number'}; got {raw!r}")
            return default
        if not number.is_integer():
            problems.append(f"{name} must be a whole number{' of ' + unit if unit else ''}; got {raw!r}")
            return default
        value = int(number)
    return value if _bounded(name, value, raw, minimum, maximum, problems) else default


def read_seconds(
    env: Mapping[str, str], name: str, default: float, problems: list[str], *, minimum: float, maximum: float
) -> float:
    """A duration in seconds, fractions allowed, within bounds."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        problems.append(f"{name} must be a number of seconds; got {raw!r}")
        return default
    if value != value:  # NaN passes no bound check
        problems.append(f"{name} must be a number of seconds; got {raw!r}")
        return default
    return value if _bounded(name, value, raw, minimum, maximum, problems) else default


def read_choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...], problems: list[str]) -> str:
    """One word out of `choices`, case-insensitive."""
    value = env.get(name, "").strip().lower() or default
    if value not in choices:
        problems.append(f"{name} must be {' or '.join(choices)}; got {value!r}")
        return default
    return value


def read_text(env: Mapping[str, str], name: str, default: str = "") -> str:
    return env.get(name, "").strip() or default


def string_list(value: object, where: str, problems: list[str]) -> tuple[str, ...]:
    """A list from TOML, or text separated by commas and/or whitespace."""
    if isinstance(value, str):
        value = [item for item in _LIST_SEPARATORS.split(value) if item]
    if not isinstance(value, list) or not all(isinstance(item, str) and item.strip() for item in value):
        problems.append(f"{where} must be a list of non-empty strings")
        return ()
    return tuple(item.strip() for item in value)


def read_list(env: Mapping[str, str], name: str, problems: list[str]) -> tuple[str, ...]:
    return string_list(env.get(name, ""), name, problems)


def absolute_url(name: str, value: str, problems: list[str]) -> str:
    """Any absolute http(s) URL (a provider endpoint, a downstream server)."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{name} must be an absolute http(s) URL; got {value!r}")
    return value


def read_url(env: Mapping[str, str], name: str, problems: list[str]) -> str | None:
    raw = env.get(name, "").strip()
    return absolute_url(name, raw, problems) if raw else None


def origin_url(name: str, value: str, problems: list[str]) -> str:
    """A URL this server or a client trusts as a base: https (OAuth 2.1 §1.5) unless loopback, normalised."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f"{name} must be an absolute http(s) URL such as https://mcp.example.com; got {value!r}")
        return value
    if parts.query or parts.fragment:
        problems.append(f"{name} must not have a query or fragment; got {value!r}")
    if parts.scheme == "http" and not is_loopback_host(parts.hostname):
        problems.append(f"{name} must use https unless it is a loopback address (OAuth 2.1 §1.5); got {value!r}")
    return urlunsplit((parts.scheme, parts.netloc.lower(), parts.path.rstrip("/"), "", ""))
