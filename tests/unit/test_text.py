"""The core's text helpers: every clipped message in the product goes through them."""

from __future__ import annotations

import pytest

from tuneloop.text import clip, first_line

pytestmark = pytest.mark.unit


def test_clip_keeps_short_text_and_ends_cut_text_with_an_ellipsis() -> None:
    assert clip("abc", 3) == "abc"
    assert clip("abcd", 3) == "ab…"
    assert len(clip("x" * 1000, 200)) == 200


def test_first_line_of_an_error_or_its_type() -> None:
    assert first_line(ValueError("bad header\nat byte 12"), 100) == "bad header"
    assert first_line(OSError(), 100) == "OSError"
    assert first_line(ValueError("  \n  "), 100) == "ValueError"
    assert first_line(ValueError("y" * 50), 10) == "y" * 9 + "…"
