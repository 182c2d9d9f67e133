"""The runtime's cloud client against a cloud that misbehaves, all real and on loopback: a port
nobody listens on, a small standard-library HTTP server that answers slowly, trickles, fails with
500/503 or hangs up mid-request, and a real `tvm-hybrid serve` killed with SIGKILL under load and
restarted on the same port.

What must hold: every call ends within its budget (connect, retries and backoff included);
connection errors and 503 are retried, 500 and read timeouts are not; the circuit breaker skips
the cloud after repeated failures and closes again after a successful half-open trial; a Session
with fallback "auto" still returns onnxruntime's answer (rtol 1e-4, atol 1e-5) throughout.
Timing bounds are the budget plus 0.7 s of slack for a loaded 2-core machine.
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
import time

import numpy as np
import pytest
from conftest import CLS, TARGET, Server, free_port, reference, text_image

from tvm_hybrid.errors import RuntimeFailure
from tvm_hybrid.protocol import HEADER_LENGTH, decode, encode
from tvm_hybrid.runtime import Session
from tvm_hybrid.runtime.cloud import CloudClient, CloudPolicy, CloudUnavailable

SLACK = 0.7
FEEDS = {"x": np.arange(12, dtype=np.float32).reshape(3, 4)}


class FaultServer:
    """A v2 endpoint that doubles its input ("y" = 2x) or fails the way ``mode`` says."""

    def __init__(self):
        self.mode, self.delay, self.requests, self.ok_after = "ok", 0.0, 0, 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                outer.requests += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                mode = outer.mode
                if mode == "503-then-ok" and outer.requests > outer.ok_after:
                    mode = "ok"
                if mode == "drop":  # dies with the request read and no answer
                    self.close_connection = True
                    self.connection.close()
                    return
                if mode == "slow":
                    time.sleep(outer.delay)
                if mode in ("500", "503", "503-then-ok"):
                    code = int(mode[:3])
                    data = json.dumps({"error": f"injected {code}"}).encode()
                    self.send_response(code)
                    if code == 503:
                        self.send_header("Retry-After", str(outer.delay))
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                _, tensors = decode(body, self.headers.get(HEADER_LENGTH), key="inputs")
                out, headers = encode({"y": tensors["x"] * 2}, binary=True, key="outputs")
                self.send_response(200)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                if mode == "trickle":  # a byte at a time, each well inside the read timeout
                    for i in range(len(out)):
                        self.wfile.write(out[i : i + 1])
                        self.wfile.flush()
                        time.sleep(outer.delay)
                else:
                    self.wfile.write(out)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fault():
    srv = FaultServer()
    yield srv
    srv.close()


def timed(fn, *args):
    t0 = time.monotonic()
    try:
        return fn(*args), time.monotonic() - t0
    except Exception as e:
        return e, time.monotonic() - t0


def test_healthy_server_round_trip(fault):
    outs, sent = CloudClient(fault.url).infer("m", "1", FEEDS)
    np.testing.assert_array_equal(outs["y"], FEEDS["x"] * 2)
    assert sent > FEEDS["x"].nbytes


def test_connection_refused_is_retried_within_budget():
    client = CloudClient(f"http://127.0.0.1:{free_port()}", policy=CloudPolicy(budget=3, retries=2, backoff=0.05))
    err, dt = timed(client.infer, "m", "1", FEEDS)
    assert isinstance(err, CloudUnavailable) and "refused" in str(err) and "after 2 retries" in str(err), err
    assert dt < 3 + SLACK


def test_slow_reply_ends_at_the_budget(fault):
    fault.mode, fault.delay = "slow", 5.0
    client = CloudClient(fault.url, policy=CloudPolicy(budget=1.0, read_timeout=30))
    err, dt = timed(client.infer, "m", "1", FEEDS)
    assert isinstance(err, CloudUnavailable) and "1 s budget" in str(err), err
    assert 0.9 < dt < 1.0 + SLACK


def test_read_timeout_is_not_retried(fault):
    fault.mode, fault.delay = "slow", 3.0
    client = CloudClient(fault.url, policy=CloudPolicy(budget=10, read_timeout=0.5, retries=3))
    err, dt = timed(client.infer, "m", "1", FEEDS)
    assert isinstance(err, CloudUnavailable) and "read timeout" in str(err), err
    assert fault.requests == 1 and dt < 0.5 + SLACK


def test_trickling_reply_still_ends_at_the_budget(fault):
    """Each byte comes well inside the read timeout; only the budget stops the call."""
    fault.mode, fault.delay = "trickle", 0.1
    client = CloudClient(fault.url, policy=CloudPolicy(budget=1.5, read_timeout=1.0))
    err, dt = timed(client.infer, "m", "1", FEEDS)
    assert isinstance(err, CloudUnavailable) and "budget" in str(err), err
    assert 1.4 < dt < 1.5 + SLACK


def test_500_is_not_retried(fault):
    fault.mode = "500"
    client = CloudClient(fault.url, policy=CloudPolicy(retries=3))
    err, _ = timed(client.infer, "m", "1", FEEDS)
    assert type(err) is RuntimeFailure and "(500): injected 500" in str(err), err
    assert fault.requests == 1


def test_503_is_retried_with_backoff(fault):
    fault.mode = "503"
    client = CloudClient(fault.url, policy=CloudPolicy(retries=2, backoff=0.05, breaker_failures=10))
    err, _ = timed(client.infer, "m", "1", FEEDS)
    assert isinstance(err, CloudUnavailable) and "503" in str(err) and "after 2 retries" in str(err), err
    assert fault.requests == 3
    fault.mode, fault.ok_after, fault.requests = "503-then-ok", 2, 0  # overloaded twice, then fine
    outs, _ = client.infer("m", "1", FEEDS)
    np.testing.assert_array_equal(outs["y"], FEEDS["x"] * 2)
    assert fault.requests == 3


def test_retry_after_longer_than_the_budget_is_not_waited_for(fault):
    fault.mode, fault.delay = "503", 30
    client = CloudClient(fault.url, policy=CloudPolicy(budget=1.0, retries=5))
    err, dt = timed(client.infer, "m", "1", FEEDS)
    assert isinstance(err, CloudUnavailable) and "no time left" in str(err), err
    assert fault.requests == 1 and dt < 1.0


def test_server_hanging_up_mid_request_is_retried(fault):
    fault.mode = "drop"
    client = CloudClient(fault.url, policy=CloudPolicy(retries=2, backoff=0.05))
    err, _ = timed(client.infer, "m", "1", FEEDS)
    assert isinstance(err, CloudUnavailable) and "unreachable" in str(err), err
    assert fault.requests == 3
    fault.mode = "ok"  # the same client, a new connection: fine again
    outs, _ = client.infer("m", "1", FEEDS)
    np.testing.assert_array_equal(outs["y"], FEEDS["x"] * 2)


def test_circuit_breaker_opens_then_half_opens_and_closes(fault):
    fault.mode = "500"
    client = CloudClient(fault.url, policy=CloudPolicy(breaker_failures=3, breaker_cooldown=0.5))
    for _ in range(3):
        assert isinstance(timed(client.infer, "m", "1", FEEDS)[0], RuntimeFailure)
    assert fault.requests == 3 and client.breaker.state == "open"
    err, dt = timed(client.infer, "m", "1", FEEDS)
    assert isinstance(err, CloudUnavailable) and "circuit breaker open" in str(err), err
    assert fault.requests == 3  # the cloud was not called
    time.sleep(0.6)
    assert client.breaker.state == "half-open"
    assert isinstance(timed(client.infer, "m", "1", FEEDS)[0], RuntimeFailure)  # the trial fails: open again
    assert fault.requests == 4 and client.breaker.state == "open"
    time.sleep(0.6)
    fault.mode = "ok"
    outs, _ = client.infer("m", "1", FEEDS)  # the trial succeeds: closed
    np.testing.assert_array_equal(outs["y"], FEEDS["x"] * 2)
    assert client.breaker.state == "closed" and fault.requests == 5


@pytest.mark.parametrize("mode", ["slow", "500", "drop"])
def test_session_falls_back_to_the_device(split_cls, fault, mode):
    fault.mode, fault.delay = mode, 5.0
    x = text_image(1, 48, 192, seed=3)
    want = reference(CLS, {"x": x})
    policy = CloudPolicy(budget=1.0, retries=1, backoff=0.05)
    with Session(split_cls / TARGET, cloud_url=fault.url, fallback="auto", cloud_policy=policy) as s:
        got, dt = timed(s.run, {"x": x})
        assert [(t["placement"], t["fallback"]) for t in s.trace] == [("device", False), ("device", True)]
    np.testing.assert_allclose(got["save_infer_model/scale_0.tmp_1"], want["save_infer_model/scale_0.tmp_1"],
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    assert dt < 1.0 + SLACK + 1.0  # the budget, then the local build
    with Session(split_cls / TARGET, cloud_url=fault.url, fallback="off", cloud_policy=policy) as s:
        with pytest.raises(RuntimeFailure, match={"slow": "budget", "500": "500", "drop": "unreachable"}[mode]):
            s.run({"x": x})


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_real_server_killed_under_load_then_restarted(split_cls):
    """4 devices run the split model nonstop; the server is SIGKILLed with requests in flight,
    the devices fall back to their local build, the breakers open; the server comes back on the
    same port and every device returns to the cloud through a half-open trial."""
    srv = Server([split_cls / "cloud-x86"], None, "--workers", "1", "--access-log", "off")
    port = srv.port
    x = text_image(1, 48, 192, seed=11)
    want = reference(CLS, {"x": x})["save_infer_model/scale_0.tmp_1"]
    policy = CloudPolicy(budget=2.0, retries=1, backoff=0.05, breaker_failures=2, breaker_cooldown=1.0)
    records = _Records()
    cloud_log = logging.getLogger("tvm_hybrid.runtime.cloud")
    cloud_log.addHandler(records)
    old_level = cloud_log.level
    cloud_log.setLevel(logging.DEBUG)
    stop = threading.Event()
    phase = {"now": "up"}
    runs: list[tuple[int, str, str, float]] = []  # (device, phase, where segment 1 ran, seconds)
    failures: list[BaseException] = []

    def device(i):
        try:
            with Session(split_cls / TARGET, cloud_url=srv.url, fallback="auto", cloud_policy=policy) as s:
                while not stop.is_set():
                    p = phase["now"]
                    got, dt = timed(s.run, {"x": x})
                    if isinstance(got, BaseException):
                        raise got
                    np.testing.assert_allclose(got["save_infer_model/scale_0.tmp_1"], want, rtol=1e-4, atol=1e-5)
                    runs.append((i, p, s.trace[1]["placement"], dt))
        except BaseException as e:
            failures.append(e)

    threads = [threading.Thread(target=device, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()
        _wait(lambda: sum(r[2] == "cloud" for r in runs) >= 20, 60, "cloud runs before the kill")
        srv.kill()
        phase["now"] = "down"
        _wait(lambda: sum(r[1] == "down" for r in runs) >= 20, 60, "runs while the server is down")
        phase["now"] = "restarting"
        srv = Server([split_cls / "cloud-x86"], None, "--workers", "1", "--access-log", "off", port=port)
        phase["now"] = "back"
        _wait(lambda: all(any(r[0] == i and r[1] == "back" and r[2] == "cloud" for r in runs) for i in range(4)),
              30, "every device back on the cloud")  # fmt: skip
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        srv.stop()
        cloud_log.removeHandler(records)
        cloud_log.setLevel(old_level)
    assert not failures, failures[0]
    down = [r for r in runs if r[1] == "down"]
    assert down and all(r[2] == "device" for r in down)
    assert max(r[3] for r in runs) < policy.budget + SLACK + 1.0  # never blocked past the budget
    # Requests were cut off mid-flight (not only refused), and the breakers opened and closed again.
    msgs = records.messages
    assert any("unreachable" in m and "refused" not in m for m in msgs), msgs[:20]
    assert any("skipping it for" in m for m in msgs) and any("circuit breaker closed" in m for m in msgs)


def _wait(cond, seconds: float, what: str) -> None:
    deadline = time.time() + seconds
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
