"""PBX adapters: each turns its PBX's control protocol into the call flow's events and actions."""
