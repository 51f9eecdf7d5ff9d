"""The PBX-neutral media engine: the session that pumps a call's leg and pipeline stream."""
