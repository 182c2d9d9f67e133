"""ARM (aarch64): cross-compiled artifacts run under qemu-user by the aarch64 TVM runtime, checked
against onnxruntime on x86.

Each artifact runs through the real runtime path on an emulated aarch64 Python
(`tvm-hybrid run ARTIFACT --emulate`, which starts `python -m tvm_hybrid run` in the sysroot),
reading .npy inputs and writing .npy outputs that are compared here.

Tolerance: as in tests/test_models.py — f32 outputs within rtol 1e-4, atol 1e-5 of onnxruntime
(numpy allclose) unless a zoo model states its own (deep conv stacks: atol 1e-4); integer outputs
exactly equal. aarch64 needed no exception of its own (largest differences measured: 3.1e-5 on
yolo_head's decoded boxes, under its stated atol 1e-4; 9.3e-6 on PP-OCR cls's probabilities; the
rest under 3e-6).

Needs aarch64-linux-gnu-g++, qemu-aarch64-static and the aarch64 sysroot
(`tvm-hybrid emulate setup`); scripts/setup.sh installs all three. Without them these
tests skip, except under CI=true, where a skip would hide a broken setup and they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import zoo
from conftest import CLS, assert_close, reference, text_image

from tvm_hybrid import emulate, hostcpu
from tvm_hybrid.targets import resolve

ARM_TARGETS = ("arm64", "arm64-cortex-a55", "arm64-cortex-a76", "arm64-neoverse-n1")
CROSS_CC = "aarch64-linux-gnu-g++"
ELF_MACHINE = {62: "x86_64", 183: "aarch64"}


def _need(what: str) -> None:
    msg = f"{what}; run scripts/setup.sh"
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the ARM tests: {msg}")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def cross_cc() -> None:
    if shutil.which(CROSS_CC) is None:
        _need(f"{CROSS_CC} is not installed")


@pytest.fixture(scope="session")
def emulation(cross_cc) -> emulate.Sysroot:
    if hostcpu.host_arch() == "aarch64":
        pytest.skip("this machine is aarch64: the ARM artifacts run natively in the other tests' way")
    if shutil.which(emulate.ARCHES["aarch64"].emulator) is None:
        _need("qemu-aarch64-static is not installed")
    try:
        return emulate.find_sysroot("aarch64")
    except emulate.RuntimeFailure as e:
        _need(str(e))


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tvm_hybrid", *args],
        capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})},
    )  # fmt: skip


def _elf_machine(path: Path) -> str:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF", path
    return ELF_MACHINE.get(int.from_bytes(head[18:20], "little"), "?")


def run_emulated(artifact: Path, feeds: dict[str, np.ndarray], tmp: Path, *extra: str) -> tuple[dict, dict, str]:
    """`tvm-hybrid run ARTIFACT --emulate --json` on .npy files: (outputs by name, the JSON document, stderr).

    The outputs come in the JSON's (sorted) key order; compare them with ``_in_order``.
    """
    tmp.mkdir(parents=True, exist_ok=True)
    args = []
    for i, (name, arr) in enumerate(feeds.items()):
        f = tmp / f"in{i}.npy"
        np.save(f, arr)
        args.append(f"--input={name}={f}")
    proc = _cli("run", str(artifact), *args, f"--output-dir={tmp / 'out'}", "--emulate", "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["emulated"]["arch"] == "aarch64" and doc["emulated"]["timings_meaningful"] is False
    outs = {name: np.load(o["file"]) for name, o in doc["outputs"].items()}
    return outs, doc, proc.stderr


def _in_order(got: dict, want: dict) -> dict:
    """``got`` in ``want``'s output order (a JSON document's keys are sorted), once the names agree."""
    assert sorted(got) == sorted(want)
    return {k: got[k] for k in want}


@pytest.mark.parametrize("name", ARM_TARGETS)
def test_arm_profile_is_an_aarch64_llvm_target(name):
    prof = resolve(name)
    t = prof.tvm()
    assert t.kind.name == "llvm" and prof.tvm_target["mtriple"] == "aarch64-linux-gnu"
    assert t.attrs["feature.is_aarch64"] and t.attrs["feature.has_asimd"]  # NEON
    # Dot product is armv8.2-a: the named cores have it, the portable armv8-a baseline does not.
    assert bool(t.attrs["feature.has_dotprod"]) == (name != "arm64")
    assert t.attrs["num-cores"] == prof.capacity["cores"]
    assert prof.toolchain["cc"] == CROSS_CC and prof.toolchain["emulator"] == "qemu-aarch64-static"
    assert hostcpu.target_arch(prof.to_dict()) == "aarch64"


# Spread the zoo over the four profiles so each is built and run.
@pytest.mark.parametrize("name", zoo.NAMES)
def test_zoo_model_under_qemu_matches_onnxruntime(name, emulation, artifacts, zoo_files, tmp_path):
    target = ARM_TARGETS[zoo.NAMES.index(name) % len(ARM_TARGETS)]
    z, path = zoo_files(name)
    art = artifacts.get(path, z.input_shapes, target)
    assert _elf_machine(art / "segments" / "0.so") == "aarch64"
    got, doc, _ = run_emulated(art, z.feeds, tmp_path)
    assert [t["placement"] for t in doc["trace"]] == ["device"]
    want = reference(z.model, z.feeds)
    assert_close(_in_order(got, want), want, z.rtol, z.atol)


def test_ppocr_cls_under_qemu_matches_onnxruntime(emulation, artifacts, tmp_path):
    art = artifacts.get(CLS, {"x": (1, 3, 48, 192)}, "arm64-cortex-a76")
    x = text_image(1, 48, 192, seed=5)
    got, doc, stderr = run_emulated(art, {"x": x}, tmp_path, "--repeat", "2")
    want = reference(CLS, {"x": x})
    assert_close(_in_order(got, want), want, rtol=1e-4, atol=1e-5)
    assert next(iter(want.values())).max() > 0.5  # a confident classifier, not a flat output
    # Timing under qemu is reported, and said to be meaningless.
    assert doc["latency_ms"]["runs"] == 2 and "timings under emulation mean nothing" in stderr


def test_multi_target_compile_builds_x86_and_arm_in_one_call(emulation, zoo_files, tmp_path):
    """One call, one JSON summary, one artifact per target; each runs where it belongs and matches."""
    from tvm_hybrid.runtime import Session

    z, path = zoo_files("dw_se")
    shape = "x".join(map(str, z.input_shapes["input"]))
    out = tmp_path / "dist"
    proc = _cli("compile", str(path), "--input", f"input:{shape}", "-t", "x86-64-avx2", "-t", "arm64-cortex-a76",
                "-o", str(out), "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # exactly one JSON document on stdout
    assert [a["target"] for a in doc["artifacts"]] == ["x86-64-avx2", "arm64-cortex-a76"]
    assert sorted(p.name for p in out.iterdir()) == ["arm64-cortex-a76", "x86-64-avx2"]
    assert _elf_machine(out / "x86-64-avx2" / "segments" / "0.so") == "x86_64"
    assert _elf_machine(out / "arm64-cortex-a76" / "segments" / "0.so") == "aarch64"
    want = reference(z.model, z.feeds)
    with Session(out / "x86-64-avx2") as sess:
        assert_close(sess.run(z.feeds), want, z.rtol, z.atol)
    # The ARM artifact as a .tar, as it would be shipped to the board.
    tar = tmp_path / "arm.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(out / "arm64-cortex-a76", arcname="arm64-cortex-a76")
    got, _, _ = run_emulated(tar, z.feeds, tmp_path / "run")
    assert_close(_in_order(got, want), want, z.rtol, z.atol)


def test_missing_cross_compiler_is_a_one_line_error_before_compiling(cross_cc, zoo_files, tmp_path):
    z, path = zoo_files("mlp")
    bin_dir = tmp_path / "bin"  # a PATH with the host's g++ and no cross compiler
    bin_dir.mkdir()
    (bin_dir / "g++").symlink_to(shutil.which("g++"))
    out = tmp_path / "dist"
    proc = _cli("compile", str(path), "-t", "x86-64", "-t", "arm64", "-o", str(out), env={"PATH": str(bin_dir)})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert CROSS_CC in lines[0] and "apt-get install -y g++-aarch64-linux-gnu" in lines[0]
    assert not out.exists()  # refused before anything was built or written


def test_arm_artifact_run_natively_points_at_emulate(cross_cc, artifacts, zoo_files):
    if hostcpu.host_arch() == "aarch64":
        pytest.skip("aarch64 artifacts run natively here")
    z, path = zoo_files("mlp")
    art = artifacts.get(path, z.input_shapes, "arm64")
    proc = _cli("run", str(art), "--input", "x=/nonexistent.npy")
    assert proc.returncode == 5, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "built for aarch64" in line and "--emulate" in line


def test_emulate_without_sysroot_says_how_to_create_it(cross_cc, artifacts, zoo_files, tmp_path):
    if hostcpu.host_arch() == "aarch64":
        pytest.skip("nothing to emulate on aarch64")
    z, path = zoo_files("mlp")
    art = artifacts.get(path, z.input_shapes, "arm64")
    np.save(tmp_path / "x.npy", z.feeds["x"])
    proc = _cli("run", str(art), "--input", f"x={tmp_path / 'x.npy'}", "--emulate",
                env={"TVM_HYBRID_AARCH64_SYSROOT": str(tmp_path / "none")})  # fmt: skip
    assert proc.returncode == 5, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert "tvm-hybrid emulate setup" in line and "TVM_HYBRID_AARCH64_SYSROOT" in line


def test_emulated_run_without_json_says_the_latency_is_not_the_devices(emulation, artifacts, zoo_files, tmp_path):
    z, path = zoo_files("mlp")
    art = artifacts.get(path, z.input_shapes, "arm64")
    np.save(tmp_path / "x.npy", z.feeds["x"])
    proc = _cli("run", str(art), "--input", f"x={tmp_path / 'x.npy'}", "--emulate")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("logits  ") and "emulated with qemu-aarch64-static" in proc.stdout


def test_tuning_an_arm_target_locally_is_refused_without_rpc():
    if hostcpu.host_arch() == "aarch64":
        pytest.skip("on an aarch64 machine ARM timings are real")
    arm = resolve("arm64-cortex-a76").to_dict()
    why = hostcpu.timing_meaningless(arm)
    assert why and "mean nothing" in why and "--rpc-tracker" in why
    with pytest.raises(hostcpu.UsageError, match="rpc-tracker"):
        hostcpu.check_tuning_target(arm, rpc_tracker=None)
    hostcpu.check_tuning_target(arm, rpc_tracker="127.0.0.1:9190")  # a real board measures: allowed
    assert hostcpu.timing_meaningless(resolve("x86-64").to_dict()) is None


def test_a_gpu_profile_with_an_arm_host_is_aarch64_but_not_emulatable():
    """Jetson-class profiles: the CPU side is aarch64 (so not native on x86), the kernels need the GPU."""
    jetson = {"name": "jetson", "tvm_target": {"kind": "cuda", "arch": "sm_87"},
              "tvm_host": {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}}  # fmt: skip
    assert hostcpu.target_arch(jetson) == "aarch64" and not hostcpu.emulatable(jetson)
    assert hostcpu.emulatable(resolve("arm64").to_dict())
    if hostcpu.host_arch() != "aarch64":
        with pytest.raises(hostcpu.RuntimeFailure, match="run it on the device$"):
            hostcpu.check_native(jetson)


def test_fp16_build_under_qemu_matches_onnxruntime(emulation, tmp_path):
    """--precision fp16 on a core with FP16 arithmetic: convolutions read fp16, accumulate fp32."""
    proc = _cli("compile", str(CLS), "--input", "x:2x3x48x192", "-t", "arm64-cortex-a76", "--precision", "fp16",
                "--cloud", "none", "-o", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    art = tmp_path / "out" / "arm64-cortex-a76"
    assert json.loads((art / "manifest.json").read_text())["precision"] == "fp16"
    x = text_image(2, 48, 192, seed=3)
    got, _, _ = run_emulated(art, {"x": x}, tmp_path / "run")
    want = reference(CLS, {"x": x})
    [g], [w] = got.values(), want.values()
    # fp16 operands carry 11 bits: probabilities within 1e-3, the same class
    np.testing.assert_allclose(g, w, atol=1e-3)
    assert (g.argmax(-1) == w.argmax(-1)).all()


def test_int8_qdq_build_under_qemu_matches_onnxruntime_int8(emulation, tmp_path):
    """A model `tvm-hybrid quantize` wrote, built for arm64 with its weights int8, runs as
    onnxruntime runs the same QDQ model: within one quantization step of the output."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import calibration

    calibration.write("cls", tmp_path / "calib", 10)
    qmodel = tmp_path / "cls.int8.onnx"
    proc = _cli("quantize", str(CLS), "-c", str(tmp_path / "calib"), "-o", str(qmodel),
                "--calibration-cache", str(tmp_path / "ranges.json"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = _cli("compile", str(qmodel), "--input", "x:1x3x48x192", "-t", "arm64-cortex-a76", "--cloud", "none",
                "-o", str(tmp_path / "out"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    x = np.load(sorted((tmp_path / "calib").glob("*.npz"))[1])["x"]
    got, _, _ = run_emulated(tmp_path / "out" / "arm64-cortex-a76", {"x": x}, tmp_path / "run")
    want = reference(qmodel, {"x": x})
    [g], [w] = got.values(), want.values()
    # the softmax output's last quantization step is its input's: 1/255 of the range at most
    np.testing.assert_allclose(g, w, atol=1 / 255)
    assert (g.argmax(-1) == w.argmax(-1)).all()


def test_int8_convolutions_with_dot_product_under_qemu(emulation, tmp_path):
    """A QDQ model on an armv8.2 core with the dot product: its convolutions become conv2d_int8
    kernels (sdot, the uint8 activations shifted to int8), and under qemu the int8 build gives
    what the fp32 build of the same QDQ model gives, and onnxruntime's int8 output within one
    quantization step."""
    from conftest import int8_kernels, reference

    from tvm_hybrid.compiler.importer import InputOverride
    from tvm_hybrid.compiler.package import CompileOptions, compile_model

    zm = zoo.qdq_convs()
    path = tmp_path / "qdq.onnx"
    path.write_bytes(zm.model.SerializeToString())
    built = {}
    for target in ("arm64-cortex-a76", "arm64"):
        [s] = compile_model(CompileOptions(model=path, targets=(target,), output=tmp_path / target, cloud=None,
                                           inputs=(InputOverride("x", zm.input_shapes["x"]),), tuning_logs=None))  # fmt: skip
        built[target] = s.path
    assert int8_kernels(built["arm64-cortex-a76"]) == 4
    got, _, _ = run_emulated(built["arm64-cortex-a76"], zm.feeds, tmp_path / "int8")
    fp32, _, _ = run_emulated(built["arm64"], zm.feeds, tmp_path / "fp32")
    want = reference(path, zm.feeds)
    for name in ("y1", "y2"):
        np.testing.assert_allclose(got[name], fp32[name], rtol=1e-5, atol=1e-5 * np.abs(fp32[name]).max())
        assert np.isclose(got[name], want[name], rtol=1e-5, atol=1e-5 * np.abs(want[name]).max()).mean() > 0.98
    assert np.abs(got["y2"] - want["y2"]).max() <= 0.05 + 1e-6  # y2's quantization step
