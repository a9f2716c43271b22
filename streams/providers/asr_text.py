"""One canonical form for final transcripts, whichever recogniser heard them.

The call core matches the caller's words (`streams.call.core.says`), redaction looks for phone numbers
and addresses (`streams.redaction`), and tools read a booking's time as the caller said it. Whisper
writes numbers as digits, but never the same way twice ("5, 5, 5, 1, 2, ...", "555-123-4567",
"3.30", "10 a.m."); pocketsphinx writes lowercase words ("five five five ...", "three thirty").
`normalize_transcript` writes both one way, so each consumer has one form to understand:

- whitespace collapsed to single spaces and stripped; punctuation and casing otherwise kept;
- digits said one by one (3 or more digits or digit words, apart by spaces, commas or hyphens; "oh"
  only between digits, as it is also an interjection) written together, as a North-American number
  when there are 10 ("555 123 4567") or 7 ("123 4567"); a number written "555-123-4567",
  "(555) 123-4567" or "123-4567" is grouped the same way;
- times as "3:30", "10 am", "3:30 pm" and "10 o'clock", from "3.30" or "3 30" after at/for/around/by
  or before am/pm, "10am", "10 A.M.", and the words "three thirty", "ten am", "ten o'clock";
- e-mail addresses as "john.smith@example.com", lowercased, from "john dot smith at example dot com",
  "john.smith at example.com" or "John.Smith@Example.com".

Everything else (other numbers, the words between) stays as it was: no word disappears but those the
rules merge, and normalising twice gives what normalising once did.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["normalize_transcript"]

_UNIT_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9}
_DIGIT_WORDS = {"zero": 0, **_UNIT_WORDS}
_HOUR_WORDS = {**_UNIT_WORDS, "ten": 10, "eleven": 11, "twelve": 12}
_TEEN_WORDS = {
    "ten": 10, "eleven": 11, "twelve": 12, "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16,
    "seventeen": 17, "eighteen": 18, "nineteen": 19,
}
_TENS_WORDS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50}


def _words(words: Iterable[str]) -> str:
    """An alternation of `words`, longest first, matched case-insensitively in ASCII only: Unicode
    case folding would take the long s and the Kelvin sign for "s" and "k"."""
    return "(?ai:" + "|".join(sorted(words, key=len, reverse=True)) + ")"


_DIGIT_WORD = _words(_DIGIT_WORDS)
_HOUR_WORD = _words(_HOUR_WORDS)
_UNIT_WORD = _words(_UNIT_WORDS)
_MINUTE_WORDS = rf"(?:(?ai:oh) {_UNIT_WORD}|{_words(_TEEN_WORDS)}|{_words(_TENS_WORDS)}(?:[ -]{_UNIT_WORD})?)"
"""Minutes as said: "oh five", "fifteen", "thirty", "forty five" (a lone "five" is no minute)."""

_CUE = r"(?<![\w'-])(?ai:at|for|around|by) "
"""Words after which "3 30" or "three thirty" is a time of day."""
_AMPM = r"[AaPp](?:\. ?[Mm]\.?|[Mm])(?!\w)"
_HOUR_24 = r"(?:2[0-3]|[01]?[0-9])"
_HOUR_12 = r"(?:1[0-2]|0?[1-9])"
_NOT_A_TIME_AFTER = (
    r"(?! ?(?:[0-9]|%|(?ai:oh|percent|minutes?|mins?|hours?|hrs?|seconds?|days?|weeks?|months?|years?|times"
    rf"|dollars?|bucks|cents?|pounds?|euros?|people|persons)(?!\w)|{_DIGIT_WORD}(?![\w'])))"
)
"""What makes "at 3 30" or "by 3.30" part of a longer number or a quantity instead ("by 3.30 percent")."""

# --- Phone numbers already grouped --------------------------------------------------------------------

_GROUPED_PHONE = re.compile(
    r"(?<![\w.@$-])(?:\(([0-9]{3})\) ?|([0-9]{3})-)?([0-9]{3})-([0-9]{4})(?![\w@-]|[.,][0-9])"
)


def _group_phone(match: re.Match[str]) -> str:
    return " ".join(group for group in match.groups() if group)


# --- Times --------------------------------------------------------------------------------------------

_CUED_WORD_TIME = re.compile(
    rf"(?P<cue>{_CUE})(?P<hour>{_HOUR_WORD}) (?P<minute>{_MINUTE_WORDS})(?![\w'-])"
    rf"(?:(?= {_AMPM})|{_NOT_A_TIME_AFTER})"
)
_WORD_HOUR = re.compile(
    rf"(?<![\w'-])(?P<hour>{_HOUR_WORD})(?:(?: (?P<minute>{_MINUTE_WORDS}))?(?= {_AMPM})"
    r"|(?= (?ai:o'clock)(?![\w'-])))"
)
"""An hour in words before am/pm ("ten thirty pm") or o'clock ("ten o'clock")."""
_DIGIT_TIME = re.compile(
    rf"(?P<cue>{_CUE})?(?<![\w.:,$'-])(?P<hour>{_HOUR_24})[. ](?P<minute>[0-5][0-9])"
    rf"(?(cue)(?:(?= ?{_AMPM})|(?![\w-]|[.:,][0-9]){_NOT_A_TIME_AFTER})|(?= ?{_AMPM}))"
)
"""3.30 or 3 30 after a cue or before am/pm; elsewhere it may be a price or two numbers."""
_HOUR_AMPM = re.compile(
    rf"(?<![\w.:,$'])(?P<time>{_HOUR_12}(?::[0-5][0-9])?) ?(?P<half>[AaPp])(?:\. ?[Mm](?P<stop>\.)?|[Mm])(?!\w)"
)


def _minutes(said: str) -> int:
    first, _, second = said.lower().replace("-", " ").partition(" ")
    if first == "oh":
        return _UNIT_WORDS[second]
    return _TEEN_WORDS.get(first) or _TENS_WORDS[first] + _UNIT_WORDS.get(second, 0)


def _word_time(match: re.Match[str]) -> str:
    hour = str(_HOUR_WORDS[match["hour"].lower()])
    minute = match["minute"]
    time = f"{hour}:{_minutes(minute):02d}" if minute else hour
    return (match.groupdict().get("cue") or "") + time


def _digit_time(match: re.Match[str]) -> str:
    return f"{match['cue'] or ''}{match['hour']}:{match['minute']}"


def _hour_ampm(match: re.Match[str]) -> str:
    """Writes "10 am", keeping the period of "a.m." where it also ends the sentence (the text ends
    there, or a capital follows)."""
    after = match.string[match.end() : match.end() + 2]
    stop = "." if match["stop"] and (not after or (after[0] == " " and after[1:].isupper())) else ""
    return f"{match['time']} {match['half'].lower()}m{stop}"


# --- Digits said one by one ---------------------------------------------------------------------------

_DIGIT_TOKEN = rf"(?:[0-9]|{_DIGIT_WORD}|(?ai:oh))(?![\w@']|[.:,][0-9])"
"""A digit, a digit word, or "oh": a zero only between digits (a run cannot start with it, and
`_digits` trims it from the end)."""
_DIGIT_SEPARATOR = r"(?: ?[,-] ?| )"
_DIGIT_RUN = re.compile(
    rf"(?<![\w.:@'$])(?<!\w-)(?<![0-9],)(?!(?ai:oh)(?!\w)){_DIGIT_TOKEN}(?:{_DIGIT_SEPARATOR}{_DIGIT_TOKEN})+"
)
_TOKEN = re.compile(r"\w+")
_SAID_DIGITS = {**_DIGIT_WORDS, "oh": 0}


def _digits(match: re.Match[str]) -> str:
    """The run's digits written together (grouped as a phone number when 7 or 10), if 3 or more are left
    once the words that are not its digits are handed back."""
    tokens = list(_TOKEN.finditer(match.group()))
    if match.string.startswith("-", match.end()) and match.string[match.end() + 1 : match.end() + 2].isalnum():
        tokens.pop()  # glued to the next word: "four-year-olds", "5-123-4567" are not its digits
    while tokens and tokens[-1].group().lower() == "oh":
        tokens.pop()  # "five five five, oh, and": an interjection, not a zero
    if len(tokens) < 3:
        return match.group()
    digits = "".join(str(_SAID_DIGITS.get(t.group().lower(), t.group())) for t in tokens)
    if len(digits) == 10:
        digits = f"{digits[:3]} {digits[3:6]} {digits[6:]}"
    elif len(digits) == 7:
        digits = f"{digits[:3]} {digits[3:]}"
    return digits + match.group()[tokens[-1].end() :]


# --- E-mail addresses ---------------------------------------------------------------------------------

_LOCAL_JOINS = {"dot": ".", "underscore": "_", "dash": "-", "hyphen": "-"}
_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9_+-]*[A-Za-z0-9])?"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN_JOIN = r"(?:\.| (?ai:dot) )"
_DOMAIN = rf"(?:{_LABEL}{_DOMAIN_JOIN})+[A-Za-z]{{2,6}}"
_AT = r"(?: ?@ ?| (?ai:at) )"
_NOT_A_NAME = _words((
    "i", "me", "you", "we", "us", "they", "them", "he", "him", "she", "her", "it", "is", "am", "are", "was", "were",
    "be", "been", "being", "here", "there", "up", "in", "out", "on", "off", "online", "back", "over", "work",
    "works", "worked", "working", "look", "looks", "looked", "looking", "shop", "shopping", "stay", "staying",
))
"""Words that, before a spoken "at", are the sentence and not an address ("I work at example.com")."""
_EMAIL = re.compile(
    rf"(?<![\w.@:'+-])(?!{_NOT_A_NAME} (?ai:at) )"
    rf"(?P<local>{_NAME}(?:(?:\.| {_words(_LOCAL_JOINS)} ){_NAME})*){_AT}(?P<domain>{_DOMAIN})"
    rf"(?![\w@-])(?!{_DOMAIN_JOIN}[A-Za-z0-9])(?!{_AT}{_DOMAIN})"
)
_SPOKEN_JOIN = re.compile(rf" {_words(_LOCAL_JOINS)} ")
_SPOKEN_DOT = re.compile(r" (?ai:dot) ")


def _email(match: re.Match[str]) -> str:
    local = _SPOKEN_JOIN.sub(lambda join: _LOCAL_JOINS[join.group().strip().lower()], match["local"])
    domain = _SPOKEN_DOT.sub(".", match["domain"])
    return f"{local}@{domain}".lower()


def normalize_transcript(text: str) -> str:
    """`text` in the canonical form the module describes. Pure, total and idempotent."""
    text = " ".join(text.split())
    text = _GROUPED_PHONE.sub(_group_phone, text)
    text = _CUED_WORD_TIME.sub(_word_time, text)
    text = _WORD_HOUR.sub(_word_time, text)
    text = _DIGIT_TIME.sub(_digit_time, text)
    # am/pm before the digit runs: "1 2 3am" must be one run whether or not "am" is apart yet.
    text = _HOUR_AMPM.sub(_hour_ampm, text)
    text = _DIGIT_RUN.sub(_digits, text)
    # Last: the rules above may write an address's digits ("five five five at ...").
    return _EMAIL.sub(_email, text)
