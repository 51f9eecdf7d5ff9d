"""FreeSWITCH's unicast port pool."""

from __future__ import annotations

import pytest

from bridge.errors import PbxActionError
from bridge.pbx.freeswitch.ports import UnicastPorts


def test_unicast_ports_are_one_per_call_and_reused_last() -> None:
    ports = UnicastPorts(32000, 32001)
    assert ports.take("a") == 32000 and ports.take("a") == 32000
    assert ports.take("b") == 32001
    with pytest.raises(PbxActionError):
        ports.take("c")
    ports.release("a")
    assert ports.take("c") == 32000
