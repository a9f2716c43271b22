"""Twilio's webhooks as FastAPI routes: signed requests in, TwiML out.

The protocol (signatures, TwiML, the forms, the replay guard) is `streams.channels.twilio_webhook_protocol`;
this is its HTTP side: the URL Twilio signed for a request as this app sees it, reading the form off
the request, the routes and their OpenAPI description. Anything that fails the signature check, or is
a replay, gets a 403 and is reported through `on_rejected` so the caller can audit it.

Behind a proxy the URL Twilio signed is not the one the app sees: set the public URL
(`VOXLOG_PUBLIC_URL`, e.g. `https://voice.example.com`) or have the proxy send
X-Forwarded-Proto / X-Forwarded-Host.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from fastapi import APIRouter, Request, Security
from fastapi.responses import PlainTextResponse, Response
from fastapi.security import APIKeyHeader
from starlette.requests import HTTPConnection

from schemas.events import CallStatus
from streams.channels.twilio_webhook_protocol import (
    CALL_ID_PARAMETER,
    DIAL_ACTION_PATH,
    FORM_CONTENT_TYPE,
    IDEMPOTENCY_HEADER,
    MAX_FORM_FIELDS,
    MAX_WEBHOOK_BYTES,
    MEDIA_PATH,
    SIGNATURE_HEADER,
    STATUS_PATH,
    VOICE_PATH,
    Replayed,
    ReplayGuard,
    WebhookError,
    connect_stream_twiml,
    form_pairs,
    hangup_twiml,
    http_scheme,
    reject_twiml,
    status_callback_payload,
    validate_handshake,
    validate_twilio_request,
    ws_scheme,
)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the URL Twilio signed


def _first_header_value(value: str | None) -> str | None:
    if not value:
        return None
    first = value.split(",")[0].strip()
    return first or None


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
    return urlunsplit((http_scheme(scheme.lower()), host, root.rstrip("/"), "", ""))


def public_request_url(conn: HTTPConnection, public_url: str | None) -> str:
    """The full URL Twilio requested (and signed) for this request or WebSocket handshake.

    HTTP requests give http(s) URLs, WebSocket handshakes ws(s) URLs; the query string is kept.
    """
    base = urlsplit(public_base_url(conn, public_url))
    scheme = ws_scheme(base.scheme) if conn.scope.get("type") == "websocket" else base.scheme
    path = base.path + _app_relative_path(conn)
    return urlunsplit((scheme, base.netloc, path, conn.url.query, ""))


def media_stream_url(conn: HTTPConnection, public_url: str | None) -> str:
    """The WebSocket URL for `<Stream url=...>`: wss:// when the public URL is https, ws:// when http."""
    base = urlsplit(public_base_url(conn, public_url))
    return urlunsplit((ws_scheme(base.scheme), base.netloc, base.path + MEDIA_PATH, "", ""))


def validate_media_handshake(auth_token: str, websocket: HTTPConnection, public_url: str | None,
                             replica_url: str | None = None) -> bool:
    """Checks the X-Twilio-Signature Twilio sends on the media WebSocket's upgrade request: signed over
    the stream URL the TwiML named, this replica's own when it has one (`own_urls`)."""
    signature = websocket.headers.get(SIGNATURE_HEADER)
    return any(validate_handshake(auth_token, public_request_url(websocket, base), signature)
               for base in own_urls(public_url, replica_url))


def own_urls(public_url: str | None, replica_url: str | None) -> tuple[str | None, ...]:
    """The bases Twilio may have signed a request to this gateway over: the public URL (None: the URL
    requested), and the replica's own (VOXLOG_REPLICA_URL), where its media streams and transfer
    outcomes are sent."""
    return (public_url,) if not replica_url or replica_url == public_url else (replica_url, public_url)


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
    return form_pairs(bytes(body))


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
                   "custom parameters in the query of this URL (see `streams.channels.twilio_outbound`); Twilio "
                   "signs them too.")

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
    replay_guard: ReplayGuard | None = None,
    replica_url: str | None = None,
) -> APIRouter:
    """`POST /twilio/voice`, `POST /twilio/status` and (with `on_dial_action`) `POST
    /twilio/dial-action`, all signature-checked.

    The voice webhook calls `on_inbound(form)` and answers `<Connect><Stream>` to `MEDIA_PATH` on the
    public host, with the stream parameters plus `CALL_ID_PARAMETER`=call_id. The status webhook calls
    `on_status(CallSid, CallStatus)` and answers 204. A bad or missing signature, or a replay, answers
    403 and calls `on_rejected`; a retry gets the first answer again (`replay_guard`, a fresh one by
    default). `public_url` is VOXLOG_PUBLIC_URL (None: the URL requested, forwarded headers honoured);
    `replica_url` VOXLOG_REPLICA_URL, where `<Stream>` points when several gateways share the public URL
    (a webhook signed over either is taken).
    """
    stream_base = replica_url or public_url
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
        urls = [public_request_url(request, base) for base in own_urls(public_url, replica_url)]
        url = urls[-1]  # the public one, named when refused
        token = auth_token_getter()
        if not token:
            return await refuse(request, url, form, "no auth token configured", "invalid Twilio signature")
        if not signature:
            return await refuse(request, url, form, "missing signature", "invalid Twilio signature")
        if not any(validate_twilio_request(token, signed, pairs, signature) for signed in urls):
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
                    return Response(earlier.body, status_code=earlier.status_code, media_type=earlier.media_type)
        except Replayed as exc:
            return await refuse(request, url, form, str(exc), "replayed Twilio request")
        try:
            response = await handle(form)
        except BaseException:
            guard.settle(key, answer, None)
            raise
        guard.settle(key, answer, response)
        return response

    @router.post(VOICE_PATH, response_class=TwimlResponse, responses={200: _VOICE_TWIML, **_REFUSALS},
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
            stream_parameters = {**dict(parameters), CALL_ID_PARAMETER: call_id}
            return TwimlResponse(connect_stream_twiml(media_stream_url(request, stream_base),
                                                      stream_parameters))

        return await answer_once(request, signature, handle)

    @router.post(STATUS_PATH, status_code=204, response_class=Response,
                 responses={204: {"description": "Recorded into its call (or audited when no call is known)."},
                            **_REFUSALS},
                 openapi_extra=_form_body("StatusCallback", _STATUS_FIELDS, ["CallSid", "CallStatus"]),
                 description="Twilio's status callback: how a call progresses. A call the dialer placed brings "
                             "`dial_id`, `tenant` and `seq` in the query (see `streams.channels.twilio_outbound`).")
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
                return TwimlResponse(connect_stream_twiml(media_stream_url(request, stream_base),
                                                          {**dict(parameters), CALL_ID_PARAMETER: call_id}))

            return await answer_once(request, signature, handle)

    return router
