"""CUDA targets: artifacts hold real device code (SASS for the arch, and PTX), built without a GPU;
running one without a GPU fails in one line; on a GPU (marker ``gpu``) outputs match onnxruntime.

Device code is checked two ways: our own fatbin reader (what `compile` itself verifies) and,
where NVIDIA's cuobjdump is installed (pip: nvidia-cuda-cuobjdump), cuobjdump on the fatbin
extracted from the library — cuobjdump cannot read the library itself, since TVM embeds the
fatbin as data rather than in an ``.nv_fatbin`` section.

GPU tolerance (marker ``gpu``): f32 outputs within rtol 1e-3, atol 1e-4 of onnxruntime on the
CPU (or the zoo model's own, if looser): nvcc compiles with --use_fast_math (``__expf``,
approximate division) and dlight's reductions sum in another order than onnxruntime's.
Integer outputs are exactly equal.
"""

from __future__ import annotations

import importlib.util
import json
import platform
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zoo
from conftest import CLS, assert_close, cli, reference, text_image

from tvm_hybrid.errors import RuntimeFailure, UnsupportedError
from tvm_hybrid.runtime.cuda import gpu_count, runs_on


def _have_nvcc() -> bool:
    from tvm_hybrid.compiler.backends.cuda import find_nvcc

    try:
        find_nvcc()
    except UnsupportedError:
        return False
    return True


needs_nvcc = pytest.mark.skipif(
    not _have_nvcc(), reason="nvcc (CUDA toolkit) not found: CUDA targets cannot be compiled here"
)
CLS_SHAPE = {"x": (1, 3, 48, 192)}
EM_X86_64, EM_AARCH64, EM_CUDA = 62, 183, 190
HOST_MACHINE = {"cuda-sm87": EM_AARCH64, "cuda-sm80": EM_X86_64}


def _elf_machine(blob: bytes) -> int:
    assert blob[:4] == b"\x7fELF", blob[:4]
    return struct.unpack_from("<H", blob, 18)[0]


def _check_device_code(art: Path, target: str) -> dict:
    """The artifact's library holds SASS for the target's arch and PTX for it, every kernel in both."""
    from tvm_hybrid.compiler.backends.cuda import fatbin_entries

    arch = int(target.removeprefix("cuda-sm"))
    m = json.loads((art / "manifest.json").read_text())
    [seg] = m["segments"]
    dc = seg["device_code"]
    assert dc["kind"] == "cuda" and dc["format"] == "fatbin"
    assert dc["arch"] == f"sm_{arch}" and dc["sass"] == [f"sm_{arch}"] and dc["ptx"] == [f"compute_{arch}"]
    # Every TIR function becomes at least one GPU kernel (a split reduction becomes several).
    assert dc["kernels"] >= seg["kernels"]["default"] + seg["kernels"]["tuned"] > 0
    lib = (art / seg["library"]).read_bytes()
    assert _elf_machine(lib) == HOST_MACHINE[target]  # host code for the device's CPU
    entries = fatbin_entries(lib)
    assert sorted((e.kind, e.arch) for e in entries) == [("ptx", arch), ("sass", arch)]
    sass = next(e for e in entries if e.kind == "sass")
    ptx = next(e for e in entries if e.kind == "ptx").payload.decode("ascii", "replace")
    assert _elf_machine(sass.payload) == EM_CUDA  # a cubin: machine code, not text
    assert f".target sm_{arch}" in ptx
    kernels = [ln.split()[-1].rstrip("(") for ln in ptx.splitlines() if ln.startswith(".visible .entry")]
    assert len(kernels) == dc["kernels"]
    for k in kernels:  # the cubin's symbol table names every kernel the PTX has
        assert k.encode() + b"\x00" in sass.payload, k
    return dc


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    spec = importlib.util.find_spec("nvidia")
    for root in spec.submodule_search_locations if spec else []:
        for p in sorted(Path(root).glob("cu*/bin/cuobjdump")):
            return str(p)
    return None


@needs_nvcc
@pytest.mark.parametrize("target", ["cuda-sm87", "cuda-sm80"])
@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_model_compiles_to_sass_and_ptx(name, target, artifacts, zoo_files):
    z, path = zoo_files(name)
    _check_device_code(artifacts.get(path, z.input_shapes, target), target)


@needs_nvcc
@pytest.mark.parametrize("target", ["cuda-sm87", "cuda-sm80"])
def test_ppocr_cls_compiles_to_sass_and_ptx(target, artifacts, tmp_path):
    art = artifacts.get(CLS, CLS_SHAPE, target)
    dc = _check_device_code(art, target)
    assert dc["kernels"] > 30  # MobileNetV3: dozens of fused conv / SE / pooling kernels
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("cuobjdump not installed (pip install nvidia-cuda-cuobjdump); own fatbin reader checked it")
    lib = (art / "segments/0.so").read_bytes()
    start = lib.find(struct.pack("<I", 0xBA55ED50))
    _, _, hsize, fsize = struct.unpack_from("<IHHQ", lib, start)
    fatbin = tmp_path / "device.fatbin"
    fatbin.write_bytes(lib[start : start + hsize + fsize])
    listing = subprocess.run([tool, "--list-elf", "--list-ptx", str(fatbin)], capture_output=True, text=True,
                             check=True).stdout  # fmt: skip
    arch = "sm_" + target.removeprefix("cuda-sm")
    assert f"{arch}.cubin" in listing and f"{arch}.ptx" in listing, listing


@needs_nvcc
def test_cloud_cuda_holds_sass_for_each_listed_arch_and_ptx(artifacts, zoo_files):
    from tvm_hybrid.compiler.backends.cuda import fatbin_entries

    z, path = zoo_files("mlp")
    art = artifacts.get(path, z.input_shapes, "cloud-cuda")
    m = json.loads((art / "manifest.json").read_text())
    assert m["segments"][0]["device_code"]["sass"] == ["sm_80", "sm_86", "sm_89", "sm_90"]
    entries = fatbin_entries((art / "segments/0.so").read_bytes())
    assert sorted((e.kind, e.arch) for e in entries) == [("ptx", 80)] + [("sass", a) for a in (80, 86, 89, 90)]


@needs_nvcc
def test_multi_target_compile_writes_one_artifact_each_with_one_json(tmp_path, zoo_files):
    """x86 and Jetson in one call: one JSON summary; the x86 artifact runs here and matches."""
    z, path = zoo_files("mlp")
    out = tmp_path / "dist"
    shape = "x".join(map(str, z.input_shapes["x"]))
    proc = cli("compile", str(path), "--input", f"x:{shape}", "--target", "x86-64-avx2", "--target", "cuda-sm87",
               "-o", str(out), "--json", check=True)  # fmt: skip
    doc = json.loads(proc.stdout)
    assert [a["target"] for a in doc["artifacts"]] == ["x86-64-avx2", "cuda-sm87"]
    assert sorted(p.name for p in out.iterdir()) == ["cuda-sm87", "x86-64-avx2"]
    _check_device_code(out / "cuda-sm87", "cuda-sm87")
    from tvm_hybrid.runtime import Session

    with Session(out / "x86-64-avx2") as sess:
        assert_close(sess.run(z.feeds), reference(z.model, z.feeds), z.rtol, z.atol)


@needs_nvcc
@pytest.mark.skipif(gpu_count() > 0, reason="a GPU is present: the artifact would run")
def test_running_without_a_gpu_fails_in_one_line_exit_5(artifacts, tmp_path):
    art = artifacts.get(CLS, CLS_SHAPE, "cuda-sm80")
    np.save(tmp_path / "x.npy", text_image(1, 48, 192))
    # A fresh process, as on an edge box: runtime-only TVM, no driver.
    proc = cli("run", str(art), "--input", f"x={tmp_path / 'x.npy'}")
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 5 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("Error: no CUDA device is present") and "sm_80" in lines[0], lines[0]
    # In this process the compile loaded TVM's CUDA runtime (over the stand-in driver): same answer.
    from tvm_hybrid.runtime import Session

    with pytest.raises(RuntimeFailure, match="no CUDA device is present"):
        Session(art)


@needs_nvcc
def test_source_only_cuda_module_is_refused(tmp_path, artifacts, zoo_files):
    """The trap: with no driver, `import tvm` skips its CUDA library and tvm.compile yields CUDA C
    source, not device code. A library built that way (in a fresh process, as TVM does it alone)
    fails the artifact check, as does a real library checked against an arch it was not built for."""
    from tvm_hybrid.compiler.backends.cuda import CudaCodegen, DeviceCompile, verify_device_code
    from tvm_hybrid.targets import resolve

    z, path = zoo_files("mlp")
    plain = tmp_path / "plain.so"
    code = f"""
import sys; sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
import tvm
from tvm.base import _LOADED_LIBS
from tvm_hybrid.compiler import backends, importer
from tvm_hybrid.targets import resolve
assert "tvm_runtime_cuda" not in _LOADED_LIBS or {gpu_count()} > 0
prof = resolve("cuda-sm80")
mod = backends.for_profile(prof).optimize(importer.to_relax(importer.load({str(path)!r}, [importer.InputOverride("x", {z.input_shapes["x"]})])), prof)
with prof.tvm():
    tvm.compile(mod, target=prof.tvm()).export_library({str(plain)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    data = plain.read_bytes()
    if gpu_count() == 0:
        assert b"__global__" in data  # CUDA C source went in instead of a fatbin
    job = DeviceCompile(codegen=CudaCodegen.from_profile(resolve("cuda-sm80")), nvcc="nvcc", kernels=["x"], fatbins=1)
    if gpu_count() == 0:
        with pytest.raises(UnsupportedError, match="lacks SASS sm_80, PTX compute_80"):
            verify_device_code(plain, job, "cuda-sm80")
    with pytest.raises(UnsupportedError, match="nvcc was never called"):
        verify_device_code(plain, DeviceCompile(codegen=job.codegen, nvcc="nvcc"), "cuda-sm80")
    real = artifacts.get(path, z.input_shapes, "cuda-sm80") / "segments/0.so"
    sm86 = DeviceCompile(codegen=CudaCodegen("sm_86", ("sm_86",), "compute_86"), nvcc="nvcc", fatbins=1)
    with pytest.raises(UnsupportedError, match="lacks SASS sm_86, PTX compute_86"):
        verify_device_code(real, sm86, "cuda-sm86")
    stale = DeviceCompile(codegen=job.codegen, nvcc="nvcc", kernels=["not_a_kernel_of_this_model"], fatbins=1)
    with pytest.raises(UnsupportedError, match="lacks kernels not_a_kernel_of_this_model"):
        verify_device_code(real, stale, "cuda-sm80")


def test_compatibility_rules_for_running_device_code():
    """SASS runs on the same major, same or newer minor; PTX JITs on anything as new or newer."""
    sm87 = {"sass": ["sm_87"], "ptx": ["compute_87"]}
    assert runs_on("8.7", sm87)
    assert runs_on("8.9", sm87)  # SASS, same major
    assert runs_on("9.0", sm87) and runs_on("12.0", sm87)  # PTX JIT
    assert not runs_on("8.6", sm87) and not runs_on("7.5", sm87)
    assert not runs_on("9.0", {"sass": ["sm_80"], "ptx": []})
    cloud = {"sass": ["sm_80", "sm_86", "sm_89", "sm_90"], "ptx": ["compute_80"]}
    assert all(runs_on(v, cloud) for v in ("8.0", "8.6", "8.9", "9.0", "10.0")) and not runs_on("7.5", cloud)


@pytest.mark.skipif(gpu_count() > 0, reason="a GPU is present")
def test_tuning_a_cuda_target_without_a_gpu_says_so():
    from tvm_hybrid.compiler.backends.cuda import prepare_tuning
    from tvm_hybrid.targets import resolve

    with pytest.raises(UnsupportedError, match="tuning cuda-sm87 needs an NVIDIA GPU"):
        prepare_tuning(resolve("cuda-sm87"))


def test_profile_for_a_gpu_prefers_its_own_sass_then_ptx():
    from tvm_hybrid.compiler.backends.cuda import profile_for_gpu

    assert profile_for_gpu("8.7", "aarch64") == "cuda-sm87"  # Jetson Orin
    assert profile_for_gpu("8.7", "x86_64") == "cuda-sm86"  # SASS of the same major, x86 host
    assert profile_for_gpu("7.5", "x86_64") == "cuda-sm75"
    assert profile_for_gpu("9.0", "x86_64") == "cuda-sm90"
    assert profile_for_gpu("12.0", "x86_64") == "cuda-sm90"  # Blackwell: PTX JIT
    assert profile_for_gpu("7.0", "x86_64") is None  # Volta: CUDA 13 dropped it


# ----------------------------------------------------------------------------- on a GPU


def _gpu_target() -> str:
    """The built-in CUDA profile for this machine's GPU 0 and CPU."""
    from tvm_hybrid.compiler.backends.cuda import profile_for_gpu
    from tvm_hybrid.runtime.cuda import gpu_compute_capability

    cc = gpu_compute_capability(0)
    name = profile_for_gpu(cc) if cc else None
    if name is None:
        pytest.skip(f"no built-in CUDA profile for compute capability {cc} on {platform.machine()}")
    return name


def _gpu_close(got, want, rtol, atol):
    assert_close(got, want, rtol=max(rtol, 1e-3), atol=max(atol, 1e-4))


@pytest.mark.gpu
@needs_nvcc
@pytest.mark.parametrize("name", zoo.NAMES)
def test_gpu_zoo_model_matches_onnxruntime(name, artifacts, zoo_files):
    from tvm_hybrid.runtime import Session

    z, path = zoo_files(name)
    with Session(artifacts.get(path, z.input_shapes, _gpu_target())) as sess:
        got = sess.run(z.feeds)
        assert sess.trace[0]["ran_on"].startswith("cuda")
    _gpu_close(got, reference(z.model, z.feeds), z.rtol, z.atol)


@pytest.mark.gpu
@needs_nvcc
@pytest.mark.parametrize("shape", [(1, 3, 48, 192), (8, 3, 48, 192)], ids=["1x3x48x192", "8x3x48x192"])
def test_gpu_ppocr_cls_matches_onnxruntime(shape, artifacts):
    from tvm_hybrid.runtime import Session

    x = text_image(shape[0], *shape[2:])
    with Session(artifacts.get(CLS, {"x": shape}, _gpu_target())) as sess:
        got = sess.run({"x": x})
    want = reference(CLS, {"x": x})
    _gpu_close(got, want, 1e-4, 1e-5)
    assert next(iter(want.values())).max() > 0.5


@pytest.mark.gpu
@needs_nvcc
def test_gpu_cli_run_reports_cuda_in_the_trace(artifacts, tmp_path):
    art = artifacts.get(CLS, CLS_SHAPE, _gpu_target())
    x = text_image(1, 48, 192)
    np.save(tmp_path / "x.npy", x)
    proc = cli("run", str(art), "--input", f"x={tmp_path / 'x.npy'}", "--repeat", "5", "--json", check=True)
    doc = json.loads(proc.stdout)
    assert doc["trace"][0]["ran_on"].startswith("cuda")


@pytest.fixture(scope="module")
def cls_fp16(tmp_path_factory):
    """PP-OCR cls built --precision fp16 for the GPU this machine has (sm80 without one)."""
    target = _gpu_target() if gpu_count() > 0 else "cuda-sm80"
    out = tmp_path_factory.mktemp("fp16")
    cli("compile", str(CLS), "--input", "x:1x3x48x192", "-t", target, "--precision", "fp16", "--cloud", "none",
        "-o", str(out), check=True)  # fmt: skip
    return out / target, target


@needs_nvcc
def test_fp16_build_holds_device_code(cls_fp16):
    art, target = cls_fp16
    assert json.loads((art / "manifest.json").read_text())["precision"] == "fp16"
    assert _check_device_code(art, target)["kernels"] > 30


@pytest.mark.gpu
@needs_nvcc
def test_gpu_fp16_build_matches_onnxruntime(cls_fp16):
    from tvm_hybrid.runtime import Session

    x = text_image(1, 48, 192)
    with Session(cls_fp16[0]) as sess:
        [got] = sess.run({"x": x}).values()
    [want] = reference(CLS, {"x": x}).values()
    np.testing.assert_allclose(got, want, atol=1e-3)  # fp16 operands, fp32 accumulation
    assert (got.argmax(-1) == want.argmax(-1)).all()
