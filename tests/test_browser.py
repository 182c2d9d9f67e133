"""The browser: tvm-hybrid.js (runtime/web) running webgpu artifacts in a real headless Chromium.

Chromium's WebGPU here is SwiftShader, a CPU implementation (scripts/setup.sh installs Debian's
chromium): it checks correctness, not speed. Tolerance vs onnxruntime as on Vulkan: rtol 1e-3,
atol 1e-4 (GPU schedules reorder every reduction).
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
import urllib.request

import numpy as np
import pytest
import zoo
from conftest import CLS, DET, Server, assert_close, cli, reference, text_image

from tvm_hybrid.errors import ArtifactError, RuntimeFailure
from tvm_hybrid.runtime.browser import CANDIDATES, run_in_browser

RTOL, ATOL = 1e-3, 1e-4
# WGSL has no i64: ArgMax's int64 output runs in the cloud (the split test below).
ZOO = [n for n in zoo.NAMES if n != "softmax_argmax"]
BROWSER = next((b for b in CANDIDATES if shutil.which(b)), None)
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium (apt-get install chromium; scripts/setup.sh does it)")


def _webgpu(artifacts, zoo_files, name):
    z, path = zoo_files(name)
    return z, artifacts.get(path, z.input_shapes, target="webgpu")


@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_matches_onnxruntime_in_chromium(name, artifacts, zoo_files):
    z, art = _webgpu(artifacts, zoo_files, name)
    res = run_in_browser(art, z.feeds)
    [t] = res["trace"]
    assert t["placement"] == "device" and t["ran_on"].startswith("webgpu"), t
    assert "HeadlessChrome" in res["browser"] and res["adapter"]["architecture"], res
    want = reference(z.model, z.feeds)
    assert_close({k: res["outputs"][k] for k in want}, want, RTOL, max(ATOL, z.atol))


def test_ppocr_models_run_in_chromium_through_the_cli(artifacts, tmp_path):
    """`run --browser` with .npy in and out, as a pipeline would: PP-OCR cls and PP-OCRv4 det."""
    for model, shape in ((CLS, (1, 3, 48, 192)), (DET, (1, 3, 320, 320))):
        art = artifacts.get(model, {"x": shape}, target="webgpu")
        x = text_image(*shape[:1], *shape[2:])
        np.save(tmp_path / "x.npy", x)
        out = tmp_path / f"out-{model.stem}"
        r = cli("run", str(art), "--input", f"x={tmp_path / 'x.npy'}", "--browser", "--output-dir", str(out), "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert [t["placement"] for t in doc["trace"]] == ["device"]
        assert doc["browser"]["adapter"]["architecture"] and doc["latency_ms"]["median"] > 0
        want = reference(model, {"x": x})
        got = {n: np.load(info["file"]) for n, info in doc["outputs"].items()}
        assert_close(got, want, RTOL, ATOL)
        assert next(iter(want.values())).max() > 0.5  # the classifier decides; the detector sees strokes


@pytest.fixture(scope="module")
def split_argmax(zoo_files, tmp_path_factory):
    """softmax_argmax for webgpu: Gemm and Softmax in the browser, ArgMax (int64) in the cloud."""
    from tvm_hybrid.compiler.importer import InputOverride
    from tvm_hybrid.compiler.package import CompileOptions, compile_model

    z, path = zoo_files("softmax_argmax")
    out = tmp_path_factory.mktemp("split-web")
    compile_model(CompileOptions(model=path, targets=("webgpu",), output=out,
                                 inputs=tuple(InputOverride(k, v) for k, v in z.input_shapes.items())))  # fmt: skip
    m = json.loads((out / "webgpu" / "manifest.json").read_text())
    assert [s["placement"] for s in m["segments"]] == ["device", "cloud"]
    token = out / "token.txt"
    token.write_text("s3cret\n")
    return z, out, token


def test_split_model_runs_in_the_browser_with_its_cloud_half_on_serve(split_argmax):
    z, out, token = split_argmax
    srv = Server([out / "cloud-x86"], token, "--cors-origin", "*")
    try:
        res = run_in_browser(out / "webgpu", z.feeds, cloud_url=srv.url, token="s3cret", fallback="off")
        with pytest.raises(RuntimeFailure, match="401"):  # the browser sends the token, or nothing runs
            run_in_browser(out / "webgpu", z.feeds, cloud_url=srv.url, token="wrong", fallback="off")
    finally:
        srv.stop()
    assert [(t["placement"], t["segment"]) for t in res["trace"]] == [("device", 0), ("cloud", 1)]
    assert res["trace"][1]["bytes_sent"] > 0 and res["trace"][1]["ran_on"] == srv.url
    assert_close(res["outputs"], reference(z.model, z.feeds), RTOL, ATOL)


def test_cloud_down_or_hung_is_a_clear_error_within_the_budget(split_argmax):
    """A server that is gone: refused at once. One that accepts and never answers: the call is
    aborted at its budget (AbortController), not left hanging."""
    z, out, _ = split_argmax
    srv = Server([out / "cloud-x86"], None, "--cors-origin", "*")
    url = srv.url
    srv.kill()
    with pytest.raises(RuntimeFailure, match=r"segment 1 \(cloud\) failed: cloud: .*unreachable"):
        run_in_browser(out / "webgpu", z.feeds, cloud_url=url)
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)
    held = []
    stop = threading.Event()

    def accept():
        hung.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(hung.accept()[0])
            except OSError:
                pass

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeFailure, match="no answer within 2000 ms"):
            run_in_browser(out / "webgpu", z.feeds, cloud_url=f"http://127.0.0.1:{hung.getsockname()[1]}", timeout=2.0)
        assert time.monotonic() - t0 < 60
    finally:
        stop.set()
        th.join()
        for c in held:
            c.close()
        hung.close()


def test_tampered_artifact_is_refused_by_the_browser(artifacts, zoo_files, tmp_path):
    """The browser checks every file against the manifest (SubtleCrypto) before using it: exit 4."""
    z, art = _webgpu(artifacts, zoo_files, "mlp")
    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    w = bad / "segments" / "0.weights.bin"
    data = bytearray(w.read_bytes())
    data[len(data) // 2] ^= 0x01
    w.write_bytes(bytes(data))
    np.save(tmp_path / "x.npy", next(iter(z.feeds.values())))
    r = cli("run", str(bad), "--input", str(tmp_path / "x.npy"), "--browser")
    assert r.returncode == 4, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "0.weights.bin does not match its checksum" in lines[0], lines


def test_signature_is_checked_in_the_browser(artifacts, zoo_files, tmp_path):
    """`tvm-hybrid sign`'s Ed25519 signature verified by WebCrypto: the release key passes, any
    other key or an unsigned artifact is refused (exit 4)."""
    from tvm_hybrid.signing import generate_key, sign_artifact

    z, art = _webgpu(artifacts, zoo_files, "mlp")
    signed = tmp_path / "signed"
    shutil.copytree(art, signed)
    _, release_pub, key_id = generate_key(tmp_path / "release.key")
    _, other_pub, _ = generate_key(tmp_path / "other.key")
    res = run_in_browser(art, z.feeds)  # unsigned, no key asked for: runs
    with pytest.raises(ArtifactError, match="not signed"):
        run_in_browser(art, z.feeds, verify_key=release_pub)
    sign_artifact(signed, tmp_path / "release.key")
    res = run_in_browser(signed, z.feeds, verify_key=release_pub)
    assert res["signed_by"] == key_id
    with pytest.raises(ArtifactError, match="not by the trusted key"):
        run_in_browser(signed, z.feeds, verify_key=other_pub)
    m = signed / "manifest.json"
    m.write_text(m.read_text().replace('"float32"', '"float32" ', 1))  # one byte more in the signed manifest
    with pytest.raises(ArtifactError, match="manifest changed after signing"):
        run_in_browser(signed, z.feeds, verify_key=release_pub)


def test_no_browser_is_exit_5_saying_how_to_install_one(artifacts, zoo_files, tmp_path):
    z, art = _webgpu(artifacts, zoo_files, "mlp")
    np.save(tmp_path / "x.npy", next(iter(z.feeds.values())))
    r = cli("run", str(art), "--input", str(tmp_path / "x.npy"), "--browser", str(tmp_path / "no-such-chrome"))
    assert r.returncode == 5, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "apt-get install chromium" in lines[0], lines


def test_serve_answers_cors_preflights_for_the_origins_it_is_given(split_argmax):
    """What a browser asks before a cross-origin infer with a token: allowed for the given origin
    (with the v2 header the client reads exposed), not for another."""
    _, out, _ = split_argmax
    srv = Server([out / "cloud-x86"], None, "--cors-origin", "https://app.example.com")
    try:
        path = srv.url + "/v2/models/x/versions/1/infer"

        def preflight(origin):
            req = urllib.request.Request(path, method="OPTIONS", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,inference-header-content-length"})  # fmt: skip
            try:
                with urllib.request.urlopen(req, timeout=10) as r:
                    return r.status, dict(r.headers)
            except urllib.error.HTTPError as e:
                return e.code, dict(e.headers)

        status, headers = preflight("https://app.example.com")
        assert status == 200 and headers["access-control-allow-origin"] == "https://app.example.com"
        assert "authorization" in headers["access-control-allow-headers"].lower()
        status, headers = preflight("https://evil.example.com")
        assert status == 400 and "access-control-allow-origin" not in {k.lower() for k in headers}
        req = urllib.request.Request(srv.url + "/v2/health/ready", headers={"Origin": "https://app.example.com"})
        with urllib.request.urlopen(req, timeout=10) as r:
            assert "Inference-Header-Content-Length" in r.headers["access-control-expose-headers"]
    finally:
        srv.stop()


def test_kernels_over_webgpus_buffer_limit_are_built_within_it(tmp_path):
    """WebGPU grants 8 storage buffers a kernel. A 9-way Concat and a 9-input Sum (each input
    through a Relu, which fusion joins to them) would be kernels binding 10; the webgpu build
    splits the concat into a tree and unfuses the group, every kernel binds at most 8, and the
    model runs in Chromium as onnxruntime does. A buffer over the profile's size limits is still
    refused, naming it."""
    import onnx
    from onnx import TensorProto, helper

    from tvm_hybrid.compiler.backends.webgpu import _check_limits
    from tvm_hybrid.errors import UnsupportedError
    from tvm_hybrid.targets import resolve

    names = [f"x{i}" for i in range(9)]
    g = helper.make_graph(
        [*(helper.make_node("Relu", [n], [f"r{n}"]) for n in names),
         helper.make_node("Concat", [f"r{n}" for n in names], ["cat"], axis=1),
         helper.make_node("Sum", [f"r{n}" for n in names], ["sum"])],
        "nine", [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in names],
        [helper.make_tensor_value_info("cat", TensorProto.FLOAT, [1, 36]),
         helper.make_tensor_value_info("sum", TensorProto.FLOAT, [1, 4])],
    )  # fmt: skip
    path = tmp_path / "nine.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    r = cli("compile", str(path), "--target", "webgpu", "--cloud", "none", "-o", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    art = tmp_path / "out" / "webgpu"
    [plan] = (art / "segments").glob("*.plan.json")
    bindings = {k: len(v["bindings"]) for k, v in json.loads(plan.read_text())["kernels"].items()}
    assert max(bindings.values()) <= 8 and any("concat" in k for k in bindings), bindings
    feeds = {n: np.random.default_rng(i).standard_normal((1, 4)).astype(np.float32) for i, n in enumerate(names)}
    res = run_in_browser(art, feeds)
    want = reference(path, feeds)
    assert_close({k: res["outputs"][k] for k in want}, want, RTOL, ATOL)

    profile = resolve("webgpu")
    plan = {"kernels": {}, "requires": {"largest_buffer_bytes": 300 << 20}}
    with pytest.raises(UnsupportedError, match=r"314572800-byte buffer .*134217728 bytes a bound buffer range"):
        _check_limits(plan, profile)


def test_demo_page_shows_boxes_and_the_trace_as_a_person_uses_it(tmp_path):
    """`serve CLOUD --web DEVICE`: a person opens /web/, picks a rendered page of five text lines;
    the detector's device half runs on WebGPU, its cloud half on the server, and the screenshot
    shows five red boxes over the lines and the trace (device and cloud rows, bytes sent)."""
    pw = pytest.importorskip("playwright.sync_api", reason="pip install playwright (the test extra)")
    import random
    import sys
    from pathlib import Path

    from PIL import Image

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from calibration import line_image

    out = tmp_path / "det"
    r = cli("compile", str(DET), "--target", "webgpu", "--input", "x:1x3x320x320", "--memory", "12MiB", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rng = random.Random(3)
    page_img = Image.new("RGB", (480, 320), (245, 245, 240))
    y = 12
    for _ in range(5):
        line = line_image(rng, 26)
        if line.width > 460:
            line = line.resize((460, line.height * 460 // line.width))
        page_img.paste(line, (10, y))
        y += line.height + 24
    png = tmp_path / "page.png"
    page_img.save(png)
    srv = Server([out / "cloud-x86"], None, "--web", str(out / "webgpu"))
    shot = tmp_path / "demo.png"
    try:
        with pw.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which(BROWSER), args=["--enable-unsafe-webgpu", "--no-sandbox"])
            try:
                page = browser.new_page(viewport={"width": 1200, "height": 800})
                page.goto(srv.url + "/web/")
                page.wait_for_function("document.getElementById('status').textContent !== '—'", timeout=120_000)
                assert page.text_content("#status") == "pick an image", page.text_content("#status")
                page.set_input_files("#file", str(png))
                page.wait_for_function("['done', 'error'].includes(document.body.dataset.state)", timeout=300_000)
                status, result = page.text_content("#status"), page.text_content("#result")
                rows = page.eval_on_selector_all("#trace tbody tr", "rs => rs.map(r => r.className)")
                page.screenshot(path=str(shot))
            finally:
                browser.close()
    finally:
        srv.stop()
    assert status.startswith("done in") and "bytes sent" in status, status
    assert rows == ["device", "cloud"] and result == "5 text regions found", (rows, result)
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    red = (img[..., 0] > 190) & (img[..., 1] < 90) & (img[..., 2] < 90)
    ys = np.nonzero(red.any(axis=1))[0]
    bands = 1 + int(np.sum(np.diff(ys) > 4))  # runs of rows with red: each text line's box edges
    assert red.sum() > 1000 and bands >= 5, (int(red.sum()), bands)


def test_no_webgpu_adapter_is_exit_5_or_the_cloud(split_argmax, monkeypatch):
    """Chromium without --enable-unsafe-webgpu on Linux gives no adapter: a device segment with no
    cloud copy cannot run (exit 5 saying so), never a silent wrong answer."""
    from tvm_hybrid.runtime import browser

    z, out, _ = split_argmax
    monkeypatch.setattr(browser, "FLAGS", tuple(f for f in browser.FLAGS if f != "--enable-unsafe-webgpu"))
    with pytest.raises(RuntimeFailure, match="segment 0 .*no WebGPU adapter"):
        run_in_browser(out / "webgpu", z.feeds)
