"""PII screening: what must be found, and the ordinary numbers that must be left alone."""

from __future__ import annotations

import pytest

from tuneloop_trainer.data.pii import PLACEHOLDERS, find_pii, luhn_valid, mask_pii

pytestmark = pytest.mark.unit


def kinds(text: str) -> list[str]:
    return [m.kind for m in find_pii(text)]


@pytest.mark.parametrize(
    "number",
    [
        "4111111111111111",  # Visa test number
        "5500005555555559",  # Mastercard
        "378282246310005",  # Amex (15)
        "6011111111111117",  # Discover
        "4222222222222",  # Visa, 13 digits
        "79927398713",  # the classic Luhn example (11 digits: valid checksum, too short for a card)
    ],
)
def test_luhn_accepts_valid_checksums(number: str) -> None:
    assert luhn_valid(number)


@pytest.mark.parametrize("number", ["4111111111111112", "79927398710", "1234567812345678", "", "4111-1111"])
def test_luhn_rejects_invalid_checksums_and_non_digits(number: str) -> None:
    assert not luhn_valid(number)


@pytest.mark.parametrize(
    "text",
    [
        "pay with 4111 1111 1111 1111 please",
        "pay with 4111-1111-1111-1111 please",
        "pay with 4111111111111111.",
        "amex 3782 822463 10005 ok",
        "card: 5500005555555559",
    ],
)
def test_card_numbers_that_pass_luhn_are_found(text: str) -> None:
    assert kinds(text) == ["card"]
    assert "[CARD]" in mask_pii(text)[0]


@pytest.mark.parametrize(
    "text",
    [
        "pay with 4111 1111 1111 1112 please",  # fails Luhn
        "0000 0000 0000 0000",  # passes Luhn, but no card is all one digit
        "order 12345678901234567890123",  # longer than any card
        "years 2019 2020 2021 2022",  # 16 digits that fail Luhn, grouped like years
    ],
)
def test_numbers_that_are_not_cards_are_left_alone(text: str) -> None:
    assert "card" not in kinds(text)


@pytest.mark.parametrize(
    "text",
    [
        "write to jane.doe@example.com today",
        "JANE+news@mail.example.co.uk",
        "a_b-c@sub-domain.example.org.",
    ],
)
def test_emails_are_found(text: str) -> None:
    assert kinds(text) == ["email"]


@pytest.mark.parametrize("text", ["@handle on social media", "a@b", "user@localhost", "5 @ 3 dollars"])
def test_things_with_at_signs_that_are_not_emails(text: str) -> None:
    assert kinds(text) == []


@pytest.mark.parametrize(
    "text",
    [
        "call +1 (415) 555-2671 now",
        "call +44 20 7946 0958 now",
        "call +33 6 12 34 56 78 now",
        "call +14155552671 now",
        "call (415) 555-2671 now",
        "call 415-555-2671 now",
        "call 415.555.2671 now",
        "call 1-800-555-0199 now",
        "call 020 7946 0958 now",
        "call 06 12 34 56 78 now",
        "call 0612345678 now",
        "call (020) 7946 0958 now",
    ],
)
def test_phone_numbers_in_international_and_national_formats_are_found(text: str) -> None:
    assert kinds(text) == ["phone"], text
    assert mask_pii(text)[0] == "call [PHONE] now"


@pytest.mark.parametrize(
    "text",
    [
        "in 2019 we sold 300 units",
        "revenue grew from 1,000,000 to 2,500,000 dollars",
        "between 1990-2000 prices doubled",
        "pi is about 3.14159265358979",
        "it happened on 2019-10-12 at 12:30:45",
        "on 01.02.2019 12:30 the shop opened",
        "order number 123456789 shipped",
        "call me at 12345",
        "ISBN 978-3-16-148410-0",
        "scores were 10 20 30 40 50 60",
        "1.000.000.000 euros",
        "room 101, floor 3, 24 people",
    ],
)
def test_ordinary_numbers_are_not_flagged(text: str) -> None:
    assert find_pii(text) == []
    assert mask_pii(text) == (text, {})


@pytest.mark.parametrize(
    "text",
    [
        "server at 192.168.1.20 is down",
        "server at 8.8.8.8, again",
        "connect to 10.0.0.1:8080",
        "v6 2001:db8:85a3::8a2e:370:7334 here",
        "v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334 here",
        "mapped ::ffff:192.0.2.128 here",
    ],
)
def test_ip_addresses_are_found(text: str) -> None:
    assert kinds(text) == ["ip"], text


@pytest.mark.parametrize(
    "text",
    [
        "version 1.2.3.4.5 released",
        "octet out of range 10.0.0.256",
        "release v1.2.3.4",
        "std::vector<int> and a::b",
        "at 12:30:45 sharp",
        "mac 00:1A:2B:3C:4D:5E",
        "loopback ::1",
    ],
)
def test_things_that_look_like_ips_but_are_not(text: str) -> None:
    assert "ip" not in kinds(text), text


def test_masking_replaces_each_kind_with_its_placeholder_and_counts_them() -> None:
    text = "mail a@example.com, call +1 415 555 2671, card 4111111111111111, from 192.168.0.7"
    masked, counts = mask_pii(text)
    assert masked == "mail [EMAIL], call [PHONE], card [CARD], from [IP]"
    assert counts == {"email": 1, "phone": 1, "card": 1, "ip": 1}
    assert set(PLACEHOLDERS.values()) == {"[EMAIL]", "[PHONE]", "[CARD]", "[IP]"}


def test_overlapping_finds_are_resolved_by_priority_not_double_masked() -> None:
    # A 16-digit card is also a long digit run a phone pattern could see; it is one card.
    assert kinds("4111 1111 1111 1111") == ["card"]
    # Digits inside an email address belong to the email.
    assert kinds("user0612345678@example.com") == ["email"]


def test_empty_and_plain_text() -> None:
    assert find_pii("") == []
    assert find_pii("A perfectly ordinary sentence about movies.") == []
