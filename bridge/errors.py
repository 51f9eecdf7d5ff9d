"""Every exception sipbridge raises on purpose.

::

    SipbridgeError
    ├── ConfigError               settings are invalid; the program exits with code 2
    ├── ResourceError             a request about an API resource cannot be served
    │   ├── ValidationFailed      the body breaks the schema (HTTP 400, one line per problem)
    │   │   └── Conflict          a unique field (sipUri) is already taken (HTTP 400)
    │   ├── NotFound              no resource with that id (HTTP 404)
    │   ├── CallStillLive         the call has not ended: it cannot be deleted (HTTP 409)
    │   └── CallRefused           an outbound call cannot be placed now (HTTP 429 or 503)
    ├── StoreError                the database failed (retryable)
    ├── ProtocolError             a wire format was violated
    │   ├── LocalProtocolError    we were about to send something invalid (a bug on our side)
    │   └── RemoteProtocolError   the peer sent something invalid
    ├── PbxError                  talking to Asterisk or FreeSWITCH failed
    │   ├── PbxConnectionError    the control link is down (retryable)
    │   ├── PbxAuthError          the PBX refused our credentials (never retried)
    │   └── PbxActionError        one action failed or timed out
    ├── TemplateLimitError        a template went over a rendering limit (it is then used literally)
    ├── MediaError                a call's audio leg failed
    ├── PipelineError             the conversational pipeline's websocket failed
    ├── WebhookError              a server message could not be delivered
    └── ApiClientError            the CLI got an error answer from the service

``retryable`` says whether trying the same thing again later can succeed.
"""

from __future__ import annotations


class SipbridgeError(Exception):
    """Base class of every error sipbridge raises on purpose."""

    retryable: bool = False


class ConfigError(SipbridgeError):
    """The effective settings are invalid.

    Args:
        problems: one human-readable line per bad field, e.g. ``"api.port: must be <= 65535"``.
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings: " + "; ".join(problems))


class ResourceError(SipbridgeError):
    """A request about an API resource cannot be served."""


class ValidationFailed(ResourceError):
    """A resource body breaks the schema.

    Args:
        problems: one line per problem, naming the field (``"sipUri: must be a SIP URI ..."``).
    """

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


class Conflict(ValidationFailed):
    """A field that must be unique is already used by another resource."""


class NotFound(ResourceError):
    """No resource of that kind has that id."""

    def __init__(self, kind: str, resource_id: str) -> None:
        self.kind = kind
        self.resource_id = resource_id
        super().__init__(f"{kind} {resource_id!r} not found")


class CallStillLive(ResourceError):
    """The call has not ended (it rings, is up, or is still ending): it cannot be deleted."""

    def __init__(self, call_id: str) -> None:
        self.call_id = call_id
        super().__init__(f"call {call_id!r} has not ended")


class CallRefused(ResourceError):
    """An outbound call cannot be placed now (``POST /call``).

    Args:
        status: the HTTP status: 429 for a cap reached (try later), 503 for no PBX able to
            place calls or an overloaded service.
    """

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


class StoreError(SipbridgeError):
    """The database failed; the same operation may succeed later."""

    retryable = True


class ProtocolError(SipbridgeError):
    """A wire format was violated (abstract: raise one of the two subclasses)."""


class LocalProtocolError(ProtocolError):
    """We were about to send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol does not allow."""


class PbxError(SipbridgeError):
    """Talking to the PBX failed."""


class PbxConnectionError(PbxError):
    """The PBX control link is down or could not be opened."""

    retryable = True


class PbxAuthError(PbxError):
    """The PBX refused our credentials. Retrying with the same ones cannot help."""


class PbxActionError(PbxError):
    """One PBX action failed or did not answer in time."""


class TemplateLimitError(SipbridgeError):
    """A template went over one of the renderer's limits; the message names the limit, no values.

    Never leaves ``templating.render``: the template is then used literally.
    """


class MediaError(SipbridgeError):
    """A call's audio leg failed."""


class PipelineError(SipbridgeError):
    """The conversational pipeline's websocket failed."""


class WebhookError(SipbridgeError):
    """A server message could not be delivered.

    Args:
        message: what went wrong.
        retryable: True for connection errors, timeouts and 5xx answers.
        status_code: the HTTP status when the server answered.
    """

    def __init__(self, message: str, *, retryable: bool, status_code: int | None = None) -> None:
        self.retryable = retryable
        self.status_code = status_code
        super().__init__(message)


class ApiClientError(SipbridgeError):
    """The service answered the CLI with an error, or could not be reached."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)
