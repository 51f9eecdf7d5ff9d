"""The pipeline dialects in one table: their names, the audio each allows, how each is built.

Everything outside protocol/ that names a dialect, an encoding, a sample rate or the frame length
takes it from here: the CLI's choices, the types and defaults of the settings and of the API's
``sipbridge.pipeline`` object, routing's effective format, the conversation's translator, the
transcoder. The implementations live in their own modules (``raw`` in protocol/pipeline.py,
``twilio`` in protocol/twilio.py) and this module lists them, the way aiortc's
``codecs/__init__.py`` lists its codecs over ``codecs/g711.py`` and the rest.

The Literal types and constants themselves are defined in protocol/pipeline.py, because both
dialects are written with them and this table imports both dialects; they are re-exported here so
that nothing else needs to know that.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeGuard, get_args

from bridge.protocol.pipeline import (
    DEFAULT_DIALECT,
    DEFAULT_ENCODING,
    DEFAULT_SAMPLE_RATE,
    FRAME_MS,
    MULAW_RATE,
    Dialect,
    DialectName,
    Encoding,
    RawDialect,
    SampleRate,
    SessionInfo,
    effective_rate,
)
from bridge.protocol.twilio import TwilioDialect

__all__ = [
    "DEFAULT_DIALECT",
    "DEFAULT_ENCODING",
    "DEFAULT_SAMPLE_RATE",
    "DIALECTS",
    "DIALECT_NAMES",
    "ENCODINGS",
    "FRAME_MS",
    "MULAW_RATE",
    "SAMPLE_RATES",
    "DialectEntry",
    "DialectName",
    "Encoding",
    "PipelineFormat",
    "SampleRate",
    "build_dialect",
    "effective_rate",
    "is_encoding",
    "resolve_format",
]

# The Literal types' values at run time (argparse choices, checks), in the types' order.
DIALECT_NAMES: tuple[DialectName, ...] = get_args(DialectName)
ENCODINGS: tuple[Encoding, ...] = get_args(Encoding)
SAMPLE_RATES: tuple[SampleRate, ...] = get_args(SampleRate)

# (encoding, sample rate, the call's session facts, the org id) -> the call's translator.
DialectFactory = Callable[[Encoding, int, SessionInfo, str], Dialect]


@dataclass(frozen=True)
class DialectEntry:
    """One dialect's row in :data:`DIALECTS`.

    Attributes:
        build: makes the dialect's translator for one call.
        encodings: the encodings the dialect can carry.
        sample_rates: the sample rates it can carry (μ-law at :data:`MULAW_RATE` only).
    """

    build: DialectFactory
    encodings: tuple[Encoding, ...]
    sample_rates: tuple[int, ...]

    @property
    def fixed(self) -> tuple[Encoding, int] | None:
        """The one encoding and rate a dialect that allows nothing else always uses, else None."""
        if len(self.encodings) == 1 and len(self.sample_rates) == 1:
            return self.encodings[0], self.sample_rates[0]
        return None


def _raw(encoding: Encoding, sample_rate: int, info: SessionInfo, org_id: str) -> Dialect:
    return RawDialect(encoding, sample_rate)


def _twilio(encoding: Encoding, sample_rate: int, info: SessionInfo, org_id: str) -> Dialect:
    # Its ids derive from the call's and the org's; its audio is fixed (see its table row).
    return TwilioDialect(info, org_id)


DIALECTS: Mapping[DialectName, DialectEntry] = MappingProxyType(
    {
        RawDialect.name: DialectEntry(_raw, encodings=ENCODINGS, sample_rates=SAMPLE_RATES),
        # Twilio Media Streams carry audio/x-mulaw at 8000 Hz and nothing else.
        TwilioDialect.name: DialectEntry(
            _twilio,
            encodings=(TwilioDialect.encoding,),
            sample_rates=(TwilioDialect.sample_rate,),
        ),
    }
)


@dataclass(frozen=True)
class PipelineFormat:
    """What a pipeline stream really carries: its dialect, encoding and sample rate."""

    dialect: DialectName
    encoding: Encoding
    sample_rate: int


def resolve_format(
    dialect: DialectName | None,
    encoding: Encoding | None,
    sample_rate: int | None,
    *,
    default_dialect: DialectName = DEFAULT_DIALECT,
    default_encoding: Encoding = DEFAULT_ENCODING,
    default_sample_rate: int = DEFAULT_SAMPLE_RATE,
) -> PipelineFormat:
    """A pipeline spec's format, encoding and sample rate over the defaults, as the stream runs.

    Each unset (None or empty) value takes its default. A dialect with a fixed encoding and rate
    (``twilio``) uses them whatever was asked; μ-law runs at 8 kHz whatever rate was asked.

    Args:
        dialect: the spec's ``format``.
        encoding: the spec's ``encoding``.
        sample_rate: the spec's ``sampleRate``.
        default_dialect: the ``format`` when the spec has none (the settings' default).
        default_encoding: the ``encoding`` when the spec has none.
        default_sample_rate: the ``sampleRate`` when the spec has none.
    """
    name = dialect or default_dialect
    fixed = DIALECTS[name].fixed
    if fixed is not None:
        return PipelineFormat(name, *fixed)
    chosen = encoding or default_encoding
    return PipelineFormat(name, chosen, effective_rate(chosen, sample_rate or default_sample_rate))


def build_dialect(
    dialect: DialectName, encoding: Encoding, sample_rate: int, info: SessionInfo, org_id: str
) -> Dialect:
    """The translator for one call's pipeline stream.

    Args:
        dialect: the stream's dialect.
        encoding: its encoding (a dialect with a fixed one ignores it).
        sample_rate: its sample rate (likewise).
        info: what the start message says about the call.
        org_id: the org the call belongs to (the ``twilio`` dialect's ``accountSid``).
    """
    return DIALECTS[dialect].build(encoding, sample_rate, info, org_id)


def is_encoding(value: str) -> TypeGuard[Encoding]:
    """Whether ``value`` is one of the pipeline encodings."""
    return value in ENCODINGS
