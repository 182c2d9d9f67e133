"""The device/cloud split end to end: compile with a plan, serve the cloud artifact on loopback,
run with the runtime, compare with onnxruntime on the whole model; fallback and auth.

Tolerance: rtol 1e-4, atol 1e-5 against onnxruntime (the split changes no arithmetic: the
boundary tensors cross as raw little-endian f32)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import CLS, TARGET, Server, assert_close, cli, free_port, reference, text_image

from tvm_hybrid.compiler.importer import InputOverride
from tvm_hybrid.compiler.package import CompileOptions, compile_model
from tvm_hybrid.errors import RuntimeFailure
from tvm_hybrid.runtime import Session

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(split_cls, tmp_path_factory):
    token_file = tmp_path_factory.mktemp("tok") / "token"
    token_file.write_text(TOKEN + "\n")
    srv = Server([split_cls / "cloud-x86"], token_file)
    yield srv
    srv.stop()


def test_split_manifest_links_device_and_cloud(split_cls):
    dev = json.loads((split_cls / TARGET / "manifest.json").read_text())
    cloud = json.loads((split_cls / "cloud-x86" / "manifest.json").read_text())
    d0, d1 = dev["segments"]
    assert (d0["placement"], d1["placement"]) == ("device", "cloud")
    assert d1["reason"] == "memory"
    assert dev["plan"]["device_memory"]["total"] <= 600 * 1024
    [c] = cloud["segments"]
    assert c["endpoint"] == d1["endpoint"] and c["onnx"].endswith(".onnx")
    # The boundary: what the device segment outputs is what the cloud segment takes.
    assert [t["name"] for t in d0["outputs"]] == [t["name"] for t in d1["inputs"]] == [t["name"] for t in c["inputs"]]
    # The cloud segment as ONNX is a model onnxruntime runs by itself.
    import onnx

    onnx.checker.check_model(onnx.load(split_cls / "cloud-x86" / c["onnx"]), full_check=True)


def test_split_run_matches_onnxruntime_and_traces_bytes(split_cls, server):
    x = text_image(1, 48, 192, seed=7)
    with Session(split_cls / TARGET, cloud_url=server.url, token=TOKEN, fallback="off") as s:
        got = s.run({"x": x})
        trace = s.trace
    assert_close(got, reference(CLS, {"x": x}), rtol=1e-4, atol=1e-5)
    assert [(t["placement"], t["fallback"]) for t in trace] == [("device", False), ("cloud", False)]
    boundary = 1 * 8 * 6 * 96 * 4
    assert boundary < trace[1]["bytes_sent"] < boundary + 2048  # tensor bytes plus the JSON header
    assert trace[0]["bytes_sent"] == 0


def test_cli_run_with_cloud(split_cls, server, tmp_path):
    x = text_image(1, 48, 192, seed=8)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "tok").write_text(TOKEN)
    proc = cli("run", str(split_cls / TARGET), "--input", f"x={tmp_path / 'x.npy'}", "--cloud-url", server.url,
               "--token-file", str(tmp_path / "tok"), "--fallback", "off", "--output-dir", str(tmp_path / "o"), "--json",
               check=True)  # fmt: skip
    doc = json.loads(proc.stdout)
    assert [t["placement"] for t in doc["trace"]] == ["device", "cloud"]
    want = next(iter(reference(CLS, {"x": x}).values()))
    np.testing.assert_allclose(np.load(tmp_path / "o" / "save_infer_model_scale_0.tmp_1.npy"), want, rtol=1e-4, atol=1e-5)


def test_wrong_token_is_refused(split_cls, server):
    with Session(split_cls / TARGET, cloud_url=server.url, token="wrong", fallback="off") as s:
        with pytest.raises(RuntimeFailure, match="401"):
            s.run({"x": text_image(1, 48, 192)})


def test_cloud_unreachable_falls_back_to_local_build(split_cls):
    x = text_image(1, 48, 192, seed=9)
    dead = f"http://127.0.0.1:{free_port()}"
    with Session(split_cls / TARGET, cloud_url=dead, fallback="auto", timeout=2) as s:
        got = s.run({"x": x})
        assert [(t["placement"], t["planned"], t["fallback"]) for t in s.trace] == [
            ("device", "device", False), ("device", "cloud", True)]  # fmt: skip
    assert_close(got, reference(CLS, {"x": x}), rtol=1e-4, atol=1e-5)
    with Session(split_cls / TARGET, cloud_url=dead, fallback="off", timeout=2) as s:
        with pytest.raises(RuntimeFailure, match="unreachable"):
            s.run({"x": x})


def test_cloud_segment_without_cloud_or_fallback_exits_5(split_cls, tmp_path):
    np.save(tmp_path / "x.npy", text_image(1, 48, 192))
    proc = cli("run", str(split_cls / TARGET), "--input", f"x={tmp_path / 'x.npy'}", "--fallback", "off")
    assert proc.returncode == 5 and proc.stderr.count("\n") == 1 and "--cloud-url" in proc.stderr


def test_unsupported_op_goes_to_the_cloud(tmp_path, zoo_files):
    """A device that cannot run Softmax: Gemm stays local, Softmax and ArgMax go to the cloud."""
    prof = Path(__file__).parent.parent / "targets" / "x86-64.toml"
    text = prof.read_text().replace('name = "x86-64"', 'name = "x86-64-nosoftmax"').replace(
        "unsupported_ops = []", 'unsupported_ops = ["Softmax"]')  # fmt: skip
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "x86-64-nosoftmax.toml").write_text(text)
    os.environ["TVM_HYBRID_TARGETS_PATH"] = str(tmp_path / "profiles")
    try:
        z, path = zoo_files("softmax_argmax")
        out = tmp_path / "d"
        compile_model(CompileOptions(model=path, targets=("x86-64-nosoftmax",), output=out,
                                     inputs=tuple(InputOverride(k, v) for k, v in z.input_shapes.items())))  # fmt: skip
    finally:
        del os.environ["TVM_HYBRID_TARGETS_PATH"]
    m = json.loads((out / "x86-64-nosoftmax" / "manifest.json").read_text())
    assert [s["placement"] for s in m["segments"]] == ["device", "cloud"]
    assert m["segments"][1]["reason"] == "unsupported-op" and "fallback_library" not in m["segments"][1]
    srv = Server([out / "cloud-x86"])
    try:
        with Session(out / "x86-64-nosoftmax", cloud_url=srv.url) as s:
            got = s.run(z.feeds)
    finally:
        srv.stop()
    assert_close(got, reference(z.model, z.feeds), z.rtol, z.atol)


def test_plan_json_and_plot(tmp_path):
    proc = cli("plan", str(CLS), "--target", TARGET, "--input", "x:1x3x48x192", "--memory", "600KiB",
               "--plot", str(tmp_path / "p.png"), "--json", check=True)  # fmt: skip
    doc = json.loads(proc.stdout)
    assert [s["placement"] for s in doc["segments"]] == ["device", "cloud"]
    assert doc["baselines"]["all-device"] is None  # over the budget
    assert doc["predicted"]["total_ms"] == pytest.approx(
        doc["predicted"]["device_ms"] + doc["predicted"]["cloud_ms"] + doc["predicted"]["transfer_ms"]
        + doc["predicted"]["rtt_ms"], rel=1e-3)  # fmt: skip
    assert {o["reason"] for o in doc["ops"] if o["placement"] == "cloud"} == {"memory"}
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
