"""What every cloud adapter shares: its key (never shown, and kept out of every message), endpoint,
model and timeouts; the deadlines of a streamed answer; and HTTP failures as `ProviderError` kinds.

Timeouts. A voice call cannot wait on a silent provider: `StreamTimeouts` bounds the connection, the
first token (or first byte of audio: a deadline from the start of the request, covering the response
headers too) and every gap after it (`stall_s`), so a stream that stops midway fails within
`stall_s`, not when the server gives up. The SDKs' own retries are off everywhere: the resilience
layer (resilience.py) decides what to retry and where to fall back, and needs to know at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import httpx2

from streams.providers.base import ErrorKind, ProviderError
from streams.rate_limit import retry_after_wait

T = TypeVar("T")

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


class CloudProvider:
    """The part of a cloud adapter's constructor every one has, written once: a key that must be
    there, the endpoint (`default_base_url` when none is given) and model (`default_model`), the
    timeouts; a repr with model and endpoint, never the key; failures as `ProviderError`s with the key
    taken out of their message. Mixed into an adapter beside its capability's base class."""

    name: str
    default_base_url: ClassVar[str]
    default_model: ClassVar[str]

    def __init__(self, api_key: str, base_url: str | None, model: str, timeouts: StreamTimeouts | None) -> None:
        if not api_key:
            raise ValueError(f"{self.name}: an API key is required")
        self.model = model or self.default_model
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        self.timeouts = timeouts or StreamTimeouts()
        self._api_key = api_key

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r})"

    def _redact(self, text: str) -> str:
        return redact(text, self._api_key)

    def _error(self, kind: ErrorKind, message: str, *, retryable: bool = False) -> ProviderError:
        return ProviderError(self.name, kind, self._redact(message), retryable=retryable)

    def _status_error(self, status: int, message: str, headers: Mapping[str, str]) -> ProviderError:
        return status_error(self.name, status, self._redact(message), headers)


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
                raise ProviderError(provider, ErrorKind.TIMEOUT, f"no first token within {timeouts.first_token_s:g} s",
                                    retryable=True) from None
            raise ProviderError(provider, ErrorKind.TIMEOUT, f"the stream stalled: nothing for {timeouts.stall_s:g} s",
                                retryable=True) from None
        if waiting_for_first and is_token(event):
            waiting_for_first = False
        yield event


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """The server's wait, from `retry-after-ms` (OpenAI) or `retry-after` (seconds or an HTTP date)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000)
        except ValueError:
            pass
    return retry_after_wait(headers.get("retry-after"))


def status_error(provider: str, status: int, message: str, headers: Mapping[str, str]) -> ProviderError:
    """An HTTP error status as a `ProviderError`: what is worth retrying, and when."""
    wait = retry_after_s(headers)
    text = f"HTTP {status}: {message}"
    if status == 429:
        return ProviderError(provider, ErrorKind.RATE_LIMITED, text, retryable=True, retry_after_s=wait)
    if status in (401, 403):
        return ProviderError(provider, ErrorKind.AUTH, text)
    if status == 408:
        return ProviderError(provider, ErrorKind.TIMEOUT, text, retryable=True, retry_after_s=wait)
    if status >= 500:  # 5xx, and Anthropic's 529 overloaded
        return ProviderError(provider, ErrorKind.SERVER, text, retryable=True, retry_after_s=wait)
    if 400 <= status < 500:
        return ProviderError(provider, ErrorKind.BAD_REQUEST, text)
    return ProviderError(provider, ErrorKind.ERROR, text)


def redact(text: str, secret: str) -> str:
    """`text` without `secret`: an error message from a server or an SDK must not carry the key."""
    return text.replace(secret, "[redacted]") if secret else text
