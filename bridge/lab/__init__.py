"""The local lab: real Asterisk from Debian's packages, SIPp calls, a demo pipeline."""
