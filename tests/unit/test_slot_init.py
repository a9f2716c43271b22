"""`schemas.slot_init`: the faster `__init__` of the event classes makes what the dataclass's own made,
keeps them frozen, and refuses the classes it cannot serve."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.base import Event
from schemas.envelope import Envelope
from schemas.events import PAYLOAD_TYPES, CallStarted
from schemas.slot_init import slot_init


def shape(name: str) -> Any:
    """A frozen, slotted dataclass of each kind of field, made anew for each side of the comparison and
    named as the module global it is bound to (pickle finds a class by its name)."""

    @dataclass(frozen=True, slots=True)
    class Shape:
        name: str
        count: int
        note: str | None = None
        tags: tuple[str, ...] = ()
        extra: dict[str, str] = field(default_factory=dict)

    Shape.__name__ = Shape.__qualname__ = name
    return Shape


Plain = shape("Plain")
"""With the dataclass's own `__init__`."""
Fast = slot_init(shape("Fast"))


@given(name=st.text(), count=st.integers(), note=st.none() | st.text(), tags=st.lists(st.text()).map(tuple),
       extra=st.dictionaries(st.text(), st.text()), keywords=st.booleans())
def test_it_stores_what_the_dataclass_init_stores(name: str, count: int, note: str | None, tags: tuple[str, ...],
                                                   extra: dict[str, str], keywords: bool) -> None:
    args: tuple[Any, ...] = (name, count, note, tags, extra)
    plain = Plain(name=name, count=count, note=note, tags=tags, extra=extra) if keywords else Plain(*args)
    fast = Fast(name=name, count=count, note=note, tags=tags, extra=extra) if keywords else Fast(*args)
    assert dataclasses.astuple(fast) == dataclasses.astuple(plain)
    assert fast == Fast(*args)


def test_defaults_and_factories_are_those_of_the_fields() -> None:
    first, second = Fast("a", 1), Fast("b", 2)
    assert (first.note, first.tags, first.extra) == (None, (), {})
    assert first.extra is not second.extra, "each instance has a dict of its own, as with the dataclass's init"


def test_the_instances_stay_frozen_and_behave_as_dataclasses() -> None:
    made = Fast("a", 1, extra={"k": "v"})
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.name = "b"  # type: ignore[misc]
    assert dataclasses.replace(made, count=2) == Fast("a", 2, extra={"k": "v"})
    assert pickle.loads(pickle.dumps(made)) == made
    assert copy.deepcopy(made) == made
    assert type(made).__init__.__qualname__ == "Fast.__init__"


@pytest.mark.parametrize(("args", "kwargs"), [(("a",), {}), (("a", 1, None, (), {}, "more"), {}),
                                              (("a", 1), {"colour": "red"}), (("a",), {"name": "b", "count": 1})])
def test_wrong_arguments_are_refused_as_the_dataclass_refuses_them(args: tuple[Any, ...],
                                                                   kwargs: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        Plain(*args, **kwargs)
    with pytest.raises(TypeError):
        Fast(*args, **kwargs)


def test_the_event_classes_have_it() -> None:
    for cls in (Envelope, Event, *PAYLOAD_TYPES.values()):
        assert cls.__init__.__qualname__ == f"{cls.__qualname__}.__init__"
        assert "_store_" in " ".join(cls.__init__.__code__.co_freevars), cls


def test_an_event_made_by_keywords_has_its_defaults() -> None:
    started = CallStarted(agent_id="a", agent_version="1", channel="sip", direction="inbound", routed_by="number",
                          from_number="+1")
    assert (started.to_number, started.parameters, started.caller_key) == (None, {}, None)
    assert started == CallStarted.from_avro(started.to_avro())


def test_classes_it_cannot_serve_are_refused() -> None:
    @dataclass(slots=True)
    class Thawed:
        name: str

    @dataclass(frozen=True)
    class Unslotted:
        name: str

    @dataclass(frozen=True, slots=True)
    class Checked:
        name: str

        def __post_init__(self) -> None:
            pass

    @dataclass(frozen=True, slots=True)
    class KeywordOnly:
        name: str = field(kw_only=True)

    @dataclass(frozen=True, slots=True)
    class Derived:
        name: str
        length: int = field(init=False, default=0)

    for cls in (Thawed, Unslotted, Checked, KeywordOnly, Derived):
        with pytest.raises(TypeError, match="slot_init"):
            slot_init(cls)
