"""The OpenAI and Anthropic adapters, with the official SDKs, against a local server that replays each
provider's recorded wire protocol (tests/fixtures/providers): streaming, tool calls, a tool round
trip through the call core, and every way a provider fails, each as the right `ProviderError`."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.events import (
    CallAnswered,
    CallStarted,
    LlmDecided,
    SpeechStarted,
    SpeechStopped,
    ToolCallSpec,
    ToolSucceeded,
    TranscriptFinal,
    TtsCompleted,
)
from streams.call.core import END_CALL_TOOL, CallLlm
from streams.config.agents import load_agents
from streams.providers import llm_anthropic, llm_openai
from streams.providers.base import (
    ChatMessage,
    LlmProvider,
    LlmRequest,
    LlmResult,
    ProviderError,
    ToolSpec,
)
from streams.providers.cloud import StreamTimeouts, retry_after_s
from streams.providers.llm_anthropic import AnthropicLlm
from streams.providers.llm_openai import OpenAiLlm
from tests.provider_server import Fault, ProviderServer, Reply
from voxlog.settings import DEFAULT_AGENTS_DIR
from voxlog.sim.core_calls import CoreSim

API_KEY = "sk-test-voxlog-7Hq2Lm9Xc4Vb8Nz1Pw6Rt3Ys2xQ9"
TIMEOUT_S = 0.3  # a timeout under test: small, so that the file stays fast
SLACK_S = 0.5  # how much later than its timeout a failure may surface
# Where a test is not about timeouts: generous, as a loaded machine may be slow to answer.
RELAXED = StreamTimeouts(connect_s=5.0, first_token_s=5.0, stall_s=5.0)

BOOK = ToolSpec(
    "book_appointment",
    "Book a technician visit.",
    '{"type":"object","properties":{"day":{"type":"string"},"time":{"type":"string"}},"required":["day"]}',
)
SYSTEM = ("You are the front desk of Acme Heating.", "Book visits; answer briefly.", "Never give prices.")


def ask(*turns: ChatMessage, parameters: dict[str, str] | None = None) -> LlmRequest:
    return LlmRequest(
        request_id="call-t/llm/0",
        model="",
        messages=(*(ChatMessage("system", s) for s in SYSTEM), *turns),
        tools=(BOOK, END_CALL_TOOL),
        parameters={"temperature": "0"} if parameters is None else parameters,
    )


GREETING = ChatMessage("assistant", "Thanks for calling Acme Heating, how can I help?")
BOOKING = ChatMessage("user", "I'd like a technician on Tuesday afternoon")


@dataclass(frozen=True)
class Provider:
    """One provider's side of the tests every provider must pass."""

    name: str
    make: Callable[[str, StreamTimeouts], LlmProvider]  # (base_url, timeouts)
    text: str
    text_answer: str
    text_tokens: tuple[int, int]
    answering_model: str
    first_token_chunk: int  # the text stream's first chunk that carries text
    tool_call: str
    after_tool: str
    rate_limited: str
    retry_after_s: float
    server_errors: tuple[str, ...]
    unauthorized: str
    malformed: str
    error_in_stream: str


def make_openai(base_url: str, timeouts: StreamTimeouts) -> OpenAiLlm:
    return OpenAiLlm(API_KEY, base_url=f"{base_url}/v1", timeouts=timeouts)


def make_anthropic(base_url: str, timeouts: StreamTimeouts) -> AnthropicLlm:
    return AnthropicLlm(API_KEY, base_url=base_url, timeouts=timeouts)


OPENAI = Provider(
    name="openai",
    make=make_openai,
    text="openai/chat_text_stream",
    text_answer="Sure, I can book a technician for Tuesday.",
    text_tokens=(187, 11),
    answering_model="gpt-4o-2024-11-20",
    first_token_chunk=1,  # after the role chunk
    tool_call="openai/chat_tool_call_stream",
    after_tool="openai/chat_after_tool_result",
    rate_limited="openai/rate_limited_429",
    retry_after_s=1.45,  # retry-after-ms wins over retry-after
    server_errors=("openai/server_error_500",),
    unauthorized="openai/unauthorized_401",
    malformed="openai/chat_malformed_stream",
    error_in_stream="openai/chat_error_in_stream",
)
ANTHROPIC = Provider(
    name="anthropic",
    make=make_anthropic,
    text="anthropic/messages_text_stream",
    text_answer="Sure, I can book a technician for Tuesday.",
    text_tokens=(412, 14),
    answering_model="claude-haiku-4-5-20251001",
    first_token_chunk=3,  # after message_start, content_block_start and a ping
    tool_call="anthropic/messages_tool_use_stream",
    after_tool="anthropic/messages_after_tool_result",
    rate_limited="anthropic/rate_limited_429",
    retry_after_s=7.0,
    server_errors=("anthropic/server_error_500", "anthropic/overloaded_529"),
    unauthorized="anthropic/unauthorized_401",
    malformed="anthropic/messages_malformed_stream",
    error_in_stream="anthropic/messages_error_in_stream",
)


@pytest.fixture(params=[OPENAI, ANTHROPIC], ids=lambda p: p.name)
def provider(request: pytest.FixtureRequest) -> Provider:
    spec: Provider = request.param
    return spec


@pytest.fixture
async def llm(provider: Provider, server: ProviderServer) -> AsyncIterator[LlmProvider]:
    adapter = provider.make(server.base_url, RELAXED)
    yield adapter
    await adapter.aclose()  # type: ignore[attr-defined]


async def failure(llm: LlmProvider, request: LlmRequest) -> ProviderError:
    with pytest.raises(ProviderError) as caught:
        await llm.complete(request)
    return caught.value


# Streaming answers


async def test_a_text_answer_streams_with_its_usage_model_and_first_token(
    provider: Provider, server: ProviderServer, llm: LlmProvider
) -> None:
    server.reply(provider.text)
    result = await llm.complete(ask(GREETING, BOOKING))
    assert result.text == provider.text_answer
    assert result.tool_calls == ()
    assert result.finish_reason == "stop"
    assert (result.input_tokens, result.output_tokens) == provider.text_tokens
    assert result.model == provider.answering_model
    assert 0 <= result.time_to_first_token_ms <= result.total_ms
    sent = server.requests[0]
    assert sent.headers["authorization"] == f"Bearer {API_KEY}"
    assert sent.json()["stream"] is True


async def test_time_to_first_token_runs_to_the_first_text_not_the_first_event(
    provider: Provider, server: ProviderServer, llm: LlmProvider
) -> None:
    server.reply(provider.text, Fault(stall_before_chunk=provider.first_token_chunk, stall_s=0.25))
    result = await llm.complete(ask(BOOKING))
    assert result.time_to_first_token_ms >= 250
    assert result.total_ms >= result.time_to_first_token_ms


async def test_a_tool_call_streamed_in_pieces_is_put_together(
    provider: Provider, server: ProviderServer, llm: LlmProvider
) -> None:
    server.reply(provider.tool_call)
    result = await llm.complete(ask(GREETING, BOOKING))
    assert result.finish_reason == "tool_calls"
    [call] = result.tool_calls
    assert call.name == "book_appointment"
    assert call.id.startswith(("call_", "toolu_"))
    assert json.loads(call.arguments_json) == {"day": "Tuesday", "time": "after 2 pm"}
    assert result.output_tokens > 0


async def test_a_tool_round_trip_through_the_call_core(
    provider: Provider, server: ProviderServer, llm: LlmProvider
) -> None:
    """The core's own requests: the tool call the provider asked for and the tool's result go back
    to it in its own format, and the answer after it is what the caller hears."""
    agent = next(a for a in load_agents(DEFAULT_AGENTS_DIR) if a.id == "front-desk")
    sim = CoreSim(agent)
    sim.feed(CallStarted(channel="phone", direction="inbound", agent_id=agent.id, agent_version=agent.version,
                         routed_by="number"))
    sim.feed(CallAnswered(answered_by=None))
    sim.feed(TtsCompleted(request_id="call-1/tts/0", provider="p", voice="v", time_to_first_byte_ms=1, audio_ms=100,
                          audio_bytes=10, interrupted=False))
    sim.feed(SpeechStarted(offset_ms=100))
    sim.feed(SpeechStopped(offset_ms=2000, duration_ms=1900))
    turn = sim.feed(TranscriptFinal(utterance_id="u0", text="i would like to book an appointment on tuesday",
                                    confidence=0.9, provider="p", model="m", start_ms=0, end_ms=1, latency_ms=1))
    first = next(d.action.request for d in turn if isinstance(d.action, CallLlm))

    server.reply(provider.tool_call)
    asked = await llm.complete(first)
    tool = sim.feed(decision(first.request_id, asked))
    [call] = asked.tool_calls
    # What the model said with its call ("Let me book that for you.", Claude's) is spoken meanwhile.
    spoken = ["tts.requested"] if asked.text.strip() else []
    assert [d.payload.EVENT_TYPE for d in tool] == [*spoken, "tool.requested"]
    again = sim.feed(ToolSucceeded(tool_call_id=call.id, tool=call.name, result_json='{"confirmation":"A1"}',
                                   attempt=1, latency_ms=5))
    second = next(d.action.request for d in again if isinstance(d.action, CallLlm))

    server.reply(provider.after_tool)
    answer = await llm.complete(second)
    said = sim.feed(decision(second.request_id, answer))
    assert [d.payload.EVENT_TYPE for d in said] == ["tts.requested"]
    assert said[0].payload.text == "You're booked for Tuesday at 2 pm."  # type: ignore[attr-defined]

    body = server.requests[1].json()
    arguments = json.loads(call.arguments_json)
    if provider is OPENAI:
        *_, assistant, result = body["messages"]
        assert assistant == {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "book_appointment",
                                                               "arguments": call.arguments_json}}]}
        assert result == {"role": "tool", "tool_call_id": call.id, "content": '{"confirmation":"A1"}'}
    else:
        messages = body["messages"]
        roles = [m["role"] for m in messages]
        assert all(a != b for a, b in itertools.pairwise(roles)), roles  # turns alternate
        *_, assistant, result = messages
        said_first = [{"type": "text", "text": asked.text.strip()}] if spoken else []
        assert assistant == {"role": "assistant", "content": [
            *said_first, {"type": "tool_use", "id": call.id, "name": "book_appointment", "input": arguments}]}
        assert result == {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call.id, "content": '{"confirmation":"A1"}', "is_error": False}]}


def decision(request_id: str, result: LlmResult) -> LlmDecided:
    return LlmDecided(
        request_id=request_id, provider="test", model=result.model, text=result.text,
        tool_calls=tuple(ToolCallSpec(id=c.id, name=c.name, arguments_json=c.arguments_json)
                         for c in result.tool_calls),
        finish_reason=result.finish_reason, input_tokens=result.input_tokens, output_tokens=result.output_tokens,
        time_to_first_token_ms=result.time_to_first_token_ms, total_ms=result.total_ms,
    )


# What each adapter sends


async def test_openai_gets_chat_messages_function_tools_and_the_usage_flag(server: ProviderServer) -> None:
    llm = make_openai(server.base_url, StreamTimeouts())
    server.reply(OPENAI.text)
    await llm.complete(ask(GREETING, BOOKING, parameters={"temperature": "0.2", "max_tokens": "200", "seed": "7"}))
    await llm.aclose()
    sent = server.requests[0]
    assert (sent.method, sent.path) == ("POST", "/v1/chat/completions")
    body = sent.json()
    assert body["model"] == "gpt-4o"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["max_completion_tokens"], body["seed"]) == (0.2, 200, 7)
    assert "max_tokens" not in body
    assert body["messages"] == [
        *({"role": "system", "content": s} for s in SYSTEM),
        {"role": "assistant", "content": GREETING.content},
        {"role": "user", "content": BOOKING.content},
    ]
    assert body["tools"][0] == {"type": "function", "function": {
        "name": "book_appointment", "description": "Book a technician visit.",
        "parameters": json.loads(BOOK.parameters_json)}}
    assert [t["function"]["name"] for t in body["tools"]] == ["book_appointment", "end_call"]


async def test_anthropic_gets_a_separate_system_alternating_turns_and_max_tokens(
    server: ProviderServer, caplog: pytest.LogCaptureFixture
) -> None:
    llm = make_anthropic(server.base_url, StreamTimeouts())
    server.reply(ANTHROPIC.text)
    server.reply(ANTHROPIC.text)
    again = ChatMessage("user", "in the afternoon if possible")
    with caplog.at_level(logging.WARNING):
        await llm.complete(ask(GREETING, BOOKING, again))
        await llm.complete(ask(GREETING, BOOKING, parameters={"temperature": "0", "max_tokens": "300", "stop": "##"}))
    await llm.aclose()
    sent = server.requests[0]
    assert (sent.method, sent.path) == ("POST", "/v1/messages")
    assert sent.headers["anthropic-version"]
    body = sent.json()
    assert body["model"] == "claude-haiku-4-5"
    assert body["stream"] is True
    assert body["max_tokens"] == 1024  # required by the API: the adapter's default
    assert body["system"] == [{"type": "text", "text": s} for s in SYSTEM]
    assert body["messages"] == [
        {"role": "assistant", "content": [{"type": "text", "text": GREETING.content}]},
        {"role": "user", "content": [{"type": "text", "text": BOOKING.content},
                                     {"type": "text", "text": again.content}]},
    ]
    assert body["tools"][0] == {"name": "book_appointment", "description": "Book a technician visit.",
                                "input_schema": json.loads(BOOK.parameters_json)}
    assert "temperature" not in body  # the API version this SDK speaks refuses sampling parameters
    second = server.requests[1].json()
    assert (second["max_tokens"], second["stop_sequences"]) == (300, ["##"])
    warnings = [r.getMessage() for r in caplog.records if "temperature" in r.getMessage()]
    assert len(warnings) == 1  # once, not on every turn


async def test_a_parameter_that_does_not_parse_is_a_bad_request_and_nothing_is_sent(
    provider: Provider, server: ProviderServer, llm: LlmProvider
) -> None:
    error = await failure(llm, ask(BOOKING, parameters={"max_tokens": "plenty"}))
    assert (error.kind, error.retryable) == ("bad_request", False)
    assert "max_tokens" in str(error)
    assert server.requests == []


async def test_tool_results_without_their_call_and_foreign_call_ids_still_make_a_valid_request(
    provider: Provider, server: ProviderServer, llm: LlmProvider
) -> None:
    """A result whose call fell out of the core's context window goes as text; the scripted LLM's
    ids (`call/llm/0/0`), which neither provider takes, are rewritten for the call and its result."""
    scripted_id = "call-9/llm/0/0"
    calls = json.dumps([{"id": scripted_id, "name": "book_appointment", "arguments": '{"day":"Tuesday"}'}])
    server.reply(provider.text)
    await llm.complete(ask(
        ChatMessage("tool", '{"ticket":"T7"}', name="create_ticket", tool_call_id="call-9/llm/0/9"),
        BOOKING,
        ChatMessage("assistant", calls),
        ChatMessage("tool", '{"error":"calendar down"}', name="book_appointment", tool_call_id=scripted_id),
    ))
    body = server.requests[0].json()
    text = json.dumps(body)
    assert "call-9/llm" not in text
    if provider is OPENAI:
        orphan, _, assistant, result = body["messages"][3:]
        assert orphan["role"] == "user"
        assert "create_ticket" in orphan["content"]
        assert "T7" in orphan["content"]
        assert result["tool_call_id"] == assistant["tool_calls"][0]["id"]
    else:
        [first, assistant, result] = body["messages"]
        assert [b["type"] for b in first["content"]] == ["text", "text"]  # the orphan, then the caller
        assert "create_ticket" in first["content"][0]["text"]
        assert result["content"][0]["tool_use_id"] == assistant["content"][0]["id"]
        assert result["content"][0]["is_error"] is True


# Failures


async def test_rate_limited_carries_the_retry_after(
    provider: Provider, server: ProviderServer, llm: LlmProvider
) -> None:
    server.reply(provider.rate_limited)
    error = await failure(llm, ask(BOOKING))
    assert (error.kind, error.retryable) == ("rate_limited", True)
    assert error.retry_after_s == pytest.approx(provider.retry_after_s)
    assert len(server.requests) == 1  # the SDK's own retries are off


async def test_server_errors_are_retryable(provider: Provider, server: ProviderServer, llm: LlmProvider) -> None:
    for fixture in provider.server_errors:
        server.reply(fixture)
        error = await failure(llm, ask(BOOKING))
        assert (error.kind, error.retryable) == ("server", True), fixture
    assert len(server.requests) == len(provider.server_errors)


async def test_an_error_event_mid_stream_is_a_server_error(
    provider: Provider, server: ProviderServer, llm: LlmProvider
) -> None:
    server.reply(provider.error_in_stream)
    error = await failure(llm, ask(BOOKING))
    assert (error.kind, error.retryable) == ("server", True)
    assert "error in the stream" in str(error)


async def test_a_wrong_key_is_an_auth_error_that_never_shows_the_key(
    provider: Provider, server: ProviderServer, llm: LlmProvider, caplog: pytest.LogCaptureFixture
) -> None:
    server.reply(provider.unauthorized)
    server.reply(provider.text)
    with caplog.at_level(logging.DEBUG):
        error = await failure(llm, ask(BOOKING))
        await llm.complete(ask(BOOKING))
    assert (error.kind, error.retryable) == ("auth", False)
    assert "401" in str(error)
    for text in (str(error), repr(error.__cause__), caplog.text, repr(llm)):
        assert API_KEY not in text


async def test_a_malformed_stream_is_a_protocol_error(
    provider: Provider, server: ProviderServer, llm: LlmProvider
) -> None:
    server.reply(provider.malformed)
    error = await failure(llm, ask(BOOKING))
    assert (error.kind, error.retryable) == ("protocol", True)
    assert "not JSON" in str(error)


async def test_a_stream_cut_off_before_its_end_is_a_retryable_protocol_error(
    provider: Provider, server: ProviderServer, llm: LlmProvider
) -> None:
    server.reply(provider.text, Fault(close_after_chunks=4))  # the connection drops mid-body
    reply = Reply.load(provider.text)
    server.reply(dataclasses.replace(reply, chunks=reply.chunks[:-3]))  # the body ends, the answer does not
    for how in ("broke off", "ended before"):
        error = await failure(llm, ask(BOOKING))
        assert (error.kind, error.retryable) == ("protocol", True)
        assert how in str(error)


async def test_no_first_byte_in_time_is_a_timeout(provider: Provider, server: ProviderServer) -> None:
    llm = provider.make(server.base_url, StreamTimeouts(first_token_s=TIMEOUT_S))
    server.reply(provider.text)  # the first request of a client pays for its setup: not the case under test
    await llm.complete(ask(BOOKING))
    server.reply(provider.text, Fault(headers_delay_s=5.0))
    started = time.perf_counter()
    error = await failure(llm, ask(BOOKING))
    await llm.aclose()  # type: ignore[attr-defined]
    assert (error.kind, error.retryable) == ("timeout", True)
    assert time.perf_counter() - started < TIMEOUT_S + SLACK_S


async def test_a_stall_mid_stream_fails_within_the_stall_timeout(provider: Provider, server: ProviderServer) -> None:
    llm = provider.make(server.base_url, StreamTimeouts(first_token_s=5.0, stall_s=TIMEOUT_S))
    server.reply(provider.text, Fault(stall_before_chunk=4, stall_s=5.0))
    error = await failure(llm, ask(BOOKING))
    stalled_for = time.perf_counter() - server.faulted_at[0]
    await llm.aclose()  # type: ignore[attr-defined]
    assert (error.kind, error.retryable) == ("timeout", True)
    assert "stalled" in str(error)
    assert TIMEOUT_S <= stalled_for < TIMEOUT_S + SLACK_S


async def test_a_slow_but_steady_stream_is_not_a_stall(provider: Provider, server: ProviderServer) -> None:
    """The stall timeout bounds each gap, not the answer: a gap shorter than it passes."""
    llm = provider.make(server.base_url, StreamTimeouts(first_token_s=5.0, stall_s=1.0))
    server.reply(provider.text, Fault(stall_before_chunk=5, stall_s=0.2))
    result = await llm.complete(ask(BOOKING))
    await llm.aclose()  # type: ignore[attr-defined]
    assert result.text == provider.text_answer
    assert result.total_ms >= 200


async def test_nobody_listening_is_a_connection_error(provider: Provider) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    llm = provider.make(f"http://127.0.0.1:{port}", StreamTimeouts())
    error = await failure(llm, ask(BOOKING))
    await llm.aclose()  # type: ignore[attr-defined]
    assert (error.kind, error.retryable) == ("connection", True)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "0.5", "retry-after-ms": "250"}, 0.25),
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_reads_seconds_and_milliseconds(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after_s(headers) == expected


def test_retry_after_reads_an_http_date() -> None:
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    wait = retry_after_s({"retry-after": when})
    assert wait is not None
    assert 28 <= wait <= 31


# The replay server itself, for the speech providers' tests to come


async def test_the_server_streams_chunked_binary_and_json_and_records_requests(
    server: ProviderServer, tmp_path: Path
) -> None:
    audio = bytes(range(256)) * 40
    (tmp_path / "tts").mkdir()
    (tmp_path / "tts" / "speech.pcm").write_bytes(audio)
    fixture: dict[str, Any] = {
        "request": {"method": "POST", "path": "/v1/text-to-speech/voice-1/stream"},
        "response": {"status": 200, "headers": {"content-type": "audio/pcm"},
                     "binary": {"file": "speech.pcm", "chunk_bytes": 3200}},
    }
    (tmp_path / "tts" / "speech.json").write_text(json.dumps(fixture))
    reply = Reply.load("tts/speech", root=tmp_path)
    assert [len(c) for c in reply.chunks] == [3200, 3200, 3200, 640]
    server.reply(reply)
    server.reply(Reply(status=200, headers=(("content-type", "application/json"),), chunks=(b'{"ok":true}',),
                       method="GET", path="/v1/voices"))
    async with httpx.AsyncClient(base_url=server.base_url) as client:
        async with client.stream("POST", "/v1/text-to-speech/voice-1/stream?output_format=pcm_16000",
                                 json={"text": "hello"}) as response:
            received = [chunk async for chunk in response.aiter_raw()]
        voices = await client.get("/v1/voices")
        wrong = await client.get("/v1/nothing-queued")
    assert b"".join(received) == audio
    assert voices.json() == {"ok": True}
    assert wrong.status_code == 500
    assert "no reply queued" in wrong.text
    first = server.requests[0]
    assert (first.path, first.query, first.json()) == (
        "/v1/text-to-speech/voice-1/stream", "output_format=pcm_16000", {"text": "hello"})


# Any conversation the core can hold maps to a request the providers take


@st.composite
def core_histories(draw: st.DrawFn) -> tuple[ChatMessage, ...]:
    """Histories as the core builds them (streams.call.core): caller and agent turns, tool-call messages
    with their results (some calls answered, some not), cut anywhere by the context window."""
    words = st.text(alphabet="abc xyz.", max_size=12)
    ids = st.lists(st.sampled_from(["call_A1", "toolu_01B2", "call-1/llm/3/0", "x" * 50]), min_size=1, max_size=3,
                   unique=True)  # unique within a message, as a provider's are; reused across messages
    arguments = st.sampled_from(['{"day":"x"}', "", "{"])
    history: list[ChatMessage] = []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from(["user", "assistant", "tools"]))
        if kind != "tools":
            history.append(ChatMessage(kind, draw(words)))
            continue
        calls = [{"id": i, "name": "book_appointment", "arguments": draw(arguments)} for i in draw(ids)]
        history.append(ChatMessage("assistant", json.dumps(calls)))
        for call in calls:
            if draw(st.booleans()):
                history.append(ChatMessage("tool", draw(words), name=call["name"], tool_call_id=call["id"]))
    return tuple(history[draw(st.integers(0, len(history))):])


@given(core_histories())
@settings(max_examples=300, deadline=None)
def test_every_core_history_maps_to_well_formed_provider_messages(history: tuple[ChatMessage, ...]) -> None:
    request = ask(*history, BOOKING)

    openai_messages = llm_openai._messages(request)
    open_ids: set[str] = set()
    for message in openai_messages:
        if message["role"] == "tool":
            assert message["tool_call_id"] in open_ids  # answers a call just before it
            open_ids.discard(message["tool_call_id"])
            continue
        assert not open_ids  # every call answered before the conversation goes on
        if message["role"] == "assistant" and message.get("tool_calls"):
            open_ids = {c["id"] for c in message["tool_calls"]}  # type: ignore[typeddict-item]
            assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,40}", i) for i in open_ids)

    system, anthropic_messages = llm_anthropic._messages(request)
    assert [b["text"] for b in system] == list(SYSTEM)
    roles = [m["role"] for m in anthropic_messages]
    assert all(a != b for a, b in itertools.pairwise(roles))  # turns alternate
    asked: set[str] = set()
    for message in anthropic_messages:
        blocks = list(message["content"])  # type: ignore[arg-type]
        kinds = [b["type"] for b in blocks]
        answered = {b["tool_use_id"] for b in blocks if b["type"] == "tool_result"}
        assert answered == asked  # each call answered in the very next message, and only those
        assert kinds == sorted(kinds, key=lambda k: k != "tool_result")  # results before any text
        assert all(b["text"].strip() for b in blocks if b["type"] == "text")
        asked = {b["id"] for b in blocks if b["type"] == "tool_use"}
        assert all(isinstance(b["input"], dict) for b in blocks if b["type"] == "tool_use")
    assert not asked
