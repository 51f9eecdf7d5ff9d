"""A small synchronous client for sipbridge's API, used by the CLI."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

from bridge import __version__
from bridge.errors import ApiClientError

# Read and written at a time by downloads (recordings are megabytes).
DOWNLOAD_BLOCK_BYTES = 64 * 1024


class ApiClient:
    """Calls the API at ``base_url`` with an optional bearer ``api_key``."""

    def __init__(self, base_url: str, api_key: str | None, timeout_s: float = 15.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._timeout_s = timeout_s

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, str] | None = None,
    ) -> Any:
        """Sends one request and returns the decoded JSON answer.

        Raises:
            ApiClientError: the service is unreachable or answered with an error.
        """
        data = json.dumps(body).encode() if body is not None else None
        with self._open(method, path, data, query, "application/json") as response:
            payload = self._read(response.read)
        if not payload:
            return None
        try:
            return json.loads(payload)
        except ValueError:
            raise ApiClientError(f"{method} {path}: the answer is not JSON") from None

    def download(self, path: str, query: Mapping[str, str], destination: BinaryIO) -> int:
        """GETs a file (a recording) into ``destination`` a block at a time; the bytes written.

        Raises:
            ApiClientError: the service is unreachable or answered with an error.
        """
        written = 0
        with self._open("GET", path, None, query, "*/*") as response:
            while block := self._read(lambda: response.read(DOWNLOAD_BLOCK_BYTES)):
                destination.write(block)
                written += len(block)
        return written

    def _open(
        self,
        method: str,
        path: str,
        data: bytes | None,
        query: Mapping[str, str] | None,
        accept: str,
    ) -> Any:
        url = self.base_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        headers = {"Accept": accept, "User-Agent": f"sipbridge-cli/{__version__}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        try:
            request = urllib.request.Request(url, data=data, method=method, headers=headers)  # noqa: S310 - the URL is the operator's
        except ValueError as exc:
            raise ApiClientError(f"cannot call {url!r}: {exc}") from None
        try:
            return urllib.request.urlopen(request, timeout=self._timeout_s)  # noqa: S310
        except urllib.error.HTTPError as exc:
            raise ApiClientError(_error_text(exc), status_code=exc.code) from None
        except (urllib.error.URLError, OSError) as exc:
            raise self._unreachable(exc) from None

    def _read(self, read: Callable[[], bytes]) -> bytes:
        try:
            return read()
        except OSError as exc:
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: OSError) -> ApiClientError:
        reason = getattr(exc, "reason", exc)
        return ApiClientError(f"cannot reach sipbridge at {self.base_url}: {reason}")


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read() or b"{}")
    except ValueError:
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    if isinstance(message, list):
        message = "; ".join(str(m) for m in message)
    return f"HTTP {exc.code}: {message or exc.reason}"
