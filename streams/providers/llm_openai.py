"""`openai`: GPT models through OpenAI's Chat Completions API, streamed, with the official SDK
(`AsyncOpenAI`; `base_url` points it at a proxy, an OpenAI-compatible gateway or the test server).

What it sends. One `POST {base_url}/chat/completions` with `stream: true` and
`stream_options: {include_usage: true}`; the system prompts as `system` messages; the caller's and
the agent's words as `user` and `assistant` messages; the core's tool-call message as an assistant
message with `tool_calls` (function calls) and each result as a `tool` message with its
`tool_call_id`; the agent's tools as function tools (their JSON schema as `parameters`). Parameters:
temperature, top_p, presence_penalty, frequency_penalty, seed, stop (one sequence) and max_tokens,
sent as `max_completion_tokens` (`max_tokens` is deprecated and refused by reasoning models).

What it reads. Content deltas are joined; tool-call deltas are joined by their `index` (the id and
name come in the first piece, the arguments in many); `finish_reason` is normalised (stop, length,
tool_calls, content_filter; `function_call` counts as tool_calls); usage comes from the last chunk
(the one with empty `choices` that `include_usage` asks for) and the model from the chunks.

Failures, as `ProviderError` kinds (`llm_common.SdkErrors`; the SDK's own retries are off):
- timeout: no connection within `timeouts.connect_s`; no first token within `first_token_s` of the
  request; a gap of more than `stall_s` between chunks after it. Retryable.
- connection: the request could not be sent or no response came back. Retryable.
- rate_limited (429): retryable, `retry_after_s` from `retry-after-ms` or `retry-after`.
- server (5xx, or an `{"error": ...}` object in the stream of type server_error): retryable.
- auth (401, 403), bad_request (400, 404, 409, 422, a parameter or tool schema that does not parse):
  not retryable; trying again, here or elsewhere, sends the same request.
- protocol: a chunk that is not JSON, a tool call without an id or name, a stream that ends or breaks
  off before a `finish_reason`. Retryable: the answer was lost, not refused.
The API key is never logged, and is removed from any message that might echo it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, TypeVar

import openai
from openai.types.chat import (
    ChatCompletionChunk,
    ChatCompletionFunctionToolParam,
    ChatCompletionMessageFunctionToolCallParam,
    ChatCompletionMessageParam,
)

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
    ToolResultTurn,
    conversation,
    tool_schema,
)

T = TypeVar("T")

NAME = "openai"

OPENAI_ERRORS = SdkErrors(api=openai.APIError, status=openai.APIStatusError, connection=openai.APIConnectionError,
                          timeout=openai.APITimeoutError, stream_kinds={"server_error": ErrorKind.SERVER})
"""The openai SDK's failures (shared with `asr_whisper`, on the same SDK)."""

_FINISH_REASONS = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
    "content_filter": "content_filter",
}


class OpenAiLlm(CloudLlm[ChatCompletionChunk]):
    """`base_url` includes the API's version path (`https://api.openai.com/v1` when None)."""

    name = NAME
    default_base_url = "https://api.openai.com/v1"
    default_model = "gpt-4o"
    errors = OPENAI_ERRORS
    parameters: ClassVar[Kinds] = {"temperature": float, "top_p": float, "presence_penalty": float,
                                   "frequency_penalty": float, "seed": int, "stop": str, "max_tokens": int}

    def __init__(self, api_key: str, base_url: str | None = None, model: str = "",
                 timeouts: StreamTimeouts | None = None) -> None:
        super().__init__(api_key, base_url, model, timeouts)
        self._client = openai.AsyncOpenAI(api_key=api_key, base_url=self.base_url, max_retries=0,
                                          timeout=self.timeouts.http())

    async def aclose(self) -> None:
        await self._client.close()

    async def _open(self, request: LlmRequest, model: str, parameters: Parameters) -> EventStream[ChatCompletionChunk]:
        tools = [_tool(spec) for spec in request.tools]
        return await self._client.chat.completions.create(
            model=model,
            messages=_messages(request),
            tools=tools or openai.omit,
            stream=True,
            stream_options={"include_usage": True},
            temperature=_given(parameters.number("temperature")),
            top_p=_given(parameters.number("top_p")),
            presence_penalty=_given(parameters.number("presence_penalty")),
            frequency_penalty=_given(parameters.number("frequency_penalty")),
            seed=_given(parameters.integer("seed")),
            stop=_given(parameters.text("stop")),
            max_completion_tokens=_given(parameters.integer("max_tokens")),
        )

    def _is_token(self, event: ChatCompletionChunk) -> bool:
        return any(choice.delta.content or choice.delta.tool_calls for choice in event.choices)

    def _answer(self, model: str) -> _Answer:
        return _Answer(model=model)


def _given(value: T | None) -> T | openai.Omit:
    return openai.omit if value is None else value


def _tool(spec: ToolSpec) -> ChatCompletionFunctionToolParam:
    return {
        "type": "function",
        "function": {"name": spec.name, "description": spec.description, "parameters": tool_schema(NAME, spec)},
    }


def _messages(request: LlmRequest) -> list[ChatCompletionMessageParam]:
    talk = conversation(request.messages)
    messages: list[ChatCompletionMessageParam] = [{"role": "system", "content": text} for text in talk.system]
    for turn in talk.turns:
        if isinstance(turn, TextTurn):
            if turn.role == "assistant":
                messages.append({"role": "assistant", "content": turn.text})
            else:
                messages.append({"role": "user", "content": turn.text})
        elif isinstance(turn, ToolCallsTurn):
            calls: list[ChatCompletionMessageFunctionToolCallParam] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments_json}}
                for c in turn.calls
            ]
            messages.append({"role": "assistant", "content": None, "tool_calls": calls})
        elif isinstance(turn, ToolResultTurn):
            messages.append({"role": "tool", "tool_call_id": turn.call_id, "content": turn.content})
    return messages


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)


@dataclass
class _Answer:
    """The answer as its chunks arrive."""

    model: str
    text: list[str] = field(default_factory=list)
    calls: dict[int, _PartialCall] = field(default_factory=dict)
    finish_reason: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0

    def add(self, chunk: ChatCompletionChunk) -> None:
        if chunk.model:
            self.model = chunk.model
        if chunk.usage is not None:
            self.input_tokens = chunk.usage.prompt_tokens
            self.output_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.index != 0:
                continue  # one answer is asked for (n=1)
            if choice.delta.content:
                self.text.append(choice.delta.content)
            for piece in choice.delta.tool_calls or ():
                call = self.calls.setdefault(piece.index, _PartialCall())
                call.id = piece.id or call.id
                if piece.function is not None:
                    call.name = piece.function.name or call.name
                    call.arguments.append(piece.function.arguments or "")
            if choice.finish_reason is not None:
                self.finish_reason = choice.finish_reason

    def result(self, clock: StreamClock) -> LlmResult:
        if self.finish_reason is None:
            raise ProviderError(NAME, ErrorKind.PROTOCOL, "the stream ended before a finish_reason", retryable=True)
        calls = []
        for index, call in sorted(self.calls.items()):
            if not call.id or not call.name:
                raise ProviderError(NAME, ErrorKind.PROTOCOL, f"tool call {index} came without an id or a name",
                                    retryable=True)
            calls.append(ToolCall(call.id, call.name, "".join(call.arguments) or "{}"))
        return LlmResult(
            text="".join(self.text),
            tool_calls=tuple(calls),
            finish_reason=_FINISH_REASONS.get(self.finish_reason, "error"),
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            time_to_first_token_ms=clock.first_token_ms(),
            total_ms=clock.elapsed_ms(),
            model=self.model,
        )

