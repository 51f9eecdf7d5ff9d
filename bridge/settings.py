"""Settings: environment (``SIPBRIDGE_`` prefix, ``__`` for nesting) over an optional TOML file.

Each component gets only its own sub-model (``settings.api`` for the API, ``settings.store`` for
the store, ...). Precedence, highest first: values passed in code (the CLI's flags), environment
variables, the TOML file named by ``--config`` or ``SIPBRIDGE_CONFIG``, then the defaults below.
Every field is documented in ``docs/configuration.md``; ``tests/test_settings.py`` keeps the two
in step.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
import json
import os
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from bridge.errors import ConfigError
from bridge.protocol.dialects import (
    DEFAULT_DIALECT,
    DEFAULT_ENCODING,
    DEFAULT_SAMPLE_RATE,
    DialectName,
    Encoding,
    SampleRate,
)

ENV_PREFIX = "SIPBRIDGE_"
CONFIG_FILE_ENV = "SIPBRIDGE_CONFIG"


def _is_integer_choice(annotation: Any) -> bool:
    """Whether ``annotation`` is ``Literal[8000, 16000, ...]`` (possibly ``| None``)."""
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(choice, int) for choice in typing.get_args(annotation))
    return any(_is_integer_choice(arg) for arg in typing.get_args(annotation))


class _Section(BaseModel):
    # A misspelt key in a TOML file or a SIPBRIDGE_X__Y variable is an error, not a silent default.
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _integer_choice_from_text(cls, value: Any, info: ValidationInfo) -> Any:
        # Environment variables are text, and pydantic matches a Literal's integers only
        # against integers (SIPBRIDGE_PIPELINE__DEFAULT_SAMPLE_RATE=8000 was "Input should be
        # 8000, 16000 or 24000"); TOML has integers already.
        if isinstance(value, str) and info.field_name is not None:
            field = cls.model_fields[info.field_name]
            if _is_integer_choice(field.annotation):
                with contextlib.suppress(ValueError):
                    return int(value)
        return value


class ApiSettings(_Section):
    """The HTTP API (Vapi-compatible resources, /health, /metrics)."""

    host: str = Field("127.0.0.1", description="Address the API listens on.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port of the API (0 picks a free one).")
    key: SecretStr | None = Field(
        None, description="Bearer token every API request must carry. Required unless lab_mode."
    )
    lab_mode: bool = Field(
        False,
        description="Allow running without a key. Only accepted when host is a loopback address.",
    )
    url: str | None = Field(
        None,
        description="Base URL the CLI talks to. Default: http://<host>:<port> (0.0.0.0: loopback).",
    )
    org_id: str | None = Field(
        None, description="orgId shown on resources. Default: a UUID created with the database."
    )
    metrics_require_key: bool | None = Field(
        None,
        description=(
            "Require the API key on /metrics too. Unset: required unless host is a loopback "
            "address (call counts and end reasons are not for everyone)."
        ),
    )
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Largest request body accepted.")

    def metrics_need_key(self) -> bool:
        """Whether /metrics asks for the key: as set, else off loopback only."""
        if self.metrics_require_key is not None:
            return self.metrics_require_key
        return not is_loopback(self.host)


class StoreSettings(_Section):
    """The embedded SQLite database holding assistants, phone numbers and call records."""

    path: Path = Field(Path("sipbridge.sqlite3"), description="SQLite database file.")
    busy_timeout_s: float = Field(5.0, gt=0, description="How long a write waits for a lock.")


class AsteriskSettings(_Section):
    """The Asterisk Manager Interface (AMI) link."""

    enabled: bool = Field(False, description="Control an Asterisk PBX over AMI.")
    host: str = Field("127.0.0.1", description="AMI host.")
    port: int = Field(5038, ge=1, le=65535, description="AMI port.")
    username: str = Field("sipbridge", description="AMI user (see dialplan/manager.conf.sample).")
    secret: SecretStr | None = Field(None, description="AMI secret.")
    ping_interval_s: float = Field(
        5.0,
        gt=0,
        description=(
            "AMI heartbeat period. A silent link is dropped within two periods; one that is "
            "slow to answer but still sending is kept."
        ),
    )
    action_timeout_s: float = Field(5.0, gt=0, description="How long any AMI action may take.")
    reconnect_max_delay_s: float = Field(30.0, gt=0, description="Cap of the reconnect backoff.")
    media_context: str = Field(
        "sipbridge-media", description="Dialplan context that runs AudioSocket for accepted calls."
    )
    transfer_context: str = Field(
        "sipbridge-transfer", description="Dialplan context that performs blind transfers."
    )
    transfer_endpoint: str = Field(
        "sipbridge-transfer",
        description="PJSIP endpoint transfers are dialled through (PJSIP/<endpoint>/<sip uri>, "
        "PJSIP/<number>@<endpoint>); see dialplan/pjsip.conf.sample.",
    )
    outbound_context: str = Field(
        "sipbridge-outbound",
        description="Dialplan context that dials an outbound call's customer (POST /call).",
    )
    outbound_endpoint: str = Field(
        "sipbridge-outbound",
        description="PJSIP endpoint outbound calls are dialled through (PJSIP/<endpoint>/<sip "
        "uri>, PJSIP/<number>@<endpoint>); see dialplan/pjsip.conf.sample.",
    )


class FreeswitchSettings(_Section):
    """The FreeSWITCH Event Socket (ESL) link."""

    enabled: bool = Field(False, description="Control a FreeSWITCH PBX over the Event Socket.")
    host: str = Field("127.0.0.1", description="Event Socket host (mod_event_socket).")
    port: int = Field(8021, ge=1, le=65535, description="Event Socket port.")
    password: SecretStr | None = Field(None, description="Event Socket password.")
    action_timeout_s: float = Field(5.0, gt=0, description="How long any api command may take.")
    ping_interval_s: float = Field(
        5.0,
        gt=0,
        le=10,
        description=(
            "Watchdog and heartbeat period; a dead link is noticed within two. At most 10 s: "
            "freeswitch_conf/sipbridge.xml refuses calls when the heartbeat is 20 s old."
        ),
    )
    reconnect_max_delay_s: float = Field(30.0, gt=0, description="Cap of the reconnect backoff.")
    offer_variable: str = Field(
        "sipbridge_offer",
        pattern=r"^[A-Za-z0-9_]{1,64}$",
        description="Channel variable freeswitch_conf/ sets on calls parked for sipbridge.",
    )
    transfer_context: str = Field(
        "sipbridge",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="XML dialplan context holding the sipbridge_transfer extension.",
    )
    unicast_host: str = Field(
        "127.0.0.1",
        description="Address on the FreeSWITCH host it binds for a call's unicast audio.",
    )
    # Below FreeSWITCH's default RTP range (16384-32768) and Linux's ephemeral ports (32768-),
    # where sipbridge's own sockets come from.
    unicast_port_min: int = Field(
        12000, ge=1024, le=65535, description="First FreeSWITCH-side unicast UDP port."
    )
    unicast_port_max: int = Field(
        12999, ge=1024, le=65535, description="Last FreeSWITCH-side unicast UDP port."
    )


class MediaSettings(_Section):
    """The PBX audio legs (AudioSocket for Asterisk, unicast L16 for FreeSWITCH)."""

    audiosocket_host: str = Field(
        "127.0.0.1", description="Address the AudioSocket server listens on."
    )
    audiosocket_port: int = Field(9092, ge=0, le=65535, description="AudioSocket TCP port.")
    unicast_host: str = Field(
        "127.0.0.1", description="Address sipbridge's per-call UDP sockets for FreeSWITCH bind."
    )
    unicast_advertise: str | None = Field(
        None, description="Address FreeSWITCH sends unicast audio to. Default: unicast_host."
    )
    audiosocket_advertise: str | None = Field(
        None,
        description="host:port Asterisk dials for AudioSocket. Default: audiosocket_host:port.",
    )
    max_frame_bytes: int = Field(
        4096, ge=320, le=65535, description="Largest AudioSocket payload accepted from the PBX."
    )
    playout_max_ms: int = Field(
        60_000,
        ge=200,
        description="Most audio queued toward the caller; newer audio beyond it drops (counted).",
    )
    connect_timeout_s: float = Field(
        5.0, gt=0, description="How long an accepted call may take to open its media leg."
    )


class PipelineSettings(_Section):
    """The conversational pipeline's websocket (defaults for assistants that name none)."""

    default_url: str | None = Field(None, description="ws:// or wss:// URL of the pipeline.")
    default_format: DialectName = Field(DEFAULT_DIALECT, description="Wire dialect.")
    default_encoding: Encoding = Field(
        DEFAULT_ENCODING, description="Audio encoding of the raw dialect."
    )
    default_sample_rate: SampleRate = Field(
        DEFAULT_SAMPLE_RATE, description="Sample rate of the raw dialect's PCM."
    )
    # Secret values: this is where a pipeline's "Authorization: Bearer ..." goes.
    default_headers: dict[str, SecretStr] = Field(
        default_factory=dict,
        description="Extra HTTP headers on the websocket handshake (values masked when shown).",
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="Websocket open timeout.")
    ping_interval_s: float = Field(5.0, gt=0, description="Websocket keepalive ping period.")
    ping_timeout_s: float = Field(
        5.0,
        gt=0,
        description=(
            "A pipeline that answers no ping within this time has stalled: the call fails over "
            "(see on_failure). Detection takes between this and ping_interval_s + this."
        ),
    )
    max_message_bytes: int = Field(1 << 16, ge=1024, description="Largest message accepted.")
    on_failure: Literal["fallback", "hangup"] = Field(
        "fallback",
        description=(
            "When the pipeline cannot be reached, or fails or stalls mid-call: 'fallback' "
            "transfers the call to its phone number's fallbackDestination (hangs up when it has "
            "none); 'hangup' always ends the call."
        ),
    )


class WebhookSettings(_Section):
    """Server messages (assistant-request, status-update, end-of-call-report)."""

    default_server_url: str | None = Field(
        None, description="Server URL used when neither the assistant nor the number has one."
    )
    default_server_secret: SecretStr | None = Field(
        None, description="Secret for the default server (sent as x-vapi-secret, signs HMAC)."
    )
    default_timeout_s: float = Field(
        20.0, gt=0, le=300, description="Per-attempt timeout when a server sets no timeoutSeconds."
    )
    max_retries: int = Field(3, ge=0, le=10, description="Retries after a 5xx or network error.")
    retry_base_delay_s: float = Field(
        0.5, ge=0, description="First retry delay; doubles each time."
    )
    signing_secret: SecretStr | None = Field(
        None, description="HMAC-SHA256 key used when the target server has no secret of its own."
    )
    signature_header: str = Field("x-signature", description="Header carrying the HMAC (hex).")
    timestamp_header: str = Field("x-timestamp", description="Header carrying the signed time (s).")
    message_id_header: str = Field(
        "x-message-id", description="Header carrying the idempotency id of each message."
    )
    max_pending: int = Field(10_000, ge=1, description="Messages queued before new ones drop.")
    concurrency: int = Field(8, ge=1, le=256, description="Deliveries in flight at once.")


class TlsSettings(_Section):
    """TLS of the connections sipbridge opens: wss:// pipelines, https:// server URLs."""

    ca_file: Path | None = Field(
        None,
        description=(
            "PEM file of CA certificates to trust besides the system's (a private PKI). "
            "Certificates and host names are always verified."
        ),
    )

    @field_validator("ca_file")
    @classmethod
    def _existing_file(cls, value: Path | None) -> Path | None:
        # Named at start-up rather than at the first call that needs it.
        if value is not None and not value.is_file():
            raise ValueError(f"{str(value)!r} is not a file")
        return value


class SipSettings(_Section):
    """Which SIP URIs reach which phone number."""

    domains: list[str] = Field(
        default_factory=list,
        description=(
            "Hosts this service answers for (request-URI host). Empty: any host, matching "
            "numbers by user part."
        ),
    )
    default_assistant_id: str | None = Field(
        None, description="Assistant for calls to a URI that matches no phone number (else 404)."
    )

    @field_validator("domains")
    @classmethod
    def _lowercase(cls, value: list[str]) -> list[str]:
        return [d.strip().lower() for d in value if d.strip()]


class ServiceSettings(_Section):
    """The process as a whole."""

    drain_timeout_s: float = Field(
        300.0, ge=0, description="On SIGTERM, how long live calls may continue before hang-up."
    )
    max_calls: int = Field(
        0,
        ge=0,
        description="Most calls at once (ringing or up); more are refused with SIP 503. "
        "0: no limit.",
    )
    max_event_loop_lag_ms: int = Field(
        100,
        ge=0,
        description="While the event loop runs at least this late for a whole second (the "
        "machine is saturated), new calls are refused with SIP 503 so that the calls already "
        "up keep their audio. 0: never.",
    )


class OutboundSettings(_Section):
    """Outbound calls (``POST /call``): which PBX places them, and the caps an operator sets."""

    pbx: Literal["asterisk", "freeswitch"] | None = Field(
        None,
        description="The PBX that places outbound calls. Default: the enabled one (Asterisk "
        "when both are).",
    )
    ring_timeout_s: int = Field(
        60, ge=1, le=600, description="How long a customer's phone may ring (Vapi: 60 s)."
    )
    max_concurrent: int = Field(
        10,
        ge=0,
        description="Most outbound calls at once (queued, ringing or up); more are refused "
        "with 429. 0: no limit.",
    )
    max_calls_per_second: float = Field(
        1.0,
        ge=0,
        description="Most outbound calls started per second; more are refused with 429. "
        "0: no limit.",
    )


class RecordingSettings(_Section):
    """Call recordings: a stereo WAV (caller left, assistant right) and a mono mix per call."""

    enabled_by_default: bool = Field(
        True,
        description="Record calls whose assistant does not say (artifactPlan.recordingEnabled); "
        "true is Vapi's default.",
    )
    path: Path | None = Field(
        None,
        description="Directory the recordings are kept in. Default: `recordings` next to "
        "store.path (the service's state lives together).",
    )
    retention_days: float = Field(
        30.0, ge=0, description="Recordings older than this are deleted. 0: kept."
    )
    max_total_mb: int = Field(
        0, ge=0, description="Beyond this much in recordings, the oldest are deleted. 0: no cap."
    )
    cleanup_interval_s: float = Field(
        3600.0, gt=0, description="How often retention and the size cap are applied."
    )
    public_url: str | None = Field(
        None,
        description="Base URL of the API as webhook receivers reach it, for the signed "
        "recording links in reports. Default: the API's own base URL.",
    )
    url_secret: SecretStr | None = Field(
        None,
        description="HMAC key signing recording links. Default: one generated with the "
        "database and kept in it.",
    )
    url_lifetime_s: int = Field(
        86400, ge=60, description="How long a signed recording link works after the report."
    )
    previous_url_secrets: list[SecretStr] = Field(
        default_factory=list,
        description="Keys that signed recording links before url_secret changed: the links "
        "they signed keep working until they expire (remove them url_lifetime_s after the "
        "change). The database's generated key is always accepted while url_secret is set.",
    )


class LogSettings(_Section):
    """Logging."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    format: Literal["text", "json"] = Field("text", description="Plain lines or one JSON per line.")


_toml_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("toml_file", default=None)


class Settings(BaseSettings):
    """The whole configuration, one sub-model per component."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        nested_model_default_partial_update=True,
        extra="forbid",
        frozen=True,
    )

    api: ApiSettings = ApiSettings()
    store: StoreSettings = StoreSettings()
    asterisk: AsteriskSettings = AsteriskSettings()
    freeswitch: FreeswitchSettings = FreeswitchSettings()
    media: MediaSettings = MediaSettings()
    pipeline: PipelineSettings = PipelineSettings()
    webhooks: WebhookSettings = WebhookSettings()
    tls: TlsSettings = TlsSettings()
    sip: SipSettings = SipSettings()
    service: ServiceSettings = ServiceSettings()
    recordings: RecordingSettings = RecordingSettings()
    outbound: OutboundSettings = OutboundSettings()
    log: LogSettings = LogSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = _toml_file.get()
        if toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ::1."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    for_service: bool = True,
) -> Settings:
    """Builds the effective settings from the environment, the TOML file and ``overrides``.

    Args:
        config_file: TOML file; when None, ``SIPBRIDGE_CONFIG`` names it (or there is none).
        overrides: nested values that beat everything else (the CLI's flags).
        for_service: also apply the rules a running service needs (:func:`check_consistency`);
            the CLI's client commands only need the API URL and key.

    Raises:
        ConfigError: naming every bad field at once.
    """
    if config_file is None and os.environ.get(CONFIG_FILE_ENV):
        config_file = Path(os.environ[CONFIG_FILE_ENV])
    if config_file is not None:
        if not config_file.is_file():
            raise ConfigError([f"config file {str(config_file)!r} does not exist"])
        try:
            tomllib.loads(config_file.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(
                [f"config file {str(config_file)!r} is not valid TOML: {exc}"]
            ) from exc
    token = _toml_file.set(config_file)
    try:
        try:
            settings = Settings(**dict(overrides or {}))
        except SettingsError as exc:
            # A list or table setting (SIPBRIDGE_SIP__DOMAINS) whose value is not JSON.
            raise ConfigError(describe_settings_error(exc)) from None
        except ValidationError as exc:
            problems = describe_validation_error(exc)
            if for_service:
                problems += _rules_beside(exc, overrides or {}, problems)
            raise ConfigError(problems) from None
    finally:
        _toml_file.reset(token)
    if for_service:
        check_consistency(settings)
    return settings


def _rules_beside(
    exc: ValidationError, overrides: Mapping[str, Any], reported: list[str]
) -> list[str]:
    """The cross-field problems that a field error hid, so one run names every bad field.

    The fields pydantic rejected are put back to their defaults (as overrides, which beat every
    source) and the rules are checked on what remains; rules about a rejected field are left out.
    """
    repaired: dict[str, dict[str, Any]] = {
        k: dict(v) for k, v in overrides.items() if isinstance(v, Mapping)
    }
    for error in exc.errors(include_url=False):
        location = error["loc"]
        if len(location) < 2 or not isinstance(location[0], str):
            return []
        info = _section_field(location[0], str(location[1]))
        if info is None:  # an unknown key: no default to put back
            return []
        repaired.setdefault(location[0], {})[str(location[1])] = info.get_default(
            call_default_factory=True
        )
    try:
        check_consistency(Settings(**{**dict(overrides), **repaired}))
    except (ValidationError, SettingsError):
        return []
    except ConfigError as rules:
        named = {line.split(":", 1)[0] for line in reported}
        return [line for line in rules.problems if line.split(":", 1)[0] not in named]
    return []


def _section_field(section_name: str, field_name: str) -> FieldInfo | None:
    """The field ``section_name.field_name`` of the settings, or None if there is none."""
    section_field = Settings.model_fields.get(section_name)
    section = section_field.annotation if section_field else None
    if not (isinstance(section, type) and issubclass(section, BaseModel)):
        return None
    return section.model_fields.get(field_name)


def describe_settings_error(exc: SettingsError) -> list[str]:
    """Names the variables behind a source error: a list or table value that is not JSON."""
    problems = []
    for name, value in sorted(os.environ.items()):
        if not name.upper().startswith(ENV_PREFIX) or name.upper() == CONFIG_FILE_ENV:
            continue
        parts = name[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2:
            continue
        info = _section_field(parts[0], parts[1])
        if info is None or not _is_complex(info.annotation):
            continue
        try:
            json.loads(value)
        except ValueError:
            problems.append(
                f'{parts[0]}.{parts[1]}: {name} must be JSON (a list like ["a", "b"] '
                'or a table like {"k": "v"})'
            )
    return problems or [str(exc)]


def _is_complex(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, dict, tuple, set):
        return True
    return any(_is_complex(arg) for arg in typing.get_args(annotation))


def check_consistency(settings: Settings) -> None:
    """Rules that span fields.

    Raises:
        ConfigError: naming every violated rule.
    """
    problems: list[str] = []
    if settings.api.key is None and not settings.api.lab_mode:
        problems.append(
            "api.key: required (set SIPBRIDGE_API__KEY), or run in lab mode on a loopback address"
        )
    if settings.api.lab_mode and not is_loopback(settings.api.host):
        problems.append(
            "api.lab_mode: only allowed when api.host is a loopback address, "
            f"not {settings.api.host!r}"
        )
    if settings.api.key is not None and len(settings.api.key.get_secret_value()) < 16:
        problems.append("api.key: must be at least 16 characters")
    if settings.asterisk.enabled and settings.asterisk.secret is None:
        problems.append("asterisk.secret: required when asterisk.enabled is true")
    if settings.freeswitch.enabled and settings.freeswitch.password is None:
        problems.append("freeswitch.password: required when freeswitch.enabled is true")
    for name, url in (
        ("pipeline.default_url", settings.pipeline.default_url),
        ("webhooks.default_server_url", settings.webhooks.default_server_url),
        ("api.url", settings.api.url),
    ):
        if url is None:
            continue
        schemes = ("ws://", "wss://") if name.startswith("pipeline") else ("http://", "https://")
        if not url.startswith(schemes):
            problems.append(f"{name}: must start with {' or '.join(schemes)}")
    if problems:
        raise ConfigError(problems)


def describe_validation_error(exc: ValidationError) -> list[str]:
    """One line per problem, ``dotted.field: message``, without pydantic's URLs."""
    lines = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "(settings)"
        lines.append(f"{where}: {error['msg']}")
    return lines


def api_base_url(settings: Settings) -> str:
    """The URL the CLI uses to reach the API."""
    if settings.api.url:
        return settings.api.url.rstrip("/")
    host = settings.api.host
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind is reached over loopback
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.api.port}"


def recordings_directory(settings: Settings) -> Path:
    """Where recordings are kept: as set, else a ``recordings`` directory beside the store."""
    if settings.recordings.path is not None:
        return settings.recordings.path
    return settings.store.path.parent / "recordings"


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as plain data with every secret shown as ``**********``."""
    data: dict[str, Any] = settings.model_dump(mode="python")

    def mask(value: Any) -> Any:
        if isinstance(value, SecretStr):
            return "**********"
        if isinstance(value, dict):
            return {k: mask(v) for k, v in value.items()}
        if isinstance(value, list):
            return [mask(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        return value

    return {k: mask(v) for k, v in data.items()}


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "").replace("pydantic.types.", "")
    # Python 3.13 spells Path pathlib._local.Path.
    text = text.replace("pathlib._local.", "").replace("pathlib.", "").replace("NoneType", "None")
    return text.replace("|", "\\|")


def reference_markdown() -> str:
    """The configuration reference table, generated from the settings models.

    ``docs/configuration.md`` embeds it between ``<!-- settings:begin -->`` and
    ``<!-- settings:end -->``; ``tests/test_settings.py`` checks the copy is current.
    """
    lines = []
    for section_name, section_field in Settings.model_fields.items():
        section = section_field.annotation
        assert isinstance(section, type) and issubclass(section, BaseModel)
        lines.append(f"### `[{section_name}]` {(section.__doc__ or '').strip()}")
        lines.append("")
        lines.append("| setting | environment variable | type | default | meaning |")
        lines.append("|---|---|---|---|---|")
        for name, info in section.model_fields.items():
            default = info.get_default(call_default_factory=True)
            shown = "(unset)" if default is None else json_default(default)
            env = f"{ENV_PREFIX}{section_name.upper()}__{name.upper()}"
            lines.append(
                f"| `{section_name}.{name}` | `{env}` | {_type_name(info.annotation)} | "
                f"`{shown}` | {info.description or ''} |"
            )
        lines.append("")
    return "\n".join(lines)


def json_default(value: Any) -> str:
    """A default value as it would be written in TOML or JSON."""
    if isinstance(value, Path):
        return str(value)
    return json.dumps(value)
