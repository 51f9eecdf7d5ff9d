"""FreeSWITCH's side of the unicast pairs: one local port per call, from a configured range.

``call-command: unicast`` makes FreeSWITCH bind ``local-ip``/``local-port`` for the call, so two
live calls must never share a port; the range (``freeswitch.unicast_port_min``-``max``) sits
below FreeSWITCH's RTP ports and Linux's ephemeral ones. A port is reused last, so a late
datagram of an ended call does not reach the next call that took its port.
"""

from __future__ import annotations

from bridge.errors import PbxActionError


class UnicastPorts:
    """FreeSWITCH-side unicast ports, one per call, reused after the call."""

    def __init__(self, low: int, high: int) -> None:
        self._free = list(range(low, high + 1))
        self._taken: dict[str, int] = {}

    def take(self, owner: str) -> int:
        """A port for ``owner`` (the same one if it has one).

        Raises:
            PbxActionError: every port is in use.
        """
        if owner in self._taken:
            return self._taken[owner]
        if not self._free:
            raise PbxActionError("no FreeSWITCH unicast port is free")
        port = self._free.pop(0)
        self._taken[owner] = port
        return port

    def release(self, owner: str) -> None:
        """Gives ``owner``'s port back (at the end of the queue: reused last)."""
        port = self._taken.pop(owner, None)
        if port is not None:
            self._free.append(port)
