"""Shared fixtures: real models, a session-wide cache of compiled artifacts, the onnxruntime reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tvm  # noqa: F401  (the full TVM, compiler included, before any test runs a Session in-process:
# runtime/_tvm.py imports TVM runtime-only when it is the first, and tvm.relax cannot follow it)

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
DET = MODELS / "ch_PP-OCRv4_det_infer.onnx"
CLS = MODELS / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
# One profile for most tests: every x86-64 CI machine since 2013 runs AVX2 code.
TARGET = "x86-64-avx2"

sys.path.insert(0, str(HERE))
# Subprocesses (`python -m tvm_hybrid`, the server) run this checkout's code, whatever is installed.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` run only where the NVIDIA driver reports a GPU."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    from tvm_hybrid.runtime.cuda import gpu_count

    if gpu_count() == 0:
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU (the driver reports none on this machine)")
        for item in items:
            if item.get_closest_marker("gpu"):
                item.add_marker(skip)


def reference(model, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """onnxruntime's outputs, by name: the reference every test compares against."""
    import onnxruntime as ort

    src = model if isinstance(model, (str, Path)) else model.SerializeToString()
    sess = ort.InferenceSession(str(src) if isinstance(src, Path) else src, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def assert_close(got: dict, want: dict, rtol: float, atol: float) -> None:
    """Every output matches: |got - want| <= atol + rtol * |want| (numpy's allclose), same dtype."""
    assert list(got) == list(want), (list(got), list(want))
    for name in want:
        g, w = got[name], want[name]
        assert g.shape == w.shape, (name, g.shape, w.shape)
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
        if np.issubdtype(w.dtype, np.integer) or w.dtype == bool:
            np.testing.assert_array_equal(g, w, err_msg=name)
        else:
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=name)


class ArtifactCache:
    """Compiles each (model, inputs, target) once per test session."""

    def __init__(self, root: Path):
        self.root = root
        self._done: dict[tuple, Path] = {}

    def get(self, model_path: Path, inputs: dict[str, tuple[int, ...]], target: str = TARGET) -> Path:
        from tvm_hybrid.compiler.importer import InputOverride
        from tvm_hybrid.compiler.package import CompileOptions, compile_model

        key = (str(model_path), tuple(sorted(inputs.items())), target)
        if key not in self._done:
            out = self.root / f"a{len(self._done)}"
            [summary] = compile_model(
                CompileOptions(
                    model=model_path,
                    targets=(target,),
                    output=out,
                    inputs=tuple(InputOverride(k, tuple(v)) for k, v in inputs.items()),
                )
            )
            self._done[key] = summary.path
        return self._done[key]


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> ArtifactCache:
    return ArtifactCache(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="session")
def zoo_files(tmp_path_factory):
    """Each zoo model written once as a .onnx file."""
    import zoo

    root = tmp_path_factory.mktemp("zoo")
    cache = {}

    def get(name: str):
        if name not in cache:
            z = zoo.build(name)
            p = root / f"{name}.onnx"
            p.write_bytes(z.model.SerializeToString())
            cache[name] = (z, p)
        return cache[name]

    return get


def int8_kernels(artifact: Path, op: str = "conv2d", library: str | None = None) -> int:
    """The int8 x int8 kernels of ``op`` (conv2d, matmul: compiler/int8.py) in an artifact's
    library (its only one, or ``library``), with what FuseOps put after them."""
    import re

    lib = (artifact / library if library else next((artifact / "segments").glob("*.so"))).read_bytes()
    names = set(re.findall(rb"(?:fused_)?" + op.encode() + rb"_int8(?!w)[a-z0-9_]*", lib))  # not int8w: weights only
    return len({n for n in names if not n.endswith(b"_compute_")})  # a parallel loop's lambda


def cli(*args: str, cwd: Path | None = None, check: bool = False) -> subprocess.CompletedProcess:
    """Run the real `tvm-hybrid` command line in a subprocess."""
    proc = subprocess.run(
        [sys.executable, "-m", "tvm_hybrid", *args], capture_output=True, text=True, cwd=cwd, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tvm-hybrid {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


def text_image(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """A synthetic page of dark strokes on paper, normalized as PP-OCR does: the detector fires on it."""
    rng = np.random.default_rng(seed)
    batch = []
    for _ in range(n):
        img = np.full((h, w, 3), 235.0) + rng.normal(0, 8, (h, w, 3))
        for _ in range(max(2, h // 40)):
            y, x, length = rng.integers(0, h - 16), rng.integers(0, w // 2), rng.integers(w // 4, w // 2)
            for cx in range(x, min(w, x + length), 7):
                img[y : y + 12, cx : cx + 4] = rng.uniform(0, 60)
        img = np.clip(img, 0, 255) / 255.0
        img = (img - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
        batch.append(img.transpose(2, 0, 1))
    return np.stack(batch).astype(np.float32)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`tvm-hybrid serve` in a subprocess on loopback; its stderr (the access log) goes to a file."""

    def __init__(self, artifacts: list[Path], token_file: Path | None = None, *args: str, port: int | None = None):
        import tempfile
        import time
        import urllib.request

        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tvm_hybrid", "serve", *map(str, artifacts), "--port", str(self.port), *args]
        if token_file:
            cmd += ["--token-file", str(token_file)]
        self.log = tempfile.NamedTemporaryFile("w+", prefix="serve-", suffix=".log")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.stderr()}")
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise AssertionError("server did not get ready in 120 s")

    def stderr(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: no goodbye to clients, requests in flight are cut off."""
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="session")
def split_cls(tmp_path_factory):
    """PP-OCR cls for a device with a 600 KiB budget: a device prefix and a cloud suffix."""
    from tvm_hybrid.compiler.importer import InputOverride
    from tvm_hybrid.compiler.package import CompileOptions, PlanSettings, compile_model

    out = tmp_path_factory.mktemp("split")
    summaries = compile_model(
        CompileOptions(model=CLS, targets=(TARGET,), output=out, inputs=(InputOverride("x", (1, 3, 48, 192)),),
                       plan=PlanSettings(memory="600KiB"))  # fmt: skip
    )
    assert [s.target for s in summaries] == [TARGET, "cloud-x86"]
    return out
