"""A contact overview read on demand: typed part by part, yet the same as one read at once."""

from __future__ import annotations

import copy
import json
import pickle
from pathlib import Path
from typing import Any

import attrs
import pytest

from engage_async import ContactOverview, UnexpectedResponse
from engage_async._overview import read_overview
from engage_async._wire import structure

FIXTURE = Path(__file__).parent / "data" / "contact_overview.json"
PARTS = [f.name for f in attrs.fields(ContactOverview) if f.name not in {"id", "raw"}]


@pytest.fixture(name="data")
def data_fixture() -> dict[str, Any]:
    """Engage's documented overview answer, every part filled."""
    loaded: dict[str, Any] = json.loads(FIXTURE.read_text(encoding="utf-8"))
    return loaded


@pytest.mark.parametrize("part", PARTS)
def test_each_part_reads_as_an_eager_read_gives_it(data: dict[str, Any], part: str) -> None:
    """Every part, typed on first access, equals the same part typed at once."""
    assert getattr(structure(data, ContactOverview), part) == getattr(read_overview(data), part)


def test_equal_to_an_eager_overview_from_either_side(data: dict[str, Any]) -> None:
    """== holds both ways with an eagerly built overview, and != with a different one."""
    eager, lazy = structure(data, ContactOverview), read_overview(data)
    other = structure({**data, "audiences": ["someone else"]}, ContactOverview)

    assert (True, True, False, True) == (eager == lazy, lazy == eager, lazy == other, lazy != other)


def test_looks_like_a_contact_overview(data: dict[str, Any]) -> None:
    """isinstance, repr and hash are those of the eagerly built overview."""
    eager, lazy = structure(data, ContactOverview), read_overview(data)

    assert isinstance(lazy, ContactOverview)
    assert repr(eager) == repr(lazy)
    assert hash(eager) == hash(lazy)


def test_a_part_is_typed_once(data: dict[str, Any]) -> None:
    """The second access gives the very object the first built."""
    lazy = read_overview(data)

    assert lazy.attributes is lazy.attributes


def test_pickles_and_evolves(data: dict[str, Any]) -> None:
    """Pickling gives an equal overview; attrs.evolve works as on any overview."""
    lazy = read_overview(data)

    assert pickle.loads(pickle.dumps(lazy)) == lazy
    assert ("new",) == attrs.evolve(lazy, audiences=("new",)).audiences
    assert copy.copy(lazy) == lazy


@pytest.mark.parametrize(
    "broken",
    [
        {"attributes": ["not", "an", "object"]},
        {"consents": [{"id": "ok", "value": True}, "not an object"]},
        {"promotions": {"not": "a list"}},
    ],
    ids=["object-as-list", "item-not-object", "list-as-object"],
)
def test_a_part_of_the_wrong_kind_fails_in_the_call(
    data: dict[str, Any], broken: dict[str, Any]
) -> None:
    """A part whose JSON has a surprising shape is typed at once: an unreadable one raises
    UnexpectedResponse from read_overview, not later from an attribute access.
    """
    reread = {**data, **broken}
    try:
        eager: ContactOverview | None = structure(reread, ContactOverview)
    except UnexpectedResponse:
        eager = None

    if eager is None:
        with pytest.raises(UnexpectedResponse):
            read_overview(reread)
    else:
        assert eager == read_overview(reread)


@pytest.mark.parametrize("answer", [[], "text", {"attributes": {}}, None])
def test_an_answer_without_an_id_is_unexpected(answer: Any) -> None:
    """Not an object, or no id: UnexpectedResponse, as an eager read raises."""
    with pytest.raises(UnexpectedResponse):
        read_overview(answer)
