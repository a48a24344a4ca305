"""Personal-data screening: emails, phone numbers, payment card numbers and IP addresses.

Regexes alone flag every long number in a corpus (years, amounts, ISBNs, product ids), and a
screen that masks "in 2019 we sold 300 units" teaches users to turn it off. So each detector
is a loose *candidate* pattern followed by a plausibility check that a human would apply:
card numbers must pass the Luhn checksum, IP addresses must parse, and phone numbers must
look like something people write (a ``+`` country code, an area code in parentheses, a
national trunk ``0``, or the North-American 3-3-4 grouping). What slips through is the price
of not destroying ordinary numbers; the report says what was found so it can be judged.

Detectors run on the original text and overlapping finds are resolved by priority (email,
IP, card, phone), so a card number is never half-masked as a phone number.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass
from typing import Final

#: The kinds of personal data screened, in priority order when finds overlap.
PII_KINDS: Final = ("email", "ip", "card", "phone")
#: What each kind is replaced with by ``screening.pii: mask``.
PLACEHOLDERS: Final[dict[str, str]] = {
    "email": "[EMAIL]",
    "phone": "[PHONE]",
    "card": "[CARD]",
    "ip": "[IP]",
}

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}(?![\w-])"
)
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
# Not preceded by a word character or a dot: "v1.2.3.4" and "1.2.3.4.5" are versions, not hosts.
_IPV4 = re.compile(rf"(?<![\w.]){_OCTET}(?:\.{_OCTET}){{3}}(?!\w|\.[0-9])")
# Candidates only (hex groups and colons, optionally an embedded IPv4 tail); ipaddress decides.
_IPV6 = re.compile(r"(?<![\w:.])[0-9A-Fa-f:]{2,39}(?:(?<=:)[0-9]{1,3}(?:\.[0-9]{1,3}){3})?(?![\w:])")
# 13-19 digits, optionally split by single spaces or dashes; never inside a longer number.
_CARD = re.compile(r"(?<![\w+\-.])[1-9](?:[ -]?[0-9]){12,18}(?![\w]|[ -]?[0-9]|\.[0-9])")
_PHONE = re.compile(
    r"(?<![\w+\-./:@])"
    r"(?P<cc>\+[0-9]{1,3}[ .\-]?)?"
    r"(?P<area>\([0-9]{1,5}\)[ .\-]?)?"
    r"(?P<body>[0-9]{1,14}(?:[ .\-][0-9]{1,14}){0,7})"
    r"(?![\w@]|[.\-][0-9])"
)
_NON_DIGIT = re.compile(r"[^0-9]")
# Every numeric find (IPv4 "1.1.1.1", a card, a phone) holds a run like this; text without
# one skips the three numeric detectors.
_NUMBERISH = re.compile(r"[0-9][0-9 .()+\-]{5,}[0-9]")
_GROUP_SPLIT = re.compile(r"[ .\-]")


@dataclass(frozen=True)
class PiiMatch:
    """One find: its kind (``email``, ``ip``, ``card``, ``phone``) and span in the text."""

    kind: str
    start: int
    end: int


def luhn_valid(number: str) -> bool:
    """Whether a digit string passes the Luhn checksum that every payment card number carries."""
    if not number.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(number)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _is_card(candidate: str) -> bool:
    digits = _NON_DIGIT.sub("", candidate)
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1 or not luhn_valid(digits):
        return False
    separators = {ch for ch in candidate if not ch.isdigit()}
    if not separators:
        return True
    # Printed cards group digits in fours first (4-4-4-4, Amex 4-6-5) with one separator;
    # a run of space-separated numbers that happens to pass Luhn usually does not.
    return len(separators) == 1 and len(_GROUP_SPLIT.split(candidate)[0]) == 4


def _is_ipv6(candidate: str) -> bool:
    if candidate.count(":") < 2:
        return False
    try:
        ipaddress.IPv6Address(candidate)
    except ValueError:
        return False
    # "::1" and "a::b" parse too, but they are loopback addresses or prose (C++ scopes);
    # a routable address has at least three groups.
    groups = [g for g in re.split(r"[:.]", candidate) if g]
    return len(groups) >= 3


def _is_phone(match: re.Match[str]) -> bool:
    text = match.group(0)
    digits = _NON_DIGIT.sub("", text)
    if not 9 <= len(digits) <= 15:  # E.164 allows at most 15 digits
        return False
    if match.group("cc") or match.group("area"):
        return True
    body = match.group("body")
    groups = _GROUP_SPLIT.split(body)
    if len(groups) == 1:
        # A bare run of digits is an id or an amount, unless it starts with a national trunk 0.
        return body.startswith("0") and len(body) <= 12
    if len({ch for ch in body if not ch.isdigit()}) != 1:
        return False  # mixed separators: "01.02.2019 12" is a date and a time
    lengths = [len(g) for g in groups]
    if body.startswith("0"):
        return min(lengths) >= 2  # "020 7946 0958", "06 12 34 56 78"
    # North-American numbering: 415-555-2671, 1-800-555-0199.
    return lengths == [3, 3, 4] or (lengths == [1, 3, 3, 4] and groups[0] == "1")


def find_pii(text: str) -> list[PiiMatch]:
    """Every personal-data find in ``text``, non-overlapping, in text order."""
    if not text:
        return []
    candidates: list[PiiMatch] = []
    # Cheap gates first: most text has no "@", no ":" and often no digit at all.
    if "@" in text:
        candidates += [PiiMatch("email", m.start(), m.end()) for m in _EMAIL.finditer(text)]
    if ":" in text:
        candidates += [PiiMatch("ip", m.start(), m.end()) for m in _IPV6.finditer(text) if _is_ipv6(m.group(0))]
    if _NUMBERISH.search(text) is not None:
        candidates += [PiiMatch("ip", m.start(), m.end()) for m in _IPV4.finditer(text)]
        candidates += [PiiMatch("card", m.start(), m.end()) for m in _CARD.finditer(text) if _is_card(m.group(0))]
        candidates += [PiiMatch("phone", m.start(), m.end()) for m in _PHONE.finditer(text) if _is_phone(m)]
    if not candidates:
        return []
    priority = {kind: i for i, kind in enumerate(PII_KINDS)}
    candidates.sort(key=lambda m: (priority[m.kind], m.start))
    taken: list[PiiMatch] = []
    for cand in candidates:
        if all(cand.end <= t.start or cand.start >= t.end for t in taken):
            taken.append(cand)
    return sorted(taken, key=lambda m: m.start)


def mask_pii(text: str) -> tuple[str, Counter[str]]:
    """``text`` with every find replaced by its placeholder, and the finds counted by kind."""
    matches = find_pii(text)
    if not matches:
        return text, Counter()
    parts: list[str] = []
    pos = 0
    for m in matches:
        parts.append(text[pos : m.start])
        parts.append(PLACEHOLDERS[m.kind])
        pos = m.end
    parts.append(text[pos:])
    return "".join(parts), Counter(m.kind for m in matches)


def masked_excerpt(value: object, limit: int) -> str:
    """``value`` as one line of text with personal data masked, then cut to ``limit`` characters:
    masked first, so that a cut never leaves half an email address unmasked. For excerpts of
    rows in reports (label issues, error analysis)."""
    masked, _ = mask_pii(str(value))
    flat = " ".join(masked.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
