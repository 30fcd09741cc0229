"""The binary search that places an id in its chunk by the chunks' smallest ids (the database
side, on 90 real chunks, is tests/integration/test_explain.py)."""

from __future__ import annotations

import math

import pytest

from services.api.store._chunks import search


async def _search(firsts: list[int | None], id_: int) -> tuple[int | None, int]:
    asked: list[int] = []

    async def first(i: int) -> int | None:
        asked.append(i)
        return firsts[i]

    return await search(len(firsts), first, id_), len(asked)


@pytest.mark.parametrize(
    ("id_", "expected"),
    [(1, 0), (99, 0), (100, 1), (150, 1), (899, 8), (900, 9), (10**12, 9), (0, None)],
)
async def test_the_last_chunk_whose_smallest_id_is_at_or_below(id_: int, expected: int | None) -> None:
    firsts: list[int | None] = [1, *range(100, 1000, 100)]  # chunk i holds ids from firsts[i]
    found, asked = await _search(firsts, id_)
    assert found == expected
    assert asked <= math.ceil(math.log2(len(firsts))) + 1


async def test_ninety_chunks_ask_at_most_seven_of_them() -> None:
    firsts: list[int | None] = [1 + 1000 * i for i in range(90)]
    for id_ in (1, 45_500, 89_999, 90_001):
        found, asked = await _search(firsts, id_)
        assert found == min((id_ - 1) // 1000, 89) and asked <= 7


async def test_no_chunk_or_an_empty_one_in_the_way_means_search_everywhere() -> None:
    assert (await _search([], 5))[0] is None
    assert (await _search([1, None, 300], 250))[0] is None
