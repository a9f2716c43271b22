"""Recording consent as operators set it: the agent's mode, the tenant's jurisdiction rule, and the mode
a call runs under (docs/compliance.md, "Consent").

An agent asks for consent in one of three modes (`Consent.mode` in its file): `notice` (the notice;
continuing is consent), `opt_out` (the notice and how to refuse: a key or "no"), `opt_in` (a question;
nothing of the caller's audio is kept until they agree). A tenant's rule (`consent.rule` in its
`tenant.yaml`) says what the law where it operates asks at least, and a call runs under the stricter
of the two. The gateway records both with the call's start (`call.started` parameters `consent_rule`
and `consent_mode`): the mode is a fact of the call from then on, which the core, replay and the
projections read, whatever the files say later.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal, get_args

ConsentMode = Literal["notice", "opt_out", "opt_in"]
ConsentRule = Literal["one_party", "all_party", "explicit"]

CONSENT_MODES: tuple[ConsentMode, ...] = get_args(ConsentMode)
"""From the least to the most the caller is asked."""
CONSENT_RULES: tuple[ConsentRule, ...] = get_args(ConsentRule)

RULE_MINIMUM: dict[ConsentRule, ConsentMode] = {
    "one_party": "notice",  # one party (the agent) may consent for the call: the agent's own mode
    "all_party": "opt_out",  # every party must consent: the caller must at least be able to refuse
    "explicit": "opt_in",  # consent must be an act (a yes or a key), never inferred from continuing
}
"""The least each rule allows."""

CONSENT_MODE_PARAMETER = "consent_mode"
CONSENT_RULE_PARAMETER = "consent_rule"
RESERVED_PARAMETERS = frozenset({CONSENT_MODE_PARAMETER, CONSENT_RULE_PARAMETER})
"""`call.started` parameters voxlog sets itself: a channel's or an API client's own are replaced."""


def effective_mode(agent_mode: ConsentMode, rule: ConsentRule) -> ConsentMode:
    """The stricter of the agent's mode and what the tenant's rule asks at least."""
    floor = RULE_MINIMUM[rule]
    return max(agent_mode, floor, key=CONSENT_MODES.index)


def consent_parameters(agent_mode: ConsentMode, rule: ConsentRule) -> dict[str, str]:
    """What the gateway records with a call's start: the rule and the mode the call runs under."""
    return {CONSENT_RULE_PARAMETER: rule, CONSENT_MODE_PARAMETER: effective_mode(agent_mode, rule)}


def recorded_mode(parameters: Mapping[str, str]) -> ConsentMode | None:
    """The mode a call's `call.started` parameters say it ran under; None when they say none (calls
    recorded before consent modes, or a session made outside a gateway)."""
    value = parameters.get(CONSENT_MODE_PARAMETER)
    return next((mode for mode in CONSENT_MODES if mode == value), None)


def words(text: str) -> list[str]:
    """The words of a transcript or a phrase, lower case, apostrophes kept ("don't")."""
    return re.findall(r"[a-z0-9']+", text.lower().replace("\u2019", "'"))


def answer_of(text: str, yes: tuple[str, ...], no: tuple[str, ...]) -> Literal["yes", "no"] | None:
    """Whether a caller's words answer a consent question yes, no, or neither.

    An answer opens with one of the phrases ("no", "no, I'd like to book", "yes please"), or holds one of
    more than one word anywhere ("please do not record this"): "I have no internet" is no answer. A no
    wins over a yes ("yes, but don't record it"): when in doubt, nothing is kept.
    """
    said = words(text)
    if _answers(said, no):
        return "no"
    if _answers(said, yes):
        return "yes"
    return None


def request_after(text: str, yes: tuple[str, ...], no: tuple[str, ...]) -> bool:
    """Whether an answer goes on to ask for something ("yes, please book a visit for Friday", "no, I'd like to
    report an outage"): after the phrase it opens with, three words or more that say nothing more of
    consent (no phrase, no "record..."). Then the answer is also the caller's first turn."""
    said = words(text)
    opening = max((p for p in map(words, (*yes, *no)) if p and said[: len(p)] == p), key=len, default=None)
    if opening is None:
        return False
    rest = said[len(opening) :]
    if len(rest) < 3 or any(word.startswith("record") for word in rest):
        return False
    return not _answers(rest, yes) and not _answers(rest, no)


def _answers(said: list[str], phrases: tuple[str, ...]) -> bool:
    for phrase in map(words, phrases):
        if phrase and said[: len(phrase)] == phrase:
            return True
        if len(phrase) > 1 and any(said[i : i + len(phrase)] == phrase for i in range(len(said) - len(phrase) + 1)):
            return True
    return False
