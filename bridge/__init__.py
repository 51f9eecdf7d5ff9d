"""sipbridge: hands calls from an existing Asterisk or FreeSWITCH PBX to voice-AI assistants."""

__version__ = "0.1.0"
