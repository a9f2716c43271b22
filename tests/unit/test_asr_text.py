"""streams.providers.asr_text: a table of what each recogniser writes and its canonical form, the same form
from Whisper's digits and pocketsphinx's words, properties (idempotent, total, no letter or digit lost,
plain speech untouched), and redaction of the canonical phone numbers and addresses."""

from __future__ import annotations

import re
import string
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.providers.asr_text import normalize_transcript
from streams.redaction import Redactor, default_redactor

EXAMPLES = [
    # whitespace
    ("  yes,\n\tplease   do  ", "yes, please do"),
    ("", ""),
    # digits said one by one
    ("My number is 5, 5, 5, 1, 2, 3, 4, 5, 6, 7.", "My number is 555 123 4567."),
    ("5-5-5-1-2-3-4-5-6-7", "555 123 4567"),
    ("Call 555-123-4567, please.", "Call 555 123 4567, please."),
    ("It's (555) 123-4567.", "It's 555 123 4567."),
    ("Extension 123-4567", "Extension 123 4567"),
    ("five five five one two three four five six seven", "555 123 4567"),
    ("Five, five, five, one, two, three, four, five, six, seven.", "555 123 4567."),
    ("one two three four five six seven", "123 4567"),
    ("my code is 1 2 3 4 5, thanks", "my code is 12345, thanks"),
    ("5 5 5 1 2 3 4 5 6 7 8", "55512345678"),
    ("nine one one", "911"),
    ("five five five oh one two three", "555 0123"),
    ("five five five zero one zero zero", "555 0100"),
    ("Oh, five five five one two three four", "Oh, 555 1234"),
    ("it's five five five, one two three four, oh, and", "it's 555 1234, oh, and"),
    ("five five five oh one oh oh", "55501 oh oh"),
    # numbers that stay
    ("In 2024 we sent 2 technicians, 42 chairs, 3,000 forms", "In 2024 we sent 2 technicians, 42 chairs, 3,000 forms"),
    ("one or two", "one or two"),
    ("two three", "two three"),
    ("I have two, three, four-year-olds", "I have two, three, four-year-olds"),
    ("call 1-800-555-1234", "call 1-800-555-1234"),
    ("SSN 123-45-6789", "SSN 123-45-6789"),
    ("version 2.5 3 4", "version 2.5 3 4"),
    ("twenty-one two", "twenty-one two"),
    # times in digits
    ("I'll come at 3.30.", "I'll come at 3:30."),
    ("At 3 30 works.", "At 3:30 works."),
    ("for 10.15 then", "for 10:15 then"),
    ("around 17.45", "around 17:45"),
    ("by 3.30pm", "by 3:30 pm"),
    ("3.30 p.m. is fine", "3:30 pm is fine"),
    ("Around 3:30 P.M. then.", "Around 3:30 pm then."),
    ("See you at 10 a.m.", "See you at 10 am."),
    ("at 10 a.m. Then I leave.", "at 10 am. Then I leave."),
    ("at 10 a.m. tomorrow", "at 10 am tomorrow"),
    ("10am works", "10 am works"),
    ("10 AM", "10 am"),
    ("10 A.M., ok", "10 am, ok"),
    ("from 9 to 5PM", "from 9 to 5 pm"),
    ("Let's say 10 o'clock.", "Let's say 10 o'clock."),
    # digits that are no time
    ("Can we do 3.30 tomorrow?", "Can we do 3.30 tomorrow?"),
    ("It costs 3.30", "It costs 3.30"),
    ("raise it by 3.25 percent", "raise it by 3.25 percent"),
    ("a table for 2 30 minutes from now", "a table for 2 30 minutes from now"),
    ("at 5 55 1234", "at 5 55 1234"),
    ("at 24.30", "at 24.30"),
    ("by 3.75", "by 3.75"),
    ("meet me at 3", "meet me at 3"),
    ("I'm 10 AMD fans", "I'm 10 AMD fans"),
    # times in words
    ("ten o'clock", "10 o'clock"),
    ("Ten o'clock works", "10 o'clock works"),
    ("at three thirty", "at 3:30"),
    ("At three thirty.", "At 3:30."),
    ("at three thirty pm", "at 3:30 pm"),
    ("ten am", "10 am"),
    ("ten thirty a.m.", "10:30 am."),
    ("for nine oh five", "for 9:05"),
    ("by eleven forty five", "by 11:45"),
    ("around twelve fifteen", "around 12:15"),
    ("at two twenty-two", "at 2:22"),
    ("three thirty", "three thirty"),
    ("at ten", "at ten"),
    ("at one point", "at one point"),
    ("for two fifteen minute slots", "for two fifteen minute slots"),
    ("at five five five one two three four", "at 555 1234"),
    # e-mail addresses
    ("john dot smith at example dot com", "john.smith@example.com"),
    ("It's john.smith at example.com.", "It's john.smith@example.com."),
    ("John Smith at example.com", "John smith@example.com"),
    ("Email me at John.Smith@Example.COM please", "Email me at john.smith@example.com please"),
    ("email me at john dot smith at example dot com at noon", "email me at john.smith@example.com at noon"),
    ("mary underscore jones at mail dot example dot co dot uk", "mary_jones@mail.example.co.uk"),
    ("five five five at example dot com", "555@example.com"),
    ("I'm at home", "I'm at home"),
    ("I'll be at home dot", "I'll be at home dot"),
    ("meet me at the office dot", "meet me at the office dot"),
    ("meet me at the office dot com", "meet me at the office dot com"),
    ("I work at example dot com", "I work at example dot com"),
    ("john at example dot community", "john at example dot community"),
    ("john at example", "john at example"),
]


@pytest.mark.parametrize(("said", "canonical"), EXAMPLES)
def test_the_canonical_form(said: str, canonical: str) -> None:
    assert normalize_transcript(said) == canonical
    assert normalize_transcript(canonical) == canonical


@pytest.mark.parametrize(
    ("whisper", "pocketsphinx"),
    [
        ("5, 5, 5, 1, 2, 3, 4, 5, 6, 7", "five five five one two three four five six seven"),
        ("555-123-4567", "five five five one two three four five six seven"),
        ("Let's meet at 3.30", "let's meet at three thirty"),
        ("Let's meet at 3:30", "let's meet at three thirty"),
        ("Book me for 10 A.M. tomorrow", "book me for ten am tomorrow"),
        ("Book me for 10am tomorrow", "book me for ten am tomorrow"),
        ("About 10 o'clock", "about ten o'clock"),
        ("It's john.smith at example.com", "it's john dot smith at example dot com"),
    ],
)
def test_every_recogniser_gives_the_same_form(whisper: str, pocketsphinx: str) -> None:
    assert normalize_transcript(whisper).lower() == normalize_transcript(pocketsphinx).lower()


# --- Redaction of the canonical form --------------------------------------------------------------


@pytest.fixture(scope="module")
def redactor() -> Redactor:
    return default_redactor()


@pytest.mark.parametrize(
    ("said", "redacted"),
    [
        ("My number is 5, 5, 5, 2, 3, 4, 5, 6, 7, 8.", "My number is <PHONE>."),
        ("it's 5-5-5-2-3-4-5-6-7-8", "it's <PHONE>"),
        ("call me on five five five two three four five six seven eight please", "call me on <PHONE> please"),
        ("it's two three four five six seven eight", "it's <PHONE>"),
        ("john dot smith at example dot com", "<EMAIL>"),
        ("It's John.Smith at Example.com.", "It's <EMAIL>."),
        ("mary underscore jones at mail dot example dot org, thanks", "<EMAIL>, thanks"),
    ],
)
def test_redaction_finds_canonical_phone_numbers_and_addresses(redactor: Redactor, said: str, redacted: str) -> None:
    assert redactor.redact(normalize_transcript(said)) == redacted


# --- Properties -----------------------------------------------------------------------------------

PLAIN_WORDS = [
    "the", "office", "home", "john", "Smith", "mary", "example", "com", "co", "org", "I'm", "Please", "call", "me",
    "meet", "tomorrow", "works", "percent", "minutes", "o'clock", "year-olds", "no", "Yes", "OK", "what", "é", "ſ",
    "K", "café",
]
NUMBER_WORDS = [
    "zero", "oh", "Oh", "one", "two", "three", "Five", "seven", "nine", "ten", "twelve", "fifteen", "thirty",
    "forty", "twenty-one", "forty five",
]
DIGITS = ["0", "1", "3", "5", "9", "10", "12", "30", "42", "2024", "555-123-4567", "123-4567", "(555)", "3.30", "3:30",
          "10am", "3,000"]
CUES = ["at", "At", "for", "around", "by", "dot", "DOT", "@", "underscore", "dash"]
AMPM = ["am", "AM", "a.m.", "P.M.", "pm", "p.m", "a. m."]
SEPARATORS = [" ", " ", " ", ", ", "-", ". ", "  ", "\n", ",", " - ", ".", "? "]


SHORT_TEXT = st.text(max_size=3)


def transcripts(*vocabularies: list[str], between: st.SearchStrategy[str] = SHORT_TEXT) -> st.SearchStrategy[str]:
    """Words from the vocabularies, each followed by a separator, sometimes with other text (`between`)."""
    word = st.sampled_from([w for vocabulary in vocabularies for w in vocabulary])
    piece = st.tuples(st.one_of(word, word, word, between), st.sampled_from(SEPARATORS))
    return st.lists(piece, max_size=24).map(lambda pieces: "".join(w + s for w, s in pieces))


NO_ASCII_LETTERS = st.text(st.characters(exclude_characters=string.ascii_letters), max_size=3)
"""Text between words that cannot make a number word."""
ANY_TRANSCRIPT = st.one_of(transcripts(PLAIN_WORDS, NUMBER_WORDS, DIGITS, CUES, AMPM), st.text(max_size=80))
_DIGIT_VALUE = {
    "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
    "nine": "9",
}
_SAID_DIGIT = re.compile(r"[0-9]|\b(?ai:zero|one|two|three|four|five|six|seven|eight|nine)\b")


def said_digits(text: str) -> Counter[str]:
    """The digits in `text`, a digit word counting as its digit."""
    return Counter(_DIGIT_VALUE.get(d.lower(), d) for d in _SAID_DIGIT.findall(text))


def letters(text: str) -> Counter[str]:
    return Counter(char.lower() for char in text if char.isalpha())


def words(text: str, word: str) -> int:
    return len(re.findall(rf"\b(?ai:{word})\b", text))


@settings(max_examples=1500)
@given(ANY_TRANSCRIPT)
def test_normalising_twice_changes_nothing(text: str) -> None:
    once = normalize_transcript(text)
    assert normalize_transcript(once) == once


@settings(max_examples=500)
@given(st.one_of(st.text(), ANY_TRANSCRIPT))
def test_any_text_gives_text_with_its_whitespace_collapsed(text: str) -> None:
    normal = normalize_transcript(text)
    assert normal == " ".join(normal.split())


@settings(max_examples=1000)
@given(ANY_TRANSCRIPT)
def test_no_digit_is_lost(text: str) -> None:
    assert said_digits(text) <= said_digits(normalize_transcript(text))


@settings(max_examples=1000)
@given(transcripts(PLAIN_WORDS, DIGITS, CUES, AMPM, between=NO_ASCII_LETTERS))
def test_no_letter_is_lost_but_the_at_and_dot_an_address_joins_with(text: str) -> None:
    """Without number words, only an address changes letters: it lowercases, and its spoken "at",
    "dot", "underscore" or "dash" becomes "@", ".", "_" or "-"."""
    normal = normalize_transcript(text)
    joined = Counter[str]()
    for word in ("at", "dot", "underscore", "dash"):
        consumed = words(text, word) - words(normal, word)
        assert consumed >= 0
        joined += Counter(word * consumed)
    assert normal.count("@") - text.count("@") == words(text, "at") - words(normal, "at")
    assert letters(text) == letters(normal) + joined


RULE_WORD = re.compile(
    r"[0-9@]|(?<![A-Za-z])(?ai:at|dot|am|pm|a\.m|p\.m|oh|zero|one|two|three|four|five|six|seven|eight|nine|ten"
    r"|eleven|twelve)(?![A-Za-z])"
)
"""Digits, "@", and the words some rule reads."""


@settings(max_examples=500)
@given(st.one_of(transcripts(PLAIN_WORDS), st.text(max_size=80)).filter(lambda t: not RULE_WORD.search(t)))
def test_plain_speech_only_has_its_whitespace_collapsed(text: str) -> None:
    assert normalize_transcript(text) == " ".join(text.split())
