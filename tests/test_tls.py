"""The client TLS context: always verifying, the system's CAs plus tls.ca_file's."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from bridge.errors import ConfigError
from bridge.settings import TlsSettings
from bridge.tls import client_context


def test_verification_is_on_with_or_without_a_private_ca(ca_file: Path) -> None:
    for settings in (TlsSettings(), TlsSettings(ca_file=ca_file)):
        context = client_context(settings)
        assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_the_private_ca_is_trusted_besides_the_system_ones(ca_file: Path) -> None:
    def ours(context: ssl.SSLContext) -> list[object]:
        # get_ca_certs() lists certificates loaded from files; trustme names its CAs so.
        return [c for c in context.get_ca_certs() if "Testing CA" in str(c["subject"])]

    assert ours(client_context(TlsSettings())) == []
    assert len(ours(client_context(TlsSettings(ca_file=ca_file)))) == 1


def test_a_file_without_certificates_is_a_config_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(ConfigError) as caught:
        client_context(TlsSettings(ca_file=junk))
    assert caught.value.problems[0].startswith(
        f"tls.ca_file: cannot load CA certificates from {junk}"
    )
