"""`anthropic`: Claude through Anthropic's Messages API, streamed, with the official SDK
(`AsyncAnthropic`; `base_url` points it at a proxy, a gateway or the test server).

What it sends. One `POST {base_url}/v1/messages` with `stream: true`. The system prompts go in the
top-level `system` (one text block each); the caller's and the agent's words as `user` and
`assistant` text blocks; the core's tool-call message as an assistant message of `tool_use` blocks
(the arguments as the `input` object) and each result as a `tool_result` block in a user message
(`is_error` where the core recorded a failed tool, `{"error": ...}`). Consecutive messages of one
role are merged into one message, as the API's turns alternate, and empty text blocks (which the
API refuses) are left out. `max_tokens` is required by the API: the request's `max_tokens`
parameter, else the adapter's default (1024). `stop` becomes `stop_sequences`. The API version this
SDK speaks (2026-10-21) has no sampling parameters: `temperature`, `top_p` and `top_k` are refused
with a 400 there, so they are left out here (with a warning, once).

What it reads. `message_start` gives the model and the input tokens (cache reads and writes
included), `content_block_start` opens a text or `tool_use` block (id and name), `text_delta` and
`input_json_delta` fill them, `message_delta` gives the stop reason and the output tokens (a running
total), `message_stop` ends the answer. Stop reasons: end_turn and stop_sequence -> stop, tool_use
-> tool_calls, max_tokens and model_context_window_exceeded -> length, refusal -> content_filter,
anything else -> error. Thinking and server-tool blocks are not part of a voice answer and are
skipped.

Failures, as `ProviderError` kinds (`llm_common.SdkErrors`; the SDK's own retries are off):
- timeout: no connection within `timeouts.connect_s`; no first token within `first_token_s` of the
  request; a gap of more than `stall_s` between events after it. Retryable.
- connection: the request could not be sent or no response came back. Retryable.
- rate_limited (429, or a `rate_limit_error` event in the stream): retryable, with `retry-after`.
- server (5xx, 529 overloaded, an `event: error` in the stream of type overloaded_error or
  api_error): retryable.
- auth (401, 403), bad_request (400, 404, 413, 422, a parameter or tool schema that does not parse):
  not retryable.
- protocol: an event that is not JSON, a stream that ends or breaks off before `message_stop`.
  Retryable: the answer was lost, not refused.
The API key is never logged, and is removed from any message that might echo it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar, cast

import anthropic
from anthropic.types import (
    AssistantMessageParam,
    ContentBlockParam,
    MessageParam,
    RawMessageStreamEvent,
    TextBlockParam,
    ToolParam,
    UserMessageParam,
)
from anthropic.types.tool_param import InputSchema

from streams.providers.base import ErrorKind, LlmRequest, LlmResult, ProviderError, ToolCall, ToolSpec
from streams.providers.cloud import StreamTimeouts
from streams.providers.llm_common import (
    CloudLlm,
    EventStream,
    Kinds,
    Parameters,
    SdkErrors,
    StreamClock,
    TextTurn,
    ToolCallsTurn,
    conversation,
    tool_schema,
)

NAME = "anthropic"
DEFAULT_MAX_TOKENS = 1024

_STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "refusal": "content_filter",
}


class AnthropicLlm(CloudLlm[RawMessageStreamEvent]):
    """`max_tokens` is used where a request's parameters set none. `base_url` is the API's root
    (`https://api.anthropic.com` when None)."""

    name = NAME
    default_base_url = "https://api.anthropic.com"
    default_model = "claude-haiku-4-5"
    errors = SdkErrors(api=anthropic.APIError, status=anthropic.APIStatusError,
                       connection=anthropic.APIConnectionError, timeout=anthropic.APITimeoutError,
                       stream_kinds={"overloaded_error": ErrorKind.SERVER, "api_error": ErrorKind.SERVER,
                                     "rate_limit_error": ErrorKind.RATE_LIMITED})
    parameters: ClassVar[Kinds] = {"max_tokens": int, "stop": str}

    def __init__(self, api_key: str, base_url: str | None = None, model: str = "",
                 timeouts: StreamTimeouts | None = None, *, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        super().__init__(api_key, base_url, model, timeouts)
        if max_tokens < 1:
            raise ValueError(f"anthropic: max_tokens must be at least 1, not {max_tokens}")
        self.max_tokens = max_tokens
        self._client = anthropic.AsyncAnthropic(api_key=api_key, base_url=self.base_url, max_retries=0,
                                                timeout=self.timeouts.http())

    async def aclose(self) -> None:
        await self._client.close()

    async def _open(self, request: LlmRequest, model: str,
                    parameters: Parameters) -> EventStream[RawMessageStreamEvent]:
        stop = parameters.text("stop")
        system, messages = _messages(request)
        return await self._client.messages.create(
            model=model,
            max_tokens=parameters.integer("max_tokens") or self.max_tokens,
            system=system or anthropic.omit,
            messages=messages,
            tools=[_tool(spec) for spec in request.tools] or anthropic.omit,
            stop_sequences=[stop] if stop else anthropic.omit,
            stream=True,
        )

    def _is_token(self, event: RawMessageStreamEvent) -> bool:
        if event.type == "content_block_start":
            return event.content_block.type == "tool_use"
        if event.type == "content_block_delta":
            delta = event.delta
            return (delta.type == "text_delta" and bool(delta.text)) or delta.type == "input_json_delta"
        return False

    def _answer(self, model: str) -> _Answer:
        return _Answer(model=model)


def _tool(spec: ToolSpec) -> ToolParam:
    return {
        "name": spec.name,
        "description": spec.description,
        "input_schema": cast(InputSchema, tool_schema(NAME, spec)),
    }


def _tool_input(call: ToolCall) -> dict[str, object]:
    """The arguments as the object `tool_use.input` must be. Arguments that are no JSON object (an
    earlier provider's malformed call) are kept as a string, not lost."""
    try:
        arguments = json.loads(call.arguments_json)
    except ValueError:
        arguments = None
    return arguments if isinstance(arguments, dict) else {"arguments": call.arguments_json}


def _is_error(content: str) -> bool:
    """The core records a failed tool's result as `{"error": ...}`."""
    try:
        result = json.loads(content)
    except ValueError:
        return False
    return isinstance(result, dict) and set(result) == {"error"}


def _messages(request: LlmRequest) -> tuple[list[TextBlockParam], list[MessageParam]]:
    talk = conversation(request.messages)
    system: list[TextBlockParam] = [{"type": "text", "text": text} for text in talk.system if text.strip()]
    merged: list[tuple[str, list[ContentBlockParam]]] = []  # (role, blocks), one entry per turn of a role
    for turn in talk.turns:
        role: str
        blocks: list[ContentBlockParam]
        if isinstance(turn, TextTurn):
            if not turn.text.strip():
                continue
            role, blocks = turn.role, [{"type": "text", "text": turn.text}]
        elif isinstance(turn, ToolCallsTurn):
            role = "assistant"
            blocks = [{"type": "tool_use", "id": c.id, "name": c.name, "input": _tool_input(c)} for c in turn.calls]
        else:
            role = "user"
            blocks = [{"type": "tool_result", "tool_use_id": turn.call_id, "content": turn.content,
                       "is_error": _is_error(turn.content)}]
        if merged and merged[-1][0] == role:
            merged[-1][1].extend(blocks)
        else:
            merged.append((role, blocks))
    messages: list[MessageParam] = [
        AssistantMessageParam(role="assistant", content=blocks)
        if role == "assistant"
        else UserMessageParam(role="user", content=blocks)
        for role, blocks in merged
    ]
    return system, messages


@dataclass
class _PartialCall:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)


@dataclass
class _Answer:
    """The answer as its events arrive."""

    model: str
    text: list[str] = field(default_factory=list)
    calls: dict[int, _PartialCall] = field(default_factory=dict)  # by content block index
    stop_reason: str | None = None
    stopped: bool = False
    input_tokens: int = 0
    output_tokens: int = 0

    def add(self, event: RawMessageStreamEvent) -> None:
        if event.type == "message_start":
            message = event.message
            self.model = message.model or self.model
            usage = message.usage
            self.input_tokens = (
                usage.input_tokens + (usage.cache_creation_input_tokens or 0) + (usage.cache_read_input_tokens or 0)
            )
            self.output_tokens = usage.output_tokens
        elif event.type == "content_block_start":
            block = event.content_block
            if block.type == "text":
                self.text.append(block.text)
            elif block.type == "tool_use":
                self.calls[event.index] = _PartialCall(block.id, block.name)
        elif event.type == "content_block_delta":
            delta = event.delta
            if delta.type == "text_delta":
                self.text.append(delta.text)
            elif delta.type == "input_json_delta" and event.index in self.calls:
                self.calls[event.index].arguments.append(delta.partial_json)
        elif event.type == "message_delta":
            self.stop_reason = event.delta.stop_reason or self.stop_reason
            self.output_tokens = event.usage.output_tokens
            if event.usage.input_tokens is not None:  # a running total, where the API sends one
                self.input_tokens = (
                    event.usage.input_tokens
                    + (event.usage.cache_creation_input_tokens or 0)
                    + (event.usage.cache_read_input_tokens or 0)
                )
        elif event.type == "message_stop":
            self.stopped = True

    def result(self, clock: StreamClock) -> LlmResult:
        if not self.stopped:
            raise ProviderError(NAME, ErrorKind.PROTOCOL, "the stream ended before message_stop", retryable=True)
        calls = tuple(
            ToolCall(call.id, call.name, "".join(call.arguments) or "{}") for _, call in sorted(self.calls.items())
        )
        return LlmResult(
            text="".join(self.text),
            tool_calls=calls,
            finish_reason=_STOP_REASONS.get(self.stop_reason or "", "error"),
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            time_to_first_token_ms=clock.first_token_ms(),
            total_ms=clock.elapsed_ms(),
            model=self.model,
        )
