from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import annotated_types
import pytest
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from bridge.errors import ConfigError
from bridge.settings import (
    Settings,
    api_base_url,
    is_loopback,
    load_settings,
    masked,
    recordings_directory,
    reference_markdown,
)

KEY = "k" * 20


def test_defaults_need_a_key_or_lab_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert any(p.startswith("api.key:") for p in caught.value.problems)
    settings = load_settings(overrides={"api": {"lab_mode": True}})
    assert settings.api.lab_mode and settings.api.key is None


def test_environment_prefix_and_nesting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIPBRIDGE_API__KEY", KEY)
    monkeypatch.setenv("SIPBRIDGE_API__PORT", "9123")
    monkeypatch.setenv("SIPBRIDGE_SIP__DOMAINS", '["SIP.Example.com", "pbx.example.org"]')
    monkeypatch.setenv("SIPBRIDGE_WEBHOOKS__MAX_RETRIES", "5")
    settings = load_settings()
    assert settings.api.port == 9123
    assert settings.api.key is not None and settings.api.key.get_secret_value() == KEY
    assert settings.sip.domains == ["sip.example.com", "pbx.example.org"]
    assert settings.webhooks.max_retries == 5


def test_toml_file_below_environment_below_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "sipbridge.toml"
    config.write_text(
        f'[api]\nkey = "{KEY}"\nport = 7000\nhost = "127.0.0.2"\n[store]\npath = "/tmp/x.db"\n'
    )
    monkeypatch.setenv("SIPBRIDGE_API__PORT", "7001")
    settings = load_settings(config, {"api": {"host": "127.0.0.3"}})
    assert settings.api.port == 7001  # env beats TOML
    assert settings.api.host == "127.0.0.3"  # flags beat env
    assert str(settings.store.path) == "/tmp/x.db"  # TOML beats defaults
    assert settings.api.key is not None


def test_config_file_from_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'[api]\nkey = "{KEY}"\nport = 7100\n')
    monkeypatch.setenv("SIPBRIDGE_CONFIG", str(config))
    assert load_settings().api.port == 7100


def test_every_bad_field_is_named_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[api]\nport = 99999\nbogus = 1\n[webhooks]\nmax_retries = "many"\n')
    monkeypatch.setenv("SIPBRIDGE_LOG__LEVEL", "LOUD")
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    problems = caught.value.problems
    assert any(p.startswith("api.port:") for p in problems)
    assert any(p.startswith("api.bogus:") for p in problems)
    assert any(p.startswith("webhooks.max_retries:") for p in problems)
    assert any(p.startswith("log.level:") for p in problems)
    assert "https://errors.pydantic.dev" not in str(caught.value)


def test_a_field_error_does_not_hide_a_rule_that_spans_fields(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No key and a bad port: both are named, not only the port.
    monkeypatch.setenv("SIPBRIDGE_API__PORT", "x")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    fields = [problem.split(":", 1)[0] for problem in caught.value.problems]
    assert fields == ["api.port", "api.key"], caught.value.problems


def test_a_list_setting_that_is_not_json_names_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SIPBRIDGE_SIP__DOMAINS", "sip.example.com")
    monkeypatch.setenv("SIPBRIDGE_PIPELINE__DEFAULT_HEADERS", '{"Authorization": "Bearer t"}')
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith("sip.domains: SIPBRIDGE_SIP__DOMAINS must be JSON")


def test_missing_and_malformed_config_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text("[api\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(broken)


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(
            overrides={
                "api": {"lab_mode": True, "host": "0.0.0.0"},
                "asterisk": {"enabled": True},
                "freeswitch": {"enabled": True},
                "pipeline": {"default_url": "http://not-a-websocket"},
                "webhooks": {"default_server_url": "ftp://x"},
            }
        )
    text = " | ".join(caught.value.problems)
    for field in (
        "api.lab_mode",
        "asterisk.secret",
        "freeswitch.password",
        "pipeline.default_url",
        "webhooks.default_server_url",
    ):
        assert field in text
    with pytest.raises(ConfigError, match="at least 16"):
        load_settings(overrides={"api": {"key": "short"}})


def test_client_commands_skip_service_rules() -> None:
    settings = load_settings(for_service=False)
    assert settings.api.key is None


def test_masked_hides_every_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIPBRIDGE_API__KEY", KEY)
    monkeypatch.setenv("SIPBRIDGE_ASTERISK__SECRET", "ami-secret")
    monkeypatch.setenv("SIPBRIDGE_WEBHOOKS__SIGNING_SECRET", "hmac-secret")
    monkeypatch.setenv("SIPBRIDGE_PIPELINE__DEFAULT_HEADERS", '{"Authorization": "Bearer tok"}')
    shown = repr(masked(load_settings()))
    assert KEY not in shown and "ami-secret" not in shown and "hmac-secret" not in shown
    assert "Bearer tok" not in shown
    assert shown.count("**********") == 4


def test_loopback_and_base_url() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.8.9.1") and is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("pbx")
    wildcard = load_settings(
        overrides={"api": {"host": "0.0.0.0", "port": 8123}}, for_service=False
    )
    assert api_base_url(wildcard) == "http://127.0.0.1:8123"
    v6 = load_settings(overrides={"api": {"host": "::1", "port": 8123}}, for_service=False)
    assert api_base_url(v6) == "http://[::1]:8123"


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md embeds the generated table for every setting, unchanged."""
    page = (Path(__file__).parent.parent / "docs" / "configuration.md").read_text()
    embedded = page.split("<!-- settings:begin -->\n", 1)[1].split("<!-- settings:end -->", 1)[0]
    assert embedded == reference_markdown()
    for section, info in Settings.model_fields.items():
        assert isinstance(info.annotation, type)
        for name in info.annotation.model_fields:
            assert f"| `{section}.{name}` |" in embedded


def setting_fields(
    model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], FieldInfo]]:
    """Every leaf setting of ``model``, found by walking the models (none listed by hand)."""
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from setting_fields(annotation, (*prefix, name))
        else:
            yield (*prefix, name), info


def bounded(info: FieldInfo, candidates: list[Any]) -> Any:
    """The first candidate that is not the default and within the field's bounds."""
    default = info.get_default(call_default_factory=True)
    for value in candidates:
        within = all(
            (not isinstance(c, annotated_types.Ge) or value >= c.ge)
            and (not isinstance(c, annotated_types.Gt) or value > c.gt)
            and (not isinstance(c, annotated_types.Le) or value <= c.le)
            and (not isinstance(c, annotated_types.Lt) or value < c.lt)
            for c in info.metadata
        )
        if within and value != default:
            return value
    raise AssertionError(f"no value for {info}")


def other_value(info: FieldInfo, existing_file: Path) -> Any:
    """A valid value of ``info`` other than its default, as plain data."""
    annotation: Any = info.annotation
    choices = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = choices[0]
    default = info.get_default(call_default_factory=True)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return next(c for c in typing.get_args(annotation) if c != default)
    if origin is dict:
        return {"X-Test": "value"}
    if origin is list:
        return ["sip.example.com"]
    if annotation is bool:
        return not default
    if annotation is int:
        return bounded(info, [default + 1, default - 1])
    if annotation is float:
        return bounded(info, [default * 2, default / 2])
    if annotation is SecretStr:
        return "secret-0123456789abcdef"
    if annotation is Path or typing.get_origin(annotation) is typing.Annotated:  # FilePath
        return str(existing_file)
    if annotation is str:
        pattern = next((c.pattern for c in info.metadata if hasattr(c, "pattern")), None)
        value = "other_value_1"
        assert pattern is None or re.fullmatch(pattern, value)
        return value
    raise AssertionError(f"a value for settings of type {annotation} is needed here")


def loaded(settings: Settings, path: tuple[str, ...]) -> Any:
    """The value at ``path`` as plain data (secrets revealed, paths as text)."""
    value: Any = settings
    for name in path:
        value = getattr(value, name)
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {
            k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in value.items()
        }
    if isinstance(value, list):
        return [v.get_secret_value() if isinstance(v, SecretStr) else v for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
        )
    return json.dumps(value)  # strings, numbers and lists of strings are spelled alike


def env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


@pytest.fixture
def every_setting(ca_file: Path) -> dict[tuple[str, ...], Any]:
    """A valid value other than the default for every setting."""
    values = {path: other_value(info, ca_file) for path, info in setting_fields()}
    assert len(values) > 60 and ("pipeline", "default_sample_rate") in values
    return values


def test_every_setting_can_be_set_from_the_environment(
    every_setting: dict[tuple[str, ...], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for path, value in every_setting.items():
        monkeypatch.setenv("SIPBRIDGE_" + "__".join(path).upper(), env_value(value))
    settings = load_settings(for_service=False)
    assert {path: loaded(settings, path) for path in every_setting} == every_setting


def test_every_setting_can_be_set_from_the_toml_file(
    every_setting: dict[tuple[str, ...], Any], tmp_path: Path
) -> None:
    sections: dict[str, list[str]] = {}
    for (section, name), value in every_setting.items():
        sections.setdefault(section, []).append(f"{name} = {toml_value(value)}")
    config = tmp_path / "every.toml"
    config.write_text(
        "".join(f"[{s}]\n" + "\n".join(lines) + "\n" for s, lines in sections.items())
    )
    settings = load_settings(config, for_service=False)
    assert {path: loaded(settings, path) for path in every_setting} == every_setting


def test_integer_choices_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIPBRIDGE_PIPELINE__DEFAULT_SAMPLE_RATE", "8000")
    assert load_settings(for_service=False).pipeline.default_sample_rate == 8000
    monkeypatch.setenv("SIPBRIDGE_PIPELINE__DEFAULT_SAMPLE_RATE", "8001")
    with pytest.raises(ConfigError) as caught:
        load_settings(for_service=False)
    assert caught.value.problems == [
        "pipeline.default_sample_rate: Input should be 8000, 16000 or 24000"
    ]


def test_recordings_live_beside_the_store_unless_placed() -> None:
    beside = load_settings(None, {"api": {"lab_mode": True}, "store": {"path": "/var/lib/x/db"}})
    assert recordings_directory(beside) == Path("/var/lib/x/recordings")
    placed = load_settings(None, {"api": {"lab_mode": True}, "recordings": {"path": "/rec"}})
    assert recordings_directory(placed) == Path("/rec")
