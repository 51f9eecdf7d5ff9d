"""``sipbridge lab``, the README's main job, run the way a person runs it."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from tests.asterisk_harness import require_lab

pytestmark = [pytest.mark.asterisk, pytest.mark.integration]


@pytest.mark.parametrize("dialect", ["raw", "twilio"])
async def test_the_lab_places_a_real_call_and_cleans_up(tmp_path: Path, dialect: str) -> None:
    require_lab()
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SIPBRIDGE_")}
    if "SIPBRIDGE_LAB_CACHE" in os.environ:
        environment["SIPBRIDGE_LAB_CACHE"] = os.environ["SIPBRIDGE_LAB_CACHE"]
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "lab", "--state-dir", str(tmp_path), "--format", dialect,
        env=environment, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), 300)
    text = output.decode()
    assert process.returncode == 0, text
    assert 'first message     "Hello John, you\'ve reached me over SIP."' in text
    assert "variables         first_name=John" in text
    assert "ended: customer-ended-call" in text
    assert f"{dialect} format" in text
    assert "its own 440 Hz tone echoed" in text
    assert "the greeting (spoken by espeak-ng)" in text  # ./dev test installs espeak-ng
    assert "channels left     0 in Asterisk" in text
    for log in ("sipbridge.log", "demo-pipeline.log", "asterisk.log"):
        assert (tmp_path / log).exists()
    # Every process it started is gone.
    ps = await asyncio.create_subprocess_exec("ps", "-eo", "args", stdout=asyncio.subprocess.PIPE)
    listing, _ = await ps.communicate()
    assert str(tmp_path) not in listing.decode()
