"""The TLS context of every connection sipbridge opens (pipelines' wss://, servers' https://).

Verification is always on: the system's trust store (OpenSSL's default paths, what websockets
and aiohttp use when given no context) plus, for companies with their own PKI, the CA
certificates of ``tls.ca_file``. There is deliberately no switch to turn verification off.
"""

from __future__ import annotations

import ssl

from bridge.errors import ConfigError
from bridge.settings import TlsSettings


def client_context(settings: TlsSettings) -> ssl.SSLContext:
    """A verifying client context trusting the system's CAs and ``settings.ca_file``'s.

    Raises:
        ConfigError: ``ca_file`` holds no usable PEM certificate.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if settings.ca_file is not None:
        try:
            context.load_verify_locations(cafile=settings.ca_file)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise ConfigError(
                [f"tls.ca_file: cannot load CA certificates from {settings.ca_file}: {exc}"]
            ) from exc
    return context
