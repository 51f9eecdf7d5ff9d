"""sipbridge's image, built and run with podman, for the tests that prove docker/.

No Docker engine runs here and no registry is reachable, so the ``FROM`` image of
``docker/Dockerfile`` (``docker.io/library/debian:bookworm-slim``) is made from a Debian bookworm
root that mmdebstrap builds (once, cached next to the Asterisk root) and ``podman import`` tags
with that name; ``podman build`` then resolves ``FROM`` locally. podman's default runtime fails
on these machines, runc with cgroupfs works, and both ulimit flags are needed.

The build reaches PyPI through the host's network; the host's CA bundle and a pip.conf naming it
are mounted into the build's RUN steps only (``podman build -v``), for hosts whose HTTPS goes
through a proxy with its own CA. Nothing of them stays in the image.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bridge.lab.asterisk import cache_dir

ROOT = Path(__file__).parent.parent
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
ULIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def containers_unavailable() -> str | None:
    """Why podman images cannot be built and run here, or None."""
    if os.geteuid() != 0:
        return "needs root (podman with runc, mmdebstrap)"
    for tool in ("podman", "runc", "mmdebstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (./dev test installs it)"
    return None


def require_containers() -> None:
    """Skips without podman, except in CI, where that is a failure."""
    reason = containers_unavailable()
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"container tests cannot run in CI: {reason}")
    pytest.skip(f"container tests: {reason}")


def podman(
    *args: str, check: bool = True, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """One podman command; its output is kept for the failure message."""
    result = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])}… failed:\n{result.stderr[-3000:]}")
    return result


def ensure_base_image() -> None:
    """``debian:bookworm-slim`` in podman's store, from a cached mmdebstrap tarball."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return
    tarball = cache_dir() / "debian-bookworm.tar"
    if not tarball.is_file():
        # mmdebstrap chooses its output's format from the name unless told: a ".partial" (the
        # name this used before) made a directory, which podman cannot import; a fresh
        # machine's first run failed on it, and the directory stayed in the cache.
        if tarball.is_dir():
            shutil.rmtree(tarball)
        tarball.parent.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_name("debian-bookworm.partial.tar")
        partial.unlink(missing_ok=True)
        subprocess.run(
            [
                "mmdebstrap",
                "--format=tar",
                "--variant=apt",
                '--aptopt=Acquire::Check-Valid-Until "false"',
                "bookworm",
                str(partial),
            ],
            capture_output=True,
            check=True,
            timeout=900,
        )
        partial.rename(tarball)
    podman("import", str(tarball), BASE_IMAGE)


def build_image(target: str, tag: str, workdir: Path) -> None:
    """Builds ``docker/Dockerfile``'s ``target`` as ``tag`` (docker format: it keeps the
    HEALTHCHECK, which the OCI format drops)."""
    ensure_base_image()
    pip_conf = workdir / "pip.conf"
    pip_conf.write_text("[global]\ncert = /etc/ssl/certs/host-ca.crt\n")
    mounts: list[str] = []
    if HOST_CA_BUNDLE.is_file():
        mounts = [
            "-v",
            f"{HOST_CA_BUNDLE}:/etc/ssl/certs/host-ca.crt:ro",
            "-v",
            f"{pip_conf}:/etc/pip.conf:ro",
        ]
    podman(
        "build",
        *ULIMITS,
        "--network",
        "host",
        "--format",
        "docker",
        *mounts,
        "-f",
        str(ROOT / "docker" / "Dockerfile"),
        "--target",
        target,
        "-t",
        tag,
        str(ROOT),
        timeout=1200,
    )


class Container:
    """One detached container on the host's network, removed by :meth:`stop`."""

    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    async def run(cls, name: str, image: str, *args: str, env: dict[str, str]) -> Container:
        environment = [item for key, value in env.items() for item in ("-e", f"{key}={value}")]
        await asyncio.to_thread(
            podman,
            "run",
            "-d",
            "--name",
            name,
            *ULIMITS,
            "--network",
            "host",
            *environment,
            image,
            *args,
        )
        return cls(name)

    async def exec(self, *command: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(podman, "exec", self.name, *command, check=False)

    async def healthy(self) -> bool:
        """The image's own HEALTHCHECK, run now."""
        result = await asyncio.to_thread(podman, "healthcheck", "run", self.name, check=False)
        return result.returncode == 0

    async def logs(self) -> str:
        result = await asyncio.to_thread(podman, "logs", self.name, check=False)
        return result.stdout + result.stderr

    async def wait_for_log(self, texts: set[str], timeout: float) -> bool:
        """Follows the container's log until every one of ``texts`` has appeared in it (True),
        the container is gone or ``timeout`` passes (False)."""
        follower = await asyncio.create_subprocess_exec(
            *PODMAN, "logs", "-f", self.name,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        assert follower.stdout is not None
        awaited = set(texts)

        async def follow(stream: asyncio.StreamReader) -> None:
            nonlocal awaited
            async for raw in stream:
                line = raw.decode(errors="replace")
                awaited = {text for text in awaited if text not in line}
                if not awaited:
                    return

        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(follow(follower.stdout), timeout)
        finally:
            if follower.returncode is None:
                follower.kill()
            await follower.wait()
        return not awaited

    async def stop(self) -> None:
        await asyncio.to_thread(podman, "rm", "-f", "-t", "5", self.name, check=False)
