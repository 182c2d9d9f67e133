"""Vulkan targets: TVM's WGSL kernels replayed by the wgpu executor on a real Vulkan driver.

Without a GPU this runs on Mesa's lavapipe (a Vulkan driver on the CPU; scripts/setup.sh installs
it). lavapipe checks correctness, not speed: it is 15-30x slower than TVM's CPU code.

Tolerance vs onnxruntime: f32 outputs within rtol 1e-3 and atol 1e-4 (numpy allclose) — GPU
schedules (dlight) tile and reorder every reduction, and lavapipe's LLVM may contract a*b+c into
FMAs; the observed worst cases are ~1e-4 relative (PP-OCRv4 det: max |diff| 1.6e-5).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import zoo
from conftest import CLS, DET, assert_close, cli, reference, text_image

from tvm_hybrid.errors import RuntimeFailure
from tvm_hybrid.runtime import Session

RTOL, ATOL = 1e-3, 1e-4
# WGSL has no i64: ArgMax's int64 output is refused at compile time (test below).
ZOO = [n for n in zoo.NAMES if n != "softmax_argmax"]


def _vulkan_adapter() -> str | None:
    try:
        from tvm_hybrid.runtime.wgpu_executor import pick_adapter

        return pick_adapter().summary
    except Exception:  # no wgpu, no driver: the whole module skips with the reason below
        return None


ADAPTER = _vulkan_adapter()
pytestmark = pytest.mark.skipif(
    ADAPTER is None,
    reason="no Vulkan adapter via wgpu (pip install wgpu==0.32.0; apt-get install mesa-vulkan-drivers libvulkan1)",
)


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_matches_onnxruntime_on_vulkan(name, artifacts, zoo_files):
    z, path = zoo_files(name)
    art = artifacts.get(path, z.input_shapes, target="vulkan-adreno")
    with Session(art) as sess:
        got = sess.run(z.feeds)
        [t] = sess.trace
    assert t["placement"] == "device" and t["ran_on"].startswith("wgpu:") and "Vulkan" in t["ran_on"]
    assert_close(got, reference(z.model, z.feeds), RTOL, max(ATOL, z.atol))


def test_ppocr_classifier_on_vulkan_mali(artifacts):
    art = artifacts.get(CLS, {"x": (1, 3, 48, 192)}, target="vulkan-mali")
    x = text_image(1, 48, 192)
    with Session(art) as sess:
        got = sess.run({"x": x})
    want = reference(CLS, {"x": x})
    assert_close(got, want, RTOL, ATOL)
    assert next(iter(want.values())).max() > 0.5


def test_ppocr_detector_320_on_vulkan(artifacts):
    art = artifacts.get(DET, {"x": (1, 3, 320, 320)}, target="vulkan-adreno")
    x = text_image(1, 320, 320)
    with Session(art) as sess:
        got = sess.run({"x": x})
    want = reference(DET, {"x": x})
    assert_close(got, want, RTOL, ATOL)
    assert next(iter(want.values())).max() > 0.5  # it sees the strokes


def test_artifact_is_wgsl_plan_and_runs_without_tvm(artifacts, zoo_files):
    """The Vulkan artifact is WGSL + a JSON plan + weights; running it imports neither TVM nor onnx."""
    import json

    z, path = zoo_files("multi_io")
    art = artifacts.get(path, z.input_shapes, target="vulkan-adreno")
    m = json.loads((art / "manifest.json").read_text())
    [seg] = m["segments"]
    assert seg["format"] == "wgsl-plan" and seg["library"] == "segments/0.plan.json"
    assert {f["path"] for f in m["files"]} == {"segments/0.plan.json", "segments/0.wgsl.json", "segments/0.weights.bin"}
    feeds = {k: v.tolist() for k, v in z.feeds.items()}
    code = f"""
import sys, numpy as np
from tvm_hybrid.runtime import Session
feeds = {{k: np.asarray(v, np.float32) for k, v in {feeds!r}.items()}}
with Session({str(art)!r}) as s:
    out = s.run(feeds)
maps = open("/proc/self/maps").read()
print({{"tvm": any(k == "tvm" or k.startswith("tvm.") for k in sys.modules), "libtvm": "libtvm" in maps,
       "onnx": "onnx" in sys.modules, "outputs": {{k: v.tolist() for k, v in out.items()}}}})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    facts = eval(proc.stdout.strip().splitlines()[-1])
    assert (facts["tvm"], facts["libtvm"], facts["onnx"]) == (False, False, False)
    want = reference(z.model, z.feeds)
    got = {k: np.asarray(v, np.float32) for k, v in facts["outputs"].items()}
    assert_close(got, want, RTOL, ATOL)


def test_int64_data_is_refused_naming_the_op(zoo_files, tmp_path):
    """WGSL has no i64: with no cloud to send it to, ArgMax's int64 output makes compile exit 3
    and name the node."""
    _, path = zoo_files("softmax_argmax")
    proc = cli("compile", str(path), "--target", "vulkan-mali", "--cloud", "none", "-o", str(tmp_path / "out"))
    assert proc.returncode == 3, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "XDG_RUNTIME_DIR" not in ln]
    assert len(lines) == 1 and "ArgMax /ArgMax" in lines[0] and "int64" in lines[0], lines
    assert not (tmp_path / "out" / "vulkan-mali").exists()


def test_ops_vulkan_cannot_run_go_to_the_cloud(zoo_files, tmp_path):
    """With a cloud, the planner sends what WGSL cannot take (ArgMax's int64) there: Gemm and
    Softmax run on Vulkan, ArgMax on the cloud server, and the answers match onnxruntime."""
    from test_hybrid import Server

    from tvm_hybrid.compiler.importer import InputOverride
    from tvm_hybrid.compiler.package import CompileOptions, compile_model

    z, path = zoo_files("softmax_argmax")
    out = tmp_path / "out"
    compile_model(CompileOptions(model=path, targets=("vulkan-mali",), output=out,
                                 inputs=tuple(InputOverride(k, v) for k, v in z.input_shapes.items())))  # fmt: skip
    m = json.loads((out / "vulkan-mali" / "manifest.json").read_text())
    assert [(s["placement"], s.get("reason")) for s in m["segments"]] == [("device", None), ("cloud", "unsupported-op")]
    assert m["segments"][0]["format"] == "wgsl-plan"
    srv = Server([out / "cloud-x86"])
    try:
        with Session(out / "vulkan-mali", cloud_url=srv.url, fallback="off") as s:
            got = s.run(z.feeds)
    finally:
        srv.stop()
    assert_close(got, reference(z.model, z.feeds), RTOL, ATOL)


def test_grid_over_65535_workgroups_is_folded(tmp_path, artifacts):
    """65537 workgroups along x exceed WebGPU's 65535 limit: folded into z like TVM's web runtime
    (32769 x 1 x 2, the odd count padded) and every element still computed exactly once."""
    import onnx
    from onnx import TensorProto, helper

    n = 65537 * 256
    g = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "big.onnx"
    onnx.save(model, path)
    art = artifacts.get(path, {"x": (1, n)}, target="vulkan-adreno")
    import json

    plan = json.loads((art / "segments" / "0.plan.json").read_text())
    assert any(ln["dispatch"][2] > 1 for ln in plan["launches"]), [ln["dispatch"] for ln in plan["launches"]]
    x = np.random.default_rng(0).standard_normal((1, n)).astype(np.float32)
    with Session(art) as s:
        [y] = s.run({"x": x}).values()
    np.testing.assert_array_equal(y, -np.maximum(x, 0))


def test_adapter_choice_by_name(artifacts, zoo_files, monkeypatch):
    z, path = zoo_files("mlp")
    art = artifacts.get(path, z.input_shapes, target="vulkan-adreno")
    monkeypatch.setenv("TVM_HYBRID_WGPU_ADAPTER", "no-such-gpu")
    with pytest.raises(RuntimeFailure, match="no wgpu adapter matches 'no-such-gpu'; found: .*Vulkan"):
        Session(art)
    word = ADAPTER.split()[0]
    monkeypatch.setenv("TVM_HYBRID_WGPU_ADAPTER", word)
    with Session(art) as s:
        assert_close(s.run(z.feeds), reference(z.model, z.feeds), RTOL, ATOL)
        assert word in s.trace[0]["ran_on"]
