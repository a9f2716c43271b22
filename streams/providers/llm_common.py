"""What the cloud LLM adapters (`llm_openai`, `llm_anthropic`) share: their skeleton (`CloudLlm`: the
request's parameters, the streamed answer within its deadlines, the SDK's failures as `ProviderError`
kinds), the failures of the SDKs they are built on (`SdkErrors`), and reading the core's conversation
into tool calls and tool results.

The conversation. The core records an assistant's tool calls as an assistant message whose content
is the JSON list `[{"id", "name", "arguments"}, ...]`, followed by one `tool` message per result
(`streams.call.core._llm_decided`, `_tool_result`). Both providers want the calls as structure (OpenAI's
`tool_calls`, Anthropic's `tool_use` blocks) and refuse (400) a tool result whose call is not in the
request, or a call whose result does not follow it; so `conversation()` recognises that message by
its shape *and* by the tool messages that answer it, and keeps only the calls that were answered. A
result whose call fell out of the core's context window (`context_messages`) is sent as plain text.
Tool-call ids are rewritten where a provider would refuse them (ids from another provider after a
fallback, or the scripted LLM's `call/llm/0/0`), consistently within the request.

Timeouts (`cloud.StreamTimeouts`): the connection (httpx), the first token (an asyncio deadline from
the start of the request to the first streamed text or tool-call piece, covering the response headers
too) and every gap between events after it (`stall_s`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from abc import abstractmethod
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, Generic, Protocol, TypeVar

import httpx2

from streams.providers.base import (
    ChatMessage,
    ErrorKind,
    LlmProvider,
    LlmRequest,
    LlmResult,
    ProviderError,
    ToolCall,
    ToolSpec,
)
from streams.providers.cloud import CloudProvider, StreamTimeouts, redact, status_error, timed_events

log = logging.getLogger(__name__)

E = TypeVar("E")
E_contra = TypeVar("E_contra", contravariant=True)
E_co = TypeVar("E_co", covariant=True)


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


class EventStream(Protocol[E_co]):
    """An SDK's streamed response: its events, and a way to let go of the connection."""

    def __aiter__(self) -> AsyncIterator[E_co]: ...

    async def __anext__(self) -> E_co: ...

    async def close(self) -> None: ...


class Answer(Protocol[E_contra]):
    """An answer as its events arrive."""

    def add(self, event: E_contra) -> None: ...

    def result(self, clock: StreamClock) -> LlmResult:
        """The whole answer; ProviderError (protocol) where the stream ended before it did."""


class SdkError(Protocol):
    message: str
    body: object | None


class SdkStatusError(SdkError, Protocol):
    status_code: int
    response: httpx2.Response


@dataclass(frozen=True)
class SdkErrors:
    """The errors of an SDK made as OpenAI's and Anthropic's are (one class tree, on httpx2), mapped to
    `ProviderError` kinds one way for the adapters on either (the LLMs, and Whisper on OpenAI's):
    - an HTTP error status: by its status (`cloud.status_error`), with the server's Retry-After;
    - timeout (no connection or no response in time);
    - connection (nothing came back), or protocol where the stream had begun and broke off;
    - an error object sent in the stream: by its `type` (`stream_kinds`), else `error`;
    - protocol: a message that is not JSON.
    Retryable, all but auth, bad_request and error: the answer was lost, not refused."""

    api: type[SdkError]
    """What the SDK raises, an error object sent in a stream included."""
    status: type[SdkStatusError]
    connection: type[Exception]
    timeout: type[Exception]
    stream_kinds: Mapping[str, ErrorKind] = field(default_factory=dict)

    @property
    def caught(self) -> tuple[type[BaseException], ...]:
        """What a call through the SDK may raise (a body that is not JSON: ValueError)."""
        # (`api` is an exception class, which its protocol type cannot say)
        return self.api, httpx2.HTTPError, ValueError  # type: ignore[return-value]

    def failure(self, provider: str, secret: str, exc: BaseException, streaming: bool) -> ProviderError:
        """`exc` (one of `caught`) as `provider`'s error, `secret` kept out; `streaming`: the answer had begun."""
        if isinstance(exc, self.status) and exc.status_code >= 400:
            _, message = error_detail(exc.body)
            return status_error(provider, exc.status_code, redact(message or exc.message, secret),
                                exc.response.headers)
        if isinstance(exc, self.timeout | httpx2.TimeoutException):
            return ProviderError(provider, ErrorKind.TIMEOUT, "the request timed out", retryable=True)
        if isinstance(exc, self.connection | httpx2.HTTPError):
            if streaming:
                return ProviderError(provider, ErrorKind.PROTOCOL, "the stream broke off before its end",
                                     retryable=True)
            return ProviderError(provider, ErrorKind.CONNECTION, redact(str(exc), secret), retryable=True)
        if isinstance(exc, self.api):
            kind, message = error_detail(exc.body)
            meaning = self.stream_kinds.get(kind or "", ErrorKind.ERROR)
            said = f" ({kind})" if kind else ""
            text = redact(message or exc.message, secret)
            return ProviderError(provider, meaning, f"error in the stream{said}: {text}",
                                 retryable=meaning != ErrorKind.ERROR)
        return ProviderError(provider, ErrorKind.PROTOCOL, f"a message that is not JSON: {exc}", retryable=True)


Kinds = Mapping[str, type[int] | type[float] | type[str]]


class CloudLlm(CloudProvider, LlmProvider, Generic[E]):
    """A cloud LLM adapter's skeleton: the request's parameters read as the provider takes them (`parameters`),
    the answer streamed within the first-token and stall deadlines and folded event by event, any
    failure of the SDK or its HTTP client as a `ProviderError` (`errors`). A vendor says how to open
    its stream (`_open`), which events carry a token (`_is_token`) and how its answer is put together
    (`_answer`)."""

    errors: ClassVar[SdkErrors]
    parameters: ClassVar[Kinds]

    def __init__(self, api_key: str, base_url: str | None = None, model: str = "",
                 timeouts: StreamTimeouts | None = None) -> None:
        """`model` is used where a request names none."""
        super().__init__(api_key, base_url, model, timeouts)
        self._parameters = ParameterReader(self.name, self.parameters)

    async def _complete(self, request: LlmRequest) -> LlmResult:
        model = request.model or self.model
        parameters = self._parameters.read(request.parameters)
        answer = self._answer(model)
        clock = StreamClock()
        first_token_deadline = asyncio.get_running_loop().time() + self.timeouts.first_token_s
        stream: EventStream[E] | None = None
        try:
            try:
                async with asyncio.timeout_at(first_token_deadline):
                    stream = await self._open(request, model, parameters)
            except TimeoutError:
                raise ProviderError(self.name, ErrorKind.TIMEOUT,
                                    f"no response within {self.timeouts.first_token_s:g} s", retryable=True) from None
            async for event in timed_events(self.name, stream, self.timeouts, first_token_deadline, self._is_token):
                if self._is_token(event):
                    clock.token()
                answer.add(event)
        except ProviderError:
            raise
        except self.errors.caught as exc:
            raise self.errors.failure(self.name, self._api_key, exc, stream is not None) from exc
        finally:
            if stream is not None:
                await stream.close()
        result = answer.result(clock)
        log.debug("%s %s: %s, %d+%d tokens, first token %d ms", self.name, request.request_id, result.finish_reason,
                  result.input_tokens, result.output_tokens, result.time_to_first_token_ms)
        return result

    @abstractmethod
    async def _open(self, request: LlmRequest, model: str, parameters: Parameters) -> EventStream[E]:
        """Sends the request, streamed; returns its stream of events."""

    @abstractmethod
    def _is_token(self, event: E) -> bool:
        """Whether `event` carries a piece of the answer (text, or a piece of a tool call)."""

    @abstractmethod
    def _answer(self, model: str) -> Answer[E]: ...


def error_detail(body: object) -> tuple[str | None, str | None]:
    """The error's type and message from a provider's error body, `{"error": {"type", "message"}}`
    (Anthropic, and OpenAI's errors in a stream) or the inner object alone (the OpenAI SDK's)."""
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping):
            kind, message = inner.get("type"), inner.get("message")
            return (kind if isinstance(kind, str) else None, message if isinstance(message, str) else None)
    return None, None


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

    def __init__(self, provider: str, kinds: Kinds) -> None:
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
                    self.provider, ErrorKind.BAD_REQUEST, f"parameter {name}={raw!r} is not a {kind.__name__}"
                ) from None
        return Parameters(parsed)


def tool_schema(provider: str, spec: ToolSpec) -> dict[str, object]:
    """A tool's JSON schema as the object the providers take; one that does not parse is a
    `bad_request` (the agent's configuration is wrong, and no provider would take it)."""
    try:
        schema = json.loads(spec.parameters_json)
    except ValueError as exc:
        raise ProviderError(provider, ErrorKind.BAD_REQUEST,
                            f"tool {spec.name}: its parameters are not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ProviderError(provider, ErrorKind.BAD_REQUEST,
                            f"tool {spec.name}: its parameters are not a JSON schema object")
    return schema
