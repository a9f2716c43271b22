"""`offline-scripted`: the offline stand-in for an LLM. Not a language model: it follows the rules
in the agent's `script` (keywords -> what to say, which tool to call, whether to end the call), so
a demo and the tests run with no keys and no network. Its answers are recorded like any LLM's."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from streams.call.core import END_CALL_TOOL, says
from streams.config.agents import AgentSpec, ScriptIntent
from streams.providers.base import LlmCapabilities, LlmProvider, LlmRequest, LlmResult, ToolCall


class _Missing(dict[str, Any]):
    """Template values where a name the script uses but nobody supplied reads as '?'."""

    def __missing__(self, key: str) -> str:
        return "?"


class _Fields:
    """`{result.when}` reads a field of the tool's JSON result; a missing field reads as '?'."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getattr__(self, name: str) -> Any:
        return self._data.get(name, "?")


def _fill(template: str, **values: Any) -> str:
    return template.format_map(_Missing({k: _Fields(v) if isinstance(v, dict) else v for k, v in values.items()}))


_TIME_OF_DAY = re.compile(
    r"\b(?:(?:at|around|by)\s)?(\d{1,2}:\d{2}(?:\s(?:am|pm))?|\d{1,2}\s(?:am|pm|o'clock))(?![\w:])"
    r"|\b(?:at|around|by)\s(\d{1,2})(?![\w:]|[.,]\d)", re.IGNORECASE)
"""A time of day as transcripts write it (streams/providers/asr_text.py): 10:30, 2 pm, 10 o'clock, at 10."""
PATTERNS = {"<time>": _TIME_OF_DAY}
"""Slot values that stand for a kind of value rather than words of their own."""
TOOL_FAILED = ("I'm sorry, I couldn't do that just now. I can open a ticket so someone calls you back, "
               "or connect you with a colleague.")
"""What the script says when a tool failed and its step says nothing of its own: never silence, and another way."""


def _spoken_error(error: str) -> str:
    """A tool's error as a caller may hear it: the connector's reason without its kind and status."""
    reason = re.sub(r"^[a-z_]+(?: \(HTTP \d+\))?: ", "", error.strip())
    return reason.rstrip(".")


def _pick(said: str, values: tuple[str, ...]) -> str:
    """The first listed value the caller said (a pattern's: what it matched), else the first entry."""
    for value in values[1:]:
        pattern = PATTERNS.get(value)
        if pattern is not None:
            if match := pattern.search(said):
                return next(group for group in match.groups() if group)
        elif says(said, value):
            return value
    return values[0] if values else ""


class ScriptedLlm(LlmProvider):
    name = "offline-scripted"
    capabilities = LlmCapabilities(prompted=False, local=True)

    def __init__(self, agent: AgentSpec) -> None:
        self.agent = agent

    def _match(self, text: str) -> ScriptIntent | None:
        for intent in self.agent.script:
            if any(says(text, phrase) for phrase in intent.match):
                return intent
        return None

    async def _complete(self, request: LlmRequest) -> LlmResult:
        started = time.perf_counter()
        text, calls, finish = self._decide(request)
        elapsed = int((time.perf_counter() - started) * 1000)
        words_in = sum(len(m.content.split()) for m in request.messages)
        return LlmResult(text=text, tool_calls=calls, finish_reason=finish, input_tokens=words_in,
                         output_tokens=len(text.split()), time_to_first_token_ms=elapsed, total_ms=elapsed,
                         model=request.model or "scripted-policy")

    def _decide(self, request: LlmRequest) -> tuple[str, tuple[ToolCall, ...], str]:
        last = request.messages[-1] if request.messages else None
        if last is not None and last.role == "tool":
            intent = next((i for i in self.agent.script if i.tool == last.name), None)
            try:
                result = json.loads(last.content)
            except ValueError:
                result = {}
            if isinstance(result, dict) and "error" in result:
                template = intent.after_failure if intent and intent.after_failure else TOOL_FAILED
                return _fill(template, error=_spoken_error(str(result["error"]))), (), "stop"
            template = intent.after_tool if intent and intent.after_tool else "Done. Anything else?"
            return _fill(template, result=result if isinstance(result, dict) else {}), (), "stop"
        said = last.content if last is not None and last.role == "user" else ""
        turn = sum(1 for m in request.messages if m.role == "user")
        intent = self._match(said)
        if intent is None:
            return self.agent.fallback, (), "stop"
        if intent.end_call:
            call = ToolCall(f"{request.request_id}/0", END_CALL_TOOL.name, json.dumps({"reason": intent.name}))
            return intent.say or self.agent.goodbye, (call,), "tool_calls"
        if intent.tool:
            slots = {name: _pick(said, values) for name, values in intent.slots.items()}
            arguments = {k: _fill(v, text=said, turn=turn, **slots) for k, v in intent.arguments.items()}
            call = ToolCall(f"{request.request_id}/0", intent.tool, json.dumps(arguments, sort_keys=True))
            return intent.say, (call,), "tool_calls"
        return intent.say or self.agent.fallback, (), "stop"
