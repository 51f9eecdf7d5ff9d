"""Decimal numbers from the PBXes' text fields: ASCII digits, within a length, or nothing."""

from __future__ import annotations

import pytest

from bridge.protocol.decimals import ascii_decimal


@pytest.mark.parametrize(("text", "number"), [("0", 0), ("16", 16), ("007", 7), ("999", 999)])
def test_ascii_digits_are_a_number(text: str, number: int) -> None:
    assert ascii_decimal(text, 3) == number


@pytest.mark.parametrize(
    "text",
    # superscript two, Arabic-Indic and fullwidth digits (isdigit() and int() take the last two),
    # what int() forgives (signs, spaces, underscores), too many digits, nothing.
    ["²", "١٦", "１６", "+1", "-1", " 1", "1 ", "1_0", "1000", "9" * 5000, ""],
)
def test_anything_else_is_none(text: str) -> None:
    assert ascii_decimal(text, 3) is None
