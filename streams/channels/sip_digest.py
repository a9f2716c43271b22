"""What voxlog reads of an INVITE itself, beside its SIP stack: the number dialled, and the digest
credentials a trunk proves (RFC 3261 22.4, RFC 8760's algorithms: MD5 and SHA-256, qop=auth).

The stack (PJSIP) parses and answers SIP; it has no server side of digest authentication for calls, so
the challenge and its check are here, pure and fuzzed: nonces are stateless (a time and its HMAC under
the gateway's secret), good for `NONCE_TTL_S`, and an answer is compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import unquote

NONCE_TTL_S = 300
MAX_HEADER = 4096
"""An Authorization header longer than this is refused unread."""
MAX_ANSWERS_KEPT = 65_536
"""Answers remembered against replay (only ones that proved a password, each for its nonce's life)."""
_ALGORITHMS: dict[str, Callable[[bytes], hashlib._Hash]] = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}
_PARAM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_-]*)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,"]+)\s*(?:,|$)')
_USER = re.compile(r"^(?:sips?|tel):([^@;?>]+)", re.IGNORECASE)
_TARGET = re.compile(r"^\s*<?\s*(sips?|tel):(?:([^@;?>]*)@)?([^;?>\s]*)", re.IGNORECASE)


class DigestError(ValueError):
    """Credentials that do not prove anything, and why (for the audit record, never for the peer)."""


class StaleAnswer(DigestError):
    """An answer to a nonce that is past its life, or that was given before: the peer is challenged
    again (`stale=true`, so a user agent answers anew without asking anyone for the password)."""


class ReplayedAnswer(StaleAnswer):
    """An answer given before: a replay, or a user agent that reuses a nonce without counting."""


class UnknownNonce(StaleAnswer):
    """An answer to a nonce this gateway did not make or cannot read: another gateway's, when the front
    before them sent the answer elsewhere than the challenge (the first gateway did not answer in time),
    one from before this gateway restarted under a new secret, or one made up. It proves nothing either
    way, so the peer is challenged anew; a forger gains a challenge, which anyone gets by asking."""


def number_of(uri: str) -> str:
    """The user part of a SIP or tel URI, as dialled (`sip:+15550100@host;user=phone` -> `+15550100`):
    a display name and angle brackets around it are allowed. '' when there is none."""
    text = uri.strip()
    if "<" in text:
        text = text[text.index("<") + 1:]
    text = text.strip()
    match = _USER.match(text)
    if match is None:
        return ""
    if not text.lower().startswith("tel:") and text[match.end():match.end() + 1] != "@":
        return ""  # sip:host has no user part: the host is no number
    return unquote(match.group(1)).strip()


def request_uri(message: str) -> str:
    """The Request-URI of a SIP request's text ('' when its first line is not a request line)."""
    parts = message.split("\n", 1)[0].strip().split(" ")
    return parts[1] if len(parts) == 3 and parts[2].upper().startswith("SIP/") else ""


def same_target(one: str, other: str) -> bool:
    """Whether two SIP URIs name the same user at the same host and port (RFC 3261 19.1.4, parameters
    aside): what a digest answer's `uri` must be of the request it comes with."""
    first, second = _TARGET.match(one), _TARGET.match(other)
    if first is None or second is None:
        return False
    return (first.group(1).lower() == second.group(1).lower() and unquote(first.group(2) or "") ==
            unquote(second.group(2) or "") and first.group(3).lower() == second.group(3).lower())


def header_value(message: str, name: str) -> str | None:
    """The first `name` header of a SIP message's text (case-insensitive; folded lines joined), or None."""
    head = message.split("\r\n\r\n", 1)[0].split("\n\n", 1)[0]
    lines = head.replace("\r\n", "\n").split("\n")[1:]  # the first line is the request line
    wanted = name.lower()
    for index, line in enumerate(lines):
        field, colon, value = line.partition(":")
        if not colon or line[:1].isspace() or field.strip().lower() != wanted:  # (a folded line is no header)
            continue
        for more in lines[index + 1:]:
            if not more[:1].isspace():
                break
            value += " " + more.strip()
        return value.strip()
    return None


def parse_digest(header: str) -> dict[str, str]:
    """The parameters of a `Digest ...` Authorization value, unquoted, names lower-cased; DigestError
    for anything else."""
    if len(header) > MAX_HEADER:
        raise DigestError("the Authorization header is too long")
    try:
        header.encode()
    except UnicodeEncodeError:  # bytes that were not UTF-8, as the SIP stack hands them over
        raise DigestError("the Authorization header is not UTF-8") from None
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() != "digest":
        raise DigestError(f"the Authorization scheme is {scheme[:20]!r}, not Digest")
    params: dict[str, str] = {}
    position = 0
    rest = rest.strip()
    while position < len(rest):
        match = _PARAM.match(rest, position)
        if match is None or match.end() == position:
            raise DigestError("the Authorization header's parameters cannot be read")
        name, value = match.group(1).lower(), match.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if name in params:
            raise DigestError(f"the Authorization header names {name} twice")
        params[name] = value
        position = match.end()
    return params


class AnswerLedger:
    """The answers that proved a password, each until its nonce's life ends: one given twice is a replay
    (the nonces are stateless, so this is what makes each answer good once). Bounded: past
    `MAX_ANSWERS_KEPT` the oldest is forgotten first."""

    def __init__(self, limit: int = MAX_ANSWERS_KEPT) -> None:
        self._until: OrderedDict[str, float] = OrderedDict()
        self._limit = limit
        self._lock = threading.Lock()

    def first(self, answer: str, until: float, now: float) -> bool:
        """Whether `answer` is given for the first time (it is remembered until `until`, in seconds)."""
        with self._lock:
            while self._until and next(iter(self._until.values())) < now:
                self._until.popitem(last=False)
            if answer in self._until:
                return False
            while len(self._until) >= self._limit:
                self._until.popitem(last=False)
            self._until[answer] = until
            return True


@dataclass(frozen=True)
class DigestAuthority:
    """Challenges and checks digest credentials for one realm. `secret` keys the nonces: a gateway's
    own, so that a nonce it did not make never checks out (`UnknownNonce`: the peer is asked anew)."""

    realm: str
    secret: bytes
    clock: Callable[[], float] = time.time
    answered: AnswerLedger = field(default_factory=AnswerLedger, compare=False)

    def challenge(self, algorithm: str = "MD5", *, stale: bool = False) -> str:
        """A WWW-Authenticate value with a fresh nonce."""
        issued = f"{int(self.clock()):x}"
        return (f'Digest realm="{self.realm}", nonce="{issued}.{self._seal(issued)}", algorithm={algorithm}, '
                f'qop="auth"' + (", stale=true" if stale else ""))

    def _seal(self, issued: str) -> str:
        return hmac.new(self.secret, f"{self.realm}:{issued}".encode(), hashlib.sha256).hexdigest()[:32]

    def verify(self, authorization: str, method: str, uri: str, password_of: Callable[[str], str | None]) -> str:
        """The username whose password the answer proves, for a request of `method` to `uri`, given once;
        StaleAnswer for an answer to be given anew, DigestError for one that proves nothing."""
        params = parse_digest(authorization)
        for needed in ("username", "realm", "nonce", "uri", "response"):
            if needed not in params:
                raise DigestError(f"the Authorization header has no {needed}")
        if params["realm"] != self.realm:
            raise DigestError(f"the realm is {params['realm'][:64]!r}, not {self.realm!r}")
        if not same_target(params["uri"], uri):
            # Else an answer seen on the wire would take its sender's credential to another number.
            raise DigestError(f"the answer is for {params['uri'][:80]!r}, not for the request's {uri[:80]!r}")
        issued, _, seal = params["nonce"].partition(".")
        if not hmac.compare_digest(seal.encode(), self._seal(issued).encode()):
            raise UnknownNonce("the nonce is not one this gateway made")
        try:
            age = self.clock() - int(issued, 16)
        except ValueError:
            raise UnknownNonce("the nonce cannot be read") from None
        if not 0 <= age <= NONCE_TTL_S:
            raise StaleAnswer(f"the nonce is stale ({age:.0f} s old)")
        algorithm = params.get("algorithm", "MD5").upper()
        digest = _ALGORITHMS.get(algorithm)
        if digest is None:
            raise DigestError(f"the algorithm {algorithm[:20]!r} is not supported")
        password = password_of(params["username"])
        if password is None:
            raise DigestError(f"no credential is named {params['username'][:64]!r}")

        def h(text: str) -> str:
            return digest(text.encode()).hexdigest()

        ha1 = h(f"{params['username']}:{self.realm}:{password}")
        ha2 = h(f"{method}:{params['uri']}")
        qop = params.get("qop")
        if qop is None:
            expected = h(f"{ha1}:{params['nonce']}:{ha2}")
        elif qop == "auth" and "nc" in params and "cnonce" in params:
            expected = h(f"{ha1}:{params['nonce']}:{params['nc']}:{params['cnonce']}:{qop}:{ha2}")
        else:
            raise DigestError(f"the qop {qop[:20]!r} is not supported, or nc and cnonce are missing")
        if not hmac.compare_digest(expected.encode(), params["response"].lower().encode()):
            raise DigestError(f"the password of {params['username'][:64]!r} does not match")
        if not self.answered.first(f"{params['nonce']} {expected}", int(issued, 16) + NONCE_TTL_S, self.clock()):
            raise ReplayedAnswer(f"the answer of {params['username'][:64]!r} was given before")
        return params["username"]

