"""The PBX backends, and the one factory that builds the enabled ones.

Each PBX is a package here whose backend implements :class:`bridge.backend.PbxBackend`: its
control link and its media transport, built from its settings section. The composition root
only calls :func:`build_backends`; adding a PBX is a package, its settings section, and one
line in ``_BUILDERS`` (``docs/architecture.md``).
"""

from __future__ import annotations

from collections.abc import Callable

from bridge.backend import PbxBackend
from bridge.pbx.asterisk.backend import AsteriskBackend
from bridge.pbx.freeswitch.backend import FreeswitchBackend
from bridge.settings import Settings


def _asterisk(settings: Settings) -> PbxBackend | None:
    return AsteriskBackend(settings.asterisk, settings.media) if settings.asterisk.enabled else None


def _freeswitch(settings: Settings) -> PbxBackend | None:
    if not settings.freeswitch.enabled:
        return None
    return FreeswitchBackend(settings.freeswitch, settings.media)


_BUILDERS: tuple[Callable[[Settings], PbxBackend | None], ...] = (_asterisk, _freeswitch)


def build_backends(settings: Settings) -> list[PbxBackend]:
    """The backends of the PBXes the settings enable, in start order."""
    return [backend for build in _BUILDERS if (backend := build(settings)) is not None]
