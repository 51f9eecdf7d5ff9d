"""Fixtures for the tests against real Asterisk 22 (see tests/asterisk_harness.py)."""

from tests.asterisk_harness import asterisk_lab, asterisk_root

__all__ = ["asterisk_lab", "asterisk_root"]
