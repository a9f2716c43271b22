"""Twilio's webhooks as a protocol: signatures, TwiML, the forms Twilio posts, replays; no web framework.

Twilio calls the voice webhook (`VOICE_PATH`) when a call reaches one of our numbers and the status
callback (`STATUS_PATH`) as the call progresses, and the `<Dial>` action (`DIAL_ACTION_PATH`) when
a transfer's leg ends. All are signed (X-Twilio-Signature: HMAC-SHA1 over the exact URL Twilio
requested plus the sorted form parameters, keyed by the account's auth token), and so is the media
WebSocket's handshake (`MEDIA_PATH`, the URL alone). The voice webhook answers `<Connect><Stream>`
TwiML: Twilio then opens the media WebSocket (`streams.channels.twilio_media_protocol`), passing
the `<Parameter>`s back in its `start` message. The routes that serve all this are the gateway's
(`gateway.twilio_webhook_routes`).

Replays. The signature has no timestamp, so a captured request stays valid for ever, and its
signature is the same every time (same URL, same form). Twilio itself sends a request again only
as a retry (its connection overrides: after a failed connect or, if asked, a timeout; 1 retry by
default, all within its 15 s total), and a retry carries the same `I-Twilio-Idempotency-Token`
header as the first try. `ReplayGuard` remembers the (path, signature) of every verified request
for `window_s`, so:

- a retry (same token, within `retry_window_s`) gets the first try's answer again and does nothing
  else: the voice webhook the same TwiML, naming the same pending call, so the call still connects
  and no second call is made; a status callback its 204 without a second `call.status`. Refusing it
  instead would drop a real call whose first answer was lost on the way back;
- any other repeat (another or no token, or later than a retry can come) is not something Twilio
  sends: it is refused (reason "replayed request"), like a bad signature.

The token is not signed, so whoever captured a request can copy it: within the retry window such a
replay is answered like a retry, which by construction changes nothing. Only verified requests are
remembered, so forged ones cannot push real ones out; the store keeps at most `max_entries` (the
oldest go first), and the answers only for the retry window. Past the window, a status callback is
still refused by its signed `Timestamp` (Twilio sends it with call progress events); a voice webhook
has no signed time, so its protection ends with the window, and the media stream it names still
needs Twilio's signed handshake.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]
from twilio.twiml.voice_response import Connect, Dial, VoiceResponse  # type: ignore[import-untyped]

from schemas.events import CallStatus, HandoffOutcome

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Twilio-Signature"
IDEMPOTENCY_HEADER = "I-Twilio-Idempotency-Token"
"""Sent by Twilio on its webhooks; the same on each retry of a request. Not signed."""
VOICE_PATH = "/twilio/voice"
STATUS_PATH = "/twilio/status"
DIAL_ACTION_PATH = "/twilio/dial-action"
MEDIA_PATH = "/twilio/media"
CALL_ID_PARAMETER = "call_id"
"""The `<Stream>` parameter naming the call the voice webhook answered."""
FORM_CONTENT_TYPE = "application/x-www-form-urlencoded"
MAX_WEBHOOK_BYTES = 64 * 1024
"""Twilio's webhooks are a few hundred bytes; anything far larger is not Twilio."""
MAX_FORM_FIELDS = 500

CALL_STATUSES = frozenset(
    {"queued", "initiated", "ringing", "in-progress", "completed", "busy", "no-answer", "canceled", "failed"}
)
"""Twilio's CallStatus values (voice webhooks and status callbacks)."""

_E164 = re.compile(r"^\+[1-9][0-9]{6,14}$")
_SIP_URI = re.compile(r"^sips?:[^\s<>\"]+@[^\s<>\"]+$")

Params = Mapping[str, str] | Sequence[tuple[str, str]]
"""Form parameters: a mapping, or the (name, value) pairs in body order when names repeat."""


# --------------------------------------------------------------------------- signatures


class _FormValues(dict[str, list[str]]):
    """A form's values by name, read by the SDK's validator through `getlist` (names may repeat)."""

    def getlist(self, name: str) -> list[str]:
        return self[name]


def _form_values(params: Params) -> _FormValues:
    values = _FormValues()
    for name, value in params.items() if isinstance(params, Mapping) else params:
        values.setdefault(name, []).append(value)
    return values


def validate_twilio_request(auth_token: str, url: str, params: Params, signature: str | None) -> bool:
    """Whether `signature` (the X-Twilio-Signature header) is Twilio's signature of this request.

    `url` is the full URL Twilio requested (scheme, host, path, query), as Twilio saw it; the SDK's
    validator accepts it with or without an explicit default port. A missing or empty signature or
    an empty auth token is never valid.
    """
    if not signature or not auth_token:
        return False
    return bool(RequestValidator(auth_token).validate(url, _form_values(params), signature))


def compute_twilio_signature(auth_token: str, url: str, params: Params) -> str:
    """The signature Twilio would send for this request (for tests and tools)."""
    return str(RequestValidator(auth_token).compute_signature(url, _form_values(params)))


def ws_scheme(scheme: str) -> str:
    return {"https": "wss", "http": "ws"}.get(scheme, scheme)


def http_scheme(scheme: str) -> str:
    return {"wss": "https", "ws": "http"}.get(scheme, scheme)


def validate_handshake(auth_token: str, url: str, signature: str | None) -> bool:
    """Checks the X-Twilio-Signature of the media WebSocket's upgrade request to `url`: signed over
    the stream URL, no parameters. The wss:// URL from the TwiML is what Twilio signs; its https://
    twin is accepted too (same host and path, so no weaker)."""
    parts = urlsplit(url)
    twin = urlunsplit((http_scheme(parts.scheme), parts.netloc, parts.path, parts.query, ""))
    return any(validate_twilio_request(auth_token, candidate, {}, signature) for candidate in (url, twin))


# --------------------------------------------------------------------------- forms


class WebhookError(Exception):
    """A webhook request that cannot be read: the HTTP status to answer, and why."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def form_pairs(body: bytes) -> list[tuple[str, str]]:
    """A webhook's urlencoded body as (name, value) pairs, in order; raises WebhookError (400)."""
    try:
        return parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        raise WebhookError(400, f"unreadable form body: {exc}") from exc


# --------------------------------------------------------------------------- TwiML


def connect_stream_twiml(stream_url: str, parameters: Mapping[str, str]) -> str:
    """`<Response><Connect><Stream url=...><Parameter name= value=/>...</Stream></Connect></Response>`:
    a bidirectional media stream; the parameters come back in the stream's `start` message."""
    parts = urlsplit(stream_url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"stream URL must be ws(s)://host/path, got {stream_url!r}")
    if parts.query:
        raise ValueError("Twilio does not allow a query string in a stream URL; use parameters")
    response = VoiceResponse()
    connect = Connect()
    stream = connect.stream(url=stream_url)
    for name, value in parameters.items():
        if not isinstance(name, str) or not name or not isinstance(value, str):
            raise ValueError(f"stream parameters must be non-empty names with string values, got {name!r}={value!r}")
        stream.parameter(name=name, value=value)
    response.append(connect)
    return str(response)


def is_transfer_target(target: str) -> bool:
    """An E.164 number (+15551234567) or a SIP URI (sip:agent@pbx.example.com)."""
    return bool(_E164.match(target) or _SIP_URI.match(target))


def dial_twiml(
    target: str,
    *,
    caller_id: str | None = None,
    timeout_s: int | None = None,
    action: str | None = None,
) -> str:
    """`<Response><Dial><Number>+1...</Number></Dial></Response>` (or `<Sip>` for a SIP URI): moves a
    live call to a human. `action` receives Twilio's DialCallStatus when the dialled leg ends."""
    if not is_transfer_target(target):
        raise ValueError(f"transfer target must be an E.164 number or a SIP URI, got {target!r}")
    response = VoiceResponse()
    dial = Dial(caller_id=caller_id, timeout=timeout_s, action=action)
    if target.startswith(("sip:", "sips:")):
        dial.sip(target)
    else:
        dial.number(target)
    response.append(dial)
    return str(response)


def hangup_twiml() -> str:
    """`<Response><Hangup/></Response>`."""
    response = VoiceResponse()
    response.hangup()
    return str(response)


def reject_twiml(reason: str = "rejected") -> str:
    """`<Response><Reject reason=.../></Response>`: refuses a ringing call without answering it."""
    if reason not in ("rejected", "busy"):
        raise ValueError("reject reason is 'rejected' or 'busy'")
    response = VoiceResponse()
    response.reject(reason=reason)
    return str(response)


# --------------------------------------------------------------------------- status callbacks


def _optional_int(params: Mapping[str, str], name: str) -> int | None:
    value = params.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value.strip())
    except ValueError:
        log.warning("twilio status callback: %s=%r is not an integer; ignored", name, value)
        return None


def status_callback_payload(params: Mapping[str, str]) -> CallStatus:
    """A Twilio status callback (or voice webhook) as a `call.status` event payload.

    CallStatus -> status, SipResponseCode -> sip_response_code, CallDuration (seconds) -> duration_s;
    every parameter is kept as received in `raw`. Raises ValueError without a CallStatus.
    """
    status = (params.get("CallStatus") or "").strip()
    if not status:
        raise ValueError("status callback has no CallStatus")
    if status not in CALL_STATUSES:
        log.warning("twilio status callback: unknown CallStatus %r, kept as is", status)
    return CallStatus(
        status=status,
        provider="twilio",
        sip_response_code=_optional_int(params, "SipResponseCode"),
        duration_s=_optional_int(params, "CallDuration"),
        raw={str(k): str(v) for k, v in params.items()},
    )


# --------------------------------------------------------------------------- dial action

DIAL_OUTCOMES = {"completed": "connected", "answered": "connected", "busy": "busy", "no-answer": "no_answer",
                 "failed": "failed", "canceled": "canceled"}
"""Twilio's DialCallStatus -> handoff.outcome's outcome."""


def dial_outcome_payload(handoff_id: str, params: Mapping[str, str]) -> HandoffOutcome:
    """A `<Dial>` action callback as a `handoff.outcome` payload; raises ValueError without DialCallStatus."""
    status = (params.get("DialCallStatus") or "").strip()
    if not status:
        raise ValueError("dial action has no DialCallStatus")
    outcome = DIAL_OUTCOMES.get(status)
    if outcome is None:
        log.warning("twilio dial action: unknown DialCallStatus %r, taken as failed", status)
        outcome = "failed"
    return HandoffOutcome(handoff_id=handoff_id, outcome=outcome, provider_status=status,
                          dialed_call_id=params.get("DialCallSid") or None,
                          duration_s=_optional_int(params, "DialCallDuration"),
                          raw={str(k): str(v) for k, v in params.items()})


# --------------------------------------------------------------------------- replays

RETRY_WINDOW_S = 60.0
"""How long after a request Twilio's retry of it may come: Twilio gives a webhook 15 s in all,
retries included; the margin covers a slow first answer and clocks."""
REPLAY_WINDOW_S = 3600.0
"""How long a verified request is remembered, so that a copy of it is refused."""
REPLAY_ENTRIES = 50_000
"""At most this many remembered requests (about 200 bytes each once their answer is let go)."""


class HttpAnswer(Protocol):
    """An HTTP response as far as a retry needs it (a framework's response object will do)."""

    @property
    def status_code(self) -> int: ...

    @property
    def body(self) -> bytes | memoryview: ...

    @property
    def media_type(self) -> str | None: ...


@dataclass(frozen=True)
class WebhookAnswer:
    """What a webhook answered, to give a retry of it the same."""

    status_code: int
    body: bytes
    media_type: str | None

    @classmethod
    def of(cls, response: HttpAnswer) -> WebhookAnswer:
        return cls(response.status_code, bytes(response.body), response.media_type)


class Replayed(Exception):
    """A verified request seen before that is not Twilio's retry of it."""


@dataclass
class _Recent:
    at: float
    token: str | None
    answer: asyncio.Future[WebhookAnswer | None]
    """None: the first try failed, so the retry is handled afresh."""


class ReplayGuard:
    """The verified webhooks of the last `window_s` seconds, at most `max_entries` of them, and the
    answers of those of the last `retry_window_s`. See the module's docstring for why."""

    def __init__(self, *, window_s: float = REPLAY_WINDOW_S, retry_window_s: float = RETRY_WINDOW_S,
                 max_entries: int = REPLAY_ENTRIES, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1 or not 0 < retry_window_s <= window_s:
            raise ValueError("a replay guard needs max_entries >= 1 and 0 < retry_window_s <= window_s")
        self.window_s, self.retry_window_s, self.max_entries = window_s, retry_window_s, max_entries
        self._clock, self._wall_clock = clock, wall_clock
        self._seen: OrderedDict[str, float] = OrderedDict()  # key -> first seen, oldest first
        self._recent: OrderedDict[str, _Recent] = OrderedDict()  # the retry window's, oldest first

    def __len__(self) -> int:
        return len(self._seen)

    def _prune(self, now: float) -> None:
        while self._seen and (len(self._seen) > self.max_entries
                              or next(iter(self._seen.values())) <= now - self.window_s):
            self._seen.popitem(last=False)
        while self._recent and (len(self._recent) > self.max_entries
                                or next(iter(self._recent.values())).at <= now - self.retry_window_s):
            self._recent.popitem(last=False)

    def admit(self, key: str, token: str | None) -> tuple[asyncio.Future[WebhookAnswer | None], bool]:
        """(the request's answer, whether this is its first try). The first try's handler settles the
        answer (`settle`); a retry awaits it. Raises Replayed for anything else seen before."""
        now = self._clock()
        self._prune(now)
        recent = self._recent.get(key)
        if recent is not None and token is not None and token == recent.token:
            return recent.answer, False
        first_seen = self._seen.get(key)
        if first_seen is not None:
            raise Replayed(f"replayed request (first seen {now - first_seen:.0f} s ago)")
        answer: asyncio.Future[WebhookAnswer | None] = asyncio.get_running_loop().create_future()
        self._seen[key] = now
        self._recent[key] = _Recent(now, token, answer)
        self._prune(now)
        return answer, True

    def settle(self, key: str, answer: asyncio.Future[WebhookAnswer | None], response: HttpAnswer | None) -> None:
        """The first try's outcome: its response, or None when it failed (then the request is
        forgotten, so that Twilio's retry, or a waiting one, is handled afresh)."""
        if response is not None:
            answer.set_result(WebhookAnswer.of(response))
            return
        recent = self._recent.get(key)
        if recent is not None and recent.answer is answer:  # not a later request with the same key
            del self._recent[key]
            self._seen.pop(key, None)
        answer.set_result(None)

    def check_timestamp(self, form: Mapping[str, str]) -> None:
        """Raises Replayed for a request whose signed `Timestamp` (RFC 2822, as Twilio sends with call
        progress events) is older than the window: it was remembered once and may be forgotten now."""
        stamp = form.get("Timestamp")
        if not stamp:
            return
        try:
            sent = parsedate_to_datetime(stamp)
        except (TypeError, ValueError):
            return  # not Twilio's format: nothing to go by, the store still applies
        if sent.tzinfo is None:
            sent = sent.replace(tzinfo=UTC)
        age_s = self._wall_clock() - sent.timestamp()
        if age_s > self.window_s:
            raise Replayed(f"replayed request (signed Timestamp {stamp!r}, {age_s:.0f} s ago)")
