"""PBX audio legs (AudioSocket, unicast L16) and the session that joins a leg to a pipeline."""
