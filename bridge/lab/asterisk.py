"""Real Asterisk 22 for the lab and the tests: a cached Debian root, isolated instances.

The root filesystem is Debian sid's ``asterisk`` package installed by ``mmdebstrap`` (about 20 s
and 350 MB, once; then cached). Each :class:`AsteriskInstance` runs from that root under
``chroot`` with its own configuration directory, run/spool/log directories and ports, so
several can run at once: each starts with ``-C`` and its own ``asterisk.conf`` whose
``[directories]`` point at its own directories (docs.asterisk.org, "Asterisk Main Configuration
File"). Their dialplan is the project's
own ``dialplan/sipbridge.conf``, so what is tested is what an admin installs.

Needs root (chroot). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

PACKAGES = ("asterisk", "asterisk-modules", "asterisk-config")
READY_MARKER = ".sipbridge-root-ready"
DIALPLAN_DIR = Path(__file__).resolve().parents[2] / "dialplan"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
ASTERISK_MAJOR = 22
# RTP port blocks for instances (rtp.conf): 50 RTP/RTCP pairs each.
RTP_BLOCK_PORTS = 100
RTP_FLOOR = 20000
RTP_CEILING = 65535

# modules.conf with autoload=no and exactly what sipbridge's dialplan and the lab use (Asterisk's
# "Configuring the Asterisk Module Loader"): measured on the lab machine, about 0.3 s to boot and
# 57 MB, and no listener that was not configured.
MODULES = (
    "pbx_config.so",
    "app_userevent.so",
    "app_verbose.so",
    "app_while.so",
    "app_dial.so",
    "app_stack.so",
    "app_echo.so",
    "app_senddtmf.so",
    "func_strings.so",
    "func_cut.so",
    "func_logic.so",
    "func_uuid.so",
    "func_uri.so",
    "func_db.so",
    "func_channel.so",
    "func_callerid.so",
    "func_hangupcause.so",
    "codec_ulaw.so",
    "codec_alaw.so",
    "res_timing_timerfd.so",
    "bridge_simple.so",
    "bridge_native_rtp.so",
    "res_sorcery_config.so",
    "res_sorcery_memory.so",
    "res_sorcery_astdb.so",
    "res_pjproject.so",
    "res_pjsip.so",
    "res_pjsip_session.so",
    "res_pjsip_pubsub.so",
    "res_pjsip_sdp_rtp.so",
    "res_pjsip_endpoint_identifier_anonymous.so",
    "res_pjsip_endpoint_identifier_ip.so",
    "res_pjsip_header_funcs.so",
    "res_pjsip_caller_id.so",
    "res_pjsip_logger.so",
    "res_pjsip_dtmf_info.so",
    "res_pjsip_authenticator_digest.so",
    "res_pjsip_outbound_authenticator_digest.so",
    "res_rtp_asterisk.so",
    "chan_pjsip.so",
    "res_audiosocket.so",
    "app_audiosocket.so",
)
EMPTY_CONFIGS = (
    "acl.conf",
    "ccss.conf",
    "cel.conf",
    "features.conf",
    "indications.conf",
    "pjproject.conf",
    "stasis.conf",
    "udptl.conf",
)


def cache_dir() -> Path:
    """Where the root filesystem is kept between runs (``SIPBRIDGE_LAB_CACHE`` overrides)."""
    configured = os.environ.get("SIPBRIDGE_LAB_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sipbridge"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_root(directory: Path | None = None) -> Path:
    """A root filesystem with Asterisk installed; built once with mmdebstrap, then reused.

    Raises:
        RuntimeError: not root, mmdebstrap missing, or the build failed (its output is kept).
    """
    directory = directory or cache_dir()
    root = directory / "asterisk-root"
    with _locked(directory / "asterisk-root.lock"):
        if (root / READY_MARKER).is_file():
            return root
        if os.geteuid() != 0:
            raise RuntimeError("building the Asterisk root needs root (mmdebstrap, chroot)")
        if shutil.which("mmdebstrap") is None:
            raise RuntimeError("mmdebstrap is not installed (apt-get install mmdebstrap)")
        staging = directory / "asterisk-root.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(root, ignore_errors=True)
        log_path = directory / "mmdebstrap.log"
        started = time.monotonic()
        log.info("building the Asterisk root with mmdebstrap (about 20 s, once)")
        with log_path.open("w") as output:
            result = subprocess.run(
                [
                    "mmdebstrap",
                    "--variant=apt",
                    # Mirrors serving an older snapshot have an expired Release file.
                    '--aptopt=Acquire::Check-Valid-Until "false"',
                    "--include=" + ",".join(PACKAGES),
                    "sid",
                    str(staging),
                ],
                stdout=output,
                stderr=subprocess.STDOUT,
                check=False,
            )
        if result.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed ({result.returncode}); see {log_path}")
        version = subprocess.run(
            ["chroot", str(staging), "asterisk", "-V"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if major_version(version) != ASTERISK_MAJOR:
            raise RuntimeError(
                f"the root has {version!r}, not Asterisk {ASTERISK_MAJOR}; see {log_path}"
            )
        (staging / READY_MARKER).write_text(version + "\n")
        staging.rename(root)
        log.info("built %s in %.1f s at %s", version, time.monotonic() - started, root)
        return root


def root_version(root: Path) -> str:
    """``Asterisk 22.10.1+dfsg...`` as recorded when the root was built."""
    return (root / READY_MARKER).read_text().strip()


def installed_version(root: Path) -> str:
    """What the root's ``asterisk -V`` says now (needs root: chroot)."""
    return subprocess.run(
        ["chroot", str(root), "/usr/sbin/asterisk", "-V"],
        capture_output=True,
        text=True,
        check=True,
        timeout=15,
    ).stdout.strip()


def major_version(version: str) -> int | None:
    """22 for ``Asterisk 22.10.1+dfsg...``; None if it is not an Asterisk version line."""
    words = version.split()
    if len(words) < 2 or words[0] != "Asterisk":
        return None
    major = words[1].split(".", 1)[0]
    return int(major) if major.isdigit() else None


def ephemeral_port_range() -> tuple[int, int]:
    """The kernel's range for port-0 binds (``ip_local_port_range``)."""
    low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
    return int(low), int(high)


def rtp_block_starts(ephemeral: tuple[int, int]) -> list[int]:
    """First ports of the RTP blocks that lie wholly outside the ephemeral range, where no
    socket bound to port 0 (SIPp, a pipeline, an AMI proxy) can land."""
    low, high = ephemeral
    return [
        start
        for start in range(RTP_FLOOR, RTP_CEILING - RTP_BLOCK_PORTS + 2, RTP_BLOCK_PORTS)
        if start + RTP_BLOCK_PORTS - 1 < low or start > high
    ]


@contextlib.contextmanager
def reserve_rtp_block(
    lock_dir: Path | None = None, ephemeral: tuple[int, int] | None = None, blocks: int = 1
) -> Iterator[tuple[int, int]]:
    """An RTP port range (first, last) of ``blocks`` adjacent blocks that no other holder, in
    any process, has meanwhile. One block carries 50 calls (RTP and RTCP each take a port).

    Each block has a lock file (``flock``, which the kernel releases when the holder exits,
    even by a crash). The search starts at an offset from the pid, so concurrent test
    processes rarely even try the same block.

    Raises:
        RuntimeError: no ``blocks`` adjacent blocks are free.
    """
    starts = rtp_block_starts(ephemeral or ephemeral_port_range())
    known = set(starts)
    locks = lock_dir or Path(tempfile.gettempdir()) / "sipbridge-rtp-blocks"
    locks.mkdir(parents=True, exist_ok=True)
    offset = os.getpid() % len(starts) if starts else 0
    for index in range(len(starts)):
        first = starts[(offset + index) % len(starts)]
        run = [first + n * RTP_BLOCK_PORTS for n in range(blocks)]
        if not known.issuperset(run):
            continue  # the run would cross the ephemeral range or the ceiling
        with contextlib.ExitStack() as held:
            try:
                for start in run:
                    handle = held.enter_context((locks / f"{start}.lock").open("w"))
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # closing a lock file releases its lock
            yield first, first + blocks * RTP_BLOCK_PORTS - 1
            return
    raise RuntimeError(f"no {blocks} adjacent RTP port blocks of {len(starts)} are free")


@dataclass
class AmiUser:
    """An AMI account written into manager.conf."""

    username: str
    secret: str
    read: str
    write: str
    eventfilter: str | None = None


def sipbridge_ami_user(secret: str) -> AmiUser:
    """The AMI user of dialplan/manager.conf.sample, with ``secret``."""
    sample = (DIALPLAN_DIR / "manager.conf.sample").read_text()
    values = dict(
        line.split("=", 1)
        for line in (raw.strip() for raw in sample.splitlines())
        if line and not line.startswith(";") and "=" in line
    )
    fields = {key.strip(): value.strip() for key, value in values.items()}
    return AmiUser("sipbridge", secret, fields["read"], fields["write"], fields.get("eventfilter"))


@dataclass
class AsteriskInstance:
    """One Asterisk process with its own config, directories and loopback ports."""

    root: Path
    name: str
    sip_port: int
    ami_port: int
    rtp_start: int
    rtp_end: int
    ami_users: list[AmiUser] = field(default_factory=list)
    extra_dialplan: str = ""
    process: subprocess.Popen[bytes] | None = None

    @property
    def etc(self) -> str:
        """The config directory as Asterisk sees it (inside the chroot)."""
        return f"/etc/asterisk-{self.name}"

    @property
    def log_path(self) -> Path:
        """Asterisk's console output (verbose 3)."""
        return self.root / f"var/log/asterisk-{self.name}/console.log"

    def _dirs(self) -> list[Path]:
        return [
            self.root / self.etc.lstrip("/"),
            *(
                self.root / f"var/{kind}/asterisk-{self.name}"
                for kind in ("lib", "log", "spool", "run", "cache")
            ),
        ]

    def write_config(self) -> None:
        """Writes the whole configuration (the project's dialplan file included)."""
        for directory in self._dirs():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir(parents=True)
        etc = self.root / self.etc.lstrip("/")
        name = self.name
        files = {
            # No "(!)" after [directories]: that would make it a template that is ignored.
            "asterisk.conf": f"""[directories]
astcachedir => /var/cache/asterisk-{name}
astetcdir => {self.etc}
astmoddir => /usr/lib/x86_64-linux-gnu/asterisk/modules
astvarlibdir => /var/lib/asterisk-{name}
astdbdir => /var/lib/asterisk-{name}
astkeydir => /var/lib/asterisk-{name}
astdatadir => /usr/share/asterisk
astagidir => /usr/share/asterisk/agi-bin
astspooldir => /var/spool/asterisk-{name}
astrundir => /var/run/asterisk-{name}
astlogdir => /var/log/asterisk-{name}
astsbindir => /usr/sbin

[options]
verbose = 3
debug = 0
""",
            "modules.conf": "[modules]\nautoload = no\n"
            + "".join(f"load => {module}\n" for module in MODULES),
            "logger.conf": "[general]\n[logfiles]\nmessages.log => notice,warning,error,verbose\n",
            # The endpoints are dialplan/pjsip.conf.sample itself, as an admin installs it;
            # the lab only adds its transport and keeps media on loopback ("(+)" appends to a
            # section the sample defined).
            "pjsip.conf": f"""[global]
type = global
user_agent = sipbridge-lab

[transport-udp]
type = transport
protocol = udp
bind = 127.0.0.1:{self.sip_port}

#include "pjsip.sipbridge.conf"
"""
            + "".join(
                f"""
[{endpoint}](+)
transport = transport-udp
media_address = 127.0.0.1
bind_rtp_to_media_address = yes
"""
                for endpoint in ("anonymous", "sipbridge-transfer", "sipbridge-outbound")
            ),
            "rtp.conf": f"[general]\nrtpstart = {self.rtp_start}\nrtpend = {self.rtp_end}\n",
            "manager.conf": f"""[general]
enabled = yes
port = {self.ami_port}
bindaddr = 127.0.0.1
"""
            + "".join(
                f"""
[{user.username}]
secret = {user.secret}
deny = 0.0.0.0/0.0.0.0
permit = 127.0.0.1/255.255.255.255
read = {user.read}
write = {user.write}
"""
                + (f"eventfilter = {user.eventfilter}\n" if user.eventfilter else "")
                for user in self.ami_users
            ),
            "extensions.conf": "[general]\nstatic = yes\nwriteprotect = yes\n"
            "autofallthrough = yes\n\n" + self.extra_dialplan + '\n#include "sipbridge.conf"\n',
            "cdr.conf": "[general]\nenable = no\n",
        }
        for empty in EMPTY_CONFIGS:
            files.setdefault(empty, "")
        for filename, text in files.items():
            (etc / filename).write_text(text)
        shutil.copy(DIALPLAN_DIR / "sipbridge.conf", etc / "sipbridge.conf")
        shutil.copy(DIALPLAN_DIR / "pjsip.conf.sample", etc / "pjsip.sipbridge.conf")

    def start(self) -> None:
        """Writes the config, starts Asterisk and waits until it is fully booted.

        Raises:
            RuntimeError: Asterisk exited or did not boot in time (its output is in the error).
        """
        self.write_config()
        output = self.log_path.open("wb")
        self.process = subprocess.Popen(
            # No -U: as root with -U Asterisk drops the capabilities it needs (pitfall 1).
            [
                "chroot",
                str(self.root),
                "/usr/sbin/asterisk",
                "-f",
                "-C",
                f"{self.etc}/asterisk.conf",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        output.close()
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Asterisk exited at start:\n{self.log_text()[-3000:]}")
            if self.rx("core waitfullybooted", check=False) is not None:
                return
            time.sleep(0.05)  # polling a control socket that does not exist yet
        self.stop()
        raise RuntimeError(f"Asterisk did not boot within {START_TIMEOUT_S:.0f} s")

    def rx(self, command: str, *, check: bool = True) -> str | None:
        """Runs one CLI command (``asterisk -rx``); None when it failed and ``check`` is off."""
        result = subprocess.run(
            [
                "chroot",
                str(self.root),
                "/usr/sbin/asterisk",
                "-C",
                f"{self.etc}/asterisk.conf",
                "-rx",
                command,
            ],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        if result.returncode != 0:
            if check:
                raise RuntimeError(
                    f"asterisk -rx {command!r} failed: {result.stderr or result.stdout}"
                )
            return None
        return result.stdout

    def channels(self) -> list[str]:
        """Names of the channels that exist right now."""
        output = self.rx("core show channels concise") or ""
        # A channel's line can appear twice in one listing (seen while a channel moved to
        # another context); names are unique, so each is listed once.
        return list(
            dict.fromkeys(line.split("!", 1)[0] for line in output.splitlines() if "!" in line)
        )

    def log_text(self) -> str:
        """Asterisk's log so far (messages.log: notices, warnings, errors, verbose)."""
        parts = []
        for path in (self.log_path, self.log_path.with_name("messages.log")):
            try:
                parts.append(path.read_text(errors="replace"))
            except FileNotFoundError:
                continue
        return "\n".join(parts)

    def stop(self) -> None:
        """Stops Asterisk (SIGTERM, then SIGKILL) and removes the instance's directories.

        Read :meth:`log_text` first if the output matters: the log directory goes too.
        """
        process = self.process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.process = None
        for directory in self._dirs():
            shutil.rmtree(directory, ignore_errors=True)
