"""Property-based tests (Hypothesis) of everything that reads input sipbridge does not control.

For each wire parser (AudioSocket, AMI offer decoding, the Event Socket, unicast datagrams, both
pipeline dialects), the templating, and the API's request bodies and list queries: any input
gives a result or the module's own error type, within a time bound (Hypothesis' per-example
deadline), with bounded buffering. Generated inputs mix random bytes and text with mutations of
real messages, so that they reach deep into each parser rather than failing at its first byte.

A few hundred examples per target run in the suite. The long run, 10^5 examples per target, is

    SIPBRIDGE_FUZZ_EXAMPLES=100000 .venv/bin/python -m pytest -q -p no:cacheprovider \\
        tests/test_properties.py

and its last result is in benchmarks/results/properties.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.api import list_query
from bridge.errors import RemoteProtocolError, ValidationFailed
from bridge.models import validate_assistant, validate_phone_number
from bridge.protocol import ami, audiosocket, esl, unicast
from bridge.protocol.pipeline import Ignored, PipelineEvent, RawDialect, SessionInfo
from bridge.protocol.twilio import TwilioDialect
from bridge.templating import render

EXAMPLES = int(os.environ.get("SIPBRIDGE_FUZZ_EXAMPLES", "300"))
PROPERTIES = settings(
    max_examples=EXAMPLES,
    deadline=2000,  # ms per example: a parser that goes super-linear on some input fails here
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=EXAMPLES <= 1000,  # the suite's run is the same every time; the long run is not
)
CAPTURES = Path(__file__).parent / "data"


def _mutated(seed: bytes) -> st.SearchStrategy[bytes]:
    """Real bytes with slices cut, repeated, overwritten or spliced with random ones."""

    @st.composite
    def mutate(draw: st.DrawFn) -> bytes:
        data = bytearray(seed)
        for _ in range(draw(st.integers(0, 6))):
            if not data:
                break
            at = draw(st.integers(0, len(data) - 1))
            action = draw(st.sampled_from(["cut", "repeat", "overwrite", "insert"]))
            size = draw(st.integers(1, 64))
            if action == "cut":
                del data[at : at + size]
            elif action == "repeat":
                data[at:at] = data[at : at + size] * draw(st.integers(1, 50))
            elif action == "overwrite":
                noise = draw(st.binary(min_size=1, max_size=size))
                data[at : at + len(noise)] = noise
            else:
                data[at:at] = draw(st.binary(min_size=1, max_size=size))
        return bytes(data)

    return mutate()


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:], strict=False)]


# ---- AudioSocket -----------------------------------------------------------------------------

AUDIOSOCKET_SEED = (
    audiosocket.encode_call_id(uuid.UUID(int=7))
    + audiosocket.encode_audio(bytes(320))
    + audiosocket.encode_dtmf("5")
    + audiosocket.encode_hangup()
)


@PROPERTIES
@given(
    data=st.one_of(st.binary(max_size=5000), _mutated(AUDIOSOCKET_SEED)),
    cuts=st.lists(st.integers(0, 6000), max_size=8),
)
def test_audiosocket_frames_or_its_protocol_error(data: bytes, cuts: list[int]) -> None:
    decoder = audiosocket.FrameDecoder(max_payload=4096)
    try:
        for chunk in _chunks(data, cuts):
            decoder.receive_data(chunk)
            for frame in decoder.events_received():
                assert isinstance(
                    frame,
                    audiosocket.Hangup
                    | audiosocket.CallId
                    | audiosocket.Dtmf
                    | audiosocket.Audio
                    | audiosocket.Error,
                )
    except RemoteProtocolError:
        return
    # Bounded: never more than one frame's worth held back.
    assert decoder.pending_bytes <= audiosocket.HEADER_BYTES + 4096


# ---- AMI offers ------------------------------------------------------------------------------


AMI_FIELDS = ("SbDialed", "SbDomain", "SbFrom", "SbTo", "SbCallId", "SbHeaders", "SbTruncated")


@PROPERTIES
@given(
    fields=st.dictionaries(
        st.sampled_from(AMI_FIELDS + ("Uniqueid", "Channel", "CallerIDNum", "CallerIDName")),
        st.one_of(st.text(max_size=3000), st.from_regex(r"(%[0-9A-Fa-f]{2}|[&=<>@:; \"\w])*")),
    )
)
def test_ami_offers_decode_or_say_why(fields: dict[str, str]) -> None:
    event = {"Event": "UserEvent", "UserEvent": ami.OFFER_EVENT, **fields}
    try:
        offer = ami.decode_offer(event)
    except RemoteProtocolError:
        return
    facts = offer.facts
    assert all("\n" not in value and "\r" not in value for _, value in facts.headers)
    assert len(facts.headers) <= 64


@PROPERTIES
@given(value=st.one_of(st.text(max_size=3000), st.from_regex(r'[ "<>@:;\w\\]*')))
def test_name_addr_parsing_is_total(value: str) -> None:
    name, uri = ami.parse_name_addr(value)
    assert name is None or isinstance(name, str)
    assert uri is None or isinstance(uri, str)


# ---- the Event Socket ------------------------------------------------------------------------

ESL_SEEDS = [
    (CAPTURES / "freeswitch" / "live" / "call" / "conn-1.s2c.bin").read_bytes()[:12000],
    (CAPTURES / "freeswitch" / "s1_inbound_plain_all.rx.bin").read_bytes()[:12000],
]


@PROPERTIES
@given(
    data=st.one_of(st.binary(max_size=5000), *(_mutated(seed) for seed in ESL_SEEDS)),
    cuts=st.lists(st.integers(0, 15000), max_size=8),
)
def test_esl_messages_events_and_facts_or_its_protocol_error(data: bytes, cuts: list[int]) -> None:
    decoder = esl.EslDecoder(max_header_bytes=16 * 1024, max_body_bytes=64 * 1024)
    try:
        for chunk in _chunks(data, cuts):
            decoder.receive_data(chunk)
            for message in decoder.messages():
                if message.content_type in (esl.EVENT_PLAIN, esl.EVENT_JSON):
                    try:
                        event = esl.parse_event(message)
                        esl.invite_facts_of(event)
                        esl.ended_by_caller(event)
                        esl.hangup_cause_code(event)
                        esl.event_time(event)
                    except RemoteProtocolError:
                        continue
    except RemoteProtocolError:
        return
    assert decoder.pending_bytes <= 16 * 1024 + 64 * 1024 + 2


@PROPERTIES
@given(
    text=st.one_of(st.text(max_size=3000), st.just('{"row_count": 1, "rows": [7, {"uuid": 1}]}'))
)
def test_esl_api_answers_parse_or_say_why(text: str) -> None:
    assert isinstance(esl.parked_channels(text), list)
    with contextlib.suppress(RemoteProtocolError):
        esl.parse_dump(text)


# ---- unicast datagrams -----------------------------------------------------------------------


@PROPERTIES
@given(
    data=st.binary(max_size=3000),
    host=st.sampled_from(["127.0.0.1", "127.0.0.2", "::1"]),
    port=st.integers(0, 65535),
)
def test_unicast_datagrams_are_audio_or_refused(data: bytes, host: str, port: int) -> None:
    decoder = unicast.UnicastDecoder("127.0.0.1", 12000)
    verdict = decoder.datagram_received(data, (host, port))
    assert isinstance(verdict, unicast.Audio | unicast.Refused)
    if isinstance(verdict, unicast.Audio):
        assert (host, port) == ("127.0.0.1", 12000) and len(verdict.pcm) % 2 == 0


# ---- the pipeline dialects -------------------------------------------------------------------

INFO = SessionInfo(
    call_id="c",
    stream_id="s",
    pbx_call_id="p",
    customer={},
    called_uri="sip:a@b",
    headers={},
    variables={},
    assistant={},
    phone_number=None,
    encoding="mulaw",
    sample_rate=8000,
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)
PIPELINE_MESSAGES = st.one_of(
    st.binary(max_size=2000),
    st.text(max_size=2000),
    _JSON.map(json.dumps),
    st.fixed_dictionaries(
        {
            "event": st.sampled_from(["media", "mark", "clear", "stop"]),
            "media": st.fixed_dictionaries({"payload": st.text(max_size=400)}) | _JSON,
            "mark": st.fixed_dictionaries({"name": st.text(max_size=300)}) | _JSON,
        }
    ).map(json.dumps),
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(
                ["clear", "mark", "end-call", "transfer", "send-dtmf", "transcript", "message"]
            ),
            "name": _JSON,
            "digits": _JSON,
            "destination": _JSON,
            "reason": _JSON,
        }
    ).map(json.dumps),
    st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth),
)


@PROPERTIES
@given(message=PIPELINE_MESSAGES)
def test_pipeline_messages_never_end_a_call_by_accident(message: str | bytes) -> None:
    for dialect in (
        RawDialect("pcm_s16le", 16000),
        RawDialect("mulaw", 8000),
        TwilioDialect(INFO, "o"),
    ):
        event: PipelineEvent = dialect.receive(message)
        assert event is not None
        if isinstance(event, Ignored):
            assert event.reason


# ---- templating ------------------------------------------------------------------------------

_TEMPLATE_PARTS = st.sampled_from(
    [
        "{{ first_name }}",
        "{{ x | times: x }}",
        '{{ "now" | date: "%H:%M", tz }}',
        "{{ 3.5 | modulo: 0 }}",
        '{{ x | split: "," | sum }}',
        "{% assign x = x | append: x %}",
        "{% for i in (1..5) %}{{ i }}{% endfor %}",
        "{% if x %}y{% else %}z{% endif %}",
        "{{",
        "}}",
        "{%",
        "%}",
        "{{ 99999999999999999999 | date: '%Y' }}",
        " plain text ",
    ]
)


@PROPERTIES
@given(
    source=st.one_of(
        st.text(max_size=400),
        st.lists(st.one_of(_TEMPLATE_PARTS, st.text(max_size=20)), max_size=12).map("".join),
    ),
    variables=st.dictionaries(
        st.sampled_from(["x", "tz", "first_name", "customer"]),
        st.one_of(st.text(max_size=300), st.integers(), st.floats(allow_nan=True)),
    ),
)
def test_templates_always_render_to_text(source: str, variables: dict[str, Any]) -> None:
    result = render(source, variables, datetime(2026, 12, 5, tzinfo=UTC))
    assert isinstance(result, str)


# ---- the API's bodies and queries ------------------------------------------------------------


@PROPERTIES
@given(body=_JSON)
def test_assistant_and_number_bodies_validate_or_list_problems(body: Any) -> None:
    for validate in (validate_assistant, validate_phone_number):
        try:
            validate(body)
        except ValidationFailed as exc:
            assert exc.problems and all(isinstance(p, str) for p in exc.problems)


@PROPERTIES
@given(
    params=st.dictionaries(
        st.sampled_from(["limit", "createdAtGt", "createdAtLt", "updatedAtGe", "updatedAtLe", "x"]),
        st.one_of(
            st.text(max_size=60),
            st.datetimes().map(lambda moment: moment.isoformat()),
            st.sampled_from(["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "²"]),
        ),
    )
)
def test_list_queries_parse_or_list_problems(params: dict[str, str]) -> None:
    try:
        query = list_query(params)
    except ValidationFailed as exc:
        assert exc.problems
        return
    assert 0 <= query.limit <= 1000
