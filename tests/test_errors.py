from __future__ import annotations

from bridge import errors


def test_retryable_errors() -> None:
    assert errors.StoreError("x").retryable
    assert errors.PbxConnectionError("x").retryable
    assert not errors.PbxAuthError("x").retryable
    assert errors.WebhookError("x", retryable=True, status_code=503).retryable
    assert not errors.WebhookError("x", retryable=False, status_code=400).retryable


def test_every_error_is_a_sipbridge_error_and_listed_in_the_tree() -> None:
    tree = errors.__doc__ or ""
    for name in dir(errors):
        value = getattr(errors, name)
        if (
            isinstance(value, type)
            and issubclass(value, Exception)
            and value.__module__ == errors.__name__
        ):
            assert issubclass(value, errors.SipbridgeError)
            assert name in tree, f"{name} is missing from the tree in the docstring"


def test_messages_name_the_problem() -> None:
    assert str(errors.ConfigError(["a: bad", "b: worse"])) == "invalid settings: a: bad; b: worse"
    assert str(errors.NotFound("Assistant", "x1")) == "Assistant 'x1' not found"
    assert isinstance(errors.Conflict(["sipUri: taken"]), errors.ValidationFailed)
