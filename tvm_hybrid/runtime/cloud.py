"""A KServe v2 client for cloud segments: standard-library HTTP, binary tensors, and the hardening
an edge device needs against a cloud that is slow, down or restarting.

Every call is bounded by ``CloudPolicy.budget`` seconds (connect, send, wait, read, retries and
backoff together); connection errors and 503/502 are retried with jittered exponential backoff;
after ``breaker_failures`` failed calls in a row a circuit breaker skips the cloud for
``breaker_cooldown`` seconds, then lets one trial call through (half-open) and closes on success.
"""

from __future__ import annotations

import dataclasses
import http.client
import io
import json
import logging
import random
import socket
import threading
import time
import urllib.parse
from typing import Any

import numpy as np

from ..errors import RuntimeFailure, UsageError, one_line
from ..protocol import COMPUTE_HEADER, HEADER_LENGTH, LOAD_HEADER, QUEUE_HEADER, ProtocolError, decode, encode

log = logging.getLogger(__name__)

_RETRY_STATUS = (502, 503)  # the server (or a proxy in front of it) says: not now, try again


class CloudUnavailable(RuntimeFailure):
    """The cloud could not be reached or did not answer in time (a fallback may apply)."""


def wire_version(version: str) -> str:
    """The version as sent on the wire: Triton needs integer versions, so a hexadecimal content
    hash (the manifest's form) travels as its decimal value; ``tvm-hybrid serve`` accepts both."""
    if version.isdigit():
        return version
    try:
        return str(int(version, 16))
    except ValueError:
        return version


@dataclasses.dataclass(frozen=True)
class LinkShaper:
    """Emulates a slower link in the client: each call waits one RTT plus bytes / bandwidth."""

    bandwidth_bps: float
    rtt_ms: float

    def delay(self, nbytes: int) -> None:
        time.sleep(self.rtt_ms / 1e3 + nbytes * 8 / self.bandwidth_bps)


@dataclasses.dataclass(frozen=True)
class CloudPolicy:
    """How patiently the client talks to the cloud (seconds unless named otherwise)."""

    budget: float = 30.0  # the most one infer() call may take, everything included
    connect_timeout: float = 3.0  # per TCP connect
    read_timeout: float = 30.0  # per wait for bytes from the server
    retries: int = 2  # extra attempts after a connection error or a 503/502
    backoff: float = 0.05  # first wait before a retry; doubles each time, with jitter
    backoff_max: float = 1.0
    breaker_failures: int = 3  # failed calls in a row that open the circuit breaker
    breaker_cooldown: float = 10.0  # how long an open breaker skips the cloud

    def __post_init__(self):
        for f in ("budget", "connect_timeout", "read_timeout"):
            if not getattr(self, f) > 0:
                raise UsageError(f"cloud {f} must be more than 0 seconds, got {getattr(self, f)}")
        if self.retries < 0 or self.breaker_failures < 1 or self.breaker_cooldown < 0 or self.backoff < 0:
            raise UsageError("cloud retries and backoff must be >= 0, breaker_failures >= 1")


class CircuitBreaker:
    """closed → (N failures in a row) → open → (cool-down) → half-open → closed or open again."""

    def __init__(self, failures: int, cooldown: float):
        self.failures, self.cooldown = failures, cooldown
        self._lock = threading.Lock()
        self._count = 0
        self._opened_at: float | None = None
        self._trial = False  # a half-open trial call is under way

    @property
    def state(self) -> str:
        with self._lock:
            if self._opened_at is None:
                return "closed"
            return "half-open" if time.monotonic() - self._opened_at >= self.cooldown else "open"

    def admit(self) -> float | None:
        """None if a call may go; else the seconds left until the breaker lets one through."""
        with self._lock:
            if self._opened_at is None:
                return None
            left = self._opened_at + self.cooldown - time.monotonic()
            if left > 0:
                return left
            if self._trial:
                return 0.0  # one trial at a time; the others keep skipping the cloud
            self._trial = True
            return None

    def success(self) -> None:
        with self._lock:
            if self._opened_at is not None:
                log.warning("cloud is back: circuit breaker closed")
            self._count, self._opened_at, self._trial = 0, None, False

    def failure(self) -> None:
        with self._lock:
            self._count += 1
            if self._opened_at is not None or self._count >= self.failures:
                if self._opened_at is None or self._trial:
                    log.warning("cloud failed %d call(s) in a row: skipping it for %.1f s", self._count, self.cooldown)
                self._opened_at, self._trial = time.monotonic(), False


@dataclasses.dataclass(frozen=True)
class Exchange:
    """One infer as the client saw it: wall time, bytes each way, and (where the server reports
    them: tvm-hybrid serve) the milliseconds it waited for a worker and computed."""

    ms: float
    bytes_up: int
    bytes_down: int
    compute_ms: float | None = None
    queue_ms: float | None = None


class CloudClient:
    """Calls ``POST /v2/models/{name}/versions/{v}/infer`` with binary tensors in and out.

    Thread-safe: one keep-alive connection per calling thread, one breaker for the client.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float | None = None,
                 shaper: LinkShaper | None = None, policy: CloudPolicy | None = None):  # fmt: skip
        u = urllib.parse.urlsplit(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise UsageError(f"cloud URL {url!r} must look like http://HOST:PORT")
        if policy is None:
            policy = CloudPolicy() if timeout is None else CloudPolicy(budget=timeout, read_timeout=timeout)
        self.url = url
        self._scheme, self._host, self._port = u.scheme, u.hostname, u.port
        self._prefix = u.path.rstrip("/")
        self.token = token
        self.policy = policy
        self.shaper = shaper
        self.breaker = CircuitBreaker(policy.breaker_failures, policy.breaker_cooldown)
        self._local = threading.local()

    @property
    def timeout(self) -> float:
        return self.policy.budget

    def infer(self, model: str, version: str, feeds: dict[str, np.ndarray],
              parameters: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], int]:  # fmt: skip
        """Run a served segment; returns its outputs and the bytes sent. ``parameters``: request
        parameters beside the binary-output one (a decoder's sequence_id, sequence_start …).

        Raises CloudUnavailable when the cloud cannot answer within the budget (or the breaker is
        open), RuntimeFailure when it answers with an error."""
        deadline = time.monotonic() + self.policy.budget
        wait = self.breaker.admit()
        if wait is not None:
            raise CloudUnavailable(f"cloud at {self.url} is skipped after repeated failures (circuit breaker open, "
                                   f"next try in {wait:.1f} s)")  # fmt: skip
        body, headers = encode(feeds, binary=True, parameters={"binary_data_output": True, **(parameters or {})})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        path = f"{self._prefix}/v2/models/{model}/versions/{wire_version(version)}/infer"
        t0 = time.perf_counter()
        try:
            status, resp_headers, data = self._request("POST", path, body, headers, deadline)
        except CloudUnavailable:
            self.breaker.failure()
            raise
        if status != 200:
            msg = _error_text(data)
            if status >= 500:  # the cloud is unwell: counts towards the breaker
                self.breaker.failure()
                cls = CloudUnavailable if status in (*_RETRY_STATUS, 504) else RuntimeFailure
                raise cls(f"cloud at {self.url} failed {model}/{version} ({status}): {msg}")
            self.breaker.success()  # the cloud is up; the request was wrong
            raise RuntimeFailure(f"cloud at {self.url} refused {model}/{version} ({status}): {msg}")
        try:
            _, outs = decode(data, resp_headers.get(HEADER_LENGTH.lower()), key="outputs")
        except ProtocolError as e:
            self.breaker.failure()
            raise RuntimeFailure(f"cloud at {self.url} sent a malformed reply: {e}") from e
        self.breaker.success()
        if self.shaper:
            self.shaper.delay(len(body) + len(data))
        self._local.last = Exchange((time.perf_counter() - t0) * 1e3, len(body), len(data),
                                    _seconds(resp_headers.get(COMPUTE_HEADER.lower())),
                                    _seconds(resp_headers.get(QUEUE_HEADER.lower())))  # fmt: skip
        return outs, len(body)

    @property
    def last_exchange(self) -> Exchange | None:
        """The calling thread's last successful infer."""
        return getattr(self._local, "last", None)

    def ping(self, timeout: float = 2.0) -> tuple[float, dict[str, Any]]:
        """``GET /v2/health/ready`` on a connection of its own: (round trip ms, the server's load,
        {"in_flight", "workers"}, empty where the server does not report it). Raises
        CloudUnavailable when it does not answer ready within ``timeout`` seconds."""
        conn = getattr(self._local, "ping_conn", None)
        if conn is None:
            conn = self._local.ping_conn = self._new_conn(timeout, timeout)
        conn.deadline = time.monotonic() + timeout
        t0 = time.perf_counter()
        try:
            if conn.sock is None:
                conn.connect()
                t0 = time.perf_counter()  # the handshake is not the round trip a request pays
            conn.request("GET", f"{self._prefix}/v2/health/ready",
                         headers={"Authorization": f"Bearer {self.token}"} if self.token else {})  # fmt: skip
            resp = conn.getresponse()
            data = resp.read()
            load = resp.getheader(LOAD_HEADER)
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            self._local.ping_conn = None
            raise CloudUnavailable(f"cloud at {self.url} did not answer a ping: {one_line(e, 200)}") from e
        if resp.status != 200:
            raise CloudUnavailable(f"cloud at {self.url} is not ready ({resp.status}): {_error_text(data)}")
        try:
            in_flight, workers = (int(x) for x in load.split("/")) if load else ((), ())
            report = {"in_flight": in_flight, "workers": workers} if load else {}
        except ValueError:
            report = {}
        if self.shaper:
            self.shaper.delay(0)
        return (time.perf_counter() - t0) * 1e3, report

    def _request(self, method: str, path: str, body: bytes, headers: dict[str, str], deadline: float):
        """One HTTP exchange, retried on connection errors and 503/502 while the budget lasts."""
        p = self.policy
        retries, backoff, last, reconnected = 0, p.backoff, "sent nothing", False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                last = f"did not answer within the {p.budget:g} s budget ({last})"
                break
            conn, reused = self._conn()
            conn.deadline = deadline
            retry_after, phase = None, "connect"
            try:
                if conn.sock is None:
                    conn.timeout = min(p.connect_timeout, left)
                    conn.connect()
                phase = "read"
                conn.request(method, path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                status, resp_headers = resp.status, {k.lower(): v for k, v in resp.getheaders()}
                if resp.will_close:
                    self._drop()
                if status not in _RETRY_STATUS:
                    return status, resp_headers, data
                last = f"answered {status}: {_error_text(data)}"
                retry_after = _seconds(resp_headers.get("retry-after"))
            except _BudgetSpent:
                self._drop()
                last = f"did not answer within the {p.budget:g} s budget"
                break
            except socket.timeout as e:
                self._drop()
                if phase == "read":  # a slow server: waiting again would not make it faster
                    raise CloudUnavailable(f"cloud at {self.url} sent nothing for {p.read_timeout:g} s (read timeout)") from e
                last = f"is unreachable: connect timed out after {conn.timeout:g} s"
            except (OSError, http.client.HTTPException) as e:
                self._drop()
                last = f"is unreachable: {one_line(e, 200)}"
                if reused and not reconnected and not isinstance(e, ConnectionRefusedError):
                    reconnected = True  # a kept-alive connection the server closed: reconnect at once
                    log.debug("cloud %s on a kept-alive connection; reconnecting", last)
                    continue
            if retries >= p.retries:
                break
            retries += 1
            pause = min(p.backoff_max, backoff) * random.uniform(0.5, 1.0)
            if retry_after is not None:
                pause = max(pause, retry_after)
            if pause >= deadline - time.monotonic():
                last += f"; no time left in the {p.budget:g} s budget for retry {retries}"
                break
            log.debug("cloud %s; retry %d in %.3f s", last, retries, pause)
            time.sleep(pause)
            backoff *= 2
        raise CloudUnavailable(f"cloud at {self.url} {last}" + (f" (after {retries} retries)" if retries else ""))

    def _conn(self) -> tuple[http.client.HTTPConnection, bool]:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, conn.sock is not None
        conn = self._local.conn = self._new_conn(self.policy.connect_timeout, self.policy.read_timeout)
        return conn, False

    def _new_conn(self, connect_timeout: float, read_timeout: float):
        cls = _HTTPSConnection if self._scheme == "https" else _HTTPConnection
        conn = cls(self._host, self._port, timeout=connect_timeout)
        conn.read_timeout = read_timeout
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def close_ping(self) -> None:
        """Close the calling thread's ping connection."""
        conn = getattr(self._local, "ping_conn", None)
        if conn is not None:
            conn.close()
            self._local.ping_conn = None

    def close(self) -> None:
        self._drop()
        self.close_ping()


class _BudgetSpent(socket.timeout):
    """The call's budget ran out while waiting on the socket."""


class _DeadlineSocket:
    """A socket whose every send and receive waits at most min(read timeout, time left in the budget)."""

    def __init__(self, sock: socket.socket, conn: Any):
        self._sock, self._conn = sock, conn

    def _arm(self) -> None:
        left = self._conn.deadline - time.monotonic()
        if left <= 0:
            raise _BudgetSpent("budget spent")
        if left <= self._conn.read_timeout:
            self._sock.settimeout(left)
            self._budget_bound = True
        else:
            self._sock.settimeout(self._conn.read_timeout)
            self._budget_bound = False

    def _guard(self, fn, *args):
        self._arm()
        try:
            return fn(*args)
        except socket.timeout:
            if self._budget_bound:
                raise _BudgetSpent("budget spent") from None
            raise

    def sendall(self, data, *flags):
        return self._guard(self._sock.sendall, data, *flags)

    def recv_into(self, buf, *args):
        return self._guard(self._sock.recv_into, buf, *args)

    def makefile(self, mode: str = "rb", *args, **kwargs):
        return io.BufferedReader(socket.SocketIO(self, "rb"))

    def _decref_socketios(self) -> None:
        pass

    def close(self) -> None:
        self._sock.close()

    def __getattr__(self, name: str):
        return getattr(self._sock, name)


class _DeadlineMixin:
    deadline: float = float("inf")
    read_timeout: float = 30.0

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        self.sock = _DeadlineSocket(self.sock, self)  # type: ignore[has-type]


class _HTTPConnection(_DeadlineMixin, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_DeadlineMixin, http.client.HTTPSConnection):
    pass


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None




def _error_text(data: bytes) -> str:
    try:
        doc: Any = json.loads(data)
        return str(doc.get("error", doc))[:300]
    except (ValueError, AttributeError):
        return data[:300].decode(errors="replace")
