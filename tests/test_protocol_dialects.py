from __future__ import annotations

import argparse
import typing

import pytest

from bridge.cli import build_parser
from bridge.models import PipelineSpec
from bridge.protocol import dialects
from bridge.protocol.dialects import (
    DEFAULT_DIALECT,
    DEFAULT_ENCODING,
    DEFAULT_SAMPLE_RATE,
    DIALECT_NAMES,
    DIALECTS,
    ENCODINGS,
    FRAME_MS,
    MULAW_RATE,
    SAMPLE_RATES,
    PipelineFormat,
    build_dialect,
    effective_rate,
    is_encoding,
    resolve_format,
)
from bridge.protocol.pipeline import RawDialect, SessionInfo
from bridge.protocol.twilio import TwilioDialect
from bridge.routing import RoutingDefaults
from bridge.settings import PipelineSettings

INFO = SessionInfo(
    call_id="c1",
    stream_id="s1",
    pbx_call_id="1700000000.1",
    customer={"number": "+15551230000"},
    called_uri="sip:demo@sip.example.com",
    headers={},
    variables={},
    assistant={"name": "Demo"},
    phone_number=None,
)


def test_the_table_lists_every_dialect_name_once() -> None:
    assert DIALECT_NAMES == ("raw", "twilio")
    assert tuple(DIALECTS) == DIALECT_NAMES
    assert ENCODINGS == ("pcm_s16le", "mulaw")
    assert SAMPLE_RATES == (8000, 16000, 24000)
    assert FRAME_MS == 20
    assert MULAW_RATE == 8000


@pytest.mark.parametrize("name", DIALECT_NAMES)
def test_every_name_builds_its_dialect(name: typing.Any) -> None:
    dialect = build_dialect(name, "pcm_s16le", 16000, INFO, "org")
    assert dialect.name == name
    expected = {"raw": RawDialect, "twilio": TwilioDialect}[name]
    assert isinstance(dialect, expected)
    fixed = DIALECTS[name].fixed
    if fixed is not None:
        assert (dialect.encoding, dialect.sample_rate) == fixed


def test_twilio_is_always_mulaw_at_8000() -> None:
    entry = DIALECTS["twilio"]
    assert entry.encodings == ("mulaw",) and entry.sample_rates == (8000,)
    assert entry.fixed == ("mulaw", 8000)
    for encoding in ENCODINGS:
        for rate in SAMPLE_RATES:
            assert resolve_format("twilio", encoding, rate) == PipelineFormat(
                "twilio", "mulaw", 8000
            )
    dialect = build_dialect("twilio", "pcm_s16le", 24000, INFO, "org")
    assert (dialect.encoding, dialect.sample_rate) == ("mulaw", 8000)


def test_raw_allows_every_encoding_and_rate_and_mulaw_is_8000() -> None:
    entry = DIALECTS["raw"]
    assert entry.encodings == ENCODINGS and entry.sample_rates == SAMPLE_RATES
    assert entry.fixed is None
    for rate in SAMPLE_RATES:
        assert resolve_format("raw", "mulaw", rate).sample_rate == 8000
        assert resolve_format("raw", "pcm_s16le", rate).sample_rate == rate
        assert effective_rate("mulaw", rate) == 8000
    assert build_dialect("raw", "mulaw", 16000, INFO, "org").sample_rate == 8000
    assert build_dialect("raw", "pcm_s16le", 24000, INFO, "org").sample_rate == 24000


def test_unset_values_take_the_defaults() -> None:
    assert resolve_format(None, None, None) == PipelineFormat("raw", "pcm_s16le", 16000)
    assert (DEFAULT_DIALECT, DEFAULT_ENCODING, DEFAULT_SAMPLE_RATE) == ("raw", "pcm_s16le", 16000)
    given = resolve_format(
        None, None, None, default_dialect="raw", default_encoding="mulaw", default_sample_rate=24000
    )
    assert given == PipelineFormat("raw", "mulaw", 8000)
    assert resolve_format(None, None, None, default_dialect="twilio") == PipelineFormat(
        "twilio", "mulaw", 8000
    )
    # The spec's own values beat the defaults.
    assert resolve_format("raw", "pcm_s16le", 8000, default_sample_rate=24000).sample_rate == 8000


def test_is_encoding() -> None:
    assert all(is_encoding(encoding) for encoding in ENCODINGS)
    assert not is_encoding("alaw")


def _choices(parser: argparse.ArgumentParser, *path: str) -> dict[str, typing.Any]:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return {a.dest: a.choices for a in parser._actions if a.choices is not None}


def test_cli_settings_and_models_offer_the_registrys_choices() -> None:
    parser = build_parser()
    create = _choices(parser, "assistant", "create")
    assert tuple(create["pipeline_format"]) == DIALECT_NAMES
    assert tuple(create["pipeline_encoding"]) == ENCODINGS
    assert tuple(create["pipeline_sample_rate"]) == SAMPLE_RATES
    assert tuple(_choices(parser, "lab")["format"]) == DIALECT_NAMES
    assert parser.parse_args(["lab"]).format == DEFAULT_DIALECT

    fields = PipelineSettings.model_fields
    assert typing.get_args(fields["default_format"].annotation) == DIALECT_NAMES
    assert typing.get_args(fields["default_encoding"].annotation) == ENCODINGS
    assert typing.get_args(fields["default_sample_rate"].annotation) == SAMPLE_RATES
    settings = PipelineSettings()
    assert (settings.default_format, settings.default_encoding, settings.default_sample_rate) == (
        DEFAULT_DIALECT,
        DEFAULT_ENCODING,
        DEFAULT_SAMPLE_RATE,
    )
    routing = RoutingDefaults()
    assert (routing.pipeline_format, routing.pipeline_encoding, routing.pipeline_sample_rate) == (
        DEFAULT_DIALECT,
        DEFAULT_ENCODING,
        DEFAULT_SAMPLE_RATE,
    )

    spec = PipelineSpec.model_fields
    assert typing.get_args(spec["format"].annotation) == (dialects.DialectName, type(None))
    assert typing.get_args(spec["encoding"].annotation) == (dialects.Encoding, type(None))
    assert typing.get_args(spec["sample_rate"].annotation) == (dialects.SampleRate, type(None))
