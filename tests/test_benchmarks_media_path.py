"""The media-path benchmark: its frame tagging, and one short run end to end (no timing asserted)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from bridge.audio import Transcoder, pcm_to_ulaw, sine

pytestmark = pytest.mark.integration


def load() -> ModuleType:
    path = Path(__file__).parents[1] / "benchmarks" / "media_path.py"
    spec = importlib.util.spec_from_file_location("media_path", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["media_path"] = module
    spec.loader.exec_module(module)
    return module


def test_caller_frames_keep_their_index_through_both_dialects() -> None:
    bench = load()
    filler = pcm_to_ulaw(sine(440, 0.02, 8000, 0.3))
    for index in (0, 1, 99, 100, 12345, 999_999):
        pcm = bench.caller_frame(index, filler)
        assert len(pcm) == 320
        raw = Transcoder("pcm_s16le", 8000).to_pipeline(pcm)  # raw at 8 kHz: unchanged
        twilio = Transcoder("mulaw", 8000).to_pipeline(pcm)  # μ-law for Twilio
        assert bench.frame_index(pcm_to_ulaw(raw[:6])) == index
        assert bench.frame_index(twilio[:3]) == index
    assert bench.frame_index(b"\xff\x00\x00") is None


@pytest.mark.parametrize("pbx", ["asterisk", "freeswitch"])
async def test_a_short_run_measures_every_figure(pbx: str) -> None:
    """Through AudioSocket, and through FreeSWITCH's unicast leg (the simulator binds its
    sockets as FreeSWITCH does and asks for the call's socket as the backend's ESL would)."""
    bench = load()
    result = await bench.one_run(calls=2, seconds=4.0, dialect="twilio", pbx=pbx)
    assert result["pbx"] == pbx
    assert result["sessions"] == 2
    assert result["framesToPbx"] >= 2 * 150
    assert result["pacingJitterToPbxMs"]["count"] >= 2 * 100
    assert result["clearToSilenceMs"]["count"] >= 2  # one barge-in per call at least
    assert result["replyFramesAfterClear"]["max"] <= 1  # at most the frame already in flight
    assert result["callerToPipelineLatencyMs"]["count"] >= 2 * 150


async def test_a_recorded_run_records_every_call() -> None:
    """--record: the service's recorder on every call, to show what recording costs."""
    bench = load()
    result = await bench.one_run(calls=2, seconds=3.0, dialect="raw", record=True)
    assert result["recorded"] and result["recordedCalls"] == 2
    # The stereo file (2 x 16 bit at 8 kHz): 32,000 bytes a second of call, headers aside.
    assert 28_000 < result["recordedBytesPerCallSecond"] < 36_000
