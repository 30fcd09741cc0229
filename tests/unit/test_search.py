"""The payload search's checks (services/api/search.py) and the console's parsing of the box:
which filter paths reach a secret path, and what the console refuses before asking the api."""

from __future__ import annotations

from typing import Any

import pytest

from services.api import search, secrets
from services.web.console import Refused, payload_filter
from shared import limits
from tests.helpers import struct

ANY = secrets.ANY


def test_leaf_paths_name_every_tested_value_with_array_items_at_any_index() -> None:
    value = {"repo": {"name": "x", "tags": ["a", {"k": 1}]}, "empty": {}, "none": []}
    assert sorted(map(secrets.path_text, search.leaf_paths(value))) == [
        "empty",
        "none",
        "repo.name",
        "repo.tags[*]",
        "repo.tags[*].k",
    ]


@pytest.mark.parametrize(
    ("searched", "secret", "reached"),
    [
        (("token",), ("token",), True),
        (("creds", "password"), ("creds",), True),  # below a secret
        (("creds",), ("creds", "password"), True),  # an object holding one
        (("creds", "login"), ("creds", "password"), False),
        (("keys", ANY, "key"), ("keys", 0, "key"), True),
        (("keys", ANY, "id"), ("keys", ANY, "key"), False),
        (("keys", "0"), ("keys", 0), False),  # a property named "0" is not item 0
        (("a", "b"), (ANY, "b"), True),
    ],
)
def test_a_filter_reaches_a_secret_at_below_or_above_it(
    searched: tuple[Any, ...], secret: tuple[Any, ...], reached: bool
) -> None:
    assert search.overlaps(searched, secret) is reached


def test_secret_reached_names_the_first_path_that_reaches_one() -> None:
    marked = [("creds", "password"), ("tokens", ANY)]
    assert search.secret_reached({"user": "ann", "creds": {"login": "a"}}, marked) is None
    assert search.secret_reached({"user": "ann", "tokens": ["t"]}, marked) == "tokens[*]"
    assert search.secret_reached({"creds": {}}, marked) == "creds"
    assert search.secret_reached({"creds": {}}, []) is None


def test_the_filter_is_bounded_and_an_empty_one_filters_nothing() -> None:
    assert search.payload_filter(struct({})) is None
    assert search.payload_filter(struct({"n": 3.0})) == {"n": 3}
    with pytest.raises(Exception, match="payload_contains"):
        search.payload_filter(struct({f"k{i}": [1, 2] for i in range(limits.MAX_SEARCH_VALUES // 2 + 1)}))
    # Keys sorted: the same filter is the same page-token scope however it was ordered.
    assert search.as_json({"b": 1, "a": {"d": 2, "c": 3}}) == search.as_json({"a": {"c": 3, "d": 2}, "b": 1})


@pytest.mark.parametrize(
    ("typed", "why"),
    [
        ("{", "not JSON"),
        ("[1]", "a JSON object"),
        ('"x"', "a JSON object"),
        ("[" * 5000 + "]" * 5000, "bytes"),
        ('{"a":' * 2000 + "1" + "}" * 2000, "bytes"),
        ("[" * 2000 + "]" * 2000, "a JSON object"),  # past the parser's recursion limit
        ('{"a":' * 500 + "1" + "}" * 500, "nests at most 8"),
        ('{"a":' * 9 + "1" + "}" * 9, "nests at most 8"),
    ],
)
def test_the_console_refuses_what_it_cannot_send(typed: str, why: str) -> None:
    with pytest.raises(Refused, match=why):
        payload_filter(typed)


def test_the_console_sends_an_object_as_typed() -> None:
    assert payload_filter("") is None
    assert payload_filter('{"repo": {"name": "x"}}') == {"repo": {"name": "x"}}
    assert payload_filter('{"a":' * 8 + "1" + "}" * 8) is not None
