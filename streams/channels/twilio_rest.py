"""A thin, async-friendly client over the official Twilio SDK for the call operations voxlog needs.

The SDK is synchronous (requests); each call runs in a worker thread so the event loop never
blocks. Errors come back as `TwilioRestError` with Twilio's error code and message.

Tests (and a Twilio-compatible gateway) point it elsewhere with `base_url`: the SDK builds every
Voice API URL from its `Api` domain's `base_url` (default `https://api.twilio.com`), so replacing
`client.api.base_url` sends `/2010-04-01/Accounts/{sid}/Calls...` to that server. Region and edge
are cleared then, since the SDK would otherwise rewrite the host name to `api.<edge>.<region>...`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import requests
from twilio.base.exceptions import (  # type: ignore[import-untyped]
    TwilioException,
    TwilioRestException,
    TwilioServiceException,
)
from twilio.http.http_client import TwilioHttpClient  # type: ignore[import-untyped]
from twilio.rest import Client  # type: ignore[import-untyped]

_CALL_SID = re.compile(r"^CA[0-9a-fA-F]{32}$")
_PREFIXES = ("Unable to update record: ", "Unable to create record: ", "Unable to fetch record: ")
DEFAULT_STATUS_EVENTS = ("initiated", "ringing", "answered", "completed")
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})

T = TypeVar("T")


class TwilioRestError(Exception):
    """A Twilio REST call failed: Twilio's answer (HTTP status, error code, message) or a network error
    (status and code None)."""

    def __init__(
        self,
        operation: str,
        message: str,
        *,
        status: int | None = None,
        code: int | None = None,
        more_info: str | None = None,
        unsent: bool = False,
    ) -> None:
        self.operation = operation
        self.unsent = unsent
        self.message = message
        self.status = status
        self.code = code
        self.more_info = more_info
        super().__init__(str(self))

    @property
    def retryable(self) -> bool:
        """Safe to try again: Twilio said so (429, 5xx), or the request never reached it. A timeout
        after sending is not: the call may have been placed."""
        return self.unsent or self.status in RETRYABLE_STATUSES

    def __str__(self) -> str:
        where = f"HTTP {self.status}" if self.status is not None else "no response"
        code = f", error {self.code}" if self.code is not None else ""
        more = f" ({self.more_info})" if self.more_info else ""
        return f"twilio {self.operation}: {where}{code}: {self.message}{more}"


@dataclass(frozen=True)
class TwilioCall:
    """The parts of Twilio's Call resource voxlog uses."""

    sid: str
    status: str | None
    direction: str | None
    from_: str | None
    to: str | None
    parent_call_sid: str | None = None


class CallControl(Protocol):
    """What a live call's media transport needs from Twilio's REST API."""

    async def update_call_twiml(self, call_sid: str, twiml: str) -> TwilioCall: ...

    async def complete_call(self, call_sid: str) -> TwilioCall: ...


def _check_call_sid(call_sid: str) -> None:
    if not _CALL_SID.match(call_sid):
        raise ValueError(f"not a Twilio call SID: {call_sid!r}")


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _call(instance: Any) -> TwilioCall:
    return TwilioCall(
        sid=str(instance.sid),
        status=_opt_str(instance.status),
        direction=_opt_str(instance.direction),
        from_=_opt_str(vars(instance).get("_from")),
        to=_opt_str(instance.to),
        parent_call_sid=_opt_str(instance.parent_call_sid),
    )


def _rest_error(operation: str, exc: Exception) -> TwilioRestError:
    if isinstance(exc, TwilioServiceException):
        code = int(exc.code) if exc.code is not None else None
        message = str(exc.detail or exc.title)
        return TwilioRestError(operation, message, status=int(exc.status), code=code, more_info=str(exc.type))
    if isinstance(exc, TwilioRestException):
        message = str(exc.msg)
        for prefix in _PREFIXES:
            if message.startswith(prefix):
                message = message[len(prefix) :]
        code = int(exc.code) if isinstance(exc.code, int) else None
        more_info = f"https://www.twilio.com/docs/errors/{code}" if code is not None and code >= 10000 else None
        return TwilioRestError(operation, message, status=int(exc.status), code=code, more_info=more_info)
    unsent = isinstance(exc, requests.exceptions.ConnectTimeout) or (
        isinstance(exc, requests.exceptions.ConnectionError)
        and any(sign in str(exc) for sign in ("NewConnectionError", "Connection refused", "Name or service not known"))
    )
    return TwilioRestError(operation, f"{type(exc).__name__}: {exc}", unsent=unsent)


class TwilioRest:
    """Voice calls over Twilio's REST API (2010-04-01), with async methods.

    `base_url` replaces `https://api.twilio.com` (tests: a local fake). `timeout_s` bounds each HTTP
    request; `client` injects a prepared SDK client instead (then base_url/timeout_s are ignored).
    """

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        *,
        base_url: str | None = None,
        timeout_s: float = 10.0,
        client: Any | None = None,
    ) -> None:
        if not account_sid or not auth_token:
            raise ValueError("Twilio account SID and auth token are required")
        self.account_sid = account_sid
        if client is None:
            client = Client(account_sid, auth_token, http_client=TwilioHttpClient(timeout=timeout_s))
            if base_url is not None:
                client.api.base_url = base_url.rstrip("/")
                client.edge = None
                client.region = None
        self.client: Any = client

    def _calls(self) -> Any:
        return self.client.api.v2010.accounts(self.account_sid).calls

    async def _run(self, operation: str, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(fn)
        except (TwilioException, OSError) as exc:
            # requests' errors (connection refused, timeouts) are OSErrors
            raise _rest_error(operation, exc) from exc

    async def update_call_twiml(self, call_sid: str, twiml: str) -> TwilioCall:
        """Replaces what a live call is doing with this TwiML (e.g. `<Dial>` for a transfer)."""
        _check_call_sid(call_sid)
        instance = await self._run("update call twiml", lambda: self._calls()(call_sid).update(twiml=twiml))
        return _call(instance)

    async def complete_call(self, call_sid: str) -> TwilioCall:
        """Ends an in-progress call (Status=completed)."""
        _check_call_sid(call_sid)
        instance = await self._run("complete call", lambda: self._calls()(call_sid).update(status="completed"))
        return _call(instance)

    async def cancel_call(self, call_sid: str) -> TwilioCall:
        """Cancels a queued or ringing call (Status=canceled)."""
        _check_call_sid(call_sid)
        instance = await self._run("cancel call", lambda: self._calls()(call_sid).update(status="canceled"))
        return _call(instance)

    async def fetch_call(self, call_sid: str) -> TwilioCall:
        _check_call_sid(call_sid)
        instance = await self._run("fetch call", lambda: self._calls()(call_sid).fetch())
        return _call(instance)

    async def create_call(
        self,
        to: str,
        from_: str,
        url: str,
        status_callback: str | None = None,
        *,
        status_callback_events: Sequence[str] = DEFAULT_STATUS_EVENTS,
        timeout_s: int | None = None,
    ) -> TwilioCall:
        """Dials `to` from `from_`; when answered Twilio fetches TwiML from `url` (our voice webhook)."""
        kwargs: dict[str, Any] = {"to": to, "from_": from_, "url": url}
        if status_callback is not None:
            kwargs["status_callback"] = status_callback
            kwargs["status_callback_event"] = list(status_callback_events)
            kwargs["status_callback_method"] = "POST"
        if timeout_s is not None:
            kwargs["timeout"] = timeout_s
        instance = await self._run("create call", lambda: self._calls().create(**kwargs))
        return _call(instance)
