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
- ``<PERSON>``: people's names where something says a name comes ("my name is", "this is",
  "I'm", "call me", "under the name", "speaking with", "Mr", "thanks", a booking's "for", "Ada
  here" at the start), spelled out after one ("A-D-A"), or said on their own; names the call knows
  (`known_names`), wherever they are said; and, in JSON, the values of name fields
  (``first_name``, ``customer_name``, ``customer``, a ``name`` inside ``customer`` or ``contact``).

Everything is pattern-based (presidio's pattern recognizers, our own `PatternRecognizer`s,
`phonenumbers`, and the US Census's lists of first names and surnames from the `names`
package): no language model, nothing downloaded, and the same text always gives the same
result. Where a rule has to choose, it errs on the side of removing: an order number that happens
to pass the Luhn check becomes ``<CARD>``, and seven or ten digits in a row become ``<PHONE>``.
Names are the exception: with no model to tell "this is Mark" from "this is about", a name is
only taken where a cue introduces it and the word could be one (see `_NameFinder`), so a name
said without a cue, and not known to the call, stays.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib.resources import files
from itertools import pairwise
from typing import TypeAlias

from phonenumbers import Leniency, PhoneNumberMatcher
from presidio_analyzer import Pattern, PatternRecognizer
from presidio_analyzer.predefined_recognizers import (
    EmailRecognizer,
    IbanRecognizer,
    IpRecognizer,
)

__all__ = ["PiiSpan", "Redactor", "default_redactor", "names_in_json", "redact_field"]

REDACTIONS_CACHED = 4096
"""Texts whose redaction a `Redactor` remembers (the most recently used)."""

_PRIORITY = ("CARD", "IBAN", "NATIONAL_ID", "EMAIL", "IP", "PHONE", "DOB", "ADDRESS", "PERSON")
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
"""What every kind of PII here but names needs somewhere in the text: a digit, an @ or a spoken
"dot", an IPv6 "::", or a birth-date cue. Text without any is only looked at for names."""


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


# --- Person names ---------------------------------------------------------------------------------
# No NER model is available, so a name is found where callers (and agents) announce one: a cue
# says a name comes, and the word after it is taken if it could be a name. How sure the cue is
# decides what "could be" means:
# - strong ("my name is", "the name's", "under the name", "call me"): any word but a common one;
# - title ("Mr", "Dr.", "doctor"): a first name or surname on the lists, a known name, or a
#   capitalised word;
# - surname ("put it under", "named"): a first name or surname on the lists, or a known name;
# - weak ("this is", "it's", "I'm", "thanks", "speaking with", "my wife", a booking's "for"): a
#   first name on the list, a known name, or a capitalised surname on the list; or any word but
#   a common one when "speaking" or "calling" follows it ("this is Priya calling");
# - here ("Tom here" opening the text): a first name, a capitalised word, or any word but a
#   common one with a stop after "here" ("Priya here, ...").
# "Capitalised" counts only in cased text, and not for a sentence's first word or an acronym.
# More words that could be names may follow (middle names, a surname); a run of single letters
# after a name or a spelling cue is the name spelled out.

_COMMON_WORDS = frozenset(re.split(r"\s+", """
a about above across actually after afternoon again against ago ah ahead all almost alone along already alright also
although always am among an and another any anybody anyone anything anytime anyway anywhere apartment appointment
apt are around as asap ask asked asking at august available away back bad basement be because been before being
below best better between big bit both busy but by bye call called calling calls came can cannot card cause ceiling
certainly check checking client close cold come coming company confused could crazy customer date daughter day days
dear december deck definitely did do does doing done door down dr during each early either else email end enough
estimate even evening ever every everybody everyone everything exactly family far february field fifth fine first
five floor for four friday friend from frustrated full garage gave get getting give glad go going gone gonna good
goodbye got gotta great guess guy guys had half happy hard has have having he hello help here hers hey hi him his
hmm hold home hope hoping hour hours house how however hundred husband i if im important in inquiry instead
interested into is issue it its itself january july june just kid kids kind kitchen know last late later least left
less let like little live long look looking lot lots maam madam made make many march may maybe me mean member minute
minutes miss missus mister mm mobile mom monday month months more morning most mother mr mrs ms much mum must my
myself near need needed needs neighbor neighbour never new next nice night nine no nobody none noon nope nor not
nothing november now number of off office oh ok okay old on once one only onto or order other our ours out over own
owner part patient pay people perhaps person phone pipe please pm pretty probably quick quite quote rather re ready
real really regarding reservation right roof room said same saturday say saying second see seven she should sick
since sink sir sister six so some somebody someone something sometimes son soon sorry speak speaking spelled
spelling spoke stairs start started still street stuck such suite summer sunday supposed sure take talk talking team
tech technician tell ten than thank thanks that the their theirs them then there these they thing things think third
this those though thought three through thursday ticket till time to today together tomorrow tonight too trying
tuesday twenty two uh um under unit until up upon upset urgent us very via wait waiting wall want wanted wants was
water way we wednesday week weekend well went were what whatever when whenever where wherever whether which while
who whoever whole whom whose why wife will window winter with within without wondering work working worried would
wrong yard yeah year years yes yesterday yet yo you your yours yourself yup
""".strip()))
"""Words that are never taken for a name, whatever the cue: what follows "this is", "I'm", "my
name is" or a first name when no name does ("this is about", "I'm calling", "call me back",
"Tom at 17 Old Mill Lane"). It wins over the Census lists, which hold "Will", "May" and "June"."""

_WORD = r"[^\W\d_]+(?:['’-][^\W\d_]+)*"
_NAME_WORD = re.compile(rf"(?<![\w<>@.'’-])({_WORD})(?![\w<>@]|\.[^\W\d_])")
"""A word, never part of a placeholder (so redacting again finds nothing new) or of an address."""
_POSSESSIVE = re.compile(r"['’]s$", re.IGNORECASE)
_CONTRACTION = re.compile(r"[a-z]+['’](?:re|ve|ll|d|m)")
_APOSTROPHES = re.compile(r"['’-]")
_BETWEEN_WORDS = re.compile(r"[ \t]+|[ \t]*-[ \t]*")
_FILLERS = r"(?:uh|um|er|erm|uhm|hmm|oh|well|like|so|yeah|yes|sure|ok|okay|hi|hello|hey)"
_AFTER_CUE = rf"[\s,:;\"-]*(?:{_FILLERS}\b[\s,:;\"-]*)*"

# The cues are matched in the lower-cased text (`_lowered`): a third of the time of IGNORECASE.
_NAME_IS = r"(?:\s*['’]s|\s*:(?=\s)|\s+(?:is|was|would\s+be|should\s+be|will\s+be))"
_STRONG_CUES = re.compile(
    rf"(?:\b(?:first|last|middle|maiden|given|family|sur)\s*name(?!s){_NAME_IS}?"
    rf"|\b(?:full\s+|nick)?name(?:\s+(?:on|for)\s+(?:the\s+|my\s+|this\s+)?(?:account|booking|reservation|card|file"
    rf"|order|ticket|appointment|policy|lease|delivery))?{_NAME_IS}"
    r"|\bunder\s+(?:the\s+|my\s+)?name(?:\s+of)?|\bcall\s+me)" + _AFTER_CUE,
)
_TITLE_CUES = re.compile(r"\b(?:mr|mrs|ms|mister|missus|dr|doctor)\b\.?" + _AFTER_CUE)
_AFTER_NUMBER = re.compile(r"[\d.]\s?$")
"""Before a title that is none: "20 ms frames" is a duration."""
_WEAK_CUES = re.compile(
    r"\b(?:this\s+is|is\s+this|it['’]?s|it\s+is|i['’]?m|i\s+am|hi|hello|hey|thanks|thank\s+you|bye|goodbye|dear|under"
    r"|(?:speaking|talking|spoke|spoken|talked|speak|talk)\s+(?:with|to)|ask(?:ing|ed)?(?:\s+for)?"
    r"|(?:transfer|put|connect)\s+me\s+(?:through\s+)?to|tell"
    r"|my\s+(?:wife|husband|son|daughter|mom|mum|mother|dad|father|brother|sister|partner|boyfriend|girlfriend"
    r"|fianc[eé]e?|friend|neighbou?r|landlord|landlady|tenant|roommate|boss|colleague|co-?worker|grandson"
    r"|granddaughter|grandma|grandmother|grandpa|grandfather|aunt|uncle|cousin|nephew|niece)(?:-in-law)?"
    r"|(?:book(?:ed|ing)?|reserv(?:e|ed|ation)|appointment|table|order|ticket|hold)\b[^.?!\n]{0,30}?\bfor)"
    + _AFTER_CUE,
)
_SURNAME_CUES = re.compile(
    r"\b(?:(?:put\s+(?:it|that|this|them|us|me)|book(?:ed|ing)?(?:\s+(?:it|that))?|reserv(?:ed|ation)|it['’]?s|is"
    r"|listed|filed|saved|registered|account(?:['’]s)?)\s+under|named|called)" + _AFTER_CUE,
)
"""Cues after which a surname alone is as likely as a first name: "put it under Kowalski"."""
_UNCASED_ONLY = re.compile(r"(?:its|im)\b")
"""Cues that are only cues in lower-case text: there they stand for "it's" and "I'm", in cased text
"its" is a possessive ("its Kafka consumer")."""
_NAME_THEN = re.compile(r",?\s+(?:speaking|calling)\b")
"""After a word a weak cue introduced: "this is Priya speaking", "I'm Kwame calling": a name."""
_LEADING = re.compile(
    rf"^[\W_]*(?:(?:{_FILLERS}|good\s+(?:morning|afternoon|evening)|it['’]?s|that['’]?s|the\s+name['’]?s)\b[\W_]*)*",
)
"""What may come before a name said on its own, or before "Ada here"."""
_HERE_SAID = re.compile(r"[\s,]+(?:here|speaking)\b")
_HERE_ALONE = re.compile(r"[\s,]+(?:here|speaking)\s*(?:[,.!;:]|$)")
"""After the first word of a text: "Tom here", and, for a word no list has, "Priya here," (not "water here is")."""
_SPELL_CUES = re.compile(
    r"\b(?:spelled|spelt|spelling|spell(?:s|ed)?(?:\s+(?:it|that|my\s+name|the\s+name|name))?|that['’]?s|it['’]?s)"
    r"(?:\s+(?:is|as|like))*[\s,:]*",
)
_SPELL_HINTS = ("spel", "that", "it's", "it’s", "its")
_CUES = (
    (_STRONG_CUES, "strong", ("name", "call me")),
    (_TITLE_CUES, "title", ("mr", "ms", "dr", "doctor", "mister", "missus")),
    (_SURNAME_CUES, "surname", ("under", "named", "called")),
    (_WEAK_CUES, "weak", ()),
)
"""Each kind of cue, its strength, and substrings one of which the text must hold for it to be there
(none: too many to list)."""
_SPELLED = re.compile(r"(?<![\w<])[a-z](?:(?:[ .]|[ .]?-[ .]?)[a-z]\b){1,20}(?![\w>])")
"""Single letters, one name spelled out: "a-d-a", "k e v i n", "L.E.E"."""
_SPELLED_FROM_NAME = re.compile(r"[\s,:;-]*(?:(?:that['’]?s|it['’]?s|as\s+in|spelled|spelt)\b[\s,:;-]*)?")


_MORE_FIRST_NAMES = re.split(r"\s+", """
aaliyah adebayo aditya agnieszka aiden akira aleksandr ama amara amit ananya anil anjali aoife arjun ayodele bogdan
brayden caden chidi chinedu cian deepak divya dmitri emeka eoin harper haruto hao hiroshi hussein ibrahim jabari
jaden jaxon jayden jie jing jun kamau karim katarzyna katya kavya kayden kenji khalid khloe kofi kwame lakshmi lei
liam mateo meera muhammad mustafa neha nevaeh ngozi niamh noor oisin oleksandr olu oluwaseun padraig peyton piotr
pooja priya rahul raj ramesh rania ravi rohan sakura samir sanjay saoirse seamus sergei sinead sipho sunil sunita
suresh takeshi tariq thabo tomasz tunde vijay vikram vlad wanjiru wojciech ximena yusuf zainab zanele zuri
""".strip())
"""Common given names the 1990 Census list lacks: later American ones, and those of families from
South Asia, East Asia, Africa, the Arab world, Eastern Europe and Ireland."""


@cache
def _census_names() -> tuple[frozenset[str], frozenset[str]]:
    """First names (the US Census 1990 list's 5,163 and `_MORE_FIRST_NAMES`) and surnames (the
    Census's 88,799), lower-case and less the common words; read from the `names` package's data
    files on first use."""
    data = files("names")

    def read(*names: str) -> set[str]:
        return {line.split(maxsplit=1)[0].lower() for name in names
                for line in (data / name).read_text(encoding="ascii").splitlines() if line.strip()}

    first = read("dist.male.first", "dist.female.first") | set(_MORE_FIRST_NAMES)
    return frozenset(first - _COMMON_WORDS), frozenset(read("dist.all.last") - _COMMON_WORDS)


@dataclass(frozen=True, slots=True)
class _KnownNames:
    """Names a call knows, to be found wherever they are said."""

    words: frozenset[str]
    """Each of their words (less the common ones), lower-case."""
    pattern: re.Pattern[str] | None
    """Any of the whole names or their words, longest first."""


@lru_cache(maxsize=4096)
def _known_names(names: frozenset[str]) -> _KnownNames:
    phrases: set[str] = set()
    words: set[str] = set()
    for name in names:
        parts = [word.lower() for word in re.findall(_WORD, name)]
        if len(parts) > 1 or (parts and parts[0] not in _COMMON_WORDS and len(parts[0]) > 1):
            phrases.add(r"\s+".join(re.escape(part) for part in parts))
        words.update(part for part in parts if len(part) > 1 and part not in _COMMON_WORDS)
    alternatives = sorted(phrases | {re.escape(word) for word in words}, key=len, reverse=True)
    if not alternatives:
        return _KnownNames(frozenset(), None)
    pattern = re.compile(rf"(?<![\w<>@.])(?:{'|'.join(alternatives)})(?:['’]s)?(?![\w>@])", re.IGNORECASE)
    return _KnownNames(frozenset(words), pattern)


_NO_NAMES = _known_names(frozenset())


class _NameFinder:
    """Finds people's names in one text (see the comment above `_COMMON_WORDS`)."""

    def __init__(self, text: str, known: _KnownNames) -> None:
        self.text = text
        self.lower = _lowered(text)
        self.known = known
        self.first, self.last = _census_names()
        self.cased = text != text.lower() and text != text.upper()
        """Written with capitals (typed, or by a recogniser that capitalises): a capital then means something."""

    def spans(self) -> Iterator[PiiSpan]:
        lower = self.lower
        for cues, strength, hints in _CUES:
            if not hints or any(hint in lower for hint in hints):  # a substring test is far cheaper than a scan
                for cue in cues.finditer(lower):
                    if self.cased and _UNCASED_ONLY.match(cue.group()):
                        continue
                    if strength == "title" and _AFTER_NUMBER.search(lower, 0, cue.start()):
                        continue
                    yield from self._name_at(cue.end(), strength)
        leading = _LEADING.match(lower)
        start = leading.end() if leading else 0
        yield from self._name_at(start, "here")
        if lower.count(" ", start) < 6:
            yield from self._said_alone(start)
        if any(hint in lower for hint in _SPELL_HINTS):
            for cue in _SPELL_CUES.finditer(lower):
                yield from self._spelled_at(cue.end(), 2 if cue.group().startswith("spel") else 3)
        if self.known.pattern is not None:
            for match in self.known.pattern.finditer(self.text):
                yield PiiSpan("PERSON", match.start(), match.end() - len(_possessive(match.group())))

    def _common(self, word: str) -> bool:
        """Never a name: a common word, a letter, or a word shaped like an adverb or a verb that no
        list has as a name ("directly", "waiting"; but "Kelly", "Sterling")."""
        lower = _POSSESSIVE.sub("", word).lower()
        if lower in _COMMON_WORDS or len(lower) < 2 or lower.endswith(("n't", "n’t")):
            return True
        if _CONTRACTION.fullmatch(lower):
            return True  # "you're", "we've", "I'll"
        listed = lower in self.first or lower in self.last or lower in self.known.words
        return not listed and len(lower) > 4 and lower.endswith(("ly", "ing", "ed"))

    def _listed(self, word: str, *, surnames: bool) -> bool:
        lower = _APOSTROPHES.sub("", _POSSESSIVE.sub("", word).lower())  # the lists write O'Brien "obrien"
        return lower in self.first or lower in self.known.words or (surnames and lower in self.last)

    def _name_at(self, position: int, strength: str) -> Iterator[PiiSpan]:
        first = _NAME_WORD.match(self.text, position)
        if first is None or self._common(first.group()):
            return
        end = first.end()
        for _ in range(3 if strength == "strong" else 2):  # middle names and a surname
            if _POSSESSIVE.search(self.text, first.start(), end):
                break  # "Mark's wife": the name ends there
            gap = _BETWEEN_WORDS.match(self.text, end)
            word = _NAME_WORD.match(self.text, gap.end()) if gap else None
            if word is None or not self._could_follow(word, strength):
                break
            end = word.end()
        if not self._introduced(first, strength, end):
            return
        end -= len(_possessive(self.text[first.start() : end]))
        yield PiiSpan("PERSON", first.start(), end)
        if _SPELLED.fullmatch(self.lower, first.start(), end):  # "my name is a-d-a"
            yield from self._said(self.lower[first.start() : end])
        after = _SPELLED_FROM_NAME.match(self.lower, end)
        yield from self._spelled_at(after.end() if after else end, 2)

    def _capitalised(self, word: re.Match[str]) -> bool:
        """A capital that says "name": in cased text, not an acronym, not a sentence's first word."""
        text = word.group()
        if not (self.cased and text[0].isupper() and not text.isupper()):
            return False
        before = self.text[: word.start()].rstrip(" \t\"'“‘(")
        return bool(before) and before[-1] not in ".!?\n"

    def _introduced(self, first: re.Match[str], strength: str, end: int) -> bool:
        """Whether `first`, the word after a cue of `strength` (its name ending at `end`), is a name."""
        word = first.group()
        if strength == "strong":
            return True
        if strength == "title":
            return self._listed(word, surnames=True) or self._capitalised(first)
        if strength == "surname":
            return self._listed(word, surnames=True)
        if strength == "here":
            if self._listed(word, surnames=False) or self._capitalised(first):
                return _HERE_SAID.match(self.lower, end) is not None
            return _HERE_ALONE.match(self.lower, end) is not None
        surnames = self._capitalised(first)
        return self._listed(word, surnames=surnames) or _NAME_THEN.match(self.lower, end) is not None

    def _could_follow(self, word: re.Match[str], strength: str) -> bool:
        """Whether `word`, after a name, is more of it: a middle name, a surname."""
        if self._common(word.group()):
            return False
        return strength == "strong" or self._listed(word.group(), surnames=True) or self._capitalised(word)

    def _said_alone(self, start: int) -> Iterator[PiiSpan]:
        """A name and nothing else ("ada lovelace": the answer to "who am I speaking with?")."""
        words = list(_NAME_WORD.finditer(self.text, start))
        if not 1 <= len(words) <= 3 or re.search(r"\w", self.text[words[-1].end() :]):
            return
        if any(not _BETWEEN_WORDS.fullmatch(self.text, a.end(), b.start()) for a, b in pairwise(words)):
            return
        if self._common(words[0].group()) or not self._listed(words[0].group(), surnames=False):
            return
        if all(self._could_follow(word, "weak") for word in words[1:]):
            yield PiiSpan("PERSON", words[0].start(), words[-1].end() - len(_possessive(words[-1].group())))

    def _spelled_at(self, position: int, minimum: int) -> Iterator[PiiSpan]:
        """A name spelled out at `position`, and the name itself wherever the text says it."""
        spelled = _SPELLED.match(self.lower, position)
        if spelled is None:
            return
        if sum(char.isalpha() for char in spelled.group()) >= minimum:
            yield PiiSpan("PERSON", spelled.start(), spelled.end())
            yield from self._said(spelled.group())

    def _said(self, spelled: str) -> Iterator[PiiSpan]:
        """The name `spelled` out, wherever the text says it whole ("a-d-a, Ada")."""
        letters = "".join(char for char in spelled if char.isalpha())
        for said in re.finditer(rf"(?<![\w<>]){letters}(?![\w>])", self.lower):
            yield PiiSpan("PERSON", said.start(), said.end())


def _lowered(text: str) -> str:
    """`text` in lower case, each character where it was (the few whose lower case is longer stay)."""
    lower = text.lower()
    if len(lower) == len(text):
        return lower
    return "".join(char.lower() if len(char.lower()) == 1 else char for char in text)


def _possessive(word: str) -> str:
    found = _POSSESSIVE.search(word)
    return found.group() if found else ""


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
    ``<ADDRESS>``, ``<IBAN>``, ``<IP>`` and ``<PERSON>``. Building one compiles every pattern and
    reads the name lists, so build it once (`default_redactor`) and share it; it holds no per-call
    state: what a call knows (its caller's name) comes with each text as `known_names`.

    Args:
        default_region: the ISO 3166 region whose national phone formats are recognised (numbers
            written with a leading ``+`` are recognised whatever the region).
    """

    def __init__(self, *, default_region: str = "US") -> None:
        self.default_region = default_region
        self._recognizers = [*_presidio_recognizers(), *_own_recognizers()]
        self._iban = IbanRecognizer()
        _census_names()
        self.find("")  # compiles the patterns now, not on the first real text
        # Agents say the same sentences call after call, callers "yes" and "thank you": each text
        # (with the names it was redacted with) is redacted once.
        self._redacted = lru_cache(maxsize=REDACTIONS_CACHED)(self._redact)

    def find(self, text: str, known_names: Collection[str] = ()) -> list[PiiSpan]:
        """The spans to redact, in text order and never overlapping; `known_names` are people's
        names the text may mention (the caller's, from the call), found wherever they are said.

        Candidates that overlap become one span covering them all, since what one rule would leave
        of another's match may be the rest of a number; it takes the kind of the longest of them,
        or among equally long ones the kind first in CARD, IBAN, NATIONAL_ID, EMAIL, IP, PHONE,
        DOB, ADDRESS, PERSON.
        """
        known = _known_names(frozenset(known_names)) if known_names else _NO_NAMES
        candidates = list(_NameFinder(text, known).spans())
        if not _MAYBE_PII.search(text):
            return _merge_overlaps(candidates)  # most of what callers say: no other rule could match
        candidates += _card_spans(text) + _iban_spans(text, self._iban)
        for match in PhoneNumberMatcher(text, self.default_region, leniency=Leniency.POSSIBLE):
            candidates.append(PiiSpan("PHONE", match.start, match.end))
        for recognizer in self._recognizers:
            kind = recognizer.supported_entities[0]
            candidates += (PiiSpan(kind, r.start, r.end) for r in recognizer.analyze(text, [kind]))
        return _merge_overlaps(candidates)

    def redact(self, text: str, known_names: Collection[str] = ()) -> str:
        """`text` with every span `find` reports replaced by ``<KIND>``; the rest is unchanged.

        Redacting again changes nothing: removing a span can expose another (digits glued to a
        card number read as part of it, alone a phone number), so the text is redacted again
        until nothing more is found. That ends: no rule matches the ``<`` and ``>`` of a
        placeholder, so each pass that finds anything removes some of the original text.
        """
        return self._redacted(text, frozenset(known_names))

    def _redact(self, text: str, known_names: frozenset[str]) -> str:
        while spans := self.find(text, known_names):
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


_PEOPLE = r"customer|caller|contact|patient|guest|person"
"""Keys whose text is a person's name (``{"customer": "Ada"}``, as an outbound call's parameters)."""
_PERSON_KEYS = (
    rf"{_PEOPLE}|client|member|people|user|owner|holder|account_holder|recipient|attendee|driver|technician"
    r"|employee|passenger|sender"
)
_NAME_KEY = re.compile(
    rf"(?:(?:first|last|middle|given|family|full|maiden|nick|legal|preferred|{_PERSON_KEYS})_?)?name|surname|forename"
    rf"|{_PEOPLE}"
)
_PERSON_KEY = re.compile(rf"(?:{_PERSON_KEYS})s?")
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def _is_name_key(key: str, parent: str | None) -> bool:
    """Whether a JSON field's text is a person's name: ``first_name``, ``customerName``,
    ``surname``, ``customer``; a plain ``name`` only inside a person (``{"customer": {"name":
    ...}}``), as tools have names too."""
    snake = _CAMEL.sub("_", key).lower().replace("-", "_").replace(" ", "_")
    if snake == "name":
        return parent is not None and _PERSON_KEY.fullmatch(_CAMEL.sub("_", parent).lower()) is not None
    return _NAME_KEY.fullmatch(snake) is not None


def _json_names(value: _JsonValue, parent: str | None = None) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str) and _is_name_key(key, parent):
                yield item
            else:
                yield from _json_names(item, key)
    elif isinstance(value, list):
        for item in value:
            yield from _json_names(item, parent)


def names_in_json(value: str | None) -> list[str]:
    """The people's names a JSON document holds in its name fields (see `redact_field`), for a
    call to know them: a CRM lookup's ``customer_name`` is then found in what is said later."""
    if not value:
        return []
    try:
        document: _JsonValue = json.loads(value)
    except ValueError:
        return []
    return [name for name in _json_names(document) if name.strip()]


def _mask_phone(value: str, redactor: Redactor, known_names: Collection[str]) -> str:
    digits = [char for char in value if char.isdigit()]
    if not digits:
        return redactor.redact(value, known_names)  # a queue name, "anonymous": not a number to mask
    plus = "+" if value.lstrip().startswith("+") else ""
    return plus + "*" * max(len(digits) - 2, 0) + "".join(digits[-2:])


def _redact_json(
    value: _JsonValue, redactor: Redactor, known_names: Collection[str], parent: str | None = None
) -> _JsonValue:
    if isinstance(value, str):
        return redactor.redact(value, known_names)
    if isinstance(value, dict):
        return {
            key: "<PERSON>" if isinstance(item, str) and item.strip() and _is_name_key(key, parent)
            else _redact_json(item, redactor, known_names, key)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_redact_json(item, redactor, known_names, parent) for item in value]
    if isinstance(value, int) and not isinstance(value, bool):
        # A card or phone number stored as a JSON number is as personal as a string one.
        redacted = redactor.redact(str(value))
        return value if redacted == str(value) else redacted
    return value


def redact_field(kind: str, value: str | None, redactor: Redactor, known_names: Collection[str] = ()) -> str | None:
    """Redacts one schema field by the ``pii`` kind its Avro schema declares; `known_names` are the
    people's names the call knows (`Redactor.find`).

    - ``phone``: the digits, each but the last two replaced by ``*``, after a ``+`` if the value
      starts with one; all other characters are dropped, so ``+1 (212) 555-0100`` becomes
      ``+*********00``. A value without digits (a queue name) is redacted as text instead.
    - ``text``: `Redactor.redact`.
    - ``json``: every string in the document redacted (keys kept; integers too, as their decimal
      text, becoming the placeholder string if they are PII), re-serialised compactly with sorted
      keys; a value that is not JSON is redacted as text. A name field (``first_name``,
      ``customerName``, ``surname``, a ``name`` inside ``customer``, ``contact``, ``patient`` and
      the like) becomes ``<PERSON>`` whole, and the names in them are known to the rest of the
      document.
    - ``voice``: ``<VOICE>``, since audio is never given to analysts; ``dtmf``: ``<DTMF>``.
    - any other kind: `Redactor.redact`.

    None stays None, whatever the kind.
    """
    if value is None:
        return None
    if kind == "phone":
        return _mask_phone(value, redactor, known_names)
    if kind == "voice":
        return "<VOICE>"
    if kind == "dtmf":
        return "<DTMF>"
    if kind == "json":
        try:
            document: _JsonValue = json.loads(value)
        except ValueError:
            return redactor.redact(value, known_names)
        names = [*known_names, *(name for name in _json_names(document) if name.strip())]
        redacted = _redact_json(document, redactor, names)
        return json.dumps(redacted, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return redactor.redact(value, known_names)
