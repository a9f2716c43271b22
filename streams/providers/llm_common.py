"""What the cloud LLM adapters (`llm_openai`, `llm_anthropic`) share: reading the core's conversation
into tool calls and tool results, the timeouts of a streamed answer, and turning HTTP failures into
`ProviderError` kinds.

The conversation. The core records an assistant's tool calls as an assistant message whose content
is the JSON list `[{"id", "name", "arguments"}, ...]`, followed by one `tool` message per result
(`streams.call.core._llm_decided`, `_tool_result`). Both providers want the calls as structure (OpenAI's
`tool_calls`, Anthropic's `tool_use` blocks) and refuse (400) a tool result whose call is not in the
request, or a call whose result does not follow it; so `conversation()` recognises that message by
its shape *and* by the tool messages that answer it, and keeps only the calls that were answered. A
result whose call fell out of the core's context window (`context_messages`) is sent as plain text.
Tool-call ids are rewritten where a provider would refuse them (ids from another provider after a
fallback, or the scripted LLM's `call/llm/0/0`), consistently within the request.

Timeouts. A voice call cannot wait on a silent provider: `StreamTimeouts` bounds the connection
(httpx), the first token (an asyncio deadline from the start of the request to the first streamed
text or tool-call piece, covering the response headers too) and every gap between events after it
(`stall_s`), so a stream that stops mid-answer fails within `stall_s`, not when the server gives up.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

import httpx2

from streams.providers.base import ChatMessage, ProviderError, ToolCall, ToolSpec

log = logging.getLogger(__name__)

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

DEFAULT_CONNECT_TIMEOUT_S = 2.0
DEFAULT_FIRST_TOKEN_TIMEOUT_S = 3.0
DEFAULT_STALL_TIMEOUT_S = 2.0


@dataclass(frozen=True, slots=True)
class StreamTimeouts:
    connect_s: float = DEFAULT_CONNECT_TIMEOUT_S
    first_token_s: float = DEFAULT_FIRST_TOKEN_TIMEOUT_S
    stall_s: float = DEFAULT_STALL_TIMEOUT_S

    def __post_init__(self) -> None:
        for name in ("connect_s", "first_token_s", "stall_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {getattr(self, name)!r}")

    def http(self) -> httpx2.Timeout:
        """The client's socket timeouts. The asyncio deadlines of `timed_events` are the precise ones;
        the read timeout only backs them up, so it is the longest wait either of them allows."""
        return httpx2.Timeout(
            connect=self.connect_s,
            read=max(self.first_token_s, self.stall_s),
            write=self.connect_s,
            pool=self.connect_s,
        )


class StreamClock:
    """When a streamed answer started and when its first token came, in ms for `LlmResult`."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.first_token: float | None = None

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()

    def elapsed_ms(self) -> int:
        return int((time.perf_counter() - self.started) * 1000)

    def first_token_ms(self) -> int:
        """Time to the first token; an answer with none (an empty reply) counts its whole time."""
        end = self.first_token if self.first_token is not None else time.perf_counter()
        return int((end - self.started) * 1000)


async def timed_events(
    provider: str,
    events: AsyncIterator[T],
    timeouts: StreamTimeouts,
    first_token_deadline: float,
    is_token: Callable[[T], bool],
) -> AsyncIterator[T]:
    """`events`, each awaited no longer than its deadline: until the first token (as `is_token` says),
    `first_token_deadline` (loop time); after it, `timeouts.stall_s` per event. A missed deadline
    raises `ProviderError(timeout)` at once, whatever the server does afterwards."""
    loop = asyncio.get_running_loop()
    waiting_for_first = True
    while True:
        deadline = first_token_deadline if waiting_for_first else loop.time() + timeouts.stall_s
        try:
            async with asyncio.timeout_at(deadline):
                event = await anext(events)
        except StopAsyncIteration:
            return
        except TimeoutError:
            if waiting_for_first:
                raise ProviderError(
                    provider, "timeout", f"no first token within {timeouts.first_token_s:g} s", retryable=True
                ) from None
            raise ProviderError(
                provider, "timeout", f"the stream stalled: nothing for {timeouts.stall_s:g} s", retryable=True
            ) from None
        if waiting_for_first and is_token(event):
            waiting_for_first = False
        yield event


class EventStream(Protocol[T_co]):
    """An SDK's streamed response: its events, and a way to let go of the connection."""

    def __aiter__(self) -> AsyncIterator[T_co]: ...

    async def __anext__(self) -> T_co: ...

    async def close(self) -> None: ...


async def read_stream(
    provider: str,
    timeouts: StreamTimeouts,
    open_stream: Callable[[], Awaitable[EventStream[T]]],
    *,
    is_token: Callable[[T], bool],
    take: Callable[[T], bool],
    sdk_errors: tuple[type[Exception], ...],
    failure: Callable[[Exception, bool], ProviderError],
) -> StreamClock:
    """Opens a streamed answer within the first-token deadline and hands each event to `take` (which
    folds it and says whether it carried a token) within `timed_events`' deadlines; an SDK's or the
    HTTP client's error becomes `failure(exc, streaming)`. The stream is closed whatever happens.
    Returns the clock of the answer."""
    caught: tuple[type[Exception], ...] = (*sdk_errors, httpx2.HTTPError, ValueError)
    clock = StreamClock()
    first_token_deadline = asyncio.get_running_loop().time() + timeouts.first_token_s
    stream: EventStream[T] | None = None
    try:
        try:
            async with asyncio.timeout_at(first_token_deadline):
                stream = await open_stream()
        except TimeoutError:
            raise ProviderError(
                provider, "timeout", f"no response within {timeouts.first_token_s:g} s", retryable=True
            ) from None
        async for event in timed_events(provider, stream, timeouts, first_token_deadline, is_token):
            if take(event):
                clock.token()
    except ProviderError:
        raise
    except caught as exc:
        raise failure(exc, stream is not None) from exc
    finally:
        if stream is not None:
            await stream.close()
    return clock


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The server's wait, from `retry-after-ms` (OpenAI) or `retry-after` (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def status_error(provider: str, status: int, message: str, headers: Mapping[str, str]) -> ProviderError:
    """An HTTP error status as a `ProviderError`: what is worth retrying, and when."""
    wait = retry_after_s(headers)
    text = f"HTTP {status}: {message}"
    if status == 429:
        return ProviderError(provider, "rate_limited", text, retryable=True, retry_after_s=wait)
    if status in (401, 403):
        return ProviderError(provider, "auth", text)
    if status == 408:
        return ProviderError(provider, "timeout", text, retryable=True, retry_after_s=wait)
    if status >= 500:  # 5xx, and Anthropic's 529 overloaded
        return ProviderError(provider, "server", text, retryable=True, retry_after_s=wait)
    if 400 <= status < 500:
        return ProviderError(provider, "bad_request", text)
    return ProviderError(provider, "error", text)


def redact(text: str, secret: str) -> str:
    """`text` without `secret`: an error message from a server or an SDK must not carry the key."""
    return text.replace(secret, "[redacted]") if secret else text


@dataclass(frozen=True, slots=True)
class TextTurn:
    role: str  # "user" or "assistant"
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallsTurn:
    calls: tuple[ToolCall, ...]


@dataclass(frozen=True, slots=True)
class ToolResultTurn:
    call_id: str
    name: str
    content: str


Turn = TextTurn | ToolCallsTurn | ToolResultTurn


@dataclass(frozen=True, slots=True)
class Conversation:
    system: tuple[str, ...]
    turns: tuple[Turn, ...]


_SAFE_ID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def safe_call_id(call_id: str) -> str:
    """An id both providers accept (letters, digits, `_`, `-`; at most 40: OpenAI's limit), the same
    for the same id, so that a call and its result still match."""
    if _SAFE_ID.match(call_id):
        return call_id
    return "call_" + hashlib.sha256(call_id.encode()).hexdigest()[:24]


def _tool_calls(message: ChatMessage) -> tuple[ToolCall, ...] | None:
    """The calls in a core tool-call message, or None where `message` is not one by its shape."""
    try:
        items = json.loads(message.content)
    except ValueError:
        return None
    if not isinstance(items, list) or not items:
        return None
    calls = []
    for item in items:
        if not (isinstance(item, dict) and set(item) == {"id", "name", "arguments"}):
            return None
        if not all(isinstance(item[key], str) for key in ("id", "name", "arguments")):
            return None
        calls.append(ToolCall(safe_call_id(item["id"]), item["name"], item["arguments"] or "{}"))
    return tuple(calls)


def conversation(messages: Iterable[ChatMessage]) -> Conversation:
    """The core's messages as system prompts and turns, tool calls and results as structure."""
    messages = list(messages)
    system = tuple(m.content for m in messages if m.role == "system")
    rest = [m for m in messages if m.role != "system"]
    turns: list[Turn] = []
    open_calls: dict[str, str] = {}  # call id -> tool name, for calls whose results may follow
    for index, message in enumerate(rest):
        if message.role == "tool":
            call_id = safe_call_id(message.tool_call_id or "")
            name = message.name or open_calls.get(call_id, "tool")
            if message.tool_call_id and call_id in open_calls:
                turns.append(ToolResultTurn(call_id, name, message.content))
            else:
                # Its call is not in the request (cut by the context window): plain text is all a
                # provider takes for it.
                log.debug("tool result %s has no call in the request; sent as text", message.tool_call_id)
                turns.append(TextTurn("user", f"(result of the {name} tool: {message.content})"))
            continue
        open_calls = {}
        if message.role == "assistant":
            calls = _tool_calls(message)
            answered = {safe_call_id(m.tool_call_id or "") for m in _following_tool_results(rest, index + 1)}
            # Both providers refuse a call without its result next to it: only the answered ones go.
            kept = tuple(c for c in calls or () if c.id in answered)
            if kept:
                turns.append(ToolCallsTurn(kept))
                open_calls = {c.id: c.name for c in kept}
                continue
        turns.append(TextTurn(message.role, message.content))
    return Conversation(system, tuple(turns))


def _following_tool_results(messages: list[ChatMessage], start: int) -> list[ChatMessage]:
    results = []
    for message in messages[start:]:
        if message.role != "tool":
            break
        results.append(message)
    return results


@dataclass(frozen=True, slots=True)
class Parameters:
    """A request's parameters, read as the types the provider takes."""

    values: Mapping[str, int | float | str]

    def number(self, name: str) -> float | None:
        value = self.values.get(name)
        return float(value) if isinstance(value, int | float) else None

    def integer(self, name: str) -> int | None:
        value = self.values.get(name)
        return value if isinstance(value, int) else None

    def text(self, name: str) -> str | None:
        value = self.values.get(name)
        return value if isinstance(value, str) else None


class ParameterReader:
    """Reads a request's parameters (strings, from the agent's configuration) as the types a provider
    takes; a value that does not parse is a `bad_request` and nothing is sent. A parameter the
    provider has no use for is left out with a warning, once per name: the core sets `temperature`
    for every request, and Anthropic's current API has no sampling parameters at all."""

    def __init__(self, provider: str, kinds: Mapping[str, type[int] | type[float] | type[str]]) -> None:
        self.provider = provider
        self.kinds = dict(kinds)
        self._warned: set[str] = set()

    def read(self, parameters: Mapping[str, str]) -> Parameters:
        parsed: dict[str, int | float | str] = {}
        for name, raw in parameters.items():
            kind = self.kinds.get(name)
            if kind is None:
                if name not in self._warned:
                    self._warned.add(name)
                    log.warning("%s: parameter %r is not supported and is left out (supported: %s)",
                                self.provider, name, ", ".join(sorted(self.kinds)))
                continue
            try:
                parsed[name] = kind(raw)
            except ValueError:
                raise ProviderError(
                    self.provider, "bad_request", f"parameter {name}={raw!r} is not a {kind.__name__}"
                ) from None
        return Parameters(parsed)


def error_detail(body: object) -> tuple[str | None, str | None]:
    """The error's type and message from a provider's error body, `{"error": {"type", "message"}}`
    (Anthropic, and OpenAI's errors in a stream) or the inner object alone (the OpenAI SDK's)."""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            kind, message = inner.get("type"), inner.get("message")
            return (kind if isinstance(kind, str) else None, message if isinstance(message, str) else None)
    return None, None


def tool_schema(provider: str, spec: ToolSpec) -> dict[str, object]:
    """A tool's JSON schema as the object the providers take; one that does not parse is a
    `bad_request` (the agent's configuration is wrong, and no provider would take it)."""
    try:
        schema = json.loads(spec.parameters_json)
    except ValueError as exc:
        raise ProviderError(provider, "bad_request", f"tool {spec.name}: its parameters are not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ProviderError(provider, "bad_request", f"tool {spec.name}: its parameters are not a JSON schema object")
    return schema
