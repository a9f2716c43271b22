"""PII redaction: what analysts see instead of what callers said.

The event log is the system of record, and it keeps transcripts, tool results and numbers exactly
as they were: replays, audits and re-projections need the raw text, and the log is the one place
access to it is controlled. Everything built from the log for analysts (the ClickHouse tables)
gets redacted text instead, so that a projection can be rebuilt at any time with better rules
without anything raw ever having left the log.

A `Redactor` replaces each piece of personal data it finds with a typed placeholder, so analysts
can still count what was said without seeing it:

- ``<PHONE>``: phone numbers, found by `phonenumbers` in the national formats of the default
  region and in international ones (``+44 20 7946 0958``), with the digits grouped by spaces,
  dashes, dots or parentheses as speech recognisers write them.
- ``<EMAIL>``: written addresses, and spoken ones (``john dot smith at example dot com``).
- ``<CARD>``: 13 to 19 digits, however grouped, that pass the Luhn check, and the "last four" of
  a card when the caller says whose digits they are.
- ``<NATIONAL_ID>``: US social security numbers (and ITINs) in the 3-2-4 shape, any nine digits
  the caller introduces as one, the "last four" of one, and UK National Insurance numbers.
- ``<DOB>``: a date, month and year, or year that the caller introduces as a birth date.
- ``<ADDRESS>``: US-style street addresses (number, street name, suffix, apartment) and PO boxes.
- ``<IBAN>``: bank account numbers with a valid IBAN checksum.
- ``<IP>``: IPv4 and IPv6 addresses.

Everything is pattern-based (presidio's pattern recognizers, our own `PatternRecognizer`s and
`phonenumbers`): no language model, nothing downloaded, and the same text always gives the same
result. Where a rule has to choose, it errs on the side of removing: an order number that happens
to pass the Luhn check becomes ``<CARD>``, and seven or ten digits in a row become ``<PHONE>``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from typing import TypeAlias

from phonenumbers import Leniency, PhoneNumberMatcher
from presidio_analyzer import Pattern, PatternRecognizer
from presidio_analyzer.predefined_recognizers import (
    EmailRecognizer,
    IbanRecognizer,
    IpRecognizer,
)

__all__ = ["PiiSpan", "Redactor", "default_redactor", "redact_field"]

_PRIORITY = ("CARD", "IBAN", "NATIONAL_ID", "EMAIL", "IP", "PHONE", "DOB", "ADDRESS")
"""Which kind names a span when equally long candidates overlap (earlier wins)."""
_CHECKSUMMED = frozenset({"CARD", "IBAN"})

_RANK = {kind: rank for rank, kind in enumerate(_PRIORITY)}


@dataclass(frozen=True, slots=True)
class PiiSpan:
    """Personal data of `kind` (one of the placeholder names, e.g. ``"PHONE"``) at ``text[start:end]``."""

    kind: str
    start: int
    end: int


# --- Patterns of our own --------------------------------------------------------------------------
# presidio's regex flavour (the `regex` package, matched case-insensitively). Where a cue ("born on",
# "my social is") is what makes text PII, the pattern matches the cue and then `\K`, which starts the
# reported span after it: the placeholder reads "born on <DOB>". (A lookbehind would do the same,
# but is tried at every position of the text, several times slower.)

_ORDINAL_WORDS = (
    r"(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth|thirteenth"
    r"|fourteenth|fifteenth|sixteenth|seventeenth|eighteenth|nineteenth|twentieth"
    r"|twenty[- ]?(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth)|thirtieth|thirty[- ]?first)"
)
_DAY = rf"(?:[0-3]?\d(?:st|nd|rd|th)?|{_ORDINAL_WORDS})"
_MONTH = (
    r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?"
    r"|sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)\b\.?"
)
_YEAR = r"(?:19|20)\d{2}"
_DATE = (
    r"\b(?:\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})|\d{4}-\d{1,2}-\d{1,2}"
    rf"|(?:the\s+)?{_DAY}\s+(?:of\s+)?{_MONTH}(?:,?\s+(?:of\s+)?{_YEAR})?"
    rf"|{_MONTH}\s+(?:the\s+)?{_DAY}(?:,?\s+(?:of\s+)?{_YEAR})?"
    rf"|{_MONTH},?\s+(?:of\s+)?{_YEAR}"
    rf"|{_YEAR})\b"
)
_DOB_CUE = r"\b(?:born|birth\s*date|date\s+of\s+birth|d\.?\s?o\.?\s?b|birthday|b-?day)"
_SSN_NAME = (
    r"(?:social(?:\s+security)?(?:\s+(?:number|no))?|s\.?\s?s\.?\s?n|itin|tax\s+id(?:entification)?(?:\s+number)?"
    r"|social\s+insurance(?:\s+number)?|sin\s+number)"
)
_FILLER = r"(?:\s*(?:'s|:|,|-|\#)|\s+(?:is|was|are|on|in|it's|its|that's|thats|would\s+be|be|number))*\s*"
"""What people put between a cue and the value: "my date of birth is", "social's", "dob:"."""

_LAST_FOUR = r"\blast\s+(?:four|4)(?:\s+digits)?\s+(?:of|on|for)\s+(?:my\s+|the\s+|your\s+)?"

_HOUSE_NUMBER = r"(?<![$£€])\b\d{1,6}[a-z]?\b"
_NOT_A_STREET_NAME = (
    r"(?:the|a|an|and|or|but|so|then|just|if|of|on|in|at|to|for|from|by|with|about|over|under|than|per|each"
    r"|every|my|your|our|their|his|her|its|it|is|are|was|were|be|been|i|we|you|they|he|she|me|us|them"
    r"|this|that|these|those|there|here|more|less|other|few|am|pm|a\.m|p\.m|times?|hours?|hrs?|minutes?"
    r"|mins?|seconds?|secs?|days?|weeks?|months?|years?|miles?|blocks?|feet|foot|ft|inch(?:es)?|meters?"
    r"|dollars?|bucks|cents?|percent|people|guys|kids|units?|pieces?|items?|rooms?|floors?|story|stories)"
)
"""Words that cannot be part of a street's name: they turn "a 10 minute drive" and "2 people on the
way" back into ordinary speech."""
_STREET_NAME_WORD = rf"(?!{_NOT_A_STREET_NAME}\b)[a-z0-9][a-z0-9']*\.?"
_STREET_SUFFIX = (
    r"(?:street|st|avenue|ave|av|road|rd|boulevard|blvd|lane|ln|drive|dr|court|ct|place|pl|terrace|ter"
    r"|way|circle|cir|parkway|pkwy|highway|hwy|trail|trl|square|sq|crescent|cres|close|alley|plaza|pike)\b\.?"
)
_DIRECTION = r"(?:north|south|east|west|northeast|northwest|southeast|southwest|n|s|e|w|ne|nw|se|sw)\b\.?"
_UNIT = r"(?:,?\s+(?:apt|apartment|unit|suite|ste|flat)\b\.?\s*(?:number\s+|no\.?\s*|\#\s*)?[a-z0-9-]{1,6}\b)"


_MAYBE_PII = re.compile(rf"[0-9@]|::|\bdot\b|{_DOB_CUE}", re.IGNORECASE)
"""What every kind of PII here needs somewhere in the text: a digit, an @ or a spoken "dot", an
IPv6 "::", or a birth-date cue. Text without any is redacted by doing nothing."""


def _recognizer(kind: str, **patterns: str) -> PatternRecognizer:
    """A presidio recognizer for `kind` from named regexes (presidio wants a score; we use none)."""
    return PatternRecognizer(
        supported_entity=kind,
        name=f"voxlog_{kind.lower()}",
        patterns=[Pattern(name, regex, 0.5) for name, regex in patterns.items()],
    )


def _own_recognizers() -> list[PatternRecognizer]:
    return [
        _recognizer("DOB", cued_date=rf"{_DOB_CUE}\.?{_FILLER}\K{_DATE}"),
        _recognizer(
            "ADDRESS",
            street=(
                rf"{_HOUSE_NUMBER}\s+(?:{_STREET_NAME_WORD}\s+){{1,3}}{_STREET_SUFFIX}"
                rf"(?:\s+{_DIRECTION})?{_UNIT}?"
            ),
            po_box=r"\bp\.?\s?o\.?\s+box\s+\d{1,8}\b",
        ),
        _recognizer(
            "NATIONAL_ID",
            # Every 3-2-4 shape, including the ranges the SSA never issues (000-, 666-, the
            # published sample numbers) that presidio's UsSsnRecognizer rejects: a number read out
            # on a call may be misheard, mistyped or made up, and is still somebody's to protect.
            ssn_shape=r"\b\d{3}([- .])\d{2}\1\d{4}\b",
            cued_nine_digits=rf"\b{_SSN_NAME}{_FILLER}\K\b\d(?:[ .-]?\d){{8}}\b",
            last_four=rf"{_LAST_FOUR}{_SSN_NAME}{_FILLER}\K\b\d{{4}}\b",
            # Any two letters, unlike presidio's UkNinoRecognizer, which knows the prefixes HMRC
            # never issues (QQ, its example prefix, among them) but not which letters a speech
            # recogniser mishears.
            uk_nino=r"\b[a-z]\s?[a-z]\s?\d{2}\s?\d{2}\s?\d{2}\s?[a-d]\b",
        ),
        _recognizer(
            "CARD",
            last_four=rf"{_LAST_FOUR}(?:(?:credit|debit)\s+)?(?:card|visa|mastercard|amex){_FILLER}\K\b\d{{4}}\b",
        ),
        _recognizer(
            "EMAIL",
            spoken=(
                r"\b[a-z0-9][a-z0-9._-]*(?:\s+(?:dot|underscore|dash|hyphen)\s+[a-z0-9][a-z0-9._-]*)*"
                r"\s+(?:at|@)\s+[a-z0-9-]+(?:(?:\.|\s+dot\s+)[a-z0-9-]+)*(?:\.|\s+dot\s+)"
                r"(?:com|net|org|edu|gov|io|co|us|uk|ca|info|biz|me)\b"
            ),
        ),
    ]


def _presidio_recognizers() -> list[PatternRecognizer]:
    return [
        # presidio's email regex without its validation, which asks tldextract and so fetches the
        # public suffix list over the network; an address-shaped string is redacted regardless.
        PatternRecognizer(supported_entity="EMAIL", name="voxlog_email", patterns=EmailRecognizer.PATTERNS),
        # Not the bare "::" (IPv6_unspecified): in text it is punctuation, not an address.
        IpRecognizer(
            supported_entity="IP",
            patterns=[pattern for pattern in IpRecognizer.PATTERNS if pattern.name != "IPv6_unspecified"],
        ),
    ]


# --- Cards ----------------------------------------------------------------------------------------

_DIGIT_GROUPS = re.compile(r"\d+(?:[ -]\d+)*")
_DIGITS = re.compile(r"\d+")
_CARD_DIGITS = range(13, 20)


def _luhn_valid(digits: str) -> bool:
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0


def _card_spans(text: str) -> list[PiiSpan]:
    """Luhn-valid runs of whole digit groups.

    A single regex would take the longest run of digits, so "4111 1111 1111 1111 123" (a card
    and its security code) would be one 19-digit number that fails the check, and the card would
    stay; instead every run of consecutive groups with 13 to 19 digits is a candidate.
    """
    spans: list[PiiSpan] = []
    for run in _DIGIT_GROUPS.finditer(text):
        groups = [(group.start(), group.group()) for group in _DIGITS.finditer(text, run.start(), run.end())]
        for first, (start, _) in enumerate(groups):
            digits = ""
            for group_start, group in groups[first:]:
                digits += group
                if len(digits) > _CARD_DIGITS[-1]:
                    break
                if len(digits) in _CARD_DIGITS and _luhn_valid(digits):
                    spans.append(PiiSpan("CARD", start, group_start + len(group)))
    return spans


# --- IBANs ----------------------------------------------------------------------------------------

_IBAN_RUN = re.compile(r"(?=\b([a-z]{2}\d{2}[a-z0-9]*(?:[ -][a-z0-9]+){0,11}))", re.IGNORECASE | re.ASCII)
"""From each country code and check digits on, the next few words: enough for 34 characters."""
_IBAN_LENGTHS = range(15, 35)
_ALPHANUMERIC = re.compile(r"[a-z0-9]+", re.IGNORECASE | re.ASCII)


def _iban_spans(text: str, iban: IbanRecognizer) -> list[PiiSpan]:
    """Each run of words from a country code and check digits on, cut at the longest valid IBAN.

    presidio's IbanRecognizer knows the checksum and each country's format, and that is what
    decides; but its own pattern, matched case-insensitively as lower-case transcripts need,
    takes the next word too ("es91 2100 0418 4502 0005 1332 then") and the IBAN then fails.
    """
    spans: list[PiiSpan] = []
    for run in _IBAN_RUN.finditer(text):
        start = run.start(1)
        length = 0
        ends: list[int] = []
        for word in _ALPHANUMERIC.finditer(text, start, run.end(1)):
            length += len(word.group())
            if length > _IBAN_LENGTHS[-1]:
                break
            if length in _IBAN_LENGTHS:
                ends.append(word.end())
        for end in reversed(ends):
            if iban.validate_result(text[start:end].upper()):
                spans.append(PiiSpan("IBAN", start, end))
                break
    return spans


# --- The redactor ---------------------------------------------------------------------------------


def _merge_overlaps(candidates: list[PiiSpan]) -> list[PiiSpan]:
    """One span for each group of overlapping candidates, named after a checksummed one (a card or
    an IBAN: what its checksum proves beats what a pattern suggests) or else the longest."""
    spans: list[PiiSpan] = []
    group: list[PiiSpan] = []
    for candidate in sorted(candidates, key=lambda s: s.start):
        if group and candidate.start >= max(span.end for span in group):
            spans.append(_covering(group))
            group = []
        group.append(candidate)
    if group:
        spans.append(_covering(group))
    return spans


def _covering(group: list[PiiSpan]) -> PiiSpan:
    named_by = min(group, key=lambda s: (s.kind not in _CHECKSUMMED, s.start - s.end, _RANK[s.kind]))
    return PiiSpan(named_by.kind, group[0].start, max(span.end for span in group))


class Redactor:
    """Finds PII in text and replaces each span with a typed placeholder.

    The placeholders are ``<PHONE>``, ``<EMAIL>``, ``<CARD>``, ``<NATIONAL_ID>``, ``<DOB>``,
    ``<ADDRESS>``, ``<IBAN>`` and ``<IP>``. Building one compiles every pattern, so build it once
    (`default_redactor`) and share it; it holds no per-call state.

    Args:
        default_region: the ISO 3166 region whose national phone formats are recognised (numbers
            written with a leading ``+`` are recognised whatever the region).
    """

    def __init__(self, *, default_region: str = "US") -> None:
        self.default_region = default_region
        self._recognizers = [*_presidio_recognizers(), *_own_recognizers()]
        self._iban = IbanRecognizer()
        self.find("")  # compiles the patterns now, not on the first real text

    def find(self, text: str) -> list[PiiSpan]:
        """The spans to redact, in text order and never overlapping.

        Candidates that overlap become one span covering them all, since what one rule would leave
        of another's match may be the rest of a number; it takes the kind of the longest of them,
        or among equally long ones the kind first in CARD, IBAN, NATIONAL_ID, EMAIL, IP, PHONE,
        DOB, ADDRESS.
        """
        if not _MAYBE_PII.search(text):
            return []  # most of what callers say: nothing any rule below could match
        candidates = _card_spans(text) + _iban_spans(text, self._iban)
        for match in PhoneNumberMatcher(text, self.default_region, leniency=Leniency.POSSIBLE):
            candidates.append(PiiSpan("PHONE", match.start, match.end))
        for recognizer in self._recognizers:
            kind = recognizer.supported_entities[0]
            candidates += (PiiSpan(kind, r.start, r.end) for r in recognizer.analyze(text, [kind]))
        return _merge_overlaps(candidates)

    def redact(self, text: str) -> str:
        """`text` with every span `find` reports replaced by ``<KIND>``; the rest is unchanged.

        Redacting again changes nothing: removing a span can expose another (digits glued to a
        card number read as part of it, alone a phone number), so the text is redacted again
        until nothing more is found. That ends: no rule matches the ``<`` and ``>`` of a
        placeholder, so each pass that finds anything removes some of the original text.
        """
        while spans := self.find(text):
            parts: list[str] = []
            position = 0
            for span in spans:
                parts += (text[position : span.start], f"<{span.kind}>")
                position = span.end
            parts.append(text[position:])
            text = "".join(parts)
        return text


@cache
def default_redactor() -> Redactor:
    """The process's shared `Redactor` (US phone formats), built on first use."""
    return Redactor()


# --- Schema fields --------------------------------------------------------------------------------

_JsonValue: TypeAlias = bool | int | float | str | list["_JsonValue"] | dict[str, "_JsonValue"] | None


def _mask_phone(value: str, redactor: Redactor) -> str:
    digits = [char for char in value if char.isdigit()]
    if not digits:
        return redactor.redact(value)  # a queue name, "anonymous": not a number to mask
    plus = "+" if value.lstrip().startswith("+") else ""
    return plus + "*" * max(len(digits) - 2, 0) + "".join(digits[-2:])


def _redact_json(value: _JsonValue, redactor: Redactor) -> _JsonValue:
    if isinstance(value, str):
        return redactor.redact(value)
    if isinstance(value, dict):
        return {key: _redact_json(item, redactor) for key, item in value.items()}
    if isinstance(value, list):
        return [_redact_json(item, redactor) for item in value]
    if isinstance(value, int) and not isinstance(value, bool):
        # A card or phone number stored as a JSON number is as personal as a string one.
        redacted = redactor.redact(str(value))
        return value if redacted == str(value) else redacted
    return value


def redact_field(kind: str, value: str | None, redactor: Redactor) -> str | None:
    """Redacts one schema field by the ``pii`` kind its Avro schema declares.

    - ``phone``: the digits, each but the last two replaced by ``*``, after a ``+`` if the value
      starts with one; all other characters are dropped, so ``+1 (212) 555-0100`` becomes
      ``+*********00``. A value without digits (a queue name) is redacted as text instead.
    - ``text``: `Redactor.redact`.
    - ``json``: every string in the document redacted (keys kept; integers too, as their decimal
      text, becoming the placeholder string if they are PII), re-serialised compactly with sorted
      keys; a value that is not JSON is redacted as text.
    - ``voice``: ``<VOICE>``, since audio is never given to analysts; ``dtmf``: ``<DTMF>``.
    - any other kind: `Redactor.redact`.

    None stays None, whatever the kind.
    """
    if value is None:
        return None
    if kind == "phone":
        return _mask_phone(value, redactor)
    if kind == "voice":
        return "<VOICE>"
    if kind == "dtmf":
        return "<DTMF>"
    if kind == "json":
        try:
            document: _JsonValue = json.loads(value)
        except ValueError:
            return redactor.redact(value)
        redacted = _redact_json(document, redactor)
        return json.dumps(redacted, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return redactor.redact(value)
