"""A small KServe v2 client for cloud segments (standard library HTTP, binary tensors)."""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import threading
import time
import urllib.parse
from typing import Any

import numpy as np

from ..errors import RuntimeFailure, UsageError
from ..protocol import HEADER_LENGTH, ProtocolError, decode, encode


class CloudUnavailable(RuntimeFailure):
    """The cloud could not be reached or did not answer in time (a fallback may apply)."""


@dataclasses.dataclass(frozen=True)
class LinkShaper:
    """Emulates a slower link in the client: each call waits one RTT plus bytes / bandwidth."""

    bandwidth_bps: float
    rtt_ms: float

    def delay(self, nbytes: int) -> None:
        time.sleep(self.rtt_ms / 1e3 + nbytes * 8 / self.bandwidth_bps)


class CloudClient:
    """Calls ``POST /v2/models/{name}/versions/{v}/infer`` with binary tensors in and out."""

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0, shaper: LinkShaper | None = None):
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise UsageError(f"cloud URL {url!r} must look like http://HOST:PORT")
        self.url = url
        self._scheme, self._host, self._port = u.scheme, u.hostname, u.port
        self._prefix = u.path.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.shaper = shaper
        self._local = threading.local()

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self.timeout)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def infer(self, model: str, version: str, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
        """Run a served segment; returns its outputs and the bytes sent."""
        body, headers = encode(feeds, binary=True, parameters={"binary_data_output": True})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        path = f"{self._prefix}/v2/models/{model}/versions/{version}/infer"
        status, resp_headers, data = self._request("POST", path, body, headers)
        if status != 200:
            msg = _error_text(data)
            if status in (502, 503, 504):
                raise CloudUnavailable(f"cloud at {self.url} answered {status}: {msg}")
            raise RuntimeFailure(f"cloud at {self.url} refused {model}/{version} ({status}): {msg}")
        try:
            _, outs = decode(data, resp_headers.get(HEADER_LENGTH.lower()), key="outputs")
        except ProtocolError as e:
            raise RuntimeFailure(f"cloud at {self.url} sent a malformed reply: {e}") from e
        if self.shaper:
            self.shaper.delay(len(body) + len(data))
        return outs, len(body)

    def _request(self, method: str, path: str, body: bytes, headers: dict[str, str]):
        for attempt in (0, 1):  # a kept-alive connection the server closed is retried once, fresh
            conn = self._conn()
            try:
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
            except (ConnectionError, http.client.HTTPException, socket.timeout, OSError) as e:
                self._drop()
                if attempt == 1 or isinstance(e, (socket.timeout, ConnectionRefusedError)):
                    raise CloudUnavailable(f"cloud at {self.url} is unreachable: {e or type(e).__name__}") from e
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._drop()


def _error_text(data: bytes) -> str:
    try:
        doc: Any = json.loads(data)
        return str(doc.get("error", doc))[:300]
    except ValueError:
        return data[:300].decode(errors="replace")
