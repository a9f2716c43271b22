"""The widget's protocol and its per-address bound, apart from any socket: whatever a page sends is an event
or a bad frame, never an exception; the opening message is a `Hello` or a ValueError; one address's calls
are bounded and its places come back."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.widget import CallsPerAddress
from streams.audio.formats import PCM_FRAME_BYTES
from streams.channels.widget_protocol import (
    MAX_CONTROL_CHARS,
    BadFrame,
    Hello,
    MarkReached,
    PageAudio,
    PageReader,
    parse_hello,
)

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4),
                           max_leaves=20)
nesting = st.sampled_from(["[", "{\"a\":", "[{\"b\":"])


@given(st.text(max_size=MAX_CONTROL_CHARS + 100))
def test_any_text_the_page_sends_is_a_mark_a_bad_frame_or_nothing(text: str) -> None:
    events = PageReader().read(text)
    assert len(events) <= 1
    assert all(isinstance(event, MarkReached | BadFrame) for event in events)


@given(json_values)
def test_a_json_value_that_is_not_an_object_is_a_bad_frame(value: object) -> None:
    events = PageReader().read(json.dumps(value))
    if isinstance(value, dict):
        assert not any(isinstance(event, BadFrame) for event in events)
    else:
        assert len(events) == 1
        assert isinstance(events[0], BadFrame)
        assert "must be a JSON object" in events[0].reason


@given(nesting, st.integers(min_value=1_000, max_value=MAX_CONTROL_CHARS // 6))
def test_json_nested_past_the_parsers_stack_is_a_bad_frame(opening: str, depth: int) -> None:
    (event,) = PageReader().read(opening * depth)
    assert isinstance(event, BadFrame)
    assert "nested too deeply" in event.reason or "not JSON" in event.reason


def test_a_text_message_past_the_bound_is_refused_before_it_is_parsed() -> None:
    (event,) = PageReader().read("[" * 200_000)
    assert isinstance(event, BadFrame)
    assert event.reason.startswith(f"control message of 200000 characters, more than {MAX_CONTROL_CHARS}")
    assert len(event.reason) < 300, "the reason shows the start of the message, not all of it"


def test_a_deeply_nested_message_within_the_bound_is_a_bad_frame() -> None:
    (event,) = PageReader().read("[" * MAX_CONTROL_CHARS)
    assert isinstance(event, BadFrame)
    assert event.reason.startswith("control message nested too deeply")


def test_marks_audio_and_unknown_control_messages_still_read_as_before() -> None:
    reader = PageReader()
    assert reader.read(json.dumps({"type": "mark", "name": "turn-3"})) == [MarkReached("turn-3")]
    assert reader.read(json.dumps({"type": "volume", "level": 3})) == [], "a newer page's message is skipped"
    frame = bytes(range(256)) * 2 + bytes(PCM_FRAME_BYTES - 512)
    assert reader.read(frame) == [PageAudio(frame)]
    (odd,) = reader.read(b"\x00" * 3)
    assert isinstance(odd, BadFrame)


@given(st.text(max_size=MAX_CONTROL_CHARS + 100))
def test_the_opening_message_is_a_hello_or_a_value_error(text: str) -> None:
    try:
        hello = parse_hello(text)
    except ValueError:
        return
    assert isinstance(hello, Hello)


@pytest.mark.parametrize("text", ["[" * 200_000, "[" * MAX_CONTROL_CHARS, "{\"key\":" * 2_000, "[1]", "not json"],
                         ids=["past-the-bound", "array-too-deep", "object-too-deep", "an-array", "not-json"])
def test_an_opening_message_that_is_not_an_object_is_a_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="control message"):
        parse_hello(text)


def test_the_opening_message_names_the_key_and_the_page() -> None:
    page = "https://shop.example/" + "p" * 900
    hello = parse_hello(json.dumps({"type": "start", "key": "demo-widget-key", "page": page}))
    assert hello.key == "demo-widget-key"
    assert len(hello.page) == 500


def test_each_address_has_its_calls_up_to_the_limit_and_gets_places_back_as_they_end() -> None:
    callers = CallsPerAddress(limit=3)
    assert [callers.take("203.0.113.7") for _ in range(4)] == [True, True, True, False]
    assert callers.take("203.0.113.8"), "another address is not held back by the first"
    callers.give_back("203.0.113.7")
    assert callers.take("203.0.113.7")
    assert not callers.take("203.0.113.7")


def test_an_address_without_live_calls_is_forgotten() -> None:
    callers = CallsPerAddress(limit=2)
    for index in range(1_000):
        address = f"198.51.100.{index % 250}/{index}"
        assert callers.take(address)
        callers.give_back(address)
    assert not callers._live
