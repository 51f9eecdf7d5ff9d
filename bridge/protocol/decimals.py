"""Decimal numbers in the PBXes' text fields, read as their wire defines them: ASCII digits.

``str.isdigit()`` and ``int()`` accept far more than a PBX sends: ``"²".isdigit()`` is true and
``int("²")`` raises a bare ``ValueError``; ``int("١٦")`` is 16 (Arabic-Indic digits);
``int(" +1_6 ")`` is 16; a string of more than ``sys.get_int_max_str_digits()`` (4300) digits
raises ``ValueError``. In a parser each of these either takes a value no peer ever sends or
raises something that is not the parser's protocol error. ESL's ``Content-Length`` and the
numeric channel variables, AMI's ``Cause``: all are ``1*DIGIT`` in the ASCII sense.
"""

from __future__ import annotations


def ascii_decimal(text: str, max_digits: int) -> int | None:
    """``text`` as a number if it is 1 to ``max_digits`` ASCII digits ``0``-``9``, else None.

    The length is checked first, so the cost is bounded by ``max_digits`` whatever the input.
    """
    if not 0 < len(text) <= max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)
