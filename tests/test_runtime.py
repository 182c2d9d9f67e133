"""The edge runtime: import isolation, integrity checks, .tar artifacts, input validation."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from conftest import CLS, cli, reference, text_image

from tvm_hybrid.errors import ArtifactError, UsageError
from tvm_hybrid.runtime import Session

CLS_SHAPE = {"x": (1, 3, 48, 192)}


@pytest.fixture
def cls_artifact(artifacts, tmp_path):
    """A private copy of the compiled classifier, free to tamper with."""
    dst = tmp_path / "art"
    shutil.copytree(artifacts.get(CLS, CLS_SHAPE), dst)
    return dst


def test_runtime_import_loads_no_compiler(artifacts):
    """An edge app importing the runtime and running a model never loads libtvm_compiler, onnx
    or tvm_hybrid.compiler."""
    art = artifacts.get(CLS, CLS_SHAPE)
    code = f"""
import sys, numpy as np
from tvm_hybrid.runtime import Session
s = Session({str(art)!r})
out = s.run({{"x": np.zeros((1, 3, 48, 192), np.float32)}})
maps = open("/proc/self/maps").read()
print({{
    "compiler_so": "libtvm_compiler" in maps,
    "runtime_so": "libtvm_runtime" in maps,
    "onnx": any(m == "onnx" or m.startswith("onnx.") for m in sys.modules),
    "compiler_pkg": any(m.startswith("tvm_hybrid.compiler") or m.startswith("tvm_hybrid.cli") for m in sys.modules),
    "relax": "tvm.relax" in sys.modules,
    "outputs": len(out),
}})
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    facts = eval(proc.stdout.strip().splitlines()[-1])
    assert facts == {"compiler_so": False, "runtime_so": True, "onnx": False, "compiler_pkg": False,
                     "relax": False, "outputs": 1}  # fmt: skip


def test_runtime_modules_do_not_import_the_compiler_side():
    """Dependencies point one way: the runtime, the server and what they use never import
    compiler, cli, onnx (static check)."""
    import ast
    import pathlib

    import tvm_hybrid

    root = pathlib.Path(tvm_hybrid.__file__).parent
    shared = ["manifest.py", "errors.py", "signing.py", "hostcpu.py", "protocol.py", "emulate.py"]
    for path in [*(root / "runtime").glob("*.py"), *(root / "server").glob("*.py"), *(root / p for p in shared)]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            else:
                continue
            for name in names:
                parts = name.lstrip(".").split(".")
                assert parts[0] not in ("onnx", "onnxruntime"), f"{path.name} imports {name}"
                assert "compiler" not in parts and "cli" not in parts, f"{path.name} imports {name}"
                assert not name.startswith("tvm.relax"), f"{path.name} imports {name}"


def test_run_command_imports_no_compiler(artifacts, tmp_path):
    """`python -m tvm_hybrid run`, what `run --emulate` starts in the aarch64 sysroot (TVM's runtime,
    numpy and click only), runs with onnx, onnxruntime, tvm.relax and tvm_hybrid.compiler unimportable."""
    art = artifacts.get(CLS, CLS_SHAPE)
    x = tmp_path / "x.npy"
    np.save(x, text_image(1, 48, 192))
    code = f"""
import runpy, sys

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("onnx", "onnxruntime") or name.startswith(("tvm_hybrid.compiler", "tvm.relax")):
            raise ImportError("blocked: " + name)

sys.meta_path.insert(0, Block())
sys.argv = ["tvm-hybrid", "run", {str(art)!r}, "--input", "x={x}", "--json"]
runpy.run_module("tvm_hybrid", run_name="__main__")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["outputs"]


def test_tampered_library_is_refused_before_loading(cls_artifact):
    lib = cls_artifact / "segments" / "0.so"
    data = bytearray(lib.read_bytes())
    data[len(data) // 2] ^= 0xFF
    lib.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="fails its checksum"):
        Session(cls_artifact)


def test_missing_file_and_bad_manifest_are_artifact_errors(cls_artifact):
    m = json.loads((cls_artifact / "manifest.json").read_text())
    (cls_artifact / "segments" / "0.so").unlink()
    with pytest.raises(ArtifactError, match="missing"):
        Session(cls_artifact)
    for broken, match in [
        ("{not json", "not valid JSON"),
        (json.dumps({**m, "schema": "tvm-hybrid/artifact@99"}), "schema"),
        (json.dumps({**m, "segments": []}), "no segments"),
        (json.dumps({**m, "files": [{"path": "../../etc/passwd", "sha256": "0"}]}), "escapes"),
        (json.dumps({**m, "versions": {**m["versions"], "tvm": "0.19.0"}}), "TVM 0.19.0"),
    ]:
        (cls_artifact / "manifest.json").write_text(broken)
        with pytest.raises(ArtifactError, match=match):
            Session(cls_artifact)


def test_tar_artifact_runs_like_the_directory(artifacts, tmp_path):
    art = artifacts.get(CLS, CLS_SHAPE)
    tar = tmp_path / "cls.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(art, arcname="cls")
    x = text_image(1, 48, 192)
    with Session(tar) as s:
        got = s.run({"x": x})
        unpacked = s._art.root
        assert unpacked.exists()
    assert not unpacked.exists(), "the unpacked copy outlived the session"
    want = reference(CLS, {"x": x})
    np.testing.assert_allclose(next(iter(got.values())), next(iter(want.values())), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["traversal", "absolute", "symlink", "device"])
def test_unsafe_tar_members_are_refused(tmp_path, kind):
    tar = tmp_path / f"{kind}.tar"
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("manifest.json")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"{}"))
        evil = tarfile.TarInfo({"traversal": "../evil.so", "absolute": "/tmp/evil.so"}.get(kind, "segments/0.so"))
        if kind == "symlink":
            evil.type, evil.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tf.addfile(evil)
        elif kind == "device":
            evil.type = tarfile.CHRTYPE
            tf.addfile(evil)
        else:
            evil.size = 4
            tf.addfile(evil, io.BytesIO(b"evil"))
    with pytest.raises(ArtifactError, match="escapes|link or special"):
        Session(tar)
    assert not (tmp_path.parent / "evil.so").exists()


def test_input_validation_names_shapes_and_dtypes(artifacts):
    with Session(artifacts.get(CLS, CLS_SHAPE)) as s:
        x = np.zeros((1, 3, 48, 192), np.float32)
        with pytest.raises(UsageError, match="missing input.*x 1x3x48x192 float32"):
            s.run({})
        with pytest.raises(UsageError, match="unknown input.*y"):
            s.run({"x": x, "y": x})
        with pytest.raises(UsageError, match="must be float32, got float64"):
            s.run({"x": x.astype(np.float64)})
        with pytest.raises(UsageError, match="shape 1x3x48x192, got 2x3x48x192"):
            s.run({"x": np.zeros((2, 3, 48, 192), np.float32)})
        # Non-contiguous views are fine: the runtime copies them.
        wide = np.zeros((1, 3, 48, 384), np.float32)[..., ::2]
        assert next(iter(s.run({"x": wide}).values())).shape == (1, 2)


def test_kernels_carry_no_argument_checks(artifacts):
    # Only the VM calls an artifact's kernels, after the runtime checked the inputs (above), so
    # TIR's per-argument asserts are compiled out: they were 6.7 KB a kernel, 90 % of the code.
    lib = artifacts.get(CLS, CLS_SHAPE) / "segments" / "0.so"
    data = lib.read_bytes()
    assert b"__tvm_ffi_" in data
    assert b"Mismatched type on argument" not in data and b"expected to be compact array" not in data


def test_trace_reports_each_segment(artifacts):
    with Session(artifacts.get(CLS, CLS_SHAPE)) as s:
        s.run({"x": text_image(1, 48, 192)})
        [t] = s.trace
    assert t["placement"] == "device" and t["ms"] > 0 and t["bytes_sent"] == 0 and t["segment"] == 0


# A Zen 3 EPYC's flags (no AVX-512): the commonest cloud x86 CPU without it.
ZEN3_FLAGS = frozenset("sse sse2 ssse3 sse4_1 sse4_2 popcnt avx avx2 fma f16c bmi1 bmi2 aes".split())


def test_x86_profiles_name_the_cpu_features_their_code_needs():
    from tvm_hybrid import hostcpu
    from tvm_hybrid.targets import resolve

    need = {n: hostcpu.x86_features(resolve(n).tvm_target) for n in
            ("x86-64", "x86-64-avx2", "x86-64-avx512", "cloud-x86", "cloud-x86-avx512")}  # fmt: skip
    assert need["x86-64"] <= need["x86-64-avx2"] == need["cloud-x86"] < need["x86-64-avx512"] == need["cloud-x86-avx512"]
    assert {"avx2", "fma"} <= need["x86-64-avx2"] and "avx512f" in need["x86-64-avx512"]
    # The default cloud profile runs on AVX2-only fleets; the AVX-512 profiles do not.
    assert hostcpu.missing_features(resolve("cloud-x86").tvm_target, ZEN3_FLAGS) == []
    assert hostcpu.missing_features(resolve("x86-64-avx512").tvm_target, ZEN3_FLAGS) == [
        "avx512bw", "avx512cd", "avx512dq", "avx512f", "avx512vl"]  # fmt: skip
    # mattr adds features; a CPU name nothing is known of is not refused.
    assert hostcpu.missing_features({"mcpu": "x86-64-v2", "mattr": ["+avx512f", "+fast-gather"]}, ZEN3_FLAGS) == ["avx512f"]
    assert hostcpu.missing_features({"mcpu": "some-future-cpu"}, ZEN3_FLAGS) == []
    # LLVM and /proc/cpuinfo name features differently; one without a known flag is not refused.
    assert hostcpu.x86_features({"mattr": ["+bmi", "+sse4.2", "+avx512vnni", "+avx512vbmi"]}) == {
        "bmi1", "sse4_2", "avx512_vnni"}  # fmt: skip
    assert hostcpu.missing_features({"mcpu": "skylake-avx512"}, frozenset()) == []  # no /proc/cpuinfo: unknown


def test_artifact_needing_cpu_features_this_cpu_lacks_is_refused_before_loading(artifacts, zoo_files):
    """AVX-512 code on an AVX2 CPU would die of SIGILL mid-run: exit 5, one line, naming the features."""
    from tvm_hybrid import hostcpu

    if "avx512f" in hostcpu.cpu_flags() or not hostcpu.cpu_flags():
        pytest.skip("this CPU runs AVX-512 code (or its features are unknown)")
    z, path = zoo_files("mlp")
    art = artifacts.get(path, z.input_shapes, "x86-64-avx512")
    np.save(art.parent / "x.npy", np.zeros(z.input_shapes["x"], np.float32))
    proc = cli("run", str(art), "--input", f"x={art.parent / 'x.npy'}")
    assert proc.returncode == 5, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "x86-64-avx512" in line and "avx512f" in line and "--target host" in line, line


def test_artifact_recompiled_in_place_runs_its_new_code(tmp_path):
    """The dynamic loader keeps a library it has loaded by name: a Session opened after the
    artifact was rebuilt in place (an update on a device, a recompile in a notebook) must run
    the new library, not the one this process loaded before."""
    import onnx
    from onnx import TensorProto, helper

    from tvm_hybrid.compiler.package import CompileOptions, compile_model

    x = np.arange(-3, 3, dtype=np.float32).reshape(2, 3)
    outs = []
    for op in ("Relu", "Neg"):
        vi = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in ("x", "y")]
        model = helper.make_model(helper.make_graph([helper.make_node(op, ["x"], ["y"])], op, vi[:1], vi[1:]),
                                  opset_imports=[helper.make_opsetid("", 17)])  # fmt: skip
        onnx.save(model, tmp_path / f"{op}.onnx")
        [s] = compile_model(CompileOptions(model=tmp_path / f"{op}.onnx", targets=("host",), output=tmp_path / "out",
                                           cloud=None, tuning_logs=None))  # fmt: skip
        with Session(s.path) as sess:
            outs.append(sess.run({"x": x})["y"])
    np.testing.assert_array_equal(outs[0], np.maximum(x, 0))
    np.testing.assert_array_equal(outs[1], -x)


def test_outputs_are_the_callers_own_arrays_call_after_call(tmp_path):
    """CPU calls reuse their input tensors and hand outputs back as views of the tensors the call
    allocated (no copy): an output that is a view of an input, of a weight, of the library's
    constant or of another output must still come back as an array of its own, which a later
    call does not overwrite and whose changes no later call sees."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from tvm_hybrid.compiler.package import CompileOptions, compile_model

    w = np.arange(64 * 64, dtype=np.float32).reshape(64, 64)
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["view"]),  # a view of the input
        helper.make_node("Relu", ["x"], ["relu"]),
        helper.make_node("Identity", ["relu"], ["relu_again"]),  # the same tensor as another output
        helper.make_node("Reshape", ["w", "wshape"], ["w_view"]),  # a constant of the library
        helper.make_node("Identity", ["x"], ["x_again"]),  # the input itself
    ]
    inits = [numpy_helper.from_array(np.array([3, 2], np.int64), "shape"), numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.array([4096], np.int64), "wshape")]  # fmt: skip
    outs = [helper.make_tensor_value_info("view", TensorProto.FLOAT, [3, 2]),
            helper.make_tensor_value_info("relu", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("relu_again", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("w_view", TensorProto.FLOAT, [4096]),
            helper.make_tensor_value_info("x_again", TensorProto.FLOAT, [2, 3])]  # fmt: skip
    graph = helper.make_graph(nodes, "views", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])], outs, inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "views.onnx")
    [s] = compile_model(CompileOptions(model=tmp_path / "views.onnx", targets=("host",), output=tmp_path / "out",
                                       cloud=None, tuning_logs=None))  # fmt: skip
    with Session(s.path) as sess:
        calls = []
        for i in range(5):
            x = np.arange(-3, 3, dtype=np.float32).reshape(2, 3) * (i + 1)
            got = sess.run({"x": x})
            calls.append((x.copy(), {k: v.copy() for k, v in got.items()}, got))
            want = {"view": x.reshape(3, 2), "relu": np.maximum(x, 0), "relu_again": np.maximum(x, 0),
                    "w_view": w.reshape(-1), "x_again": x}  # fmt: skip
            for k, v in want.items():
                np.testing.assert_array_equal(got[k], v, err_msg=f"call {i}: {k}")
            arrays = list(got.values())
            for a in arrays:
                assert a.flags.writeable and not np.shares_memory(a, x)
                assert not any(np.shares_memory(a, b) for b in arrays if b is not a)
            for v in arrays:  # the caller's to change
                v[...] = -7
        for x, copies, got in calls:  # each call's arrays hold what that call returned, changed by the caller only
            for k, v in got.items():
                assert (v == -7).all(), k
        np.testing.assert_array_equal(sess.run({"x": calls[0][0]})["w_view"], w.reshape(-1))
