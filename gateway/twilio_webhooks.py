"""Twilio's HTTP side: signed webhooks in, TwiML out.

Twilio calls `POST /twilio/voice` when a call reaches one of our numbers and `POST /twilio/status`
as the call progresses. Both are signed (X-Twilio-Signature: HMAC-SHA1 over the exact URL Twilio
requested plus the sorted form parameters, keyed by the account's auth token); anything that fails
the check gets a 403 and is reported through `on_rejected` so the caller can audit it.

The voice webhook answers with `<Connect><Stream>` TwiML: Twilio then opens the bidirectional media
WebSocket (`gateway.twilio_media`) to `wss://<public host>/twilio/media`, passing the `<Parameter>`s
back in its `start` message.

Behind a proxy the URL Twilio signed is not the one the app sees: set the public URL
(`VOXLOG_PUBLIC_URL`, e.g. `https://voice.example.com`) or have the proxy send
X-Forwarded-Proto / X-Forwarded-Host.

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
  sends: it gets a 403 and goes to `on_rejected` (reason "replayed request"), like a bad signature.

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
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Annotated, Any, Protocol
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from fastapi import APIRouter, Request, Security
from fastapi.responses import PlainTextResponse, Response
from fastapi.security import APIKeyHeader
from starlette.datastructures import MultiDict
from starlette.requests import HTTPConnection
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]
from twilio.twiml.voice_response import Connect, Dial, VoiceResponse  # type: ignore[import-untyped]

from schemas.events import CallStatus, HandoffOutcome

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Twilio-Signature"
IDEMPOTENCY_HEADER = "I-Twilio-Idempotency-Token"
"""Sent by Twilio on its webhooks; the same on each retry of a request. Not signed."""
DIAL_ACTION_PATH = "/twilio/dial-action"
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


# --------------------------------------------------------------------------- signatures and URLs


def validate_twilio_request(auth_token: str, url: str, params: Params, signature: str | None) -> bool:
    """Whether `signature` (the X-Twilio-Signature header) is Twilio's signature of this request.

    `url` is the full URL Twilio requested (scheme, host, path, query), as Twilio saw it; the SDK's
    validator accepts it with or without an explicit default port. A missing or empty signature or
    an empty auth token is never valid.
    """
    if not signature or not auth_token:
        return False
    multi = MultiDict(list(params.items()) if isinstance(params, Mapping) else list(params))
    return bool(RequestValidator(auth_token).validate(url, multi, signature))


def compute_twilio_signature(auth_token: str, url: str, params: Params) -> str:
    """The signature Twilio would send for this request (for tests and tools)."""
    multi = MultiDict(list(params.items()) if isinstance(params, Mapping) else list(params))
    return str(RequestValidator(auth_token).compute_signature(url, multi))


def _first_header_value(value: str | None) -> str | None:
    if not value:
        return None
    first = value.split(",")[0].strip()
    return first or None


def _ws_scheme(scheme: str) -> str:
    return {"https": "wss", "http": "ws"}.get(scheme, scheme)


def _http_scheme(scheme: str) -> str:
    return {"wss": "https", "ws": "http"}.get(scheme, scheme)


def _app_relative_path(conn: HTTPConnection) -> str:
    """The request path below the app's root_path (what a stripping proxy forwarded)."""
    path: str = conn.scope.get("path", "/")
    root: str = conn.scope.get("root_path", "") or ""
    if root and path.startswith(root):
        return path[len(root) :] or "/"
    return path


def public_base_url(conn: HTTPConnection, public_url: str | None) -> str:
    """The app's public root as an http(s) URL, without a trailing slash.

    `public_url` (VOXLOG_PUBLIC_URL) wins when set; otherwise the URL the request came to, using
    X-Forwarded-Proto / X-Forwarded-Host (first value each) when a proxy sent them.
    """
    if public_url:
        parts = urlsplit(public_url.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"public URL must be http(s)://host[:port][/prefix], got {public_url!r}")
        return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))
    scheme = _first_header_value(conn.headers.get("x-forwarded-proto")) or conn.url.scheme
    host = _first_header_value(conn.headers.get("x-forwarded-host")) or conn.headers.get("host") or conn.url.netloc
    root: str = conn.scope.get("root_path", "") or ""
    return urlunsplit((_http_scheme(scheme.lower()), host, root.rstrip("/"), "", ""))


def public_request_url(conn: HTTPConnection, public_url: str | None) -> str:
    """The full URL Twilio requested (and signed) for this request or WebSocket handshake.

    HTTP requests give http(s) URLs, WebSocket handshakes ws(s) URLs; the query string is kept.
    """
    base = urlsplit(public_base_url(conn, public_url))
    scheme = _ws_scheme(base.scheme) if conn.scope.get("type") == "websocket" else base.scheme
    path = base.path + _app_relative_path(conn)
    return urlunsplit((scheme, base.netloc, path, conn.url.query, ""))


def media_stream_url(conn: HTTPConnection, public_url: str | None, media_path: str = "/twilio/media") -> str:
    """The WebSocket URL for `<Stream url=...>`: wss:// when the public URL is https, ws:// when http."""
    base = urlsplit(public_base_url(conn, public_url))
    return urlunsplit((_ws_scheme(base.scheme), base.netloc, base.path + media_path, "", ""))


def validate_media_handshake(auth_token: str, websocket: HTTPConnection, public_url: str | None) -> bool:
    """Checks the X-Twilio-Signature Twilio sends on the media WebSocket's upgrade request: signed
    over the stream URL, no parameters. The wss:// URL from the TwiML is what Twilio signs; its
    https:// twin is accepted too (same host and path, so no weaker)."""
    signature = websocket.headers.get(SIGNATURE_HEADER)
    url = public_request_url(websocket, public_url)
    parts = urlsplit(url)
    twin = urlunsplit((_http_scheme(parts.scheme), parts.netloc, parts.path, parts.query, ""))
    return any(validate_twilio_request(auth_token, candidate, {}, signature) for candidate in (url, twin))


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


@dataclass(frozen=True)
class WebhookAnswer:
    """What a webhook answered, to give a retry of it the same."""

    status_code: int
    body: bytes
    media_type: str | None

    @classmethod
    def of(cls, response: Response) -> WebhookAnswer:
        return cls(response.status_code, bytes(response.body), response.media_type)

    def response(self) -> Response:
        return Response(self.body, status_code=self.status_code, media_type=self.media_type)


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

    def settle(self, key: str, answer: asyncio.Future[WebhookAnswer | None], response: Response | None) -> None:
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


# --------------------------------------------------------------------------- the router


class CallRejected(Exception):
    """Raised by `on_inbound` to refuse a call (no agent answers the number, tenant over quota):
    Twilio gets `<Reject>` and the caller hears a busy or not-in-service signal, unbilled."""

    def __init__(self, reason: str, *, busy: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.busy = busy


@dataclass(frozen=True)
class RejectedWebhook:
    """A webhook that failed the signature check, for the audit trail. `call_sid` and
    `account_sid` are what the request claimed, unverified."""

    path: str
    url: str
    """The URL the signature was checked against."""
    reason: str
    """missing signature, bad signature, no auth token configured."""
    remote: str | None
    call_sid: str | None
    account_sid: str | None
    user_agent: str | None


class InboundHook(Protocol):
    async def __call__(self, form: Mapping[str, str], query: Mapping[str, str]) -> tuple[str, Mapping[str, str]]:
        """A verified call to answer (Twilio's voice webhook form, and the query of the URL Twilio was
        given, which it signed too): returns (call_id, stream parameters). Raise CallRejected to refuse it."""
        ...


class StatusHook(Protocol):
    async def __call__(self, call_sid: str, status: CallStatus, query: Mapping[str, str]) -> None:
        """A verified status callback."""
        ...


class DialActionHook(Protocol):
    async def __call__(self, form: Mapping[str, str], query: Mapping[str, str]) -> tuple[str, Mapping[str, str]] | None:
        """A verified `<Dial>` action callback (the human's leg ended). None: the call is over (Twilio
        gets `<Hangup/>`); (call_id, stream parameters): the caller goes back to an agent on a new stream."""
        ...


class RejectedHook(Protocol):
    async def __call__(self, info: RejectedWebhook) -> None:
        """A webhook refused for its signature."""
        ...


class WebhookError(Exception):
    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


async def read_form(request: Request) -> list[tuple[str, str]]:
    """The urlencoded body as (name, value) pairs, in order; raises WebhookError (413/415/400)."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != FORM_CONTENT_TYPE:
        raise WebhookError(415, f"expected {FORM_CONTENT_TYPE}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_WEBHOOK_BYTES:
        raise WebhookError(413, "webhook body too large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_WEBHOOK_BYTES:
            raise WebhookError(413, "webhook body too large")
    try:
        text = body.decode("utf-8")
        return parse_qsl(text, keep_blank_values=True, max_num_fields=MAX_FORM_FIELDS)
    except (UnicodeDecodeError, ValueError) as exc:
        raise WebhookError(400, f"unreadable form body: {exc}") from exc


# --------------------------------------------------------------------------- OpenAPI: what Twilio sends
# The routes read and check the raw body themselves (the signature covers every parameter exactly as
# sent), so these describe the form in the OpenAPI document only; nothing parses the body with them.


def _text(description: str, **constraints: object) -> dict[str, object]:
    return {"type": "string", "description": description, **constraints}


_CALL_FIELDS: dict[str, dict[str, object]] = {
    "CallSid": _text("Twilio's id of the call (CA + 32 hex digits).", minLength=1),
    "AccountSid": _text("The Twilio account of the call."),
    "From": _text("The caller: an E.164 number, a SIP URI or a client id."),
    "To": _text("The number called; an inbound call's picks the agent."),
    "CallStatus": _text("queued, initiated, ringing, in-progress, completed, busy, no-answer, canceled or failed."),
    "Direction": _text("inbound, outbound-api (a call the dialer placed) or outbound-dial."),
    "ApiVersion": _text("Twilio's API version, 2010-04-01."),
    "Caller": _text("Same as From."),
    "Called": _text("Same as To."),
    "CallToken": _text("A token to forward the call with the caller's identity."),
    "ForwardedFrom": _text("The number that forwarded the call, when the carrier says."),
    "CallerName": _text("The caller's name (CNAM), when looked up."),
    "ParentCallSid": _text("The call this one was created from, if any."),
    "StirVerstat": _text("The caller id's SHAKEN/STIR attestation."),
    **{f"{who}{what}": _text(f"Geography of {who}, when Twilio knows it.")
       for who in ("From", "To", "Caller", "Called") for what in ("City", "State", "Zip", "Country")},
}
_STATUS_FIELDS: dict[str, dict[str, object]] = {
    **_CALL_FIELDS,
    "CallStatus": _text("The call's status now; values Twilio adds later are kept as they are.", pattern=r"\S"),
    "CallbackSource": _text("call-progress-events."),
    "SequenceNumber": _text("Order of this call's callbacks, from 0; a retried callback has the same."),
    "Timestamp": _text("When the event happened, RFC 2822; an old one is refused as a replay."),
    "CallDuration": _text("Seconds the call lasted (completed calls); not an integer: ignored."),
    "Duration": _text("Minutes billed."),
    "SipResponseCode": _text("The SIP code the call ended with; not an integer: ignored."),
}
_DIAL_FIELDS: dict[str, dict[str, object]] = {
    **_CALL_FIELDS,
    "DialCallStatus": _text("How the dialled leg ended: completed, answered, busy, no-answer, failed, canceled.",
                            pattern=r"\S"),
    "DialCallSid": _text("The dialled leg's call id."),
    "DialCallDuration": _text("Seconds the dialled leg lasted; not an integer: ignored."),
    "DialBridged": _text("Whether the two legs were connected."),
}


def _form_body(title: str, fields: dict[str, dict[str, object]], required: Sequence[str]) -> dict[str, Any]:
    schema = {"title": title, "type": "object", "properties": fields, "required": list(required),
              "additionalProperties": {"type": "string"}, "maxProperties": MAX_FORM_FIELDS,
              "description": f"Twilio's parameters (those it adds later are accepted too); {MAX_WEBHOOK_BYTES} bytes "
                             "at most, UTF-8."}
    return {"requestBody": {"required": True, "content": {FORM_CONTENT_TYPE: {"schema": schema}}}}


def _query(name: str, description: str, *, required: bool = True) -> dict[str, object]:
    return {"name": name, "in": "query", "required": required, "description": description,
            "schema": {"type": "string", "minLength": 1} if required else {"type": "string"}}


def _plain(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"text/plain": {"schema": {"type": "string"}}}}


class TwimlResponse(Response):
    media_type = "application/xml"


_REFUSALS: dict[int | str, dict[str, Any]] = {
    400: _plain("A parameter the webhook needs is missing or wrong, or the form cannot be read."),
    403: _plain("The signature is missing or wrong, or the request is a replay of one already answered."),
    413: _plain(f"The body is over {MAX_WEBHOOK_BYTES} bytes."),
    415: _plain(f"The body is not {FORM_CONTENT_TYPE}."),
}
_VOICE_TWIML = {"description": "TwiML: `<Connect><Stream>` to the media WebSocket, or `<Reject>` when no agent "
                               "takes the call or there is no room for it. A retry of a request gets the same "
                               "answer."}
_OUTBOUND_QUERY = ("A call the dialer placed comes back with `dial_id`, `call_id`, `tenant`, `agent` and `p.<name>` "
                   "custom parameters in the query of this URL (see `gateway.outbound`); Twilio signs them too.")

twilio_signature = APIKeyHeader(
    name=SIGNATURE_HEADER, scheme_name="TwilioSignature", auto_error=False,
    description="HMAC-SHA1 of the URL Twilio requested and the sorted form parameters, keyed by the account's auth "
                "token, base64.")
Signature = Annotated[str | None, Security(twilio_signature)]


def twilio_router(
    auth_token_getter: Callable[[], str],
    public_url: str | None,
    on_inbound: InboundHook,
    on_status: StatusHook,
    *,
    on_rejected: RejectedHook | None = None,
    on_dial_action: DialActionHook | None = None,
    media_path: str = "/twilio/media",
    call_id_parameter: str = "call_id",
    replay_guard: ReplayGuard | None = None,
) -> APIRouter:
    """`POST /twilio/voice`, `POST /twilio/status` and (with `on_dial_action`) `POST
    /twilio/dial-action`, all signature-checked.

    The voice webhook calls `on_inbound(form)` and answers `<Connect><Stream>` to `media_path` on the
    public host, with the stream parameters plus `call_id_parameter`=call_id. The status webhook calls
    `on_status(CallSid, CallStatus)` and answers 204. A bad or missing signature, or a replay, answers
    403 and calls `on_rejected`; a retry gets the first answer again (`replay_guard`, a fresh one by
    default). `public_url` is VOXLOG_PUBLIC_URL (None: the URL requested, forwarded headers honoured).
    """
    router = APIRouter(tags=["twilio"])
    guard = replay_guard or ReplayGuard()

    async def refuse(request: Request, url: str, form: Mapping[str, str], reason: str, text: str) -> Response:
        info = RejectedWebhook(
            path=request.url.path,
            url=url,
            reason=reason,
            remote=request.client.host if request.client else None,
            call_sid=form.get("CallSid"),
            account_sid=form.get("AccountSid"),
            user_agent=request.headers.get("user-agent"),
        )
        log.warning("twilio webhook rejected: %s (%s, signed URL %s)", reason, info.path, url)
        if on_rejected is not None:
            try:
                await on_rejected(info)
            except Exception:
                log.exception("on_rejected hook failed")
        return PlainTextResponse(text, status_code=403)

    async def answer_once(
        request: Request, signature: str | None, handle: Callable[[dict[str, str]], Awaitable[Response]]
    ) -> Response:
        """Reads and verifies the form, refuses replays, answers retries as before, else `handle`s it."""
        try:
            pairs = await read_form(request)
        except WebhookError as exc:
            return PlainTextResponse(exc.detail, status_code=exc.status_code)
        form = dict(pairs)
        url = public_request_url(request, public_url)
        token = auth_token_getter()
        if not token:
            return await refuse(request, url, form, "no auth token configured", "invalid Twilio signature")
        if not signature:
            return await refuse(request, url, form, "missing signature", "invalid Twilio signature")
        if not validate_twilio_request(token, url, pairs, signature):
            return await refuse(request, url, form, "bad signature", "invalid Twilio signature")
        key = f"{request.url.path} {signature}"
        try:
            guard.check_timestamp(form)
            while True:
                answer, first = guard.admit(key, request.headers.get(IDEMPOTENCY_HEADER))
                if first:
                    break
                earlier = await asyncio.shield(answer)  # shielded: this request's end must not cancel the first's
                if earlier is not None:
                    log.info("twilio retried %s for %s: answered as before", request.url.path, form.get("CallSid"))
                    return earlier.response()
        except Replayed as exc:
            return await refuse(request, url, form, str(exc), "replayed Twilio request")
        try:
            response = await handle(form)
        except BaseException:
            guard.settle(key, answer, None)
            raise
        guard.settle(key, answer, response)
        return response

    @router.post("/twilio/voice", response_class=TwimlResponse, responses={200: _VOICE_TWIML, **_REFUSALS},
                 openapi_extra=_form_body("VoiceWebhook", _CALL_FIELDS, ["CallSid"]),
                 description=f"Twilio's voice webhook: a call to answer. {_OUTBOUND_QUERY}")
    async def voice(request: Request, signature: Signature) -> Response:
        async def handle(form: dict[str, str]) -> Response:
            if not form.get("CallSid"):
                return PlainTextResponse("missing CallSid", status_code=400)
            try:
                call_id, parameters = await on_inbound(form, dict(request.query_params))
            except CallRejected as exc:
                log.info("call %s rejected: %s", form.get("CallSid"), exc.reason)
                return TwimlResponse(reject_twiml("busy" if exc.busy else "rejected"))
            stream_parameters = {**dict(parameters), call_id_parameter: call_id}
            return TwimlResponse(connect_stream_twiml(media_stream_url(request, public_url, media_path),
                                                      stream_parameters))

        return await answer_once(request, signature, handle)

    @router.post("/twilio/status", status_code=204, response_class=Response,
                 responses={204: {"description": "Recorded into its call (or audited when no call is known)."},
                            **_REFUSALS},
                 openapi_extra=_form_body("StatusCallback", _STATUS_FIELDS, ["CallSid", "CallStatus"]),
                 description="Twilio's status callback: how a call progresses. A call the dialer placed brings "
                             "`dial_id`, `tenant` and `seq` in the query (see `gateway.outbound`).")
    async def status(request: Request, signature: Signature) -> Response:
        async def handle(form: dict[str, str]) -> Response:
            call_sid = form.get("CallSid")
            if not call_sid:
                return PlainTextResponse("missing CallSid", status_code=400)
            try:
                payload = status_callback_payload(form)
                await on_status(call_sid, payload, dict(request.query_params))
            except ValueError as exc:
                return PlainTextResponse(str(exc), status_code=400)
            return Response(status_code=204)

        return await answer_once(request, signature, handle)

    if on_dial_action is not None:
        dial_action = on_dial_action
        dial_query = [_query("call_id", "The call that was handed off."), _query("tenant", "Its tenant."),
                      _query("agent", "Its agent, who takes the caller back if nobody answered."),
                      _query("direction", "outbound for a call the dialer placed; else inbound.", required=False)]

        @router.post(DIAL_ACTION_PATH, response_class=TwimlResponse,
                     responses={200: {"description": "TwiML: `<Hangup/>`, or `<Connect><Stream>` back to the agent "
                                                     "when nobody took the call."}, **_REFUSALS},
                     openapi_extra={**_form_body("DialAction", _DIAL_FIELDS, ["CallSid", "DialCallStatus"]),
                                    "parameters": dial_query},
                     description="Twilio's `<Dial action>` callback: the human's leg of a handoff ended.")
        async def dial_result(request: Request, signature: Signature) -> Response:
            async def handle(form: dict[str, str]) -> Response:
                if not form.get("CallSid") or not form.get("DialCallStatus"):
                    return PlainTextResponse("missing CallSid or DialCallStatus", status_code=400)
                try:
                    back = await dial_action(form, dict(request.query_params))
                except ValueError as exc:
                    return PlainTextResponse(str(exc), status_code=400)
                if back is None:
                    return TwimlResponse(hangup_twiml())
                call_id, parameters = back
                return TwimlResponse(connect_stream_twiml(media_stream_url(request, public_url, media_path),
                                                          {**dict(parameters), call_id_parameter: call_id}))

            return await answer_once(request, signature, handle)

    return router
