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
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from starlette.datastructures import MultiDict
from starlette.requests import HTTPConnection
from twilio.request_validator import RequestValidator  # type: ignore[import-untyped]
from twilio.twiml.voice_response import Connect, Dial, VoiceResponse  # type: ignore[import-untyped]

from schemas.events import CallStatus, HandoffOutcome

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Twilio-Signature"
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
) -> APIRouter:
    """`POST /twilio/voice`, `POST /twilio/status` and (with `on_dial_action`) `POST
    /twilio/dial-action`, all signature-checked.

    The voice webhook calls `on_inbound(form)` and answers `<Connect><Stream>` to `media_path` on the
    public host, with the stream parameters plus `call_id_parameter`=call_id. The status webhook calls
    `on_status(CallSid, CallStatus)` and answers 204. A bad or missing signature answers 403 and calls
    `on_rejected`. `public_url` is VOXLOG_PUBLIC_URL (None: the URL requested, forwarded headers honoured).
    """
    router = APIRouter()

    async def verified_form(request: Request) -> dict[str, str] | Response:
        try:
            pairs = await read_form(request)
        except WebhookError as exc:
            return PlainTextResponse(exc.detail, status_code=exc.status_code)
        form = dict(pairs)
        url = public_request_url(request, public_url)
        signature = request.headers.get(SIGNATURE_HEADER)
        token = auth_token_getter()
        if not token:
            reason = "no auth token configured"
        elif not signature:
            reason = "missing signature"
        elif not validate_twilio_request(token, url, pairs, signature):
            reason = "bad signature"
        else:
            return form
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
        return PlainTextResponse("invalid Twilio signature", status_code=403)

    @router.post("/twilio/voice", response_class=Response)
    async def voice(request: Request) -> Response:
        form = await verified_form(request)
        if isinstance(form, Response):
            return form
        if not form.get("CallSid"):
            return PlainTextResponse("missing CallSid", status_code=400)
        try:
            call_id, parameters = await on_inbound(form, dict(request.query_params))
        except CallRejected as exc:
            log.info("call %s rejected: %s", form.get("CallSid"), exc.reason)
            return Response(reject_twiml("busy" if exc.busy else "rejected"), media_type="application/xml")
        stream_parameters = {**dict(parameters), call_id_parameter: call_id}
        twiml = connect_stream_twiml(media_stream_url(request, public_url, media_path), stream_parameters)
        return Response(twiml, media_type="application/xml")

    @router.post("/twilio/status", status_code=204, response_class=Response)
    async def status(request: Request) -> Response:
        form = await verified_form(request)
        if isinstance(form, Response):
            return form
        call_sid = form.get("CallSid")
        if not call_sid:
            return PlainTextResponse("missing CallSid", status_code=400)
        try:
            payload = status_callback_payload(form)
        except ValueError as exc:
            return PlainTextResponse(str(exc), status_code=400)
        try:
            await on_status(call_sid, payload, dict(request.query_params))
        except ValueError as exc:
            return PlainTextResponse(str(exc), status_code=400)
        return Response(status_code=204)

    if on_dial_action is not None:
        dial_action = on_dial_action

        @router.post(DIAL_ACTION_PATH, response_class=Response)
        async def dial_result(request: Request) -> Response:
            form = await verified_form(request)
            if isinstance(form, Response):
                return form
            if not form.get("CallSid") or not form.get("DialCallStatus"):
                return PlainTextResponse("missing CallSid or DialCallStatus", status_code=400)
            try:
                back = await dial_action(form, dict(request.query_params))
            except ValueError as exc:
                return PlainTextResponse(str(exc), status_code=400)
            if back is None:
                return Response(hangup_twiml(), media_type="application/xml")
            call_id, parameters = back
            twiml = connect_stream_twiml(media_stream_url(request, public_url, media_path),
                                         {**dict(parameters), call_id_parameter: call_id})
            return Response(twiml, media_type="application/xml")

    return router
