"""`tvm-hybrid serve` as an operator runs it, and `tvm-hybrid export triton`.

A real v2 client (tritonclient[http]) talks to a real server subprocess on loopback: metadata,
JSON and binary infer, compared with onnxruntime on the cloud segment's ONNX (rtol 1e-4,
atol 1e-5: the same arithmetic, different kernels). Then the operable parts: 401, 413, 400 with
the reason, 404, /metrics, the JSON access log, graceful shutdown, and the Triton export's config
checked against the segments with protobuf's own text-format parser.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time

import numpy as np
import pytest
from conftest import Server, cli, reference

from tvm_hybrid.protocol import HEADER_LENGTH, encode
from tvm_hybrid.runtime.cloud import CloudClient, wire_version

TOKEN = "operator-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}  # tritonclient adds to the headers it is given: pass copies
LIMIT = 256 * 1024


@pytest.fixture(scope="module")
def cloud(split_cls):
    """The served segment: its manifest entry, the ONNX path and a boundary tensor."""
    doc = json.loads((split_cls / "cloud-x86" / "manifest.json").read_text())
    [seg] = doc["segments"]
    [inp] = seg["inputs"]
    x = np.random.default_rng(0).standard_normal(inp["shape"]).astype(np.float32)
    return {"seg": seg, "model": seg["endpoint"]["model"], "version": seg["endpoint"]["version"],
            "onnx": split_cls / "cloud-x86" / seg["onnx"], "x": x, "in": inp["name"],
            "out": seg["outputs"][0]["name"]}  # fmt: skip


@pytest.fixture(scope="module")
def server(split_cls, tmp_path_factory):
    tok = tmp_path_factory.mktemp("tok") / "token"
    tok.write_text(TOKEN)
    srv = Server([split_cls / "cloud-x86"], tok, "--workers", "2", "--max-request-size", "256KiB")
    yield srv
    srv.stop()


def post(srv: Server, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        return r.status, (json.loads(data) if r.getheader("content-type", "").startswith("application/json") else {})
    finally:
        conn.close()


def get(srv: Server, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_tritonclient_metadata_json_and_binary_infer(server, cloud):
    import tritonclient.http as tc

    client = tc.InferenceServerClient(f"127.0.0.1:{server.port}")
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    name, version = cloud["model"], cloud["version"]
    meta = client.get_model_metadata(name, version, headers=dict(AUTH))
    assert meta["versions"] == [version, wire_version(version)]
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
        (t["name"], "FP32", t["shape"]) for t in cloud["seg"]["inputs"]]  # fmt: skip
    assert [(t["name"], t["shape"]) for t in meta["outputs"]] == [(t["name"], t["shape"]) for t in cloud["seg"]["outputs"]]
    assert client.is_model_ready(name, version, headers=dict(AUTH))

    want = reference(cloud["onnx"], {cloud["in"]: cloud["x"]})[cloud["out"]]
    for binary, ver in ((False, version), (True, version), (True, wire_version(version))):
        inp = tc.InferInput(cloud["in"], list(cloud["x"].shape), "FP32")
        inp.set_data_from_numpy(cloud["x"], binary_data=binary)
        out = tc.InferRequestedOutput(cloud["out"], binary_data=binary)
        res = client.infer(name, [inp], model_version=ver, outputs=[out], headers=dict(AUTH), request_id="r1")
        got = res.as_numpy(cloud["out"])
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        body = res.get_response()
        assert body["id"] == "r1" and body["model_version"] == version
        assert ("binary_data_size" in body["outputs"][0]["parameters"]) if binary else "data" in body["outputs"][0]


def test_bad_requests_get_the_reason(server, cloud):
    name, version = cloud["model"], cloud["version"]
    path = f"/v2/models/{name}/versions/{version}/infer"
    x = cloud["x"]

    def body(tensors, **kw):
        return encode(tensors, binary=True, **kw)

    b, h = body({cloud["in"]: x})
    assert post(server, path, b, h)[0] == 401  # no token
    assert post(server, path, b, {**h, "Authorization": "Bearer nope"})[0] == 401
    assert get(server, f"/v2/models/{name}")[0] == 401
    ok = post(server, path, b, {**h, **AUTH})
    assert ok[0] == 200, ok

    status, doc = post(server, "/v2/models/nosuch/infer", b, {**h, **AUTH})
    assert status == 404 and name in doc["error"]
    status, doc = post(server, f"/v2/models/{name}/versions/999/infer", b, {**h, **AUTH})
    assert status == 404 and version in doc["error"]

    cases = [
        ({cloud["in"]: x[..., :-1]}, "shape"),
        ({cloud["in"]: x.astype(np.float64)}, "FP32"),
        ({"wrong": x}, "missing"),
        ({cloud["in"]: x, "extra": x}, "unknown"),
    ]
    for tensors, reason in cases:
        status, doc = post(server, path, *(lambda bh: (bh[0], {**bh[1], **AUTH}))(body(tensors)))
        assert status == 400 and reason in doc["error"], (reason, doc)
    status, doc = post(server, path, b"{not json", {"Content-Type": "application/json", **AUTH})
    assert status == 400 and "JSON" in doc["error"]
    status, doc = post(server, path, b[:-4], {**h, **AUTH})  # binary data cut short
    assert status == 400 and "binary_data_size" in doc["error"]
    status, doc = post(server, path, b, {**h, **AUTH, HEADER_LENGTH: "99999999"})
    assert status == 400 and HEADER_LENGTH in doc["error"]
    jb, jh = encode({cloud["in"]: x}, binary=False)
    doc = json.loads(jb)
    doc["outputs"] = [{"name": "nosuch"}]
    status, err = post(server, path, json.dumps(doc).encode(), {**jh, **AUTH})
    assert status == 400 and "nosuch" in err["error"]


def test_request_size_limit(server, cloud):
    path = f"/v2/models/{cloud['model']}/infer"
    big = json.dumps({"inputs": [{"name": cloud["in"], "datatype": "FP32", "shape": [LIMIT], "data": [0.5] * LIMIT}]})
    status, doc = post(server, path, big.encode(), {"Content-Type": "application/json", **AUTH})
    assert status == 413 and str(LIMIT) in doc["error"]
    # Without a Content-Length (chunked), the server counts as it reads.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    chunks = (big[i : i + 65536].encode() for i in range(0, len(big), 65536))
    conn.request("POST", path, body=chunks, headers={"Content-Type": "application/json", **AUTH}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and "limit" in json.loads(r.read())["error"]
    conn.close()


def test_concurrent_clients_get_their_own_answers(server, cloud):
    """8 threads, each with its own input, through the runtime's client; every answer is its own."""
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal(cloud["x"].shape).astype(np.float32) for _ in range(8)]
    wants = [reference(cloud["onnx"], {cloud["in"]: x})[cloud["out"]] for x in xs]
    client = CloudClient(server.url, TOKEN)
    failures = []

    def work(i):
        try:
            for _ in range(5):
                outs, _ = client.infer(cloud["model"], cloud["version"], {cloud["in"]: xs[i]})
                np.testing.assert_allclose(outs[cloud["out"]], wants[i], rtol=1e-4, atol=1e-5)
        except Exception as e:  # collected: a thread's assertion must fail the test
            failures.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[0]


def test_metrics_and_access_log(server, cloud):
    from prometheus_client.parser import text_string_to_metric_families

    client = CloudClient(server.url, TOKEN)
    for _ in range(3):
        client.infer(cloud["model"], cloud["version"], {cloud["in"]: cloud["x"]})
    assert get(server, "/metrics")[0] == 401
    status, text = get(server, "/metrics", AUTH)
    assert status == 200
    fams = {f.name: f for f in text_string_to_metric_families(text.decode())}
    m = cloud["model"]

    def value(fam, suffix, **labels):
        return sum(s.value for s in fams[fam].samples
                   if s.name == fam + suffix and all(s.labels.get(k) == v for k, v in labels.items()))  # fmt: skip

    assert value("tvm_hybrid_requests", "_total", route="infer", model=m, code="200") >= 3
    assert value("tvm_hybrid_requests", "_total", route="infer", model=m, code="400") >= 1  # from the test above or not
    assert value("tvm_hybrid_request_duration_seconds", "_count", route="infer", model=m) >= 3
    assert value("tvm_hybrid_request_duration_seconds", "_bucket", route="infer", model=m, le="+Inf") >= 3
    assert value("tvm_hybrid_inference_duration_seconds", "_count", model=m) >= 3
    assert value("tvm_hybrid_request_bytes", "_total", route="infer", model=m) >= 3 * cloud["x"].nbytes
    assert value("tvm_hybrid_response_bytes", "_total", route="infer", model=m) > 0
    # Unknown model names do not become label values (no cardinality blow-up).
    assert all(s.labels.get("model", m) in (m, "-") for f in fams.values() for s in f.samples)

    lines = [json.loads(line) for line in server.stderr().splitlines() if line.startswith("{")]
    infers = [r for r in lines if r["route"] == "infer" and r["status"] == 200]
    assert len(infers) >= 3
    r = infers[-1]
    assert r["method"] == "POST" and r["model"] == m and r["bytes_in"] > cloud["x"].nbytes and r["bytes_out"] > 0
    assert r["ms"] > 0 and r["remote"].startswith("127.0.0.1:")
    assert any(r["status"] == 401 for r in lines)


def test_graceful_shutdown_finishes_the_request_in_flight(split_cls, cloud):
    """SIGTERM while a request is half sent: the server stops listening, finishes it, then exits 0."""
    srv = Server([split_cls / "cloud-x86"], None, "--graceful-timeout", "20")
    try:
        body, headers = encode({cloud["in"]: cloud["x"]}, binary=True)
        head = (f"POST /v2/models/{cloud['model']}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()  # fmt: skip
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
        sock.sendall(head + body[:1000])
        time.sleep(0.5)  # the server has the request open
        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 20
        while time.time() < deadline:  # new connections are refused once it stops listening
            try:
                socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
                time.sleep(0.1)
            except OSError:
                break
        else:
            raise AssertionError("server kept listening after SIGTERM")
        assert srv.proc.poll() is None, "server exited with a request in flight"
        sock.sendall(body[1000:])
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        sock.close()
        assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
        assert srv.proc.wait(20) == 0
        want = reference(cloud["onnx"], {cloud["in"]: cloud["x"]})[cloud["out"]]
        from tvm_hybrid.protocol import decode

        _, outs = decode(reply.split(b"\r\n\r\n", 1)[1], None, key="outputs")  # a JSON reply
        np.testing.assert_allclose(outs[cloud["out"]], want, rtol=1e-4, atol=1e-5)
    finally:
        srv.stop()


def _model_config_class():
    """Triton's ModelConfig message (the fields an ONNX export uses, names as in Triton's
    model_config.proto), built at run time so protobuf's text-format parser can check config.pbtxt."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fp = descriptor_pb2.FileDescriptorProto(name="tvm_hybrid_test_model_config.proto", package="inference")

    def enum(name, values):
        e = fp.enum_type.add(name=name)
        for i, v in enumerate(values):
            e.value.add(name=v, number=i)

    enum("DataType", ["TYPE_INVALID", "TYPE_BOOL", "TYPE_UINT8", "TYPE_UINT16", "TYPE_UINT32", "TYPE_UINT64",
                      "TYPE_INT8", "TYPE_INT16", "TYPE_INT32", "TYPE_INT64", "TYPE_FP16", "TYPE_FP32", "TYPE_FP64",
                      "TYPE_STRING", "TYPE_BF16"])  # fmt: skip
    enum("Kind", ["KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL"])

    def message(name, fields):
        m = fp.message_type.add(name=name)
        for i, (fname, ftype, label, tname) in enumerate(fields, 1):
            f = m.field.add(name=fname, number=i, type=ftype, label=label)
            if tname:
                f.type_name = ".inference." + tname

    opt, rep = F.LABEL_OPTIONAL, F.LABEL_REPEATED
    message("Specific", [("versions", F.TYPE_INT64, rep, None)])
    message("VersionPolicy", [("specific", F.TYPE_MESSAGE, opt, "Specific")])
    message("Tensor", [("name", F.TYPE_STRING, opt, None), ("data_type", F.TYPE_ENUM, opt, "DataType"),
                       ("dims", F.TYPE_INT64, rep, None)])  # fmt: skip
    message("InstanceGroup", [("kind", F.TYPE_ENUM, opt, "Kind"), ("count", F.TYPE_INT32, opt, None)])
    message("ModelConfig", [
        ("name", F.TYPE_STRING, opt, None), ("platform", F.TYPE_STRING, opt, None),
        ("max_batch_size", F.TYPE_INT32, opt, None), ("version_policy", F.TYPE_MESSAGE, opt, "VersionPolicy"),
        ("input", F.TYPE_MESSAGE, rep, "Tensor"), ("output", F.TYPE_MESSAGE, rep, "Tensor"),
        ("instance_group", F.TYPE_MESSAGE, rep, "InstanceGroup"),
    ])  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def test_export_triton_repository_matches_the_segments(split_cls, cloud, tmp_path):
    import onnx
    import yaml
    from google.protobuf import text_format

    repo = tmp_path / "repo"
    proc = cli("export", "triton", str(split_cls / "cloud-x86"), "-o", str(repo), "--storage-uri", "s3://b/repo",
               "--json", check=True)  # fmt: skip
    doc = json.loads(proc.stdout)
    name, ver = cloud["model"], wire_version(cloud["version"])
    assert doc["models"] == {name: [ver]}
    cfg = text_format.Parse((repo / name / "config.pbtxt").read_text(), _model_config_class()())
    assert (cfg.name, cfg.platform, cfg.max_batch_size) == (name, "onnxruntime_onnx", 0)
    assert list(cfg.version_policy.specific.versions) == [int(ver)]
    dtype_enum = cfg.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name["data_type"].enum_type
    onnx_types = {onnx.TensorProto.FLOAT: "TYPE_FP32"}
    model = onnx.load(repo / name / ver / "model.onnx")
    for kind, specs, values in (("input", cfg.input, model.graph.input), ("output", cfg.output, model.graph.output)):
        got = [(t.name, dtype_enum.values_by_number[t.data_type].name, list(t.dims)) for t in specs]
        # Exactly the segment's tensors, in the manifest ...
        assert got == [(t["name"], "TYPE_FP32", t["shape"]) for t in cloud["seg"][kind + "s"]]
        # ... and in the ONNX file Triton will load.
        assert got == [(v.name, onnx_types[v.type.tensor_type.elem_type], [d.dim_value for d in v.type.tensor_type.shape.dim])
                       for v in values]  # fmt: skip
    assert [(g.kind, g.count) for g in cfg.instance_group] == [(2, 1)]  # KIND_CPU, one instance
    # The exported ONNX computes what the server computes.
    want = reference(cloud["onnx"], {cloud["in"]: cloud["x"]})
    got = reference(repo / name / ver / "model.onnx", {cloud["in"]: cloud["x"]})
    np.testing.assert_array_equal(got[cloud["out"]], want[cloud["out"]])

    isvc = yaml.safe_load((repo / "inferenceservice.yaml").read_text())
    assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    pred = isvc["spec"]["predictor"]["model"]
    assert pred["modelFormat"]["name"] == "triton" and pred["protocolVersion"] == "v2"
    assert pred["storageUri"] == "s3://b/repo"
    assert isvc["metadata"]["name"] == doc["name"] and len(doc["name"]) <= 63

    again = cli("export", "triton", str(split_cls / "cloud-x86"), "-o", str(repo))
    assert again.returncode == 2 and "--force" in again.stderr and again.stderr.count("\n") == 1
    dev = cli("export", "triton", str(split_cls / "x86-64-avx2"), "-o", str(tmp_path / "r2"))
    assert dev.returncode == 4 and "cloud artifact" in dev.stderr
