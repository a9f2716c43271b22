"""A local stand-in for Twilio's REST API (Voice, 2010-04-01), for driving the real twilio SDK.

It serves, on 127.0.0.1 and a free port, what the SDK calls for voxlog's call operations:

- `POST /2010-04-01/Accounts/{AccountSid}/Calls.json`             create a call (To, From, Url|Twiml|ApplicationSid)
- `POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`   update: Twiml, Url, Status=completed|canceled
- `GET  /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`   fetch

with HTTP Basic auth checked (account SID : auth token), Call resources shaped like Twilio's API
reference, Twilio's error JSON (`{"code", "message", "more_info", "status"}`) for what Twilio would
refuse, every request recorded for assertions, and errors injectable (`fail_next`).

    with FakeTwilio(ACCOUNT_SID, AUTH_TOKEN) as fake:
        sid = fake.add_call("+15550001111", "+15550002222")
        rest = TwilioRest(ACCOUNT_SID, AUTH_TOKEN, base_url=fake.base_url)
"""

from __future__ import annotations

import base64
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

API_VERSION = "2010-04-01"
LIVE_STATUSES = {"queued", "ringing", "in-progress"}


def new_call_sid() -> str:
    return "CA" + uuid.uuid4().hex


def new_account_sid() -> str:
    return "AC" + uuid.uuid4().hex


def _rfc2822(moment: datetime) -> str:
    return format_datetime(moment)


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def _formatted(number: str) -> str:
    if number.startswith("+1") and len(number) == 12 and number[1:].isdigit():
        return f"({number[2:5]}) {number[5:8]}-{number[8:]}"
    return number


def twilio_error(status: int, code: int, message: str) -> JSONResponse:
    """Twilio's error body, e.g. {"code": 20404, "message": ..., "more_info": ..., "status": 404}."""
    return JSONResponse(
        {
            "code": code,
            "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}",
            "status": status,
        },
        status_code=status,
    )


@dataclass
class RecordedRequest:
    method: str
    path: str
    operation: str
    """create_call, update_call, fetch_call, unknown."""
    account_sid: str | None
    call_sid: str | None
    form: list[tuple[str, str]]
    auth_user: str | None
    auth_ok: bool
    headers: dict[str, str]
    at: float = field(default_factory=time.monotonic)

    @property
    def params(self) -> dict[str, str]:
        """The form as a dict (last value wins)."""
        return dict(self.form)

    def getlist(self, name: str) -> list[str]:
        return [value for key, value in self.form if key == name]


@dataclass
class InjectedError:
    status: int
    code: int
    message: str
    operation: str | None
    call_sid: str | None
    times: int


class FakeTwilio:
    """Twilio's Voice REST API on a local port; start with `with FakeTwilio(...)` or `start()`."""

    def __init__(self, account_sid: str, auth_token: str, *, host: str = "127.0.0.1") -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.host = host
        self.calls: dict[str, dict[str, Any]] = {}
        self.requests: list[RecordedRequest] = []
        self._errors: list[InjectedError] = []
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.app = self._make_app()

    # ------------------------------------------------------------------ control

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise RuntimeError("FakeTwilio is not started")
        return f"http://{self.host}:{self.port}"

    def start(self) -> FakeTwilio:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("FakeTwilio did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeTwilio:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_call(
        self,
        from_: str = "+15550001111",
        to: str = "+15550002222",
        *,
        sid: str | None = None,
        status: str = "in-progress",
        direction: str = "inbound",
    ) -> str:
        """Registers a call Twilio knows about (e.g. the inbound call a test caller placed)."""
        sid = sid or new_call_sid()
        now = _now()
        with self._lock:
            self.calls[sid] = self._call_resource(sid, from_, to, status, direction, now)
        return sid

    def fail_next(
        self,
        status: int = 404,
        code: int = 20404,
        message: str | None = None,
        *,
        operation: str | None = None,
        call_sid: str | None = None,
        times: int = 1,
    ) -> None:
        """The next `times` matching requests (by operation and/or call SID) get this Twilio error."""
        with self._lock:
            self._errors.append(
                InjectedError(
                    status, code, message or "The requested resource was not found", operation, call_sid, times
                )
            )

    def requests_for(self, operation: str, call_sid: str | None = None) -> list[RecordedRequest]:
        with self._lock:
            return [
                r for r in self.requests if r.operation == operation and (call_sid is None or r.call_sid == call_sid)
            ]

    # ------------------------------------------------------------------ resources

    def _call_resource(
        self, sid: str, from_: str, to: str, status: str, direction: str, now: datetime
    ) -> dict[str, Any]:
        uri = f"/{API_VERSION}/Accounts/{self.account_sid}/Calls/{sid}"
        started = status in ("in-progress", "completed")
        return {
            "account_sid": self.account_sid,
            "annotation": None,
            "answered_by": None,
            "api_version": API_VERSION,
            "caller_name": None,
            "date_created": _rfc2822(now),
            "date_updated": _rfc2822(now),
            "direction": direction,
            "duration": None,
            "end_time": None,
            "forwarded_from": None,
            "from": from_,
            "from_formatted": _formatted(from_),
            "group_sid": None,
            "parent_call_sid": None,
            "phone_number_sid": "PN" + uuid.uuid5(uuid.NAMESPACE_URL, to).hex,
            "price": None,
            "price_unit": "USD",
            "queue_time": "0",
            "sid": sid,
            "start_time": _rfc2822(now) if started else None,
            "status": status,
            "subresource_uris": {
                "notifications": f"{uri}/Notifications.json",
                "recordings": f"{uri}/Recordings.json",
                "payments": f"{uri}/Payments.json",
                "events": f"{uri}/Events.json",
                "siprec": f"{uri}/Siprec.json",
                "streams": f"{uri}/Streams.json",
                "transcriptions": f"{uri}/Transcriptions.json",
                "user_defined_message_subscriptions": f"{uri}/UserDefinedMessageSubscriptions.json",
                "user_defined_messages": f"{uri}/UserDefinedMessages.json",
            },
            "to": to,
            "to_formatted": _formatted(to),
            "trunk_sid": None,
            "uri": f"{uri}.json",
            "_started_at": time.monotonic() if started else None,
        }

    @staticmethod
    def _public(call: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in call.items() if not k.startswith("_")}

    def _end(self, call: dict[str, Any], status: str) -> None:
        now = _now()
        call["status"] = status
        call["date_updated"] = _rfc2822(now)
        call["end_time"] = _rfc2822(now)
        started = call.get("_started_at")
        call["duration"] = str(int(time.monotonic() - started)) if started is not None else "0"

    # ------------------------------------------------------------------ HTTP

    def _auth(self, request: Request) -> tuple[str | None, bool]:
        header = request.headers.get("authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return None, False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None, False
        return user, user == self.account_sid and password == self.auth_token

    async def _record(
        self, request: Request, operation: str, account_sid: str | None, call_sid: str | None
    ) -> RecordedRequest:
        body = (await request.body()).decode("utf-8", errors="replace")
        user, ok = self._auth(request)
        recorded = RecordedRequest(
            method=request.method,
            path=request.url.path,
            operation=operation,
            account_sid=account_sid,
            call_sid=call_sid,
            form=parse_qsl(body, keep_blank_values=True),
            auth_user=user,
            auth_ok=ok and account_sid == self.account_sid,
            headers={k.lower(): v for k, v in request.headers.items()},
        )
        with self._lock:
            self.requests.append(recorded)
        return recorded

    def _gate(self, recorded: RecordedRequest) -> JSONResponse | None:
        """Auth, then injected errors; None lets the request through."""
        if not recorded.auth_ok:
            response = twilio_error(401, 20003, "Authenticate")
            response.headers["WWW-Authenticate"] = 'Basic realm="Twilio API"'
            return response
        with self._lock:
            for error in self._errors:
                if (error.operation in (None, recorded.operation)) and (error.call_sid in (None, recorded.call_sid)):
                    error.times -= 1
                    if error.times <= 0:
                        self._errors.remove(error)
                    return twilio_error(error.status, error.code, error.message)
        return None

    def _not_found(self, path: str) -> JSONResponse:
        return twilio_error(404, 20404, f"The requested resource {path} was not found")

    def _make_app(self) -> FastAPI:
        app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        prefix = f"/{API_VERSION}/Accounts/{{account_sid}}"

        @app.post(prefix + "/Calls.json")
        async def create_call(account_sid: str, request: Request) -> Response:
            recorded = await self._record(request, "create_call", account_sid, None)
            refused = self._gate(recorded)
            if refused is not None:
                return refused
            params = recorded.params
            if not params.get("To"):
                return twilio_error(400, 21201, "No 'To' number is specified")
            if not params.get("From"):
                return twilio_error(400, 21213, "No 'From' number is specified")
            if not (params.get("Url") or params.get("Twiml") or params.get("ApplicationSid")):
                return twilio_error(
                    400, 21205, "Url parameter is required. Please provide Url, Twiml or ApplicationSid"
                )
            sid = new_call_sid()
            call = self._call_resource(sid, params["From"], params["To"], "queued", "outbound-api", _now())
            call["_request"] = params
            with self._lock:
                self.calls[sid] = call
            recorded.call_sid = sid
            return JSONResponse(self._public(call), status_code=201)

        @app.get(prefix + "/Calls/{call_sid}.json")
        async def fetch_call(account_sid: str, call_sid: str, request: Request) -> Response:
            recorded = await self._record(request, "fetch_call", account_sid, call_sid)
            refused = self._gate(recorded)
            if refused is not None:
                return refused
            with self._lock:
                call = self.calls.get(call_sid)
                if call is None:
                    return self._not_found(request.url.path)
                return JSONResponse(self._public(call))

        @app.post(prefix + "/Calls/{call_sid}.json")
        async def update_call(account_sid: str, call_sid: str, request: Request) -> Response:
            recorded = await self._record(request, "update_call", account_sid, call_sid)
            refused = self._gate(recorded)
            if refused is not None:
                return refused
            params = recorded.params
            with self._lock:
                call = self.calls.get(call_sid)
                if call is None:
                    return self._not_found(request.url.path)
                status = params.get("Status")
                if status is not None:
                    if status not in ("completed", "canceled"):
                        return twilio_error(400, 21218, f"Invalid Status: {status}")
                    # completed hangs up a live call (a queued or ringing one ends canceled);
                    # canceled only affects queued or ringing calls.
                    if status == "completed" and call["status"] in LIVE_STATUSES:
                        self._end(call, "completed" if call["status"] == "in-progress" else "canceled")
                    elif status == "canceled" and call["status"] in ("queued", "ringing"):
                        self._end(call, "canceled")
                elif params.get("Twiml") or params.get("Url"):
                    if call["status"] not in LIVE_STATUSES:
                        return twilio_error(400, 21220, "Call is not in-progress. Cannot redirect.")
                    call["_twiml"] = params.get("Twiml")
                    call["_url"] = params.get("Url")
                    call["date_updated"] = _rfc2822(_now())
                else:
                    return twilio_error(400, 20001, "Missing required parameter: Url, Twiml or Status")
                return JSONResponse(self._public(call))

        @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE"])
        async def anything_else(path: str, request: Request) -> Response:
            await self._record(request, "unknown", None, None)
            return self._not_found(request.url.path)

        return app
