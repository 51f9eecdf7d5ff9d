"""Asterisk: AMI control (link.py), AudioSocket media (audiosocket.py), one backend (backend.py)."""
