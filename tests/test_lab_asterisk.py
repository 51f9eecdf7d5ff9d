from __future__ import annotations

import os
from pathlib import Path

import pytest

from bridge.lab.asterisk import (
    ASTERISK_MAJOR,
    DIALPLAN_DIR,
    MODULES,
    READY_MARKER,
    RTP_BLOCK_PORTS,
    AmiUser,
    AsteriskInstance,
    cache_dir,
    ensure_root,
    installed_version,
    major_version,
    reserve_rtp_block,
    root_version,
    rtp_block_starts,
    sipbridge_ami_user,
)
from tests.asterisk_harness import require_lab


def test_the_lab_user_is_the_sample_user() -> None:
    user = sipbridge_ami_user("s")
    assert (user.read, user.write, user.eventfilter) == (
        "call,user",
        "call,reporting,originate",
        "Event: (UserEvent|Hangup)",
    )


def test_cache_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SIPBRIDGE_LAB_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("SIPBRIDGE_LAB_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "sipbridge"


def test_a_built_root_is_reused(tmp_path: Path) -> None:
    root = tmp_path / "asterisk-root"
    root.mkdir()
    (root / READY_MARKER).write_text("Asterisk 22.10.1+dfsg\n")
    assert ensure_root(tmp_path) == root  # no mmdebstrap run: the marker says it is complete
    assert root_version(root) == "Asterisk 22.10.1+dfsg"


def test_instance_configuration(tmp_path: Path) -> None:
    instance = AsteriskInstance(
        tmp_path,
        "t1",
        15060,
        15038,
        20000,
        20099,
        [AmiUser("u", "p", "call", "call", "Event: Hangup")],
    )
    instance.write_config()
    etc = tmp_path / "etc/asterisk-t1"
    asterisk_conf = (etc / "asterisk.conf").read_text()
    assert "[directories]\n" in asterisk_conf and "(!)" not in asterisk_conf  # not a template
    assert "astrundir => /var/run/asterisk-t1" in asterisk_conf
    assert "bind = 127.0.0.1:15060" in (etc / "pjsip.conf").read_text()
    manager = (etc / "manager.conf").read_text()
    assert "port = 15038" in manager and "eventfilter = Event: Hangup" in manager
    assert (etc / "rtp.conf").read_text() == "[general]\nrtpstart = 20000\nrtpend = 20099\n"
    modules = (etc / "modules.conf").read_text()
    assert "autoload = no" in modules and all(f"load => {m}" in modules for m in MODULES)
    assert (etc / "sipbridge.conf").read_bytes() == (DIALPLAN_DIR / "sipbridge.conf").read_bytes()
    assert '#include "sipbridge.conf"' in (etc / "extensions.conf").read_text()
    instance.stop()  # never started: only removes the directories
    assert not etc.exists()


def test_the_dialplan_names_only_modules_the_lab_loads() -> None:
    """dialplan/sipbridge.conf lists its modules; the lab must load every one of them."""
    header = (DIALPLAN_DIR / "sipbridge.conf").read_text().split("[sipbridge-inbound]")[0]
    named = {
        word.strip(" ,;()\n")
        for word in header.replace(",", " ").split()
        if word.startswith(("app_", "func_", "res_", "chan_", "pbx_"))
    }
    loaded = {module.removesuffix(".so") for module in MODULES}
    assert named and named <= loaded, named - loaded


def test_major_version() -> None:
    assert major_version("Asterisk 22.10.1+dfsg+~cs6.17.60671434-1") == 22
    assert major_version("Asterisk 20.6.0") == 20
    assert major_version("asterisk: command not found") is None
    assert major_version("") is None


@pytest.mark.asterisk
def test_the_lab_root_is_asterisk_22() -> None:
    """The real-Asterisk tests claim Asterisk 22: the cached root must be it, marker and binary."""
    require_lab()
    root = ensure_root()
    recorded = root_version(root)
    assert major_version(recorded) == ASTERISK_MAJOR, recorded
    assert installed_version(root) == recorded


def test_rtp_blocks_avoid_the_ephemeral_range() -> None:
    starts = rtp_block_starts((32768, 60999))
    assert starts[0] == 20000 and starts[-1] + RTP_BLOCK_PORTS - 1 <= 65535
    for start in starts:
        last = start + RTP_BLOCK_PORTS - 1
        assert last < 32768 or start > 60999, start
    assert 32600 in starts and 32700 not in starts and 61000 in starts and 60900 not in starts


def test_rtp_blocks_are_never_held_twice(tmp_path: Path) -> None:
    """Two holders (two fds, as two processes would have) get different blocks."""
    only_two = (20200, 65535)  # leaves 20000-20099 and 20100-20199
    with reserve_rtp_block(tmp_path, only_two) as first:
        with reserve_rtp_block(tmp_path, only_two) as second:
            assert {first, second} == {(20000, 20099), (20100, 20199)}
            with (
                pytest.raises(RuntimeError, match="no 1 adjacent RTP port blocks of 2 are free"),
                reserve_rtp_block(tmp_path, only_two),
            ):
                pass
        # Released: the next holder may take it again.
        with reserve_rtp_block(tmp_path, only_two) as again:
            assert again == second
    assert first[0] == 20000 + RTP_BLOCK_PORTS * (os.getpid() % 2)  # the pid picks the start


def test_several_adjacent_rtp_blocks_for_many_calls(tmp_path: Path) -> None:
    """The soak and load benchmarks hold 100-200 calls: one range of adjacent blocks."""
    three = (20300, 65535)  # leaves 20000-20299: three blocks
    with reserve_rtp_block(tmp_path, three, blocks=2) as pair:
        assert pair in {(20000, 20199), (20100, 20299)}
        with reserve_rtp_block(tmp_path, three) as single:
            assert single[1] < pair[0] or single[0] > pair[1]
        with (
            pytest.raises(RuntimeError, match="no 3 adjacent"),
            reserve_rtp_block(tmp_path, three, blocks=3),
        ):
            pass
