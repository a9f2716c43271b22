"""streams.channels.sip_digest: the number an INVITE dials (`number_of`), a header of its text
(`header_value`), the Authorization value's parameters (`parse_digest`), and the gateway's digest
authority (RFC 3261 22.4 with RFC 8760's MD5 and SHA-256, qop=auth or none): known answers computed here
from RFC 2617/7616's formulas, every way an answer fails, stateless nonces with a lifetime, and
properties on arbitrary text."""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.channels.sip_digest import (
    MAX_HEADER,
    NONCE_TTL_S,
    AnswerLedger,
    DigestAuthority,
    DigestError,
    ReplayedAnswer,
    StaleAnswer,
    UnknownNonce,
    header_value,
    number_of,
    parse_digest,
    request_uri,
    same_target,
)

REALM = "voxlog.test"
SECRET = b"the gateway's own secret"
NOW = 1_700_000_000.0
HASHES = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}
PASSWORDS = {"pbx-1": "correct horse", "carrier": "battery staple"}
URI = "sip:+15550100@gw.voxlog.test"
"""The Request-URI of the INVITE the answers come with."""


def response(*, username: str, realm: str, password: str, method: str, uri: str, nonce: str,
             algorithm: str = "MD5", qop: str | None = "auth", nc: str = "00000001",
             cnonce: str = "0a4f113b") -> str:
    """RFC 2617 3.2.2 / RFC 7616 3.4.1, written out independently of the module under test."""
    def h(text: str) -> str:
        return HASHES[algorithm](text.encode()).hexdigest()

    ha1 = h(f"{username}:{realm}:{password}")
    ha2 = h(f"{method}:{uri}")
    if qop is None:
        return h(f"{ha1}:{nonce}:{ha2}")
    return h(f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")


def authority(clock: float = NOW, secret: bytes = SECRET, realm: str = REALM) -> DigestAuthority:
    return DigestAuthority(realm=realm, secret=secret, clock=lambda: clock)


def nonce_of(challenge: str) -> str:
    return parse_digest(challenge)["nonce"]


def authorization(params: dict[str, str], unquoted: tuple[str, ...] = ("algorithm", "qop", "nc")) -> str:
    """An Authorization value as a client writes it: most values quoted, a few tokens."""
    parts = [f"{name}={value}" if name in unquoted else f'{name}="{quote(value)}"' for name, value in params.items()]
    return "Digest " + ", ".join(parts)


def quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def answer(nonce: str, *, username: str = "pbx-1", password: str | None = None, method: str = "INVITE",
           uri: str = URI, algorithm: str = "MD5", qop: str | None = "auth",
           realm: str = REALM) -> dict[str, str]:
    """The parameters of a correct answer to `nonce` (or one with `password` instead of the right one)."""
    params = {"username": username, "realm": realm, "nonce": nonce, "uri": uri, "algorithm": algorithm}
    if qop is not None:
        params |= {"qop": qop, "nc": "00000001", "cnonce": "0a4f113b"}
    params["response"] = response(username=username, realm=realm, method=method, uri=uri, nonce=nonce,
                                  password=PASSWORDS[username] if password is None else password,
                                  algorithm=algorithm, qop=qop)
    return params


def password_of(username: str) -> str | None:
    return PASSWORDS.get(username)


# The formulas above, checked against the RFCs' own examples before anything is checked with them.

def test_the_tests_own_formula_gives_rfc_2617s_known_answer() -> None:
    assert response(username="Mufasa", realm="testrealm@host.com", password="Circle Of Life", method="GET",
                    uri="/dir/index.html", nonce="dcd98b7102dd2f0e8b11d0f600bfb0c093") == \
        "6629fae49393a05397450978507c4ef1"


@pytest.mark.parametrize(("algorithm", "expected"), [
    ("MD5", "8ca523f5e9506fed4657c9700eebdbec"),
    ("SHA-256", "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1"),
])
def test_the_tests_own_formula_gives_rfc_7616s_known_answers(algorithm: str, expected: str) -> None:
    assert response(username="Mufasa", realm="http-auth@example.org", password="Circle of Life", method="GET",
                    uri="/dir/index.html", nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v",
                    cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ", algorithm=algorithm) == expected


# The challenge.

@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
def test_a_challenge_names_the_realm_a_fresh_nonce_the_algorithm_and_qop_auth(algorithm: str) -> None:
    challenge = authority().challenge(algorithm)
    params = parse_digest(challenge)
    assert params["realm"] == REALM
    assert params["algorithm"] == algorithm
    assert params["qop"] == "auth"
    assert params["nonce"]
    assert nonce_of(authority(NOW + 1).challenge()) != params["nonce"], "a nonce of another second is another nonce"
    assert nonce_of(authority(secret=b"another").challenge()) != params["nonce"], "the secret keys the nonce"


# Answers that prove the password.

@pytest.mark.parametrize("algorithm", ["MD5", "SHA-256"])
@pytest.mark.parametrize("qop", ["auth", None])
def test_a_correct_answer_verifies_and_names_its_username(algorithm: str, qop: str | None) -> None:
    gateway = authority()
    nonce = nonce_of(gateway.challenge(algorithm))
    for username in PASSWORDS:
        header = authorization(answer(nonce, username=username, algorithm=algorithm, qop=qop))
        assert gateway.verify(header, "INVITE", URI, password_of) == username


def test_without_an_algorithm_the_answer_is_md5s() -> None:
    gateway = authority()
    params = answer(nonce_of(gateway.challenge()))
    del params["algorithm"]
    assert gateway.verify(authorization(params), "INVITE", URI, password_of) == "pbx-1"
    sha = answer(nonce_of(gateway.challenge()), algorithm="SHA-256")
    del sha["algorithm"]
    with pytest.raises(DigestError, match="does not match"):
        gateway.verify(authorization(sha), "INVITE", URI, password_of)


def test_the_response_may_be_written_in_capitals_and_the_algorithm_in_lower_case() -> None:
    gateway = authority()
    params = answer(nonce_of(gateway.challenge("SHA-256")), algorithm="SHA-256")
    params |= {"response": params["response"].upper(), "algorithm": "sha-256"}
    assert gateway.verify(authorization(params), "INVITE", URI, password_of) == "pbx-1"


def test_a_nonce_is_good_until_its_lifetime_ends_then_stale() -> None:
    nonce = nonce_of(authority(NOW).challenge())
    header = authorization(answer(nonce))
    assert authority(NOW + NONCE_TTL_S).verify(header, "INVITE", URI, password_of) == "pbx-1"
    with pytest.raises(StaleAnswer, match="stale") as raised:
        authority(NOW + NONCE_TTL_S + 1).verify(header, "INVITE", URI, password_of)
    assert not isinstance(raised.value, ReplayedAnswer)


def test_a_nonce_from_the_future_is_stale() -> None:
    """A nonce dated after the gateway's clock was not made by this clock (or the clock went back)."""
    header = authorization(answer(nonce_of(authority(NOW + 60).challenge())))
    with pytest.raises(StaleAnswer, match="stale"):
        authority(NOW).verify(header, "INVITE", URI, password_of)


def test_a_stale_challenge_says_so() -> None:
    assert parse_digest(authority().challenge(stale=True))["stale"] == "true"
    assert "stale" not in parse_digest(authority().challenge())


# Each answer is good once (the nonces are stateless: this is what stops a replay).

@pytest.mark.parametrize("qop", ["auth", None])
def test_an_answer_given_twice_is_a_replay(qop: str | None) -> None:
    gateway = authority()
    header = authorization(answer(nonce_of(gateway.challenge()), qop=qop))
    assert gateway.verify(header, "INVITE", URI, password_of) == "pbx-1"
    with pytest.raises(ReplayedAnswer, match="'pbx-1' was given before"):
        gateway.verify(header, "INVITE", URI, password_of)


def test_the_same_nonce_counted_on_is_a_new_answer() -> None:
    """RFC 7616 3.4: a client may reuse a nonce with the next nc; that is no replay."""
    gateway = authority()
    params = answer(nonce_of(gateway.challenge()))
    assert gateway.verify(authorization(params), "INVITE", URI, password_of) == "pbx-1"
    counted = params | {"nc": "00000002", "response": response(
        username="pbx-1", realm=REALM, password=PASSWORDS["pbx-1"], method="INVITE", uri=URI, nonce=params["nonce"],
        nc="00000002")}
    assert gateway.verify(authorization(counted), "INVITE", URI, password_of) == "pbx-1"


def test_a_wrong_answer_is_not_remembered() -> None:
    """Only answers that proved the password are kept: wrong ones cannot fill the ledger, nor spoil a
    right one given after."""
    gateway = authority()
    nonce = nonce_of(gateway.challenge())
    for _ in range(3):
        with pytest.raises(DigestError, match="does not match"):
            gateway.verify(authorization(answer(nonce, password="guess")), "INVITE", URI, password_of)
    assert gateway.verify(authorization(answer(nonce)), "INVITE", URI, password_of) == "pbx-1"


def test_the_ledger_forgets_an_answer_when_its_nonce_dies_and_keeps_at_most_its_limit() -> None:
    ledger = AnswerLedger(limit=3)
    assert ledger.first("a", until=NOW + 10, now=NOW)
    assert not ledger.first("a", until=NOW + 10, now=NOW + 10)
    assert ledger.first("a", until=NOW + 30, now=NOW + 11), "past its nonce's life it is stale anyway"
    for answer_text in ("b", "c", "d"):
        assert ledger.first(answer_text, until=NOW + 30, now=NOW + 12)
    assert ledger.first("a", until=NOW + 30, now=NOW + 12), "the oldest went first at the limit"
    assert not ledger.first("d", until=NOW + 30, now=NOW + 12)


# Answers that do not prove anything.

def test_a_wrong_password_is_refused_naming_the_username() -> None:
    gateway = authority()
    header = authorization(answer(nonce_of(gateway.challenge()), password="not the password"))
    with pytest.raises(DigestError, match=r"password of 'pbx-1' does not match"):
        gateway.verify(header, "INVITE", URI, password_of)


def test_an_answer_for_another_method_or_uri_is_refused() -> None:
    gateway = authority()
    nonce = nonce_of(gateway.challenge())
    with pytest.raises(DigestError, match="does not match"):
        gateway.verify(authorization(answer(nonce, method="REGISTER")), "INVITE", URI, password_of)
    moved = answer(nonce) | {"uri": URI}
    moved["response"] = answer(nonce, uri="sip:+15550199@gw.voxlog.test")["response"]
    with pytest.raises(DigestError, match="does not match"):
        gateway.verify(authorization(moved), "INVITE", URI, password_of)


@pytest.mark.parametrize("request_line_uri", ["sip:+15550199@gw.voxlog.test", "sip:+15550100@elsewhere.test",
                                              "sip:+15550100@gw.voxlog.test:5080", "sips:+15550100@gw.voxlog.test",
                                              "", "garbage"])
def test_a_right_answer_for_one_request_uri_is_refused_on_another(request_line_uri: str) -> None:
    """An answer seen on the wire takes nobody's credential to another number, host or port."""
    gateway = authority()
    with pytest.raises(DigestError, match=r"the answer is for 'sip:\+15550100@gw.voxlog.test', not for"):
        gateway.verify(authorization(answer(nonce_of(gateway.challenge()))), "INVITE", request_line_uri, password_of)


@pytest.mark.parametrize("request_line_uri", [
    "sip:+15550100@GW.VOXLOG.TEST", "sip:+15550100@gw.voxlog.test;user=phone",
    "sip:%2B15550100@gw.voxlog.test;transport=tcp", "SIP:+15550100@gw.voxlog.test"])
def test_the_request_uri_may_differ_from_the_answers_in_case_escapes_and_parameters(request_line_uri: str) -> None:
    gateway = authority()
    header = authorization(answer(nonce_of(gateway.challenge())))
    assert gateway.verify(header, "INVITE", request_line_uri, password_of) == "pbx-1"


def test_request_uri_reads_the_request_line() -> None:
    assert request_uri("INVITE sip:+15550100@gw SIP/2.0\r\nVia: x\r\n\r\n") == "sip:+15550100@gw"
    assert request_uri("SIP/2.0 200 OK\r\n") == ""
    assert request_uri("INVITE sip:a@b\r\n") == ""
    assert request_uri("") == ""


@settings(max_examples=300)
@given(st.text(max_size=80), st.text(max_size=80))
def test_same_target_never_raises_and_is_symmetric(one: str, other: str) -> None:
    assert same_target(one, other) == same_target(other, one)
    # Reflexive for whatever names a scheme (a lone "<" names nothing, and matches nothing, itself included).
    assert same_target(one, one) or not re.match(r"\s*<?\s*(sips?|tel):", one, re.IGNORECASE)


def test_an_answer_for_another_realm_is_refused_naming_it() -> None:
    gateway = authority()
    header = authorization(answer(nonce_of(gateway.challenge()), realm="elsewhere.test"))
    with pytest.raises(DigestError, match=r"realm is 'elsewhere.test', not 'voxlog.test'"):
        gateway.verify(header, "INVITE", URI, password_of)


def test_a_nonce_of_another_realm_under_the_same_secret_is_not_ours() -> None:
    nonce = nonce_of(authority(realm="elsewhere.test").challenge())
    with pytest.raises(UnknownNonce, match="nonce is not one this gateway made"):
        authority().verify(authorization(answer(nonce)), "INVITE", URI, password_of)


def test_a_nonce_made_under_another_secret_is_asked_for_anew() -> None:
    nonce = nonce_of(authority(secret=b"another gateway's secret").challenge())
    with pytest.raises(UnknownNonce, match="nonce is not one this gateway made"):
        authority().verify(authorization(answer(nonce)), "INVITE", URI, password_of)


@pytest.mark.parametrize("nonce", ["", "made-up", "6553f100", "6553f100.", ".deadbeef"])
def test_a_made_up_nonce_is_asked_for_anew(nonce: str) -> None:
    with pytest.raises(UnknownNonce, match="nonce is not one this gateway made"):
        authority().verify(authorization(answer(nonce)), "INVITE", URI, password_of)


def test_a_nonce_whose_time_is_changed_no_longer_checks_out() -> None:
    """The time is sealed: a peer cannot extend a nonce's life by rewriting it."""
    gateway = authority(NOW + NONCE_TTL_S * 10)
    _, _, seal = nonce_of(authority(NOW).challenge()).partition(".")
    later = f"{int(gateway.clock()):x}.{seal}"
    with pytest.raises(UnknownNonce, match="nonce is not one this gateway made"):
        gateway.verify(authorization(answer(later)), "INVITE", URI, password_of)


@pytest.mark.parametrize("algorithm", ["MD5-sess", "SHA-256-sess", "SHA-512-256", "SHA1", "none"])
def test_an_algorithm_other_than_md5_and_sha_256_is_refused(algorithm: str) -> None:
    gateway = authority()
    params = answer(nonce_of(gateway.challenge())) | {"algorithm": algorithm}
    with pytest.raises(DigestError, match=rf"algorithm {re.escape(repr(algorithm.upper()))} is not supported"):
        gateway.verify(authorization(params), "INVITE", URI, password_of)


@pytest.mark.parametrize("missing", ["username", "realm", "nonce", "uri", "response"])
def test_an_answer_without_a_needed_field_is_refused_naming_it(missing: str) -> None:
    gateway = authority()
    params = answer(nonce_of(gateway.challenge()))
    del params[missing]
    with pytest.raises(DigestError, match=f"has no {missing}"):
        gateway.verify(authorization(params), "INVITE", URI, password_of)


@pytest.mark.parametrize("missing", ["nc", "cnonce"])
def test_qop_auth_without_nc_or_cnonce_is_refused(missing: str) -> None:
    gateway = authority()
    params = answer(nonce_of(gateway.challenge()))
    del params[missing]
    with pytest.raises(DigestError, match="nc and cnonce are missing"):
        gateway.verify(authorization(params), "INVITE", URI, password_of)


def test_qop_auth_int_is_refused() -> None:
    gateway = authority()
    params = answer(nonce_of(gateway.challenge()), qop="auth-int")
    with pytest.raises(DigestError, match="qop 'auth-int' is not supported"):
        gateway.verify(authorization(params), "INVITE", URI, password_of)


def test_an_unknown_username_is_refused_naming_it() -> None:
    gateway = authority()
    params = answer(nonce_of(gateway.challenge())) | {"username": "intruder"}
    with pytest.raises(DigestError, match="no credential is named 'intruder'"):
        gateway.verify(authorization(params), "INVITE", URI, password_of)


@pytest.mark.parametrize("header", ['Basic cGJ4LTE6Y29ycmVjdCBob3JzZQ==', "Bearer abc", "", "Digestusername=x"])
def test_a_scheme_other_than_digest_is_refused(header: str) -> None:
    with pytest.raises(DigestError, match="not Digest"):
        authority().verify(header, "INVITE", URI, password_of)


@pytest.mark.parametrize("field", ["nonce", "username"])
def test_text_that_pjsip_decoded_from_invalid_utf8_is_refused_as_a_digest_error(field: str) -> None:
    gateway = authority()
    params = answer(nonce_of(gateway.challenge())) | {field: "\udcff"}
    with pytest.raises(DigestError):
        gateway.verify(authorization(params), "INVITE", URI, lambda username: "a password")


# parse_digest

def test_parse_digest_unquotes_values_and_lower_cases_names() -> None:
    header = ('Digest  USERNAME="pbx \\"one\\"", Realm=voxlog.test ,nonce="a,b=c", uri="sip:x@y;a=\\\\b",'
              ' qop=auth, nc=00000001,algorithm=SHA-256')
    assert parse_digest(header) == {"username": 'pbx "one"', "realm": "voxlog.test", "nonce": "a,b=c",
                                    "uri": "sip:x@y;a=\\b", "qop": "auth", "nc": "00000001",
                                    "algorithm": "SHA-256"}
    assert parse_digest("digest ") == {}


@pytest.mark.parametrize("header", [
    'Digest username="a", USERNAME="b"',
    "Digest username=a, username=a",
])
def test_a_parameter_named_twice_is_refused(header: str) -> None:
    with pytest.raises(DigestError, match="names username twice"):
        parse_digest(header)


@pytest.mark.parametrize("header", [
    'Digest username="unterminated',
    "Digest username",
    "Digest =value",
    'Digest username="a" realm="b"',
    "Digest , username=a",
    'Digest username=a"b',
])
def test_unreadable_parameters_are_refused(header: str) -> None:
    with pytest.raises(DigestError, match="cannot be read"):
        parse_digest(header)


def test_a_header_longer_than_the_limit_is_refused_unread() -> None:
    header = 'Digest username="' + "a" * MAX_HEADER + '"'
    with pytest.raises(DigestError, match="too long"):
        parse_digest(header)


names = st.from_regex(r"[A-Za-z][A-Za-z0-9_-]{0,12}", fullmatch=True)
tokens = st.text(st.characters(codec="ascii", exclude_categories=["Cc"], exclude_characters=' ,"'),
                 min_size=1, max_size=20)
quoted_values = st.text(st.characters(exclude_categories=["Cc", "Cs"]), max_size=30)
client_params = st.dictionaries(names, st.tuples(st.booleans(), quoted_values, tokens), max_size=8).filter(
    lambda params: len({name.lower() for name in params}) == len(params))


@settings(max_examples=300)
@given(client_params, st.sampled_from([",", ", ", " , ", ",\t"]), st.sampled_from(["Digest", "digest", "DIGEST"]))
def test_parse_digest_reads_back_what_a_client_writes(params: dict[str, tuple[bool, str, str]], separator: str,
                                                      scheme: str) -> None:
    written = [f'{name}="{quote(value)}"' if quoted else f"{name}={token}"
               for name, (quoted, value, token) in params.items()]
    expected = {name.lower(): value if quoted else token for name, (quoted, value, token) in params.items()}
    assert parse_digest(f"{scheme} " + separator.join(written)) == expected


digestish = st.text(st.sampled_from(list('Digest uname=",\\ \t\r\nabc')), max_size=60).map(lambda t: "Digest " + t)


@settings(max_examples=500)
@given(st.one_of(st.text(max_size=200), digestish))
def test_parse_digest_raises_nothing_but_digest_errors(text: str) -> None:
    try:
        params = parse_digest(text)
    except DigestError:
        return  # refused, as it may be: any other exception fails the test
    assert all(name == name.lower() for name in params)


@settings(max_examples=300)
@given(st.text(max_size=300), st.text(max_size=20))
def test_header_value_never_raises(message: str, name: str) -> None:
    value = header_value(message, name)
    assert value is None or value == value.strip()


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=80), st.text(st.characters(), max_size=80).map(lambda t: "sip:" + t)))
def test_number_of_never_raises(uri: str) -> None:
    number = number_of(uri)
    assert number == number.strip()


answer_fields = st.fixed_dictionaries({}, optional={
    name: st.one_of(st.just(good), st.text(max_size=20)) for name, good in answer(
        nonce_of(authority().challenge())).items()} | {"qop": st.sampled_from(["auth", "auth-int", ""]),
                                                        "nc": st.text(max_size=9)})


@settings(max_examples=300)
@given(st.one_of(st.text(max_size=200), digestish, answer_fields.map(authorization)))
def test_verify_raises_nothing_but_digest_errors_on_any_authorization(header: str) -> None:
    gateway = authority()
    try:
        username = gateway.verify(header, "INVITE", URI, password_of)
    except DigestError:
        return  # refused, as it may be: any other exception fails the test
    params = parse_digest(header)
    assert username == params["username"] == "pbx-1"
    assert params["response"].lower() == answer(params["nonce"])["response"]


# number_of

@pytest.mark.parametrize(("uri", "number"), [
    ("sip:+15550100@host", "+15550100"),
    ("sip:+15550100@host:5060;transport=udp", "+15550100"),
    ("<sip:+15550100@host;user=phone>", "+15550100"),
    ('"Name" <sips:+15550100@host:5061>;tag=x', "+15550100"),
    ("Name <SIP:+15550100@host>", "+15550100"),
    ("tel:+15550100", "+15550100"),
    ("tel:+15550100;phone-context=+1", "+15550100"),
    ("sip:%2B15550100@host", "+15550100"),
    ("sip:alice%20smith@host", "alice smith"),
    ("sip:1000@pbx.example?subject=x", "1000"),
    ("  <sip:+15550100@host>  ", "+15550100"),
])
def test_number_of_reads_the_user_part(uri: str, number: str) -> None:
    assert number_of(uri) == number


@pytest.mark.parametrize("uri", ["", "garbage", "http://+15550100@host", "mailto:a@b", "<>", "sip:", "tel:",
                                 "<sip:@host>"])
def test_number_of_is_empty_without_a_user_part_or_a_sip_uri(uri: str) -> None:
    assert number_of(uri) == ""


@pytest.mark.parametrize("uri", ["sip:host", "sip:gw.example:5060", "<sips:gw.example;transport=tls>"])
def test_number_of_a_sip_uri_without_a_user_part_is_empty(uri: str) -> None:
    assert number_of(uri) == ""


# header_value

INVITE = ("INVITE sip:+15550100@gw SIP/2.0\r\n"
          "Via: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1\r\n"
          "authorization: Digest username=\"pbx-1\",\r\n"
          "\trealm=\"voxlog.test\",\r\n"
          "  nonce=\"n\"\r\n"
          "Authorization: Digest username=\"second\"\r\n"
          "Content-Type : application/sdp\r\n"
          "\r\n"
          "Authorization: in the body\r\n"
          "X-Body: yes\r\n")


def test_header_value_finds_a_header_whatever_the_case_of_its_name() -> None:
    assert header_value(INVITE, "Via") == "SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bK1"
    assert header_value(INVITE, "VIA") == header_value(INVITE, "via")
    assert header_value(INVITE, "content-type") == "application/sdp"


def test_header_value_joins_folded_lines_and_answers_the_first_of_several() -> None:
    assert header_value(INVITE, "Authorization") == 'Digest username="pbx-1", realm="voxlog.test", nonce="n"'


def test_header_value_does_not_search_the_body_nor_the_request_line() -> None:
    assert header_value(INVITE, "X-Body") is None
    assert header_value(INVITE.replace("\r\n", "\n"), "X-Body") is None
    assert header_value(INVITE, "INVITE sip") is None
    assert header_value("INVITE sip:x SIP/2.0\r\n\r\nAuthorization: body", "Authorization") is None


def test_header_value_reads_bare_newlines_too() -> None:
    assert header_value(INVITE.replace("\r\n", "\n"), "authorization") == \
        'Digest username="pbx-1", realm="voxlog.test", nonce="n"'


def test_header_value_is_none_for_a_header_not_there() -> None:
    assert header_value(INVITE, "Proxy-Authorization") is None
    assert header_value("", "Authorization") is None


def test_a_folded_continuation_line_is_never_a_header_of_its_own() -> None:
    message = ("INVITE sip:x SIP/2.0\r\n"
               "Subject: hello\r\n"
               " Authorization: Digest username=\"folded\"\r\n"
               "Authorization: Digest username=\"real\"\r\n\r\n")
    assert header_value(message, "Subject") == 'hello Authorization: Digest username="folded"'
    assert header_value(message, "Authorization") == 'Digest username="real"'
