"""The parsers of setting values, one per kind: what each accepts, and the problem it reports for anything else."""

from __future__ import annotations

import pytest

from oauthproxy.config_values import (
    absolute_url,
    boolean_value,
    origin_url,
    read_bool,
    read_choice,
    read_int,
    read_list,
    read_seconds,
    read_url,
    string_list,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        (" 1 ", True),
        ("yes", True),
        ("On", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("OFF", False),
        (True, True),
        (False, False),
    ],
)
def test_boolean_spellings(raw: object, expected: bool) -> None:
    problems: list[str] = []
    assert boolean_value(raw, "X", not expected, problems) is expected
    assert problems == []


@pytest.mark.parametrize("raw", ["maybe", "2", "enabled", "", 1, None, ["true"]])
def test_a_bad_boolean_names_the_accepted_spellings_and_keeps_the_default(raw: object) -> None:
    for default in (True, False):
        problems: list[str] = []
        assert boolean_value(raw, "X", default, problems) is default
        assert problems == [f"X must be true or false (also accepted: 1/0, yes/no, on/off); got {raw!r}"]


def test_an_unset_or_empty_boolean_setting_is_its_default() -> None:
    problems: list[str] = []
    assert read_bool({}, "X", True, problems) is True
    assert read_bool({"X": "  "}, "X", False, problems) is False
    assert read_bool({"X": "no"}, "X", True, problems) is False
    assert problems == []


@pytest.mark.parametrize(
    ("raw", "unit", "problem"),
    [
        ("eighty", "", "X must be a whole number; got 'eighty'"),
        ("lots", "bytes", "X must be a number of bytes; got 'lots'"),
        ("1.5", "", "X must be a whole number; got '1.5'"),
        ("30.5", "seconds", "X must be a whole number of seconds; got '30.5'"),
        ("nan", "", "X must be a whole number; got 'nan'"),
        ("inf", "", "X must be a whole number; got 'inf'"),
        ("-1", "", "X must be between 0 and 100; got -1"),
        ("101", "", "X must be between 0 and 100; got 101"),
    ],
)
def test_bad_whole_numbers(raw: str, unit: str, problem: str) -> None:
    problems: list[str] = []
    assert read_int({"X": raw}, "X", 7, problems, minimum=0, maximum=100, unit=unit) == 7
    assert problems == [problem]


def test_whole_numbers() -> None:
    problems: list[str] = []
    assert read_int({}, "X", 7, problems) == 7
    assert read_int({"X": " 42 "}, "X", 7, problems) == 42
    assert read_int({"X": "1e3"}, "X", 7, problems) == 1000  # as it was for byte sizes: exponent and .0 are whole
    assert read_int({"X": "30.0"}, "X", 7, problems) == 30
    assert read_int({"X": "5"}, "X", 7, problems, minimum=5, maximum=5) == 5
    assert problems == []
    assert read_int({"X": "0"}, "X", 7, problems, minimum=1) == 7
    assert problems == ["X must be at least 1; got 0"]


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ("soon", "X must be a number of seconds; got 'soon'"),
        ("nan", "X must be a number of seconds; got 'nan'"),
        ("-0.5", "X must be between 0.1 and 120; got -0.5"),
        ("inf", "X must be between 0.1 and 120; got inf"),
        ("121", "X must be between 0.1 and 120; got 121"),
    ],
)
def test_bad_seconds(raw: str, problem: str) -> None:
    problems: list[str] = []
    assert read_seconds({"X": raw}, "X", 5.0, problems, minimum=0.1, maximum=120) == 5.0
    assert problems == [problem]


def test_seconds_take_fractions() -> None:
    problems: list[str] = []
    assert read_seconds({"X": "0.25"}, "X", 5.0, problems, minimum=0.1, maximum=120) == 0.25
    assert read_seconds({}, "X", 5.0, problems, minimum=0.1, maximum=120) == 5.0
    assert problems == []


def test_choice() -> None:
    problems: list[str] = []
    assert read_choice({"X": "JSON"}, "X", "text", ("text", "json"), problems) == "json"
    assert read_choice({}, "X", "text", ("text", "json"), problems) == "text"
    assert problems == []
    assert read_choice({"X": "xml"}, "X", "text", ("text", "json"), problems) == "text"
    assert problems == ["X must be text or json; got 'xml'"]


def test_lists_from_text_and_from_toml() -> None:
    problems: list[str] = []
    assert read_list({"X": " a, b  c,\td ,, "}, "X", problems) == ("a", "b", "c", "d")
    assert read_list({}, "X", problems) == ()
    assert string_list(["a", " b "], "X", problems) == ("a", "b")
    assert problems == []
    assert string_list(["a", 3], "X", problems) == ()
    assert string_list(["a", " "], "X", problems) == ()
    assert problems == ["X must be a list of non-empty strings"] * 2


def test_urls() -> None:
    problems: list[str] = []
    assert read_url({}, "X", problems) is None
    assert read_url({"X": " http://10.0.0.1:9000/mcp "}, "X", problems) == "http://10.0.0.1:9000/mcp"
    assert origin_url("X", "https://MCP.example.com/base/", problems) == "https://mcp.example.com/base"
    assert origin_url("X", "http://127.0.0.1:8080", problems) == "http://127.0.0.1:8080"
    assert problems == []
    absolute_url("X", "ftp://example.com", problems)
    origin_url("X", "http://mcp.example.com", problems)
    origin_url("X", "https://mcp.example.com/?q=1", problems)
    origin_url("X", "mcp.example.com", problems)
    assert problems == [
        "X must be an absolute http(s) URL; got 'ftp://example.com'",
        "X must use https unless it is a loopback address (OAuth 2.1 §1.5); got 'http://mcp.example.com'",
        "X must not have a query or fragment; got 'https://mcp.example.com/?q=1'",
        "X must be an absolute http(s) URL such as https://mcp.example.com; got 'mcp.example.com'",
    ]
